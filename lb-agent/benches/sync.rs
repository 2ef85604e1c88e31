//! The agent's sync pipeline in-process (`cargo xtask bench`, section 4; root, bpffs).
//!
//! ```text
//! cargo bench -p lb-agent --bench sync -- [--quick] [--configs N:K[,N:K...]]
//!     [--change-seconds S] [--out FILE]
//! ```
//! Each configuration N:K is N services and up to K changes, as many as fit in S seconds
//! (default 1000:1000,10000:1000 and 30 s; quick 1000:1000 and 10 s): the count measured is
//! recorded, so a slow control plane costs the run its time box, not more.
//! The library pipeline the agent runs — the changed objects into `view::ClusterView`, the
//! affected services' desired state recomputed, `sync::Reconciler::apply` on the keys that
//! touched — against the real maps (`BpfDatapath::load`, pinned under a private
//! `/sys/fs/bpf/kplb-bench-sync-<pid>` that is removed at the end) for N ClusterIP services of
//! 10 endpoints each:
//!
//! 1. a full sync from empty maps, split into its phases (every object validated into the
//!    view, every service's desired state, apply), with every map operation the reconciler
//!    issues timed by kind (a wrapper around the real datapath);
//! 2. K single EndpointSlice changes (one service alternates between 10 and 9 endpoints, so
//!    each change writes one Maglev table and rewrites one frontend), each timed as the agent
//!    does it: the slice into the view, its service's desired state, apply.
//!
//! Prints a JSON document (and writes it to `--out`).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    datapath::{BpfDatapath, DatapathError, LoadOptions},
    model::NodeConfig,
    standalone,
    sync::{Datapath, Reconciler, Scope, TableLoc},
    view::ClusterView,
};
use lb_common::{Backend, MaglevSlot, SvcKey, SvcVal};
use serde_json::{Value, json};

const ENDPOINTS: usize = 10;
const SEED: u64 = 0x6b70_6c62;

