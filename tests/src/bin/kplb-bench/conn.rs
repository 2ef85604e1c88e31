//! Section 2: connection rate and latency through a ClusterIP, a new TCP connection per
//! request, for each dataplane at each service count.
//!
//! Every dataplane has a lab node of its own (netns and cgroup) with its own 10 netexec
//! backends (CPU 0) and client pod (CPU 1), so all of them can be loaded at the same time
//! without any being on another's packet path. Per size: each dataplane is loaded once, within
//! a time box (`load_limit` each, twice that for all of a size's loads together; one that does
//! not load in time is recorded as such, with the time), and checked
//! (requests that must all reach the backends); then `runs` rounds, each running
//! `kplb-connclient` once per dataplane in a freshly shuffled order, so that drifts in the
//! machine's load spread over all dataplanes alike; then section 4 on kplb's agent where asked;
//! then every dataplane is removed completely. "none" connects straight to its node's 10 pod
//! IPs round-robin: nothing installed at all.

use std::{
    fmt, fs,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    bpf_stats, control,
    lab::{BenchLab, NODE, Requests, RunningAgent, node_name},
    rules,
    services::{self, Cluster, ENDPOINTS, PORT, TARGET_PORT},
    stats::Rng,
};

pub struct Config {
    pub sizes: Vec<usize>,
    pub runs: usize,
    pub count: usize,
    pub warmup: usize,
    pub client: PathBuf,
    /// Longest a dataplane may take to load at one size; all loads of one size together get
    /// twice that (a slow one may use what faster ones left).
    pub load_limit: Duration,
    /// Results so far, rewritten after every step (a long run that is interrupted keeps what
    /// it measured).
    pub partial: PathBuf,
    /// Section 4 on kplb's agent at its size, after the connection rounds.
    pub control: Option<control::Config>,
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

const SANITY_REQUESTS: usize = 100;
/// Removing a dataplane (flushing 30k services' rules takes seconds).
const TEARDOWN_LIMIT: Duration = Duration::from_secs(300);

/// The connection results, and section 4's when `cfg.control` asked for it.
pub fn run(cfg: &Config, rng: &mut Rng) -> Result<(Value, Option<Value>)> {
    let (dataplanes, skipped) = available_dataplanes()?;
    let bl = BenchLab::with_pods(dataplanes.len())?;
    let mut results = Vec::new();
    let mut rounds = serde_json::Map::new();
    let mut control = None;
    for &n in &cfg.sizes {
        let mut size = Size::load(&bl, cfg, &dataplanes, n);
        save_partial(cfg, &results, &size.entries);
        rounds.insert(n.to_string(), json!(size.measure(cfg, rng)));
        size.hook_cost(cfg);
        if let Some(c) = cfg.control.as_ref().filter(|c| c.services == n) {
            control = Some(size.control(c, rng));
        }
        results.extend(size.teardown());
        save_partial(cfg, &results, &[]);
    }
    Ok((
        json!({
            "sizes": cfg.sizes,
            "runs": cfg.runs,
            "count": cfg.count,
            "warmup": cfg.warmup,
            "endpoints": ENDPOINTS,
            "load_limit_s": cfg.load_limit.as_secs_f64(),
            "dataplanes": dataplanes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "rounds": rounds,
            "skipped": skipped,
            "results": results,
        }),
        control,
    ))
}

fn save_partial(cfg: &Config, done: &[Value], current: &[Entry<'_>]) {
    let results: Vec<Value> = done
        .iter()
        .cloned()
        .chain(current.iter().map(Entry::result))
        .collect();
    let partial = json!({ "results": results });
    if let Err(e) = fs::write(&cfg.partial, partial.to_string()) {
        eprintln!("kplb-bench: writing {}: {e}", cfg.partial.display());
    }
}

/// The dataplanes this machine has (probed in a scratch lab), and why the others are skipped.
fn available_dataplanes() -> Result<(Vec<Dataplane>, serde_json::Map<String, Value>)> {
    let probe = BenchLab::new_nodes(1)?;
    let mut available = vec![Dataplane::None, Dataplane::Kplb];
    let mut skipped = serde_json::Map::new();
    for (dp, why) in [
        (Dataplane::Iptables, check_iptables(&probe)),
        (Dataplane::Nftables, check_nft(&probe)),
        (Dataplane::Ipvs, check_ipvs(&probe)),
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
    Ok((available, skipped))
}

fn check_iptables(bl: &BenchLab) -> std::result::Result<(), String> {
    bl.node_probe(NODE, &["iptables-restore", "--version"])?;
    bl.node_probe(NODE, &["iptables", "-t", "nat", "-L", "-n"])
}

fn check_nft(bl: &BenchLab) -> std::result::Result<(), String> {
    bl.node_probe(NODE, &["nft", "--version"])?;
    bl.node_probe(NODE, &["nft", "list", "ruleset"])
}

fn check_ipvs(bl: &BenchLab) -> std::result::Result<(), String> {
    // Loads the module where IPVS is one; the outcome shows in /proc/net/ip_vs.
    let modprobe = match bl.node_probe(NODE, &["modprobe", "ip_vs"]) {
        Ok(()) => "`modprobe ip_vs` succeeded",
        Err(e) if e.contains("spawning") => "there is no modprobe",
        Err(_) => "`modprobe ip_vs` failed",
    };
    if bl
        .node_probe(NODE, &["test", "-e", "/proc/net/ip_vs"])
        .is_err()
    {
        let config = bl
            .node_probe(
                NODE,
                &[
                    "sh",
                    "-c",
                    "zcat /proc/config.gz | grep -qx '# CONFIG_IP_VS is not set'",
                ],
            )
            .map_or("", |()| "; /proc/config.gz: CONFIG_IP_VS is not set");
        return Err(format!(
            "the kernel has no IPVS: /proc/net/ip_vs is missing ({modprobe}{config})"
        ));
    }
    bl.node_probe(NODE, &["ipvsadm", "-Ln"])?;
    bl.node_probe(
        NODE,
        &["ip", "link", "add", "kbench-probe", "type", "dummy"],
    )
    .map_err(|e| format!("{e} (kube-proxy's ipvs mode needs a dummy interface for the VIPs)"))?;
    bl.node_probe(NODE, &["ip", "link", "del", "kbench-probe"])
}

/// Seconds spent in each phase of one dataplane at one size.
#[derive(Default)]
struct Phases {
    load_s: f64,
    check_s: f64,
    measure_s: f64,
    teardown_s: f64,
}

/// One dataplane at one size: what it loaded, its runs, or why it has none.
struct Entry<'a> {
    dp: Dataplane,
    services: usize,
    loaded: Option<Loaded<'a>>,
    detail: Value,
    sanity: Value,
    runs: Vec<Value>,
    /// kplb only: its socket programs' kernel run time over one extra run (see [`hook_cost`]).
    hooks: Value,
    error: Option<String>,
    phases: Phases,
}

impl Entry<'_> {
    fn result(&self) -> Value {
        let p = &self.phases;
        let mut r = json!({
            "dataplane": self.dp.to_string(),
            "services": self.services,
            "load_s": (self.dp != Dataplane::None).then_some(p.load_s),
            "detail": self.detail,
            "sanity": self.sanity,
            "runs": self.runs,
            "hooks": self.hooks,
            "phases": {
                "load_s": p.load_s,
                "check_s": p.check_s,
                "measure_s": p.measure_s,
                "teardown_s": p.teardown_s,
            },
        });
        if let Some(e) = &self.error {
            r["error"] = json!(e);
        }
        r
    }

    fn fail(&mut self, e: String) {
        eprintln!("kplb-bench: conn: {} at {}: {e}", self.dp, self.services);
        self.error = Some(e);
    }

    /// Removes `l` completely, keeping the agent's last words and the time it took.
    fn remove(&mut self, l: Loaded<'_>) {
        let t = Instant::now();
        if let Some(a) = &l.agent {
            self.detail["agent_log_tail"] = json!(a.agent.log_tail(5));
        }
        if let Err(e) = l.remove() {
            let what = format!("removing it: {e:#}");
            match &mut self.error {
                Some(first) => *first = format!("{first}; {what}"),
                None => self.fail(what),
            }
        }
        self.phases.teardown_s = t.elapsed().as_secs_f64();
    }
}

/// All dataplanes at one size.
struct Size<'a> {
    bl: &'a BenchLab,
    entries: Vec<Entry<'a>>,
}

