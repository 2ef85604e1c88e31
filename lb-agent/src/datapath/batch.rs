//! `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` on maps with `u32` keys and values (the
//! Maglev outer map: values are inner-map fds), which aya does not wrap.
//!
//! The kernel processes elements in order and stops at the first failure, reporting how many
//! it did; the rest are retried after it so each element gets its own outcome.

use std::os::fd::{AsRawFd as _, BorrowedFd};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's ENOTSUPP (not in libc): the map type has no batch operations.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[derive(Debug)]
pub enum Failed {
    /// This kernel or map type has no batch operation: do it one element at a time.
    Unsupported,
    Os(std::io::Error),
}

/// Updates `keys[i]` to `values[i]` (`BPF_ANY`).
pub fn update(map: BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> Vec<Result<(), Failed>> {
    assert_eq!(keys.len(), values.len());
    run(BPF_MAP_UPDATE_BATCH, map, keys, Some(values))
}

/// Deletes `keys`; a missing key fails with `ENOENT` (and the others still go).
pub fn delete(map: BorrowedFd<'_>, keys: &[u32]) -> Vec<Result<(), Failed>> {
    run(BPF_MAP_DELETE_BATCH, map, keys, None)
}

fn run(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[u32],
    values: Option<&[u32]>,
) -> Vec<Result<(), Failed>> {
    let mut out = Vec::with_capacity(keys.len());
    while out.len() < keys.len() {
        let start = out.len();
        let rest = &keys[start..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            values: values.map_or(0, |v| v[start..].as_ptr() as u64),
            count: u32::try_from(rest.len()).unwrap_or(u32::MAX),
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` keys (and values) that outlive the call; the kernel
        // only reads them and writes `count` back.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let done = (attr.count as usize).min(rest.len());
        if rc == 0 {
            out.extend((0..rest.len()).map(|_| Ok(())));
            break;
        }
        let err = std::io::Error::last_os_error();
        out.extend((0..done).map(|_| Ok(())));
        let unsupported = done == 0
            && start == 0
            && matches!(
                err.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
            );
        if unsupported {
            out.extend(keys.iter().map(|_| Err(Failed::Unsupported)));
            break;
        }
        if done < rest.len() {
            out.push(Err(Failed::Os(err)));
        }
    }
    out
}