struct Args {
    quick: bool,
    /// (services, changes).
    configs: Vec<(usize, usize)>,
    /// Time box of one configuration's changes.
    change_budget: Duration,
    out: Option<PathBuf>,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let quick = argv.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let default = if quick {
        "1000:1000"
    } else {
        "1000:1000,10000:1000"
    };
    let configs = value("--configs")
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .filter_map(|c| {
            let mut it = c.split(':');
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    let seconds = value("--change-seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 10.0 } else { 30.0 });
    Args {
        quick,
        configs,
        change_budget: Duration::from_secs_f64(seconds),
        out: value("--out").map(PathBuf::from),
    }
}

/// The same synthetic services as the lab bench: ClusterIP 172.30.x.y, port 80 -> 8080,
/// endpoints 10.128.0.0 + 10 i + j (distinct per service).
fn service_doc(i: usize, endpoints: usize, out: &mut String) {
    let n = (i + 1) as u32;
    let vip = std::net::Ipv4Addr::from(0xac1e_0000 | (n & 0xffff));
    let _ = write!(
        out,
        "---\n{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"svc-{i}\",\"namespace\":\"default\"}},\
         \"spec\":{{\"type\":\"ClusterIP\",\"clusterIP\":\"{vip}\",\"clusterIPs\":[\"{vip}\"],\"ipFamilies\":[\"IPv4\"],\
         \"ports\":[{{\"name\":\"http\",\"protocol\":\"TCP\",\"port\":80,\"targetPort\":8080}}]}}}}\n"
    );
    let eps: Vec<String> = (0..endpoints)
        .map(|j| {
            let ip = std::net::Ipv4Addr::from(0x0a80_0000 + (i * ENDPOINTS + j) as u32);
            format!(
                "{{\"addresses\":[\"{ip}\"],\"conditions\":{{\"ready\":true,\"serving\":true,\"terminating\":false}},\"nodeName\":\"node1\"}}"
            )
        })
        .collect();
    let _ = write!(
        out,
        "---\n{{\"apiVersion\":\"discovery.k8s.io/v1\",\"kind\":\"EndpointSlice\",\"metadata\":{{\"name\":\"svc-{i}-1\",\"namespace\":\"default\",\
         \"labels\":{{\"kubernetes.io/service-name\":\"svc-{i}\"}}}},\"addressType\":\"IPv4\",\
         \"ports\":[{{\"name\":\"http\",\"protocol\":\"TCP\",\"port\":8080}}],\"endpoints\":[{}]}}\n",
        eps.join(",")
    );
}

fn parse(text: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut problems = Vec::new();
    let objects = standalone::parse_documents(text, &mut problems).expect("generated YAML parses");
    assert!(problems.is_empty(), "{problems:?}");
    (objects.services, objects.slices)
}

/// Times every datapath operation by kind, delegating to the real datapath.
struct Timed<'a> {
    inner: &'a mut BpfDatapath,
    ops: BTreeMap<&'static str, (usize, Duration)>,
}

impl Timed<'_> {
    fn time<T>(&mut self, kind: &'static str, f: impl FnOnce(&mut BpfDatapath) -> T) -> T {
        let t = Instant::now();
        let r = f(self.inner);
        let e = self.ops.entry(kind).or_default();
        e.0 += 1;
        e.1 += t.elapsed();
        r
    }
}

impl Datapath for Timed<'_> {
    type Error = DatapathError;
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), DatapathError> {
        self.time("set_backend", |d| d.set_backend(id, b))
    }
    fn set_backends(&mut self, b: &[(u32, Backend)]) -> Vec<Result<(), DatapathError>> {
        self.time("set_backends", |d| d.set_backends(b))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.time("del_backend", |d| d.del_backend(id))
    }

    fn write_table(&mut self, t: &[MaglevSlot]) -> Result<TableLoc, DatapathError> {
        self.time("write_table", |d| d.write_table(t))
    }
    fn write_tables(&mut self, t: &[&[MaglevSlot]]) -> Vec<Result<TableLoc, DatapathError>> {
        self.time("write_tables", |d| d.write_tables(t))
    }
    fn rewrite_table(&mut self, loc: TableLoc, t: &[MaglevSlot]) -> Result<(), DatapathError> {
        self.time("rewrite_table", |d| d.rewrite_table(loc, t))
    }
    fn retire_table(&mut self, loc: TableLoc) {
        self.time("retire_table", |d| d.retire_table(loc))
    }
    fn set_frontend(&mut self, k: &SvcKey, v: &SvcVal) -> Result<(), DatapathError> {
        self.time("set_frontend", |d| d.set_frontend(k, v))
    }
    fn del_frontend(&mut self, k: &SvcKey) -> Result<(), DatapathError> {
        self.time("del_frontend", |d| d.del_frontend(k))
    }
    fn set_src_range(
        &mut self,
        group: u32,
        net: std::net::IpAddr,
        prefix: u8,
        present: bool,
    ) -> Result<(), DatapathError> {
        self.time("set_src_range", |d| {
            d.set_src_range(group, net, prefix, present)
        })
    }
    fn purge_affinity_groups(&mut self, purges: &[(u32, Vec<u32>)]) -> Result<(), DatapathError> {
        self.time("purge_affinity", |d| d.purge_affinity_groups(purges))
    }
}

