//! `lb-agent`: process start-up, signals and the sync loop.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use lb_agent::{
    changes::{Batch, ChangeQueue, Changed},
    cli::{Cli, LbMode, RunArgs},
    datapath::{self, BpfDatapath},
    health::{self, Health},
    healthcheck::HealthChecks,
    k8s::KubeSource,
    model::NodeConfig,
    mountns, node, objects,
    standalone::{DirWatch, ManifestDir},
    stats::{DatapathStats, ServiceStats},
    sync::{Reconciler, Scope},
    view::ClusterView,
};
use tracing::{debug, error, info, warn};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.cleanup_dir() {
        Some(dir) => datapath::cleanup(dir).map_err(anyhow::Error::from),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

/// Where Services and EndpointSlices come from.
enum Source {
    Dir {
        dir: ManifestDir,
        /// `None` where inotify is unavailable (the timed poll remains).
        watch: Option<DirWatch>,
    },
    Kube(KubeSource),
}

impl Source {
    /// The changes to sync, if any (reports file problems on the way).
    fn changed(&mut self, changes: &ChangeQueue) -> Option<Batch> {
        if let Self::Dir { dir, .. } = self {
            let mut problems = Vec::new();
            let changed = dir.poll(&mut problems).unwrap_or_else(|e| {
                warn!("reading manifests in {}: {e}", dir.dir().display());
                Changed::default()
            });
            for p in &problems {
                warn!("{p}");
            }
            if !changed.is_empty() {
                changes.queued_objects(changed, None);
            }
        }
        changes.take(Duration::ZERO)
    }

    /// Waits until a change may be pending or `timeout` passes.
    fn wait(&self, changes: &ChangeQueue, timeout: Duration) {
        match self {
            Self::Dir {
                watch: Some(watch), ..
            } => {
                watch.wait(timeout);
            }
            Self::Dir { watch: None, .. } => sleep_unless_stopped(timeout),
            Self::Kube(_) => {
                changes.wait_pending(Instant::now() + timeout);
            }
        }
    }

    /// This node's zone and whether it may receive traffic. Without a Node document, a
    /// standalone agent has no zone and is eligible; in a cluster a missing Node is not.
    fn node_status(&self, node_name: &str) -> (Option<String>, bool) {
        let info = match self {
            Self::Dir { dir, .. } => match dir.node(node_name).map(objects::node) {
                Some(Ok(info)) => Some(info),
                _ => return (None, true),
            },
            Self::Kube(kube) => kube.node_info(),
        };
        info.map_or((None, false), |i| (i.zone, !i.deleting))
    }

    /// Addresses of every Node the source knows, by name (for backends' node IPs).
    fn node_addresses(&self) -> BTreeMap<String, Vec<IpAddr>> {
        let infos: Vec<objects::NodeInfo> = match self {
            Self::Dir { dir, .. } => dir.nodes().filter_map(|n| objects::node(n).ok()).collect(),
            // Every Node with --lb-mode dsr, else only this one (no other node IPs needed).
            Self::Kube(kube) => kube.node_infos(),
        };
        infos
            .into_iter()
            .filter(|i| !i.addresses.is_empty())
            .map(|i| (i.name, i.addresses))
            .collect()
    }

    /// Brings `view` up to date with what `changed` names (everything after a relist).
    fn update(&mut self, view: &mut ClusterView, changed: &Changed, warn: &mut dyn FnMut(String)) {
        match self {
            Self::Dir { dir, .. } => dir.update_view(view, changed, warn),
            Self::Kube(kube) => kube.update_view(view, changed, warn),
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    mountns::join_host_if_hidden(&args.cgroup_path, &args.bpffs_dir)
        .context("joining the host mount namespace")?;
    install_signal_handlers();
    if !lb_common::maglev::is_supported_size(args.maglev_table_size) {
        bail!(
            "--maglev-table-size {} is not supported; use one of {:?}",
            args.maglev_table_size,
            lb_common::maglev::SUPPORTED_TABLE_SIZES
        );
    }
    // Health first: /livez answers while the first list of a large cluster is still running.
    let changes = Arc::new(ChangeQueue::default());
    let health = Arc::new(Health::new(changes.clone(), args.healthz_timeout));
    health::serve(args.healthz_bind, health.clone()).context("healthz server")?;
    if args.metrics_bind != args.healthz_bind {
        health::serve(args.metrics_bind, health.clone()).context("metrics server")?;
    }
    let mut source = match &args.manifests {
        Some(dir) if !dir.is_dir() => bail!("--manifests {}: not a directory", dir.display()),
        Some(dir) => Source::Dir {
            dir: ManifestDir::new(dir),
            watch: DirWatch::new(dir)
                .inspect_err(|e| {
                    warn!(
                        "watching {} (changes are noticed every --poll-interval-ms): {e}",
                        dir.display()
                    );
                })
                .ok(),
        },
        None => Source::Kube(
            KubeSource::start(
                &args.node_name,
                changes.clone(),
                args.lb_mode == LbMode::Dsr,
            )
            .context("Kubernetes API source")?,
        ),
    };

    let snat_ports = node::parse_port_range(&args.snat_ports)
        .with_context(|| format!("--snat-ports {:?}: expected LOW-HIGH", args.snat_ports))?;
    let node_ips = if args.node_ips.is_empty() {
        node::interface_addrs(&args.interfaces).context("reading the addresses of --interfaces")?
    } else {
        args.node_ips.clone()
    };
    let nodeport_ips =
        node::nodeport_ips(&node_ips, &args.nodeport_addresses).context("--nodeport-addresses")?;
    let settings = node::Settings {
        service_cidrs: args.service_cidr.clone(),
        snat_ports,
        dsr: args.lb_mode == LbMode::Dsr,
    };
    let config = node::config(&node_ips, &settings).context("--service-cidr")?;

    let opts = datapath::LoadOptions {
        conntrack_max: args.conntrack_max,
    };
    let mut dp = BpfDatapath::load(&args.bpffs_dir, opts).with_context(|| {
        format!(
            "loading the datapath (pins left by a kplb version with another map layout must be \
             removed first: lb-agent cleanup --bpffs-dir {})",
            args.bpffs_dir.display()
        )
    })?;
    match DatapathStats::open(&args.bpffs_dir) {
        Ok(stats) => health.metrics.set_counter_source(Box::new(stats)),
        Err(e) => warn!("datapath counters will not be exported: {e}"),
    }
    match ServiceStats::open(&args.bpffs_dir) {
        Ok(stats) => health.metrics.set_service_source(Box::new(stats)),
        Err(e) => warn!("per-service counters will not be exported: {e}"),
    }
    let mut reconciler = Reconciler::adopt(args.maglev_seed, dp.existing())
        .with_prev_window(Duration::from_secs(args.maglev_prev_window));
    dp.set_config(&config)
        .context("writing the datapath configuration")?;
    dp.attach_cgroup(&args.cgroup_path, &args.bpffs_dir)
        .with_context(|| format!("attaching to cgroup {}", args.cgroup_path.display()))?;
    for iface in &args.interfaces {
        let mode = dp
            .attach_interface(iface, &args.bpffs_dir, args.xdp_mode)
            .with_context(|| format!("attaching XDP and tc to {iface}"))?;
        info!(interface = %iface, xdp_mode = mode, "XDP and tc egress attached");
    }
    info!(
        capacity = dp.conntrack_capacity(),
        node_ips = ?node_ips,
        nodeport_ips = ?nodeport_ips,
        "conntrack table ready"
    );
    info!(
        node = %args.node_name,
        cgroup = %args.cgroup_path.display(),
        bpffs = %args.bpffs_dir.display(),
        "datapath attached"
    );

    let mut node = NodeConfig {
        node_name: args.node_name.clone(),
        maglev_table_size: args.maglev_table_size,
        zone: None,
        nodeport_ips,
        node_addresses: BTreeMap::new(),
    };
    let mut view = ClusterView::default();
    let mut health_checks = HealthChecks::default();
    let mut next_gc = Instant::now() + CT_GC_INTERVAL;
    let interval = Duration::from_millis(args.poll_interval_ms);
    let mut last_sync: Option<Instant> = None;
    changes.queued(); // the first full sync
    while !STOP.load(Ordering::SeqCst) {
        let ready = last_sync.is_none_or(|t| t.elapsed() >= args.min_sync_period);
        let batch = if ready {
            source.changed(&changes)
        } else {
            None
        };
        if let Some(batch) = batch {
            if batch.changed.all || batch.changed.nodes {
                let (zone, eligible) = source.node_status(&args.node_name);
                node.zone = zone;
                node.node_addresses = source.node_addresses();
                health.set_node_eligible(eligible);
            }
            let first = last_sync.is_none();
            sync_once(
                &mut source,
                &node,
                &mut view,
                &mut reconciler,
                &mut dp,
                &health,
                batch,
                first,
            );
            health_checks.update(&view.desired().health_checks);
            last_sync = Some(Instant::now());
            continue; // more may have arrived meanwhile
        }
        // Housekeeping when there is nothing to sync.
        if Instant::now() >= next_gc {
            let start = Instant::now();
            let (scanned, deleted) = dp.ct_gc(monotonic_ns());
            debug!(
                scanned,
                deleted,
                took_ms = start.elapsed().as_secs_f64() * 1e3,
                "conntrack gc"
            );
            next_gc = Instant::now() + CT_GC_INTERVAL;
        }
        let expired = reconciler.expire_prev(Instant::now(), &mut dp, &mut |e| error!("sync: {e}"));
        if expired > 0 {
            info!(
                tables = expired,
                "previous-owner window ended; tables rewritten"
            );
        }
        if let Err(e) = dp.reclaim_idle(Instant::now()) {
            warn!("reclaiming Maglev table space: {e}");
        }
        let wait = match last_sync {
            Some(t) if !ready => args.min_sync_period.saturating_sub(t.elapsed()),
            _ => interval,
        };
        source.wait(&changes, wait.min(interval));
    }
    if let Source::Kube(kube) = source {
        kube.shutdown();
    }
    info!(
        "stopping; the datapath stays pinned in {} and keeps serving",
        args.bpffs_dir.display()
    );
    Ok(())
}

/// Applies one batch of changes: the changed objects into the view, the services they affect
/// recomputed, the difference written to the maps.
#[allow(clippy::too_many_arguments)]
fn sync_once(
    source: &mut Source,
    node: &NodeConfig,
    view: &mut ClusterView,
    reconciler: &mut Reconciler,
    dp: &mut BpfDatapath,
    health: &Health,
    batch: Batch,
    first: bool,
) {
    let start = Instant::now();
    let batch_was_all = batch.changed.all;
    let mut warn_once = |w: String| warn!("{w}");
    source.update(view, &batch.changed, &mut warn_once);
    view.set_node(node);
    let touched = view.recompute(&mut warn_once);
    // The first sync also removes whatever a previous agent left that is no longer wanted.
    let scope = if first {
        Scope::All
    } else {
        Scope::Touched(&touched)
    };
    let stats = reconciler.apply(view.desired(), scope, dp, &mut |e| error!("sync: {e}"));
    let took = start.elapsed();
    let triggers = health.changes().applied(batch);
    health.record_sync(&stats, took, &triggers);
    let (slabs, slots, used) = dp.table_usage();
    health.metrics.set_table_usage(used, slots);
    if stats.groups_changed || first {
        health
            .metrics
            .set_service_labels(service_labels(reconciler));
    }
    if first || batch_was_all {
        // A full sync's transient allocations (parsing, table builds on every CPU) leave free
        // memory in malloc's arenas; give it back rather than keep it resident.
        // SAFETY: plain libc call, no preconditions.
        unsafe { libc::malloc_trim(0) };
    }
    if first {
        info!(
            services = view.service_count(),
            frontends = stats.frontends,
            backends = stats.backends,
            tables = stats.groups,
            table_slabs = slabs,
            table_slots_used = used,
            table_slots = slots,
            errors = stats.errors,
            took_ms = took.as_secs_f64() * 1e3,
            "synced"
        );
    } else {
        info!(
            writes = stats.writes,
            errors = stats.errors,
            took_ms = took.as_secs_f64() * 1e3,
            "applied changes"
        );
    }
}

/// Prometheus labels for every programmed group.
fn service_labels(reconciler: &Reconciler) -> lb_agent::metrics::ServiceLabels {
    reconciler
        .group_ids()
        .map(|(k, id)| {
            let labels = vec![
                ("namespace", k.service.namespace.clone()),
                ("service", k.service.name.clone()),
                ("port", k.port_name.clone()),
                ("protocol", k.protocol.to_string()),
                ("family", if k.ipv6 { "IPv6" } else { "IPv4" }.to_owned()),
                (
                    "endpoints",
                    if k.local_only { "local" } else { "all" }.to_owned(),
                ),
            ];
            (id, labels)
        })
        .collect()
}

/// How often expired conntrack entries are removed.
const CT_GC_INTERVAL: Duration = Duration::from_secs(10);

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns, which conntrack expiry uses.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_unless_stopped(d: Duration) {
    let end = Instant::now() + d;
    while !STOP.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}
