//! Skipping privileged tests on developer machines, failing them in CI.

/// True when the lab can run here (root, iproute2, cgroup v2 and bpffs available).
/// Otherwise: panics when `CI=true` (a skipped suite must not look green in CI), else prints
/// `SKIPPED (<feature>): ...` to stderr and returns false. Start tests with
/// `if !require_root("...") { return; }`.
pub fn require_root(feature: &str) -> bool {
    let Err(why) = crate::host::host() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{feature}: the lab cannot run here ({why:#}); CI=true, so this fails instead of skipping"
        );
    }
    eprintln!("SKIPPED ({feature}): needs root with iproute2, cgroup v2 and bpffs: {why:#}");
    false
}
