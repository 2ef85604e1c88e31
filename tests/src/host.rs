//! Host prerequisites shared by every lab in this process: root, `ip`, a cgroup v2 mount and
//! bpffs at /sys/fs/bpf. Prepared once per process, under a file lock so that concurrent test
//! processes do not mount things twice.

use std::{
    ffi::CString,
    fs::{self, File},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, Result, anyhow, bail};

/// Where bpffs must be mounted; the agents pin under `<BPFFS>/<lab prefix>-<node>`.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where the lab mounts cgroup v2 itself when the host has no cgroup2 mount.
pub const OWN_CGROUP2_MOUNT: &str = "/run/kplb/cgroup2";
const LOCK_FILE: &str = "/run/kplb/lab.lock";

/// What the labs of this process rely on.
#[derive(Debug)]
pub struct Host {
    /// Root of the cgroup v2 hierarchy used for every lab cgroup.
    pub cgroup2: PathBuf,
    /// True when the lab had to mount cgroup2 itself (at [`OWN_CGROUP2_MOUNT`]).
    pub mounted_cgroup2: bool,
}

static HOST: OnceLock<Result<Host, String>> = OnceLock::new();

/// The prepared host, or why it could not be prepared (the error is remembered).
pub fn host() -> Result<&'static Host> {
    HOST.get_or_init(|| prepare().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn prepare() -> Result<Host> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("not running as root (euid 0)");
    }
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .context("running `ip -V` (iproute2 missing?)")?;
    if !ip.status.success() {
        bail!("`ip -V` failed");
    }
    let _lock = HostLock::acquire()?;
    ensure_bpffs()?;
    let (cgroup2, mounted_cgroup2) = match find_mount("cgroup2")? {
        Some(path) => (path, false),
        None => {
            mount("none", Path::new(OWN_CGROUP2_MOUNT), "cgroup2")?;
            eprintln!("kplb lab: no cgroup2 mount found; mounted one at {OWN_CGROUP2_MOUNT}");
            (PathBuf::from(OWN_CGROUP2_MOUNT), true)
        }
    };
    // The first `ip netns add` turns /run/netns into a shared mount; doing that from several
    // labs at once stacks mounts, so do it once here, under the lock.
    if find_mount_at(Path::new("/run/netns"))?.is_none() {
        let probe = format!("{}-{}-hostprobe", crate::cleanup::STEM, std::process::id());
        crate::netns::add(&probe)?;
        crate::netns::delete(&probe)?;
    }
    Ok(Host {
        cgroup2,
        mounted_cgroup2,
    })
}

/// An exclusive flock on [`LOCK_FILE`], released on drop (when the file closes).
pub(crate) struct HostLock {
    _file: File,
}

impl HostLock {
    pub(crate) fn acquire() -> Result<Self> {
        let dir = Path::new(LOCK_FILE)
            .parent()
            .context("lock file has no parent")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        // SAFETY: the fd is open for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("flock on the lab lock");
        }
        Ok(Self { _file: file })
    }
}

fn ensure_bpffs() -> Result<()> {
    let bpffs = Path::new(BPFFS);
    if find_mount_at(bpffs)?.as_deref() == Some("bpf") {
        return Ok(());
    }
    mount("bpf", bpffs, "bpf")
}

fn mount(source: &str, target: &Path, fstype: &str) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let c = |s: &str| CString::new(s).context("path with NUL");
    let (src, dst, ty) = (c(source)?, c(&target.to_string_lossy())?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mount -t {fstype} {source} {}", target.display()));
    }
    Ok(())
}

/// (mount point, fs type) of every mount, from /proc/self/mountinfo.
fn mounts() -> Result<Vec<(PathBuf, String, String)>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ');
            let root = l.nth(3)?;
            let mount_point = l.next()?;
            let fstype = right.split(' ').next()?;
            Some((
                PathBuf::from(unescape(mount_point)),
                fstype.to_owned(),
                unescape(root),
            ))
        })
        .collect())
}

/// The fs type mounted at `path` (the topmost mount), if any.
fn find_mount_at(path: &Path) -> Result<Option<String>> {
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|(p, _, _)| p == path)
        .map(|(_, ty, _)| ty))
}

/// The first mount of `fstype` that shows its filesystem's root (a cgroup namespace's
/// root counts), else any mount of that type.
fn find_mount(fstype: &str) -> Result<Option<PathBuf>> {
    let all: Vec<_> = mounts()?
        .into_iter()
        .filter(|(_, ty, _)| ty == fstype)
        .collect();
    let root = all.iter().find(|(_, _, root)| root == "/");
    Ok(root.or(all.first()).map(|(p, _, _)| p.clone()))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