impl<'a> Size<'a> {
    /// Loads and checks every dataplane; failures are recorded in their entries.
    fn load(bl: &'a BenchLab, cfg: &Config, dataplanes: &[Dataplane], n: usize) -> Self {
        let mut size = Self {
            bl,
            entries: Vec::new(),
        };
        let budget_end = Instant::now() + 2 * cfg.load_limit;
        for (k, &dp) in dataplanes.iter().enumerate() {
            let cluster = Cluster {
                services: n,
                node: k + 1,
            };
            let poll = cfg.control.as_ref().is_some_and(|c| c.services == n);
            let limit = cfg
                .load_limit
                .min(budget_end.saturating_duration_since(Instant::now()));
            eprintln!("kplb-bench: conn: loading {dp} at {n} services (at most {limit:.0?})");
            let entry = size.load_entry(cfg, dp, cluster, poll, limit);
            size.entries.push(entry);
        }
        // For development: look at the loaded dataplanes (`ip netns`, `nft list ruleset`).
        if let Ok(secs) = std::env::var("KPLB_BENCH_PAUSE") {
            eprintln!("kplb-bench: pausing {secs} s (lab {})", bl.lab.prefix());
            std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
        }
        size
    }

    fn load_entry(
        &self,
        cfg: &Config,
        dp: Dataplane,
        cluster: Cluster,
        poll: bool,
        limit: Duration,
    ) -> Entry<'a> {
        let mut entry = Entry {
            dp,
            services: cluster.services,
            loaded: None,
            detail: json!({}),
            sanity: Value::Null,
            runs: Vec::new(),
            hooks: Value::Null,
            error: None,
            phases: Phases::default(),
        };
        let t = Instant::now();
        let mut loaded = match Loaded::new(self.bl, dp, cluster) {
            Ok(l) => l,
            Err(e) => {
                entry.fail(format!("preparing {dp}: {e:#}"));
                return entry;
            }
        };
        let detail = loaded.load(t + limit, poll);
        entry.phases.load_s = t.elapsed().as_secs_f64();
        let works = match detail {
            Ok(detail) => {
                entry.detail = detail;
                self.check(&mut entry, &loaded, cfg)
            }
            Err(e) => {
                entry.fail(format!(
                    "did not load ({:.1} s of its {:.0} s): {e:#}",
                    entry.phases.load_s,
                    limit.as_secs_f64()
                ));
                false
            }
        };
        if works {
            entry.loaded = Some(loaded);
        } else {
            // Not measured: free its node now.
            entry.remove(loaded);
        }
        entry
    }

    /// Requests that must all reach the backends; whether they did.
    fn check(&self, entry: &mut Entry<'_>, l: &Loaded<'_>, cfg: &Config) -> bool {
        let t = Instant::now();
        let req = Requests {
            count: SANITY_REQUESTS,
            warmup: 0,
            fail_fast: true,
        };
        let sanity = self
            .bl
            .client(l.cluster.node, &cfg.client, &l.targets(), &req);
        entry.phases.check_s = t.elapsed().as_secs_f64();
        match sanity {
            Ok(s) if s["count"].as_u64() == Some(SANITY_REQUESTS as u64) => {
                entry.sanity = s;
                true
            }
            Ok(s) => {
                entry.fail(format!("does not work: {s}"));
                entry.sanity = s;
                false
            }
            Err(e) => {
                entry.fail(format!("checking: {e:#}"));
                false
            }
        }
    }

    /// `cfg.runs` rounds over the dataplanes that loaded and work, each in a new shuffled
    /// order; returns the orders.
    fn measure(&mut self, cfg: &Config, rng: &mut Rng) -> Vec<Vec<String>> {
        let req = Requests {
            count: cfg.count,
            warmup: cfg.warmup,
            fail_fast: false,
        };
        let mut orders = Vec::new();
        for round in 0..cfg.runs {
            let mut order: Vec<usize> = (0..self.entries.len())
                .filter(|&k| self.entries[k].error.is_none())
                .collect();
            rng.shuffle(&mut order);
            eprintln!(
                "kplb-bench: conn: round {}/{} at {} services",
                round + 1,
                cfg.runs,
                self.entries.first().map_or(0, |e| e.services)
            );
            for &k in &order {
                let entry = &mut self.entries[k];
                let Some(l) = &entry.loaded else {
                    continue;
                };
                let t = Instant::now();
                let run = self
                    .bl
                    .client(l.cluster.node, &cfg.client, &l.targets(), &req);
                entry.phases.measure_s += t.elapsed().as_secs_f64();
                match run {
                    Ok(r) => entry.runs.push(r),
                    Err(e) => entry.fail(format!("run {}: {e:#}", round + 1)),
                }
            }
            orders.push(
                order
                    .iter()
                    .map(|&k| self.entries[k].dp.to_string())
                    .collect(),
            );
        }
        orders
    }

    /// kplb's socket programs' own cost per connection: one more client run, outside the timed
    /// rounds, with the kernel's BPF run-time statistics on (they cost every program on the
    /// machine a little while on). End-to-end ratios on a shared 2-vCPU VM move by ±10% from
    /// round to round; this says how much of a connection's time kplb itself takes.
    fn hook_cost(&mut self, cfg: &Config) {
        let Some(entry) = self
            .entries
            .iter_mut()
            .find(|e| e.dp == Dataplane::Kplb && e.error.is_none())
        else {
            return;
        };
        let Some(l) = &entry.loaded else { return };
        let req = Requests {
            count: cfg.count,
            warmup: cfg.warmup,
            fail_fast: false,
        };
        let bl = self.bl;
        let res = bpf_stats::measure(|| bl.client(l.cluster.node, &cfg.client, &l.targets(), &req));
        entry.hooks = match res {
            Ok((client, progs)) => {
                let conns = (cfg.count + cfg.warmup) as f64;
                let total: u64 = progs.values().map(|p| p.run_time_ns).sum();
                let per_prog: serde_json::Map<String, Value> = progs
                    .iter()
                    .map(|(name, p)| {
                        let per_call = p.run_time_ns as f64 / p.run_cnt.max(1) as f64;
                        let calls = p.run_cnt as f64 / conns;
                        (
                            name.clone(),
                            json!({"ns_per_call": per_call, "calls_per_connection": calls}),
                        )
                    })
                    .collect();
                json!({
                    "connections": conns,
                    "ns_per_connection": total as f64 / conns,
                    "programs": per_prog,
                    "client": client,
                })
            }
            Err(e) => json!({"error": format!("{e:#}")}),
        };
    }

    /// Section 4 on kplb's running agent (whose cold start was this size's load). Further cold
    /// starts (`cfg.cold_starts` in all) replace it with a fresh agent on the same node first.
    fn control(&mut self, cfg: &control::Config, rng: &mut Rng) -> Value {
        let kplb = self.entries.iter_mut().find(|e| e.dp == Dataplane::Kplb);
        let Some(entry) = kplb else {
            return json!({"error": "kplb is not running at this size (see section 2)"});
        };
        let services = entry.services;
        let mut cold = vec![json!({
            "start_to_synced_s": entry.detail["start_to_synced_s"],
            "synced": entry.detail["synced"],
        })];
        let Some(l) = entry.loaded.as_mut().filter(|l| l.agent.is_some()) else {
            return json!({"error": "kplb is not running at this size (see section 2)"});
        };
        eprintln!("kplb-bench: control: changes at {services} services");
        let result = (|| -> Result<Value> {
            for _ in 1..cfg.cold_starts {
                if let Some(old) = l.agent.take() {
                    old.stop_and_clean()?;
                }
                let (agent, sample) =
                    control::cold_start(&l.bl.lab, l.cluster.node, &l.manifests())?;
                l.agent = Some(agent);
                cold.push(sample);
            }
            let agent = l.agent.as_ref().context("no agent")?;
            control::measure_running(agent, &l.manifests(), &l.cluster, cfg, rng, cold)
        })();
        result.unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
    }

    /// Removes every dataplane; returns the entries' results.
    fn teardown(self) -> Vec<Value> {
        self.entries
            .into_iter()
            .map(|mut entry| {
                if let Some(l) = entry.loaded.take() {
                    entry.remove(l);
                }
                entry.result()
            })
            .collect()
    }
}

