//! Kernel run-time statistics of kplb's socket programs (`kernel.bpf_stats_enabled`), as
//! `bpftool prog show` reports them: the time the programs themselves take, apart from
//! everything else a connection costs.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde_json::Value;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Run time and run count of one program (by name) over a measurement.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// kplb's cgroup socket-address programs (`kplb_connect4`, ...; names as the kernel keeps
/// them, truncated to 15 bytes), summed by name.
fn snapshot() -> Result<BTreeMap<String, ProgStats>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool prog show")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let progs: Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let mut by_name: BTreeMap<String, ProgStats> = BTreeMap::new();
    for p in progs.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("");
        if p["type"] != "cgroup_sock_addr" || !name.starts_with("kplb_") {
            continue;
        }
        let s = by_name.entry(name.to_owned()).or_default();
        s.run_time_ns += p["run_time_ns"].as_u64().unwrap_or(0);
        s.run_cnt += p["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(by_name)
}

/// Runs `f` with the statistics on (restoring the sysctl after, also on failure); returns its
/// result and what each of kplb's socket programs ran meanwhile.
pub fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, BTreeMap<String, ProgStats>)> {
    let was = std::fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
    std::fs::write(SYSCTL, "1").with_context(|| format!("enabling {SYSCTL}"))?;
    let res = (|| -> Result<(T, BTreeMap<String, ProgStats>)> {
        let before = snapshot()?;
        let out = f()?;
        let after = snapshot()?;
        let delta = after
            .into_iter()
            .map(|(name, a)| {
                let b = before.get(&name).copied().unwrap_or_default();
                let d = ProgStats {
                    run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
                    run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
                };
                (name, d)
            })
            .filter(|(_, d)| d.run_cnt > 0)
            .collect();
        Ok((out, delta))
    })();
    let restore = std::fs::write(SYSCTL, was.trim()).with_context(|| format!("restoring {SYSCTL}"));
    let res = res?;
    restore?;
    Ok(res)
}
