//! The few bpf(2) commands the bench needs, as raw syscalls (no loader library): reading the
//! agent's pinned maps, counting their memory, and loading tiny hand-assembled XDP programs.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{Context, Result, bail};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_MAP_GET_NEXT_KEY: i64 = 4;
const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_GET: i64 = 7;
const BPF_MAP_GET_FD_BY_ID: i64 = 14;
const BPF_LINK_CREATE: i64 = 28;

const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

pub const XDP_DROP: i32 = 1;

/// `bpf(cmd, attr, size)`; `attr` is the command's prefix of `union bpf_attr`.
fn sys<T>(cmd: i64, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a properly sized, initialised #[repr(C)] prefix of union bpf_attr; the
    // kernel reads at most `size_of::<T>()` bytes and zero-fills the rest of its copy.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<u8>(),
            size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a file descriptor the kernel just returned to us.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Opens a pinned object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("path with NUL")?;
    let mut a = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = sys(BPF_OBJ_GET, &mut a).with_context(|| format!("opening {}", path.display()))?;
    Ok(owned(fd))
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_MAP_LOOKUP_ELEM`: `Ok(false)` when the key is absent.
pub fn lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> Result<bool> {
    let mut a = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match sys(BPF_MAP_LOOKUP_ELEM, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e).context("map lookup"),
    }
}

/// `BPF_MAP_DELETE_ELEM`; an absent key is not an error.
pub fn delete(map: &OwnedFd, key: &[u8]) -> Result<()> {
    let mut a = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    };
    match sys(BPF_MAP_DELETE_ELEM, &mut a) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e).context("map delete"),
    }
}

/// Every key of a map, `key_size` bytes each (`BPF_MAP_GET_NEXT_KEY` from no key).
pub fn keys(map: &OwnedFd, key_size: usize) -> Result<Vec<Vec<u8>>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut next = vec![0u8; key_size];
        let mut a = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: out.last().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match sys(BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(_) => out.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e).context("map get_next_key"),
        }
    }
}

/// A map by id (`BPF_MAP_GET_FD_BY_ID`), e.g. an inner map named by a map-in-map lookup.
pub fn map_by_id(id: u32) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut a = Attr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    Ok(owned(
        sys(BPF_MAP_GET_FD_BY_ID, &mut a).with_context(|| format!("map id {id}"))?,
    ))
}

/// A field of `/proc/self/fdinfo/<fd>` (what `bpftool map show` prints as `bytes_memlock`
/// is the `memlock` line).
pub fn fdinfo(fd: &OwnedFd, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .context("reading fdinfo")?;
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == field).then(|| v.trim().parse().ok())?
        })
        .with_context(|| format!("no {field} in fdinfo"))
}

/// `memlock` of every map pinned in `dir`, plus the inner maps of the map-in-map `outer`
/// (whose values are inner map ids when read from userspace). Returns (name, maps, bytes).
pub fn pinned_memlock(dir: &Path, outer: &str) -> Result<Vec<(String, usize, u64)>> {
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let fd = obj_get(&dir.join(&name))?;
        out.push((name.clone(), 1, fdinfo(&fd, "memlock")?));
        if name == outer {
            let (mut n, mut bytes) = (0usize, 0u64);
            for key in keys(&fd, 4)? {
                let mut id = [0u8; 4];
                if lookup(&fd, &key, &mut id)? {
                    let inner = map_by_id(u32::from_ne_bytes(id))?;
                    bytes += fdinfo(&inner, "memlock")?;
                    n += 1;
                }
            }
            out.push((format!("{name} inner tables"), n, bytes));
        }
    }
    Ok(out)
}

/// A one-entry per-CPU array of u64 (a packet counter).
pub fn percpu_counter() -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut a = Attr {
        map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        map_flags: 0,
    };
    Ok(owned(
        sys(BPF_MAP_CREATE, &mut a).context("creating a per-CPU array")?,
    ))
}

/// Sum over CPUs of entry 0 of a [`percpu_counter`].
pub fn read_counter(map: &OwnedFd) -> Result<u64> {
    let cpus = possible_cpus()?;
    let mut values = vec![0u8; 8 * cpus];
    if !lookup(map, &0u32.to_ne_bytes(), &mut values)? {
        bail!("counter entry missing");
    }
    Ok(values
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .sum())
}

fn possible_cpus() -> Result<usize> {
    // "0-1" or "0,2-3": the highest index + 1.
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading /sys/devices/system/cpu/possible")?;
    let max = text
        .trim()
        .split([',', '-'])
        .filter_map(|s| s.parse::<usize>().ok())
        .max()
        .context("parsing possible CPUs")?;
    Ok(max + 1)
}

/// One eBPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0xf);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

/// An XDP program that adds 1 to entry 0 of `counter` and returns `action`:
/// ```text
/// r1 = map; *(u32 *)(r10 - 4) = 0; r2 = r10 - 4; r0 = map_lookup_elem(r1, r2)
/// if r0 != 0 { *(u64 *)r0 += 1 }  (a per-CPU value: no atomics needed)
/// return action
/// ```
pub fn load_counting_xdp(counter: &OwnedFd, action: i32) -> Result<OwnedFd> {
    let map_fd = counter.as_raw_fd();
    let prog = [
        insn(0x18, 1, 1, 0, map_fd), // ld_imm64 r1, map fd (BPF_PSEUDO_MAP_FD)
        insn(0, 0, 0, 0, 0),
        insn(0x62, 10, 0, -4, 0),    // *(u32 *)(r10 - 4) = 0
        insn(0xbf, 2, 10, 0, 0),     // r2 = r10
        insn(0x07, 2, 0, 0, -4),     // r2 += -4
        insn(0x85, 0, 0, 0, 1),      // call bpf_map_lookup_elem
        insn(0x15, 0, 0, 3, 0),      // if r0 == 0 goto +3
        insn(0x79, 1, 0, 0, 0),      // r1 = *(u64 *)(r0 + 0)
        insn(0x07, 1, 0, 0, 1),      // r1 += 1
        insn(0x7b, 0, 1, 0, 0),      // *(u64 *)(r0 + 0) = r1
        insn(0xb7, 0, 0, 0, action), // r0 = action
        insn(0x95, 0, 0, 0, 0),      // exit
    ];
    load_xdp(&prog, "kplb_bench_cnt")
}

fn load_xdp(insns: &[u64], name: &str) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut a = Attr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
    };
    match sys(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "loading XDP program {name}: {e}\nverifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// Attaches `prog` to interface `ifindex` with a BPF link (driver mode, which veth supports);
/// the program stays attached while the returned fd is open.
pub fn attach_xdp(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut a = Attr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: 0,
    };
    Ok(owned(
        sys(BPF_LINK_CREATE, &mut a).context("attaching XDP (BPF_LINK_CREATE)")?,
    ))
}