/// A dataplane installed on its node; removed completely by [`Loaded::remove`], or when
/// dropped (also when loading failed half way).
struct Loaded<'a> {
    bl: &'a BenchLab,
    dp: Dataplane,
    cluster: Cluster,
    agent: Option<RunningAgent>,
    /// Rule files and manifests; removed last (the agent reads its manifests until it stops).
    scratch: PathBuf,
    removed: bool,
}

impl<'a> Loaded<'a> {
    /// Nothing installed yet for `cluster` on its node.
    fn new(bl: &'a BenchLab, dp: Dataplane, cluster: Cluster) -> Result<Self> {
        let scratch = bl.lab.tmp_dir().join(format!("{dp}-{}", cluster.services));
        fs::create_dir_all(&scratch)?;
        Ok(Self {
            bl,
            dp,
            cluster,
            agent: None,
            scratch,
            removed: false,
        })
    }

    /// Installs the dataplane, giving up at `deadline`; returns how it went. `poll`: the
    /// agent polls its manifests every [`control::POLL_MS`] (section 4 runs on it).
    fn load(&mut self, deadline: Instant, poll: bool) -> Result<Value> {
        match self.dp {
            Dataplane::None => Ok(json!({})),
            Dataplane::Kplb => self.load_kplb(deadline, poll),
            Dataplane::Iptables => self.load_iptables(deadline),
            Dataplane::Nftables => self.load_nftables(deadline),
            Dataplane::Ipvs => self.load_ipvs(deadline),
        }
    }

