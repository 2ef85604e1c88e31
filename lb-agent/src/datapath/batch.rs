//! `BPF_MAP_UPDATE_BATCH`, which aya does not wrap: many elements in one syscall (and, for
//! map-in-map types, one RCU grace period instead of one per element).
//!
//! The kernel processes elements in order and stops at the first failure, reporting how many
//! it did; the rest are retried after it so each element gets its own outcome.

use std::os::fd::{AsRawFd as _, BorrowedFd};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
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

/// `union bpf_attr`'s element member (`BPF_MAP_UPDATE_ELEM`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Sets `key` to `value` (`BPF_ANY`) with a plain syscall: usable from any thread with just an
/// fd (aya's typed maps need the map object).
pub fn update_one<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_ref(value) as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `attr` points at a key and a value of the map's sizes that outlive the call.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }
}

/// The `bpf(2)` syscall with `attr` as its attribute union member.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` reads and writes through it.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the pointers inside `attr`; its size is passed along.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<A>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Debug)]
pub enum Failed {
    /// This kernel or map type has no batch operation: do it one element at a time.
    Unsupported,
    Os(std::io::Error),
}

/// Sets `keys[i]` to `values[i]` (`BPF_ANY`). `K` and `V` must be the map's key and value
/// layouts (plain `#[repr(C)]` data; for map-in-map values, `u32` fds).
pub fn update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Vec<Result<(), Failed>> {
    assert_eq!(keys.len(), values.len());
    let mut out = Vec::with_capacity(keys.len());
    while out.len() < keys.len() {
        let start = out.len();
        let rest = keys.len() - start;
        let mut attr = BatchAttr {
            keys: keys[start..].as_ptr() as u64,
            values: values[start..].as_ptr() as u64,
            count: u32::try_from(rest).unwrap_or(u32::MAX),
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` keys and values that outlive the call; the kernel
        // only reads them and writes `count` back.
        let rc = unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) };
        let done = (attr.count as usize).min(rest);
        let Err(err) = rc else {
            out.extend((0..rest).map(|_| Ok(())));
            break;
        };
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
        if done < rest {
            out.push(Err(Failed::Os(err)));
        }
    }
    out
}
