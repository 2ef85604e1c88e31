//! Section 4, end to end through the real agent: cold-start full sync, the latency from one
//! EndpointSlice change on disk to the pinned maps, agent memory and BPF map memory.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::Lab;
use serde_json::{Value, json};

use crate::{
    bpf,
    lab::{BenchLab, RunningAgent, fields, rss_kib},
    services::{self, Cluster, PORT},
    stats::{Rng, percentile, sorted},
};

pub struct Config {
    pub services: usize,
    pub cold_starts: usize,
    /// EndpointSlice changes to measure, as many as fit in `change_budget`.
    pub changes: usize,
    pub change_budget: Duration,
}

/// The agent's manifest poll interval for these runs: a minute, so polling plays no part and
/// every change is noticed through inotify, as it is with the default.
pub const POLL_MS: &str = "60000";

/// Longest a cold start may take to sync (recorded as an error beyond).
pub const COLD_START_LIMIT: Duration = Duration::from_secs(120);

/// `KPLB_SVC` key of an in-cluster IPv4 TCP frontend (`lb_common::SvcKey`: IPv4-mapped
/// address, port in network order, protocol, scope 0).
fn frontend_key(ip: Ipv4Addr, port: u16) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[10] = 0xff;
    k[11] = 0xff;
    k[12..16].copy_from_slice(&ip.octets());
    k[16..18].copy_from_slice(&port.to_be_bytes());
    k[18] = 6;
    k
}

/// `SvcVal.backend_count` of the frontend, if present.
fn backend_count(map: &std::os::fd::OwnedFd, key: &[u8]) -> Result<Option<u32>> {
    let mut val = [0u8; size_of::<lb_common::SvcVal>()];
    if !bpf::lookup(map, key, &mut val)? {
        return Ok(None);
    }
    // SAFETY: SvcVal is a repr(C) aggregate of u32s (every bit pattern valid), the buffer
    // is exactly its size.
    let v: lb_common::SvcVal = unsafe { std::ptr::read_unaligned(val.as_ptr().cast()) };
    Ok(Some(v.backend_count))
}

/// Section 4 on a lab of its own (when section 2 does not run kplb at this size).
pub fn run(cfg: &Config, rng: &mut Rng) -> Result<Value> {
    let bl = BenchLab::new_nodes(1)?;
    let cluster = Cluster {
        services: cfg.services,
        node: 1,
    };
    let dir = bl.lab.tmp_dir().join("control-manifests");
    cluster.write_manifests(&dir)?;

    let mut cold = Vec::new();
    let mut running: Option<RunningAgent> = None;
    for _ in 0..cfg.cold_starts {
        if let Some(old) = running.take() {
            old.stop_and_clean()?;
        }
        let (agent, sample) = cold_start(&bl.lab, 1, &dir)?;
        cold.push(sample);
        running = Some(agent);
    }
    let agent = running.context("no cold start ran")?;
    let result = measure_running(&agent, &dir, &cluster, cfg, rng, cold);
    agent.stop_and_clean()?;
    result
}

/// Starts an agent on `node` reading `dir` (changes noticed through inotify, see [`POLL_MS`])
/// and waits for its first sync; returns it and the cold start's figures.
pub fn cold_start(lab: &Lab, node: usize, dir: &Path) -> Result<(RunningAgent, Value)> {
    let mut agent = RunningAgent::start(lab, node, dir, &["--poll-interval-ms", POLL_MS])?;
    let (wall, line) = agent.wait_synced(COLD_START_LIMIT)?;
    eprintln!("kplb-bench: control: cold start: {wall:.3} s to synced");
    Ok((agent, json!({"start_to_synced_s": wall, "synced": line})))
}

