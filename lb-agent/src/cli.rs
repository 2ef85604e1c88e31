//! Command line. The standalone flags are a contract shared with users, tests and acceptance
//! suites (see the README): their names and meanings stay stable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "kplb node agent: programs eBPF service load balancing (a kube-proxy replacement)",
    long_about = "kplb node agent. Watches Services and EndpointSlices (from the Kubernetes API, or \
                  from YAML files with --manifests) and programs this node's eBPF datapath: socket-level \
                  load balancing for ClusterIPs on cgroup v2 hooks, and XDP for NodePort, LoadBalancer \
                  and ExternalIPs on --interfaces. State is pinned under --bpffs-dir so traffic keeps \
                  flowing while the agent restarts."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Remove everything the agent installed: pinned programs, links and maps (detaching the
    /// programs from the cgroup and interfaces).
    Cleanup(CleanupArgs),
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Directory on a bpf filesystem holding the agent's pins [default: the run flag's value,
    /// also when given before `cleanup`, else /sys/fs/bpf/kplb].
    #[arg(long)]
    pub bpffs_dir: Option<PathBuf>,
    /// External interfaces the agent attached to (accepted for symmetry with the run flags).
    #[arg(long, value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// cgroup v2 directory the socket programs were attached to.
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// This node's name. An endpoint whose EndpointSlice nodeName equals it is local.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// Standalone mode: read Service and EndpointSlice YAML (multi-document files allowed) from
    /// this directory and re-read it on change. Without it the agent watches the Kubernetes API
    /// (in-cluster config or KUBECONFIG).
    #[arg(long)]
    pub manifests: Option<PathBuf>,

    /// External interfaces (comma-separated) where NodePort, LoadBalancer and ExternalIP traffic
    /// is translated (XDP, plus tc for the reverse path).
    #[arg(long, value_delimiter = ',')]
    pub interfaces: Vec<String>,

    /// cgroup v2 directory where the socket-level load balancing programs attach; every socket
    /// created by a process below it is balanced.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_path: PathBuf,

    /// Directory on a bpf filesystem for this agent's pinned programs, links and maps (one per
    /// agent instance). Pins survive restarts, so traffic keeps flowing.
    #[arg(long, default_value = "/sys/fs/bpf/kplb")]
    pub bpffs_dir: PathBuf,

    /// This node's IPs (comma-separated). Default: the addresses of --interfaces.
    #[arg(long, value_delimiter = ',')]
    pub node_ips: Vec<std::net::IpAddr>,

    /// CIDRs (comma-separated) whose node addresses accept NodePort traffic, like kube-proxy's
    /// --nodeport-addresses. Default: all node IPs.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,

    /// Address for the kube-proxy-compatible /healthz and /livez endpoints.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind: SocketAddr,

    /// Address for Prometheus /metrics.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind: SocketAddr,

    /// How long a Service or EndpointSlice change may wait to reach the maps before /healthz and
    /// /livez answer 503 (kube-proxy: twice its sync period). A number with a unit: 500ms, 60s,
    /// 2m (seconds without one).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub healthz_timeout: Duration,

    /// Maglev lookup table size per service: a supported prime (251 ... 1048573), larger than
    /// the service's backend count; ~100x the backends gives even balance. Services can override
    /// it with the annotation kplb.io/maglev-table-size.
    #[arg(long, default_value_t = lb_common::maglev::DEFAULT_TABLE_SIZE)]
    pub maglev_table_size: u32,

    /// Cluster-wide Maglev hash seed. Must be equal on every node so that all nodes choose the
    /// same backend for the same flow.
    #[arg(long, default_value_t = 0x6b70_6c62)]
    pub maglev_seed: u64,

    /// Seconds a Maglev table keeps each moved slot's previous owner after a backend change
    /// (0 disables). A non-SYN TCP packet without conntrack state (the flow was re-hashed to this
    /// node by an upstream router, or the node restarted) goes to that previous owner if it still
    /// exists. Longer windows protect longer-lived flows at the cost of one extra table rewrite.
    #[arg(long, default_value_t = 60)]
    pub maglev_prev_window: u64,

    /// How often, in milliseconds, the agent wakes up without being told of a change: to check
    /// the manifest directory (changes there are normally noticed at once through inotify), and
    /// for housekeeping (conntrack GC, previous-owner windows, reuse of table space).
    #[arg(long, default_value_t = 100)]
    pub poll_interval_ms: u64,

    /// Minimum time between two syncs, like kube-proxy's --min-sync-period: changes arriving
    /// sooner are applied together. 0 applies every change as soon as it arrives (a sync costs
    /// in proportion to what changed, not to the size of the cluster). A number with a unit:
    /// 0s, 100ms, 1s.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub min_sync_period: Duration,

    /// How traffic to remote backends leaves this node: `snat` (source becomes this node's IP;
    /// replies come back here), or `dsr` (IPv4: the packet keeps the client's source and is
    /// tunnelled in IPIP, with a 28-byte outer header, to the backend's node, which answers
    /// the client directly; every node must run with `dsr`, and a backend's node IP must be
    /// known from its Node object, else that backend is reached through SNAT; IPv6 uses SNAT).
    #[arg(long, value_enum, default_value = "snat")]
    pub lb_mode: LbMode,

    /// Service CIDRs (comma-separated, one per family). Addresses inside them that are no
    /// frontend are dropped on --interfaces instead of being routed out.
    #[arg(long, value_delimiter = ',')]
    pub service_cidr: Vec<String>,

    /// Capacity of the north-south connection tracking table (LRU; set when the map is first
    /// created, kept by restarts).
    #[arg(long, default_value_t = lb_common::maps::DEFAULT_CT_MAX)]
    pub conntrack_max: u32,

    /// XDP attach mode on --interfaces: native where the driver supports it (auto), or forced.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: crate::datapath::XdpAttach,

    /// Source ports used for SNAT towards remote backends (keep them outside the kernel's
    /// ip_local_port_range).
    #[arg(long, default_value = "61001-65535")]
    pub snat_ports: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LbMode {
    Snat,
    Dsr,
}

/// `500ms`, `60s`, `2m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with a unit (500ms, 60s, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{text:?}: unknown unit {unit:?} (use ms, s or m)")),
    }
}

