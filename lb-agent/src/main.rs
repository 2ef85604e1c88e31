//! `lb-agent`: process start-up, signals and the sync loop.

use std::{
    collections::BTreeSet,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use clap::Parser as _;
use lb_agent::{
    cli::{Cli, Command, RunArgs},
    datapath::{self, BpfDatapath},
    health::{self, Health},
    k8s::KubeSource,
    model::{self, NodeConfig},
    mountns, objects,
    standalone::ManifestDir,
    sync::Reconciler,
};
use tracing::{error, info, warn};

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
    let result = match cli.command {
        Some(Command::Cleanup(a)) => datapath::cleanup(&a.bpffs_dir).map_err(anyhow::Error::from),
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
    Dir(ManifestDir),
    Kube(KubeSource),
}

impl Source {
    /// Whether the objects changed since the last call (reports file problems on the way).
    fn changed(&mut self, coalesce: Duration) -> bool {
        match self {
            Self::Dir(dir) => {
                let mut problems = Vec::new();
                let changed = dir.poll(&mut problems).unwrap_or_else(|e| {
                    warn!("reading manifests: {e}");
                    false
                });
                for p in &problems {
                    warn!("{p}");
                }
                changed
            }
            Self::Kube(kube) => kube.take_change(coalesce),
        }
    }

    fn snapshot(&self) -> (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>) {
        match self {
            Self::Dir(dir) => (
                dir.services().cloned().map(Arc::new).collect(),
                dir.slices().cloned().map(Arc::new).collect(),
            ),
            Self::Kube(kube) => (kube.services(), kube.slices()),
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
    let mut source = match &args.manifests {
        Some(dir) if !dir.is_dir() => bail!("--manifests {}: not a directory", dir.display()),
        Some(dir) => Source::Dir(ManifestDir::new(dir)),
        None => Source::Kube(KubeSource::start(&args.node_name).context("Kubernetes API source")?),
    };
    let health = Arc::new(Health::default());
    health::serve(args.healthz_bind, health.clone()).context("healthz server")?;
    if args.metrics_bind != args.healthz_bind {
        health::serve(args.metrics_bind, health.clone()).context("metrics server")?;
    }

    let mut dp = BpfDatapath::load(&args.bpffs_dir, datapath::LoadOptions::default()).context("loading the datapath")?;
    let mut reconciler = Reconciler::adopt(args.maglev_seed, dp.existing());
    dp.attach_cgroup(&args.cgroup_path, &args.bpffs_dir)
        .with_context(|| format!("attaching to cgroup {}", args.cgroup_path.display()))?;
    info!(
        node = %args.node_name,
        cgroup = %args.cgroup_path.display(),
        bpffs = %args.bpffs_dir.display(),
        "datapath attached"
    );

    let node = NodeConfig {
        node_name: args.node_name.clone(),
        maglev_table_size: args.maglev_table_size,
    };
    let interval = Duration::from_millis(args.poll_interval_ms);
    let mut logged = BTreeSet::new();
    let mut first = true;
    while !STOP.load(Ordering::SeqCst) {
        if source.changed(interval) || first {
            let (services, slices) = source.snapshot();
            let inputs = Inputs { services: &services, slices: &slices };
            sync_once(&inputs, &node, &mut reconciler, &mut dp, &health, &mut logged, first);
            first = false;
        }
        sleep_unless_stopped(interval);
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

struct Inputs<'a> {
    services: &'a [Arc<Service>],
    slices: &'a [Arc<EndpointSlice>],
}

fn sync_once(
    inputs: &Inputs<'_>,
    node: &NodeConfig,
    reconciler: &mut Reconciler,
    dp: &mut BpfDatapath,
    health: &Health,
    logged: &mut BTreeSet<String>,
    first: bool,
) {
    let start = Instant::now();
    let mut warnings = BTreeSet::new();
    let inv = objects::inventory(
        inputs.services.iter().map(|s| &**s),
        inputs.slices.iter().map(|s| &**s),
        &mut |w| {
            warnings.insert(w);
        },
    );
    let desired = model::desired_state(&inv, node, &mut |w| {
        warnings.insert(w);
    });
    // Log each problem once, not again on every unrelated change.
    for w in warnings.difference(logged) {
        warn!("{w}");
    }
    *logged = warnings;
    let stats = reconciler.apply(&desired, dp, &mut |e| error!("sync: {e}"));
    let took = start.elapsed();
    record(health, &stats, took);
    if first {
        info!(
            services = inv.services.len(),
            frontends = stats.frontends,
            backends = stats.backends,
            tables = stats.groups,
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
    health.mark_synced();
}

fn record(health: &Health, stats: &lb_agent::sync::SyncStats, took: Duration) {
    let r = Ordering::Relaxed;
    health.syncs.fetch_add(1, r);
    health.sync_errors.fetch_add(stats.errors as u64, r);
    health.frontends.store(stats.frontends as u64, r);
    health.backends.store(stats.backends as u64, r);
    health.tables.store(stats.groups as u64, r);
    health.last_sync_micros.store(took.as_micros() as u64, r);
}

fn sleep_unless_stopped(d: Duration) {
    let end = Instant::now() + d;
    while !STOP.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}