/// Everything after the first sync, on a running agent whose manifest directory `dir` holds
/// `cluster` as [`Cluster::write_manifests`] wrote it: memory, map memory, and EndpointSlice
/// changes end to end. `cold` are the cold starts already measured.
pub fn measure_running(
    agent: &RunningAgent,
    dir: &Path,
    cluster: &Cluster,
    cfg: &Config,
    rng: &mut Rng,
    cold: Vec<Value>,
) -> Result<Value> {
    let pid = agent.pid()?;
    let (rss_synced, _) = rss_kib(pid)?;
    let maps = agent.maps_dir();
    let memlock: Vec<Value> = bpf::pinned_memlock(&maps, "KPLB_MAGLEV")?
        .into_iter()
        .map(|(name, count, bytes)| json!({"map": name, "maps": count, "bytes": bytes}))
        .collect();

    let svc = bpf::obj_get(&maps.join("KPLB_SVC"))?;
    let key = frontend_key(services::vip(cluster.measured()), PORT);
    if backend_count(&svc, &key)? != Some(services::ENDPOINTS as u32) {
        bail!("the measured frontend is not in KPLB_SVC with 10 backends");
    }
    let t = Instant::now();
    let mut latencies = Vec::with_capacity(cfg.changes);
    while latencies.len() < cfg.changes && t.elapsed() < cfg.change_budget {
        let c = latencies.len();
        latencies.push(change(dir, cluster, &svc, &key, c, rng)?);
    }
    let changes_s = t.elapsed().as_secs_f64();
    let log = agent.agent.log();
    let applied: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("applied changes"))
        .filter_map(|l| fields(l)["took_ms"].as_f64())
        .collect();
    let (rss_after, hwm_after) = rss_kib(pid)?;
    Ok(json!({
        "services": cluster.services,
        "endpoints_per_service": services::ENDPOINTS,
        "poll_interval_ms": POLL_MS.parse::<u32>().unwrap_or_default(),
        "cold_starts": cold,
        "rss_kib_synced": rss_synced,
        "rss_kib_after_changes": rss_after,
        "hwm_kib": hwm_after,
        "memlock": memlock,
        "changes_asked": cfg.changes,
        "change_budget_s": cfg.change_budget.as_secs_f64(),
        "changes_s": changes_s,
        "change_e2e_ms": dist(latencies),
        "agent_applied_took_ms": dist(applied),
    }))
}

/// Change `c`: the measured service alternates between 9 and 10 endpoints (every change
/// rebuilds its table and rewrites its frontend, whose `backend_count` tells it has landed).
/// Returns milliseconds from the rename to the pinned map showing it.
fn change(
    dir: &Path,
    cluster: &Cluster,
    svc: &std::os::fd::OwnedFd,
    key: &[u8],
    c: usize,
    rng: &mut Rng,
) -> Result<f64> {
    let want = if c.is_multiple_of(2) {
        services::ENDPOINTS - 1
    } else {
        services::ENDPOINTS
    };
    let mut text = String::new();
    cluster.documents(cluster.measured(), want, &mut text)?;
    let tmp = dir.join(".measured.yaml.tmp");
    fs::write(&tmp, text)?;
    // A random phase against the agent's poll interval.
    thread::sleep(Duration::from_micros(rng.next() % 10_000));
    let t0 = Instant::now();
    fs::rename(&tmp, dir.join("measured.yaml"))?;
    while backend_count(svc, key)? != Some(want as u32) {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("change {c} not in the maps after 30 s");
        }
        thread::sleep(Duration::from_micros(100));
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

fn dist(v: Vec<f64>) -> Value {
    let v = sorted(v);
    json!({
        "count": v.len(),
        "p50": percentile(&v, 50.0),
        "p99": percentile(&v, 99.0),
        "max": percentile(&v, 100.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout() {
        let k = frontend_key(Ipv4Addr::new(172, 30, 0, 1), 80);
        assert_eq!(&k[10..18], &[0xff, 0xff, 172, 30, 0, 1, 0, 80]);
        assert_eq!(k[18], 6);
    }
}
