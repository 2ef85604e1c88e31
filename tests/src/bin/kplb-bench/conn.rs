//! Section 2: connection rate and latency through a ClusterIP, a new TCP connection per
//! request, for each dataplane at each service count.
//!
//! Per size, the dataplanes run in a shuffled order; each is set up from the same synthetic
//! Services, checked (a sanity run must reach the backends), measured `runs` times with
//! `kplb-connclient` in the client pod (pinned to CPU 1, backends on CPU 0), then removed
//! completely before the next one starts. "none" connects straight to the 10 pod IPs
//! round-robin: nothing installed at all.

use std::{
    fmt, fs,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    control,
    lab::{BenchLab, RunningAgent},
    rules,
    services::{self, ENDPOINTS, PORT, TARGET_PORT},
    stats::Rng,
};

pub struct Config {
    pub sizes: Vec<usize>,
    pub runs: usize,
    pub count: usize,
    pub warmup: usize,
    pub client: PathBuf,
    /// Results so far, rewritten after every measurement (a long run that is interrupted
    /// keeps what it measured).
    pub partial: PathBuf,
    /// Section 4 on kplb's agent at this size, after its connection runs (the cold start is
    /// the one measured here): (services, changes).
    pub control: Option<(usize, usize)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    None,
    Kplb,
    Iptables,
    Nftables,
    Ipvs,
}

impl fmt::Display for Dataplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Kplb => "kplb",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
        })
    }
}

const LOAD_LIMIT: Duration = Duration::from_secs(900);
const SANITY_REQUESTS: usize = 100;

/// The connection results, and section 4's when `cfg.control` asked for it.
pub fn run(cfg: &Config, rng: &mut Rng) -> Result<(Value, Option<Value>)> {
    let bl = BenchLab::new(true)?;
    let mut available = vec![Dataplane::None, Dataplane::Kplb];
    let mut skipped = serde_json::Map::new();
    for (dp, why) in [
        (Dataplane::Iptables, check_iptables(&bl)),
        (Dataplane::Nftables, check_nft(&bl)),
        (Dataplane::Ipvs, check_ipvs(&bl)),
    ] {
        match why {
            Ok(()) => available.push(dp),
            Err(e) => {
                eprintln!("kplb-bench: conn: skipping {dp}: {e}");
                skipped.insert(dp.to_string(), json!(e));
            }
        }
    }
    // For development: KPLB_BENCH_DATAPLANES=kplb,iptables limits the columns.
    if let Ok(only) = std::env::var("KPLB_BENCH_DATAPLANES") {
        available.retain(|dp| only.split(',').any(|o| o == dp.to_string()));
    }
    let mut results = Vec::new();
    let mut control = None;
    let mut orders = serde_json::Map::new();
    for &n in &cfg.sizes {
        let mut order = available.clone();
        rng.shuffle(&mut order);
        orders.insert(
            n.to_string(),
            json!(order.iter().map(ToString::to_string).collect::<Vec<_>>()),
        );
        for dp in order {
            eprintln!("kplb-bench: conn: {dp} at {n} services");
            let res = measure(&bl, cfg, dp, n, rng, &mut control).unwrap_or_else(|e| {
                eprintln!("kplb-bench: conn: {dp} at {n}: {e:#}");
                json!({"dataplane": dp.to_string(), "services": n, "error": format!("{e:#}")})
            });
            results.push(res);
            let partial = json!({"results": results, "order": orders, "control": control});
            if let Err(e) = fs::write(&cfg.partial, partial.to_string()) {
                eprintln!("kplb-bench: writing {}: {e}", cfg.partial.display());
            }
        }
    }
    Ok((
        json!({
            "sizes": cfg.sizes,
            "runs": cfg.runs,
            "count": cfg.count,
            "warmup": cfg.warmup,
            "endpoints": ENDPOINTS,
            "order": orders,
            "skipped": skipped,
            "results": results,
        }),
        control,
    ))
}

fn check_iptables(bl: &BenchLab) -> std::result::Result<(), String> {
    bl.node_probe(&["iptables-restore", "--version"])?;
    bl.node_probe(&["iptables", "-t", "nat", "-L", "-n"])
}