const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;

/// A program by id (`BPF_PROG_GET_FD_BY_ID`), e.g. the one attached to an interface.
pub fn prog_by_id(id: u32) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut a = Attr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    Ok(owned(
        sys(BPF_PROG_GET_FD_BY_ID, &mut a).with_context(|| format!("program id {id}"))?,
    ))
}

/// An XDP program that only returns XDP_PASS: the harness floor.
pub fn load_xdp_pass() -> Result<OwnedFd> {
    let prog = [
        insn(0xb7, 0, 0, 0, 2), // r0 = XDP_PASS
        insn(0x95, 0, 0, 0, 0), // exit
    ];
    load_xdp(&prog, "kplb_bench_pass")
}

/// One `BPF_PROG_TEST_RUN`: (verdict, the kernel's duration per iteration in ns, bytes out).
/// `ctx` is a `struct xdp_md` (ingress ifindex, resolved in the calling thread's netns).
/// The packet comes back in `out` (whose length is the output buffer size).
pub fn test_run(
    prog: &OwnedFd,
    data: &[u8],
    repeat: u32,
    ctx: Option<&[u8]>,
    out: &mut [u8],
) -> Result<(u32, u32, u32)> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        // Explicit: the kernel rejects an attr whose bytes past the command's fields are not
        // zero, and implicit padding is uninitialised.
        _pad: u32,
    }
    let mut a = Attr {
        prog_fd: prog.as_raw_fd() as u32,
        retval: 0,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        duration: 0,
        ctx_size_in: ctx.map_or(0, |c| c.len() as u32),
        ctx_size_out: 0,
        ctx_in: ctx.map_or(0, |c| c.as_ptr() as u64),
        ctx_out: 0,
        flags: 0,
        cpu: 0,
        batch_size: 0,
        _pad: 0,
    };
    sys(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    Ok((a.retval, a.duration, a.data_size_out))
}