impl Cli {
    /// The pins directory `cleanup` removes: its own flag, else the one given before the
    /// subcommand (`lb-agent --bpffs-dir X cleanup` must not clean the default directory,
    /// which may be another agent's).
    pub fn cleanup_dir(&self) -> Option<&std::path::Path> {
        match &self.command {
            Some(Command::Cleanup(a)) => {
                Some(a.bpffs_dir.as_deref().unwrap_or(&self.run.bpffs_dir))
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn healthz_timeout_defaults_to_a_minute() {
        use clap::Parser as _;
        let cli = Cli::try_parse_from(["lb-agent"]).unwrap();
        assert_eq!(cli.run.healthz_timeout, Duration::from_secs(60));
        let cli = Cli::try_parse_from(["lb-agent", "--healthz-timeout", "5s"]).unwrap();
        assert_eq!(cli.run.healthz_timeout, Duration::from_secs(5));
    }

    #[test]
    fn cleanup_cleans_the_directory_given_before_or_after_it() {
        use clap::Parser as _;
        let dir = |argv: &[&str]| {
            let cli = Cli::try_parse_from(argv).unwrap();
            cli.cleanup_dir().map(|d| d.display().to_string())
        };
        assert_eq!(
            dir(&["lb-agent", "cleanup"]).as_deref(),
            Some("/sys/fs/bpf/kplb")
        );
        let after = ["lb-agent", "cleanup", "--bpffs-dir", "/sys/fs/bpf/x"];
        assert_eq!(dir(&after).as_deref(), Some("/sys/fs/bpf/x"));
        let before = ["lb-agent", "--bpffs-dir", "/sys/fs/bpf/y", "cleanup"];
        assert_eq!(dir(&before).as_deref(), Some("/sys/fs/bpf/y"));
        assert_eq!(dir(&["lb-agent"]), None);
    }
}