fn check_nft(bl: &BenchLab) -> std::result::Result<(), String> {
    bl.node_probe(&["nft", "--version"])?;
    bl.node_probe(&["nft", "list", "ruleset"])
}

fn check_ipvs(bl: &BenchLab) -> std::result::Result<(), String> {
    let kernel = "the kernel has no IPVS (no /proc/net/ip_vs; CONFIG_IP_VS is not set here)";
    let has_ipvs = bl.node_probe(&["test", "-e", "/proc/net/ip_vs"]).is_ok();
    bl.node_probe(&["ipvsadm", "-Ln"]).map_err(|e| {
        if has_ipvs {
            e
        } else {
            format!("{kernel}; {e}")
        }
    })?;
    bl.node_probe(&["ip", "link", "add", "kbench-probe", "type", "dummy"])
        .map_err(|e| {
            format!("{e} (kube-proxy's ipvs mode needs a dummy interface for the VIPs)")
        })?;
    bl.node_probe(&["ip", "link", "del", "kbench-probe"])
}

/// Removes a dataplane's state when dropped, also when measuring failed half way.
struct Teardown<'a> {
    bl: &'a BenchLab,
    dp: Dataplane,
    agent: Option<RunningAgent>,
    /// Rule files and manifests; removed last (the agent reads its manifests until it stops).
    scratch: PathBuf,
    done: bool,
}

impl Teardown<'_> {
    fn finish(mut self) -> Result<()> {
        self.done = true;
        self.clean()
    }

    fn clean(&mut self) -> Result<()> {
        let r = self.remove_dataplane();
        let _ = fs::remove_dir_all(&self.scratch);
        r
    }

    fn remove_dataplane(&mut self) -> Result<()> {
        let limit = Duration::from_secs(300);
        match self.dp {
            Dataplane::None => Ok(()),
            Dataplane::Kplb => match self.agent.take() {
                Some(a) => a.stop_and_clean(),
                None => Ok(()),
            },
            Dataplane::Iptables => {
                self.bl.node_ok(&["iptables", "-t", "nat", "-F"], limit)?;
                self.bl.node_ok(&["iptables", "-t", "nat", "-X"], limit)?;
                // iptables-nft leaves its (now empty) tables behind; remove them too.
                if self.bl.node_probe(&["nft", "--version"]).is_ok() {
                    self.bl.node_ok(&["nft", "flush", "ruleset"], limit)?;
                }
                Ok(())
            }
            // Only the lab node's own ruleset: everything there is ours.
            Dataplane::Nftables => self
                .bl
                .node_ok(&["nft", "flush", "ruleset"], limit)
                .map(|_| ()),
            Dataplane::Ipvs => {
                let a = self.bl.node_ok(&["ipvsadm", "-C"], limit).map(|_| ());
                let b = self
                    .bl
                    .node_ok(&["ip", "link", "del", "kube-ipvs0"], limit)
                    .map(|_| ());
                a.and(b)
            }
        }
    }
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = self.clean() {
            eprintln!("kplb-bench: removing {}: {e:#}", self.dp);
        }
    }
}

