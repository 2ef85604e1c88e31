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
use serde_json::{Value, json};

use crate::{
    bpf,
    lab::{BenchLab, RunningAgent, fields, rss_kib},
    services::{self, PORT},
    stats::{Rng, percentile, sorted},
};

pub struct Config {
    pub services: usize,
    pub cold_starts: usize,
    pub changes: usize,
}

/// The agent's manifest poll interval for these runs (the default is 100 ms, which would
/// dominate the change latency; what is measured is the agent's own work).
pub const POLL_MS: &str = "10";

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

pub fn run(cfg: &Config, rng: &mut Rng) -> Result<Value> {
    let bl = BenchLab::new(false)?;
    let n = cfg.services;
    let measured = n - 1;
    let dir = bl.lab.tmp_dir().join("control-manifests");
    // The measured Service has its own file: a change rewrites a small file, as one
    // EndpointSlice update would arrive, not the 10k-service bulk file.
    services::write_manifest(&dir, "bulk.yaml", n, 0..measured)?;
    services::write_manifest(&dir, "measured.yaml", n, measured..n)?;

    let mut cold = Vec::new();
    let mut running = None;
    for k in 0..cfg.cold_starts {
        let mut agent = RunningAgent::start(&bl.lab, &dir, &["--poll-interval-ms", POLL_MS])?;
        let (wall, line) = agent.wait_synced(Duration::from_secs(600))?;
        eprintln!("kplb-bench: control: cold start {k}: {wall:.3} s to synced ({line})");
        cold.push(json!({"start_to_synced_s": wall, "synced": line}));
        if k + 1 < cfg.cold_starts {
            agent.stop_and_clean()?;
        } else {
            running = Some(agent);
        }
    }
    let agent = running.context("no cold start ran")?;
    let result = measure_running(&agent, &dir, n, cfg.changes, rng, cold);
    agent.stop_and_clean()?;
    result
}

/// Everything after the first sync, on a running agent whose manifest directory `dir` holds
/// the measured service (the last of `n`) alone in `measured.yaml`: memory, map memory, and
/// `changes` EndpointSlice changes end to end. `cold` are the cold starts already measured.
pub fn measure_running(
    agent: &RunningAgent,
    dir: &Path,
    n: usize,
    changes: usize,
    rng: &mut Rng,
    cold: Vec<Value>,
) -> Result<Value> {
    let measured = n - 1;
    let pid = agent.pid()?;
    let (rss_synced, _) = rss_kib(pid)?;
    let maps = agent.maps_dir();
    let memlock: Vec<Value> = bpf::pinned_memlock(&maps, "KPLB_MAGLEV")?
        .into_iter()
        .map(|(name, count, bytes)| json!({"map": name, "maps": count, "bytes": bytes}))
        .collect();

    let svc = bpf::obj_get(&maps.join("KPLB_SVC"))?;
    let key = frontend_key(services::vip(measured), PORT);
    if backend_count(&svc, &key)? != Some(services::ENDPOINTS as u32) {
        bail!("the measured frontend is not in KPLB_SVC with 10 backends");
    }
    let mut latencies = Vec::with_capacity(changes);
    for c in 0..changes {
        // Alternate 9 and 10 endpoints: every change rebuilds the table and rewrites the
        // frontend (whose backend_count tells the change has landed).
        let want = if c % 2 == 0 {
            services::ENDPOINTS - 1
        } else {
            services::ENDPOINTS
        };
        let mut text = String::new();
        services::documents(n, measured, want, &mut text)?;
        let tmp = dir.join(".measured.yaml.tmp");
        fs::write(&tmp, text)?;
        // A random phase against the agent's poll interval.
        thread::sleep(Duration::from_micros(rng.next() % 10_000));
        let t0 = Instant::now();
        fs::rename(&tmp, dir.join("measured.yaml"))?;
        loop {
            if backend_count(&svc, &key)? == Some(want as u32) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("change {c} not in the maps after 30 s");
            }
            thread::sleep(Duration::from_micros(100));
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let log = agent.agent.log();
    let applied: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("applied changes"))
        .filter_map(|l| fields(l)["took_ms"].as_f64())
        .collect();
    let (rss_after, hwm_after) = rss_kib(pid)?;
    let lat = sorted(latencies);
    let applied = sorted(applied);
    Ok(json!({
        "services": n,
        "endpoints_per_service": services::ENDPOINTS,
        "poll_interval_ms": POLL_MS.parse::<u32>().unwrap_or_default(),
        "cold_starts": cold,
        "rss_kib_synced": rss_synced,
        "rss_kib_after_changes": rss_after,
        "hwm_kib": hwm_after,
        "memlock": memlock,
        "change_e2e_ms": {
            "count": lat.len(),
            "p50": percentile(&lat, 50.0),
            "p99": percentile(&lat, 99.0),
            "max": percentile(&lat, 100.0),
        },
        "agent_applied_took_ms": {
            "count": applied.len(),
            "p50": percentile(&applied, 50.0),
            "p99": percentile(&applied, 99.0),
            "max": percentile(&applied, 100.0),
        },
    }))
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
