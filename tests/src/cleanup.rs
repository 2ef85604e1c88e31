//! Naming and removal of everything a lab creates on the host.
//!
//! Every resource carries the lab's prefix `kplab-<pid>-<n>`: netns `<prefix>-<name>`, cgroup
//! `<cgroup2>/<prefix>`, bpffs dirs `/sys/fs/bpf/<prefix>-<node>`, scratch dir
//! `$TMPDIR/<prefix>`. The pid lets [`cleanup_stale`] tell leftovers of crashed runs from the
//! labs of live test processes.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};

use crate::{host, netns};

pub const STEM: &str = "kplab";

/// A prefix unique among the labs of all processes on this host.
pub fn new_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{STEM}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `kplab-<pid>-<token>[-rest]` -> (`kplab-<pid>-<token>`, pid).
fn parse_prefix(name: &str) -> Option<(String, u32)> {
    let mut parts = name.splitn(4, '-');
    let (stem, pid, token) = (parts.next()?, parts.next()?, parts.next()?);
    if stem != STEM || token.is_empty() {
        return None;
    }
    let pid = pid.parse().ok()?;
    Some((format!("{stem}-{pid}-{token}"), pid))
}

fn belongs(name: &str, prefix: &str) -> bool {
    name == prefix
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// Directories whose entries may belong to a lab.
fn places() -> Result<[PathBuf; 4]> {
    let host = host::host()?;
    Ok([
        PathBuf::from(netns::NETNS_DIR),
        host.cgroup2.clone(),
        PathBuf::from(host::BPFFS),
        std::env::temp_dir(),
    ])
}

fn entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Everything on the host that still carries `prefix`.
pub fn leftovers(prefix: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for dir in places()? {
        found.extend(
            entries(&dir)
                .into_iter()
                .filter(|n| belongs(n, prefix))
                .map(|n| dir.join(n)),
        );
    }
    Ok(found)
}

/// Removes leftovers of labs whose creating process is gone. Returns the prefixes removed.
pub fn cleanup_stale() -> Result<Vec<String>> {
    host::host()?; // prepares the host (which takes the lock itself) before we take it
    let _lock = host::HostLock::acquire()?;
    let mut stale: Vec<String> = places()?
        .iter()
        .flat_map(|dir| entries(dir))
        .filter_map(|name| parse_prefix(&name))
        .filter(|(_, pid)| !Path::new(&format!("/proc/{pid}")).exists())
        .map(|(prefix, _)| prefix)
        .collect();
    stale.sort();
    stale.dedup();
    for prefix in &stale {
        remove_prefix(prefix).with_context(|| format!("removing stale lab {prefix}"))?;
    }
    Ok(stale)
}

/// Kills every process in the lab's cgroups, then deletes its namespaces, cgroups, bpffs
/// dirs and scratch dir. Best effort: carries on past failures and reports them together.
pub fn remove_prefix(prefix: &str) -> Result<()> {
    let mut errors = Vec::new();
    let host = host::host()?;
    let cgroup = host.cgroup2.join(prefix);
    if cgroup.exists()
        && let Err(e) = kill_cgroup(&cgroup)
    {
        errors.push(format!("{e:#}"));
    }
    for name in entries(Path::new(netns::NETNS_DIR))
        .iter()
        .filter(|n| belongs(n, prefix))
    {
        if let Err(e) = netns::delete(name) {
            errors.push(format!("{e:#}"));
        }
    }
    if cgroup.exists()
        && let Err(e) = remove_cgroup_tree(&cgroup)
    {
        errors.push(format!("{e:#}"));
    }
    for dir in [Path::new(host::BPFFS).to_path_buf(), std::env::temp_dir()] {
        for name in entries(&dir).iter().filter(|n| belongs(n, prefix)) {
            let path = dir.join(name);
            let res = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            if let Err(e) = res.or_else(ignore_not_found) {
                errors.push(format!("removing {}: {e}", path.display()));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("cleanup of {prefix}: {}", errors.join("; ")))
    }
}

fn ignore_not_found(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// SIGKILLs the whole subtree and waits until it is empty.
pub fn kill_cgroup(cgroup: &Path) -> Result<()> {
    let kill_file = cgroup.join("cgroup.kill");
    if kill_file.exists() {
        fs::write(&kill_file, "1").with_context(|| format!("writing {}", kill_file.display()))?;
    } else {
        // Kernels before 5.14: kill what is listed, repeatedly, until the subtree is empty.
        for pid in procs_in_tree(cgroup) {
            // SAFETY: plain kill(2); these pids were just read from the lab's own cgroups.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(cgroup) {
        if Instant::now() > deadline {
            return Err(anyhow!(
                "processes {:?} still in {} after SIGKILL",
                procs_in_tree(cgroup),
                cgroup.display()
            ));
        }
        if !kill_file.exists() {
            for pid in procs_in_tree(cgroup) {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn populated(cgroup: &Path) -> bool {
    match fs::read_to_string(cgroup.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l == "populated 1"),
        Err(_) => !procs_in_tree(cgroup).is_empty(),
    }
}

fn procs_in_tree(cgroup: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for child in subdirs(cgroup) {
        pids.extend(procs_in_tree(&child));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// rmdir children first; a cgroup can stay busy for a moment after its last process exits.
fn remove_cgroup_tree(cgroup: &Path) -> Result<()> {
    for child in subdirs(cgroup) {
        remove_cgroup_tree(&child)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(cgroup).or_else(ignore_not_found) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", cgroup.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_match() {
        assert_eq!(
            parse_prefix("kplab-12-3-node1"),
            Some(("kplab-12-3".into(), 12))
        );
        assert_eq!(parse_prefix("kplab-12-3"), Some(("kplab-12-3".into(), 12)));
        assert_eq!(parse_prefix("kplab-x-3"), None);
        assert_eq!(parse_prefix("kplb"), None);
        assert!(belongs("kplab-12-3-node1", "kplab-12-3"));
        assert!(!belongs("kplab-12-30-node1", "kplab-12-3"));
    }
}