fn ops_json(ops: &BTreeMap<&'static str, (usize, Duration)>) -> Value {
    ops.iter()
        .map(|(k, (n, d))| {
            (
                (*k).to_owned(),
                json!({"count": n, "total_ms": d.as_secs_f64() * 1e3,
                       "mean_us": d.as_secs_f64() * 1e6 / (*n).max(1) as f64}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn dist(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"count": v.len(), "p50": pct(&v, 50.0), "p99": pct(&v, 99.0), "max": pct(&v, 100.0)})
}

/// The private pin directory; removed when dropped (also on panic).
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    let a = args();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("sync bench: SKIPPED (needs root to load BPF maps)");
        println!("{}", json!({"skipped": "needs root"}));
        return;
    }
    // Leftovers of killed runs (their pid is gone).
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("kplb-bench-sync-")
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let mut results = Vec::new();
    for &(n, changes) in &a.configs {
        eprintln!("sync bench: {n} services, {changes} changes");
        results.push(run_config(n, changes, a.change_budget));
    }
    let result = json!({"quick": a.quick, "configs": results});
    println!("{result}");
    if let Some(out) = a.out {
        std::fs::write(
            &out,
            serde_json::to_string_pretty(&result).unwrap_or_default(),
        )
        .unwrap_or_else(|e| eprintln!("sync bench: writing {}: {e}", out.display()));
    }
}

fn run_config(n: usize, changes: usize, change_budget: Duration) -> Value {
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/kplb-bench-sync-{}",
        std::process::id()
    )));
    let measured = n - 1;
    let mut text = String::with_capacity(n * 1100);
    for i in 0..n {
        service_doc(i, ENDPOINTS, &mut text);
    }
    let t = Instant::now();
    let (services, slices) = parse(&text);
    let parse_s = t.elapsed().as_secs_f64();
    let variants: Vec<EndpointSlice> = [ENDPOINTS - 1, ENDPOINTS]
        .iter()
        .map(|&k| {
            let mut one = String::new();
            service_doc(measured, k, &mut one);
            parse(&one).1.remove(0)
        })
        .collect();
    let slice_key = ("default".to_string(), format!("svc-{measured}-1"));

    let mut dp = BpfDatapath::load(&pins.0, LoadOptions::default()).expect("loading the datapath");
    let node = NodeConfig {
        node_name: "node1".into(),
        ..NodeConfig::default()
    };
    let mut rec = Reconciler::new(SEED);
    let mut view = ClusterView::default();
    let mut errors = Vec::new();

    // 1. Full sync from empty maps.
    let t0 = Instant::now();
    view.resync(services.iter(), slices.iter(), &mut |_| {});
    view.set_node(&node);
    let t1 = Instant::now();
    view.recompute(&mut |_| {});
    let t2 = Instant::now();
    let mut timed = Timed {
        inner: &mut dp,
        ops: BTreeMap::new(),
    };
    let stats = rec.apply(view.desired(), Scope::All, &mut timed, &mut |e| {
        errors.push(e)
    });
    let t3 = Instant::now();
    let full_ops = ops_json(&timed.ops);
    let (slabs, slots, used) = dp.table_usage();
    let full = json!({
        "inventory_ms": (t1 - t0).as_secs_f64() * 1e3,
        "desired_ms": (t2 - t1).as_secs_f64() * 1e3,
        "apply_ms": (t3 - t2).as_secs_f64() * 1e3,
        "total_ms": (t3 - t0).as_secs_f64() * 1e3,
        "frontends": stats.frontends,
        "tables": stats.groups,
        "backends": stats.backends,
        "errors": stats.errors,
        "table_slabs": slabs,
        "table_slots": slots,
        "table_slots_used": used,
        "ops": full_ops,
    });
    eprintln!("sync bench: full sync of {n} services: {full}");

    // 2. Single EndpointSlice changes.
    let (mut inv_ms, mut des_ms, mut app_ms, mut tot_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut change_ops = BTreeMap::new();
    let mut writes = 0usize;
    let started = Instant::now();
    for c in (0..changes).take_while(|_| started.elapsed() < change_budget) {
        let t0 = Instant::now();
        view.set_slice(&slice_key, Some(&variants[c % 2]), &mut |_| {});
        let t1 = Instant::now();
        let touched = view.recompute(&mut |_| {});
        let t2 = Instant::now();
        let mut timed = Timed {
            inner: &mut dp,
            ops: std::mem::take(&mut change_ops),
        };
        let st = rec.apply(
            view.desired(),
            Scope::Touched(&touched),
            &mut timed,
            &mut |e| errors.push(e),
        );
        let t3 = Instant::now();
        change_ops = timed.ops;
        writes += st.writes;
        inv_ms.push((t1 - t0).as_secs_f64() * 1e3);
        des_ms.push((t2 - t1).as_secs_f64() * 1e3);
        app_ms.push((t3 - t2).as_secs_f64() * 1e3);
        tot_ms.push((t3 - t0).as_secs_f64() * 1e3);
    }
    let result = json!({
        "services": n,
        "endpoints_per_service": ENDPOINTS,
        "maglev_table_size": node.maglev_table_size,
        "yaml_parse_s": parse_s,
        "full_sync": full,
        "change": {
            "count": tot_ms.len(),
            "asked": changes,
            "budget_s": change_budget.as_secs_f64(),
            "writes_per_change": writes as f64 / tot_ms.len().max(1) as f64,
            "inventory_ms": dist(inv_ms),
            "desired_ms": dist(des_ms),
            "apply_ms": dist(app_ms),
            "total_ms": dist(tot_ms),
            "ops": ops_json(&change_ops),
        },
        "errors": errors.len(),
        "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
    });
    drop(dp);
    drop(pins);
    result
}