fn measure(
    bl: &BenchLab,
    cfg: &Config,
    dp: Dataplane,
    n: usize,
    rng: &mut Rng,
    control: &mut Option<Value>,
) -> Result<Value> {
    let control_here = dp == Dataplane::Kplb && cfg.control.is_some_and(|(s, _)| s == n);
    let scratch = bl.lab.tmp_dir().join(format!("{dp}-{n}"));
    let mut td = Teardown {
        bl,
        dp,
        agent: None,
        scratch: scratch.clone(),
        done: false,
    };
    fs::create_dir_all(&scratch)?;
    let started = Instant::now();
    let mut detail = json!({});
    match dp {
        Dataplane::None => {}
        Dataplane::Kplb => {
            let dir = scratch.join("manifests");
            // The measured service in a file of its own, so that section 4's changes rewrite
            // a small file.
            services::write_manifest(&dir, "bulk.yaml", n, 0..n - 1)?;
            services::write_manifest(&dir, "measured.yaml", n, n - 1..n)?;
            let gen_s = started.elapsed().as_secs_f64();
            let extra: &[&str] = if control_here {
                &["--poll-interval-ms", control::POLL_MS]
            } else {
                &[]
            };
            let mut agent = RunningAgent::start(&bl.lab, &dir, extra)?;
            let synced = agent.wait_synced(LOAD_LIMIT);
            td.agent = Some(agent);
            let (wall, line) = synced?;
            detail = json!({"synced": line, "start_to_synced_s": wall, "manifest_write_s": gen_s});
        }
        Dataplane::Iptables => {
            let file = scratch.join("iptables.rules");
            fs::write(&file, rules::iptables(n))?;
            let t = Instant::now();
            bl.node_ok(
                &["iptables-restore", file.to_str().context("path")?],
                LOAD_LIMIT,
            )?;
            let version = bl.node_ok(&["iptables", "--version"], LOAD_LIMIT)?;
            detail = json!({"restore_s": t.elapsed().as_secs_f64(), "version": version.trim()});
        }
        Dataplane::Nftables => {
            let mut times = Vec::new();
            for (k, tx) in rules::nftables(n).iter().enumerate() {
                let file = scratch.join(format!("nft-{k}.nft"));
                fs::write(&file, tx)?;
                let t = Instant::now();
                bl.node_ok(&["nft", "-f", file.to_str().context("path")?], LOAD_LIMIT)?;
                times.push(t.elapsed().as_secs_f64());
            }
            let version = bl.node_ok(&["nft", "--version"], LOAD_LIMIT)?;
            detail = json!({"transactions_s": times, "load_s": times.iter().sum::<f64>(), "version": version.trim()});
        }
        Dataplane::Ipvs => {
            let (ip, restore) = rules::ipvs(n);
            let node = bl.lab.node(1)?.netns.clone();
            lb_tests::netns::ip_batch(&node, &ip)?;
            let file = scratch.join("ipvs.rules");
            fs::write(&file, restore)?;
            let t = Instant::now();
            bl.node_ok(
                &["sh", "-c", &format!("ipvsadm-restore < {}", file.display())],
                LOAD_LIMIT,
            )?;
            lb_tests::netns::sysctls(&node, &[("net.ipv4.vs.conntrack", "1")])?;
            detail = json!({"restore_s": t.elapsed().as_secs_f64()});
        }
    }
    let load_s = (dp != Dataplane::None).then(|| started.elapsed().as_secs_f64());

    let targets: Vec<SocketAddr> = match dp {
        Dataplane::None => (0..ENDPOINTS)
            .map(|j| SocketAddr::new(services::pod_ip(j).into(), TARGET_PORT))
            .collect(),
        _ => vec![SocketAddr::new(services::vip(n - 1).into(), PORT)],
    };
    if let Ok(secs) = std::env::var("KPLB_BENCH_PAUSE") {
        eprintln!("kplb-bench: pausing {secs} s (lab {})", bl.lab.prefix());
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
    }
    let sanity = bl.client(&cfg.client, &targets, SANITY_REQUESTS, 0)?;
    if sanity["count"].as_u64() != Some(SANITY_REQUESTS as u64) {
        bail!("{dp} at {n} services does not work: {sanity}");
    }
    let mut runs = Vec::new();
    for _ in 0..cfg.runs {
        runs.push(bl.client(&cfg.client, &targets, cfg.count, cfg.warmup)?);
    }
    if let Some(a) = &td.agent {
        detail["agent_log_tail"] = json!(a.agent.log_tail(3));
        if control_here {
            let changes = cfg.control.map_or(0, |(_, c)| c);
            eprintln!("kplb-bench: control: {changes} changes at {n} services");
            let cold = vec![json!({
                "start_to_synced_s": detail["start_to_synced_s"],
                "synced": detail["synced"],
            })];
            *control = Some(
                control::measure_running(a, &scratch.join("manifests"), n, changes, rng, cold)
                    .unwrap_or_else(|e| json!({"error": format!("{e:#}")})),
            );
        }
    }
    td.finish()
        .with_context(|| format!("removing {dp} after measuring"))?;
    Ok(json!({
        "dataplane": dp.to_string(),
        "services": n,
        "load_s": load_s,
        "detail": detail,
        "sanity": sanity,
        "runs": runs,
    }))
}
