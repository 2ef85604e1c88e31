//! `ip netns exec` runs the agent in a private mount namespace with a fresh sysfs on /sys, which
//! hides /sys/fs/bpf and /sys/fs/cgroup. Pins must live on the host's bpffs (a new bpffs mount
//! would be a separate instance that dies with the namespace), so when the configured paths are
//! not visible the agent joins PID 1's mount namespace. The network namespace is untouched.

use std::{
    ffi::CString,
    fs, io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use tracing::info;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `dir` (or, if it does not exist yet, its nearest existing ancestor) is on bpffs.
pub fn on_bpffs(dir: &Path) -> bool {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            return false;
        }
    }
    let Ok(c) = CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a valid C string into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) }) == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Joins the mount namespace of the nearest ancestor process that has a different one (the
/// shell or harness that ran `ip netns exec`), if the cgroup or bpffs path is hidden here.
/// Must run before any thread starts (setns(CLONE_NEWNS) needs a single thread).
pub fn join_host_if_hidden(cgroup: &Path, bpffs_dir: &Path) -> io::Result<bool> {
    let visible = || cgroup.exists() && on_bpffs(bpffs_dir);
    if visible() {
        return Ok(false);
    }
    let own = fs::metadata("/proc/self/ns/mnt")?.ino();
    let Some(pid) = ancestors()
        .find(|pid| fs::metadata(format!("/proc/{pid}/ns/mnt")).is_ok_and(|m| m.ino() != own))
    else {
        return Ok(false);
    };
    let f = fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    // SAFETY: plain syscall on an owned fd.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The cwd still points into the old namespace's tree.
    let _ = std::env::set_current_dir("/");
    info!(
        pid,
        "joined an ancestor's mount namespace: the bpffs/cgroup paths were hidden by a private /sys"
    );
    Ok(visible())
}

/// Parent, grandparent, ... up to (excluding) pid 1.
fn ancestors() -> impl Iterator<Item = u32> {
    let mut pid = std::process::id();
    std::iter::from_fn(move || {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 4 is the ppid; the command (field 2) may contain spaces, so split after ')'.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid > 1).then(|| {
            pid = ppid;
            ppid
        })
    })
}
