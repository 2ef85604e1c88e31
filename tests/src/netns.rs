//! Named network namespaces (the `ip netns` convention: bind mounts under /run/netns) and
//! running code or commands inside them.
//!
//! Commands enter a namespace with setns(2) in the forked child instead of `ip netns exec`:
//! the latter also remounts /sys in a private mount namespace, which hides bpffs
//! (/sys/fs/bpf) and the cgroup2 mount from the agent. The price: /sys/class/net inside a
//! spawned process still shows the host's interfaces (use netlink or if_nametoindex).

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::{self, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context, Result, anyhow, bail};

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// `ip netns add NAME`.
pub fn add(name: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "add", name])
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What `ip netns del` does: detach the bind mount and remove the file. The namespace dies
/// with its last process, taking its interfaces (and their peers) along.
pub fn delete(name: &str) -> Result<()> {
    let p = path(name);
    let c = CString::new(p.to_string_lossy().as_bytes()).context("netns path with NUL")?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = io::Error::last_os_error();
        // EINVAL: not a mount point (half-created namespace); still remove the file.
        if err.raw_os_error() != Some(libc::EINVAL) && err.kind() != io::ErrorKind::NotFound {
            return Err(err).with_context(|| format!("umount {}", p.display()));
        }
    }
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

fn open(name: &str) -> Result<File> {
    File::open(path(name)).with_context(|| format!("opening netns {name}"))
}

/// Runs `f` on a fresh thread that has joined the namespace; the calling thread is untouched.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = open(name)?;
    thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: `ns` is an open netns fd; setns only affects this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error()).context("setns");
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread inside netns {name} panicked"))?
    })
}

/// Writes sysctls (`net.ipv4.ip_forward` style keys) inside the namespace: /proc/sys/net
/// shows the namespace of the thread that opens it.
pub fn sysctls(name: &str, settings: &[(&str, &str)]) -> Result<()> {
    run_in(name, || {
        for (key, value) in settings {
            let file = Path::new("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&file, value).with_context(|| format!("sysctl {key}={value}"))?;
        }
        Ok(())
    })
}

/// Runs `ip -n NAME -batch -` with one command per line (stops at the first failure).
pub fn ip_batch(name: &str, commands: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", name, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ip -batch")?;
    let mut stdin = child.stdin.take().context("ip stdin")?;
    stdin
        .write_all(commands.join("\n").as_bytes())
        .context("writing ip batch")?;
    drop(stdin);
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!(
            "ip -n {name} -batch failed: {}\nbatch:\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            commands.join("\n")
        );
    }
    Ok(())
}

/// A command that runs `argv` inside netns `name` and, when given, inside cgroup v2 directory
/// `cgroup` (socket-level load balancing only sees processes in the node's cgroup subtree).
pub fn command(name: &str, cgroup: Option<&Path>, argv: &[&str]) -> Result<Command> {
    let (program, args) = argv.split_first().context("empty command line")?;
    let ns = open(name)?;
    let procs = cgroup
        .map(|cg| {
            let file = cg.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&file)
                .with_context(|| format!("opening {}", file.display()))
        })
        .transpose()?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only makes async-signal-safe syscalls on fds it owns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}