    fn node(&self) -> String {
        node_name(self.cluster.node)
    }

    fn manifests(&self) -> PathBuf {
        self.scratch.join("manifests")
    }

    /// Where the client connects: the measured ClusterIP, or the pods themselves.
    fn targets(&self) -> Vec<SocketAddr> {
        match self.dp {
            Dataplane::None => (0..ENDPOINTS)
                .map(|j| {
                    SocketAddr::new(services::pod_ip(self.cluster.node, j).into(), TARGET_PORT)
                })
                .collect(),
            _ => vec![SocketAddr::new(
                services::vip(self.cluster.measured()).into(),
                PORT,
            )],
        }
    }

    /// Runs `argv` in the node, failing when it fails or `deadline` passes.
    fn run_until(&self, argv: &[&str], deadline: Instant) -> Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("out of time before `{}`", argv.join(" "));
        }
        self.bl.node_ok(&self.node(), argv, left)
    }

    fn load_kplb(&mut self, deadline: Instant, poll: bool) -> Result<Value> {
        let t = Instant::now();
        self.cluster.write_manifests(&self.manifests())?;
        let manifest_write_s = t.elapsed().as_secs_f64();
        let extra: &[&str] = if poll {
            &["--poll-interval-ms", control::POLL_MS]
        } else {
            &[]
        };
        let agent = RunningAgent::start(&self.bl.lab, self.cluster.node, &self.manifests(), extra)?;
        let agent = self.agent.insert(agent);
        let (wall, line) = agent.wait_synced(deadline.saturating_duration_since(Instant::now()))?;
        Ok(json!({"synced": line, "start_to_synced_s": wall, "manifest_write_s": manifest_write_s}))
    }

    /// One `iptables-restore` of the whole nat table (kube-proxy's first sync).
    fn load_iptables(&mut self, deadline: Instant) -> Result<Value> {
        let file = self.scratch.join("iptables.rules");
        fs::write(&file, rules::iptables(&self.cluster))?;
        let t = Instant::now();
        self.run_until(&["iptables-restore", path(&file)?], deadline)?;
        let restore_s = t.elapsed().as_secs_f64();
        let version = self.run_until(&["iptables", "--version"], deadline)?;
        Ok(json!({"restore_s": restore_s, "version": version.trim()}))
    }

    /// The transactions of [`rules::nftables`] one after another, each within what is left
    /// of the deadline.
    fn load_nftables(&mut self, deadline: Instant) -> Result<Value> {
        let txs = rules::nftables(&self.cluster);
        let mut times = Vec::new();
        for (k, tx) in txs.iter().enumerate() {
            let file = self.scratch.join(format!("nft-{k}.nft"));
            fs::write(&file, tx)?;
            let t = Instant::now();
            self.run_until(&["nft", "-f", path(&file)?], deadline)
                .with_context(|| {
                    let before: Vec<String> = times.iter().map(|s| format!("{s:.1}")).collect();
                    format!(
                        "transaction {} of {} (those before took {} s)",
                        k + 1,
                        txs.len(),
                        before.join(", ")
                    )
                })?;
            times.push(t.elapsed().as_secs_f64());
        }
        let version = self.run_until(&["nft", "--version"], deadline)?;
        Ok(
            json!({"transactions_s": times, "load_s": times.iter().sum::<f64>(), "version": version.trim()}),
        )
    }

    fn load_ipvs(&mut self, deadline: Instant) -> Result<Value> {
        let (ip, restore) = rules::ipvs(&self.cluster);
        let netns = self.bl.lab.node(self.cluster.node)?.netns.clone();
        lb_tests::netns::ip_batch(&netns, &ip)?;
        let file = self.scratch.join("ipvs.rules");
        fs::write(&file, restore)?;
        let t = Instant::now();
        let restore_cmd = format!("ipvsadm-restore < {}", file.display());
        self.run_until(&["sh", "-c", &restore_cmd], deadline)?;
        lb_tests::netns::sysctls(&netns, &[("net.ipv4.vs.conntrack", "1")])?;
        Ok(json!({"restore_s": t.elapsed().as_secs_f64()}))
    }

    fn remove(mut self) -> Result<()> {
        self.removed = true;
        self.clean()
    }

    fn clean(&mut self) -> Result<()> {
        let r = self.remove_dataplane();
        let _ = fs::remove_dir_all(&self.scratch);
        r
    }

    fn remove_dataplane(&mut self) -> Result<()> {
        let node = self.node();
        let run = |argv: &[&str]| self.bl.node_ok(&node, argv, TEARDOWN_LIMIT).map(|_| ());
        match self.dp {
            Dataplane::None => Ok(()),
            Dataplane::Kplb => match self.agent.take() {
                Some(a) => a.stop_and_clean(),
                None => Ok(()),
            },
            Dataplane::Iptables => {
                run(&["iptables", "-t", "nat", "-F"])?;
                run(&["iptables", "-t", "nat", "-X"])?;
                // iptables-nft leaves its (now empty) tables behind; remove them too (the
                // node's ruleset is all ours).
                run(&["nft", "flush", "ruleset"])
            }
            Dataplane::Nftables => run(&["nft", "flush", "ruleset"]),
            Dataplane::Ipvs => {
                let a = run(&["ipvsadm", "-C"]);
                a.and(run(&["ip", "link", "del", "kube-ipvs0"]))
            }
        }
    }
}

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(e) = self.clean() {
            eprintln!("kplb-bench: removing {}: {e:#}", self.dp);
        }
    }
}

fn path(p: &std::path::Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
