//! The lab: nodes and pods as network namespaces on one kernel (README §2 address plan).
//!
//! ```text
//!   fabric netns: br0 ── n1 ═ eth0 node1 (192.168.0.2/24, 2001:db8::2/64)
//!                     ├─ n2 ═ eth0 node2 (192.168.0.3/24, 2001:db8::3/64) ...
//!                     └─ x1 ═ eth0 external client (e.g. 203.0.113.10/24)
//!   nodeK: lxcN ═ eth0 pod (10.0.K.x/32, fd00:10:0:K::x/128)
//! ```
//! Pods are wired like a routed CNI (Calico style): the pod's default route points at the
//! link-local next hop 169.254.1.1 / fe80::1, which the node answers for (169.254.1.1 sits on
//! the node's `lo` with link scope; fe80::1 on every host-side veth). The node has a /32
//! (/128) route per local pod and a route per remote node's pod CIDR. DAD is off everywhere
//! so IPv6 works at once. Every namespace has a cgroup v2 directory; node cgroups are
//! `<cgroup2>/<prefix>/nodeK` and pods live below their node's.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, Ipv6Addr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    cleanup,
    client::{self, Attempt, Request},
    host, netns,
    poll::poll_until,
    process::{LabChild, output_with_timeout},
};

/// A node: a netns with `eth0` on the shared bridge.
#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based, as in `node1`.
    pub index: usize,
    /// `node<index>`: the agent's --node-name and the EndpointSlice nodeName.
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    /// The agent's --bpffs-dir: `/sys/fs/bpf/<prefix>-node<index>`.
    pub bpffs: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Node {
    /// This node's pod CIDRs: 10.0.K.0/24 and fd00:10:0:K::/64.
    pub fn pod_cidrs(&self) -> (String, String) {
        pod_cidrs(self.index)
    }
}

fn pod_cidrs(k: usize) -> (String, String) {
    let v6 = Ipv6Addr::new(0xfd00, 0x10, 0, k as u16, 0, 0, 0, 0);
    (format!("10.0.{k}.0/24"), format!("{v6}/64"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Fabric,
    Node(usize),
    Pod { node: usize },
    External,
}

/// Any namespace of the lab, looked up by its short name (`node1`, `pod-a`, `fabric`).
#[derive(Debug, Clone)]
pub struct Ns {
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub role: Role,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// A lab; dropping it removes everything it created (also when a test panics).
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    tmp: PathBuf,
    cgroup: PathBuf,
    nodes: Vec<Node>,
    spaces: BTreeMap<String, Ns>,
    links: u32,
    logs: AtomicU32,
    backends: Mutex<Vec<(String, LabChild)>>,
}

const FABRIC: &str = "fabric";
/// What a node needs to forward between pods and nodes with no surprises.
const ROUTER_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
];
const COMMON_SYSCTLS: [(&str, &str); 4] = [
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
];

impl Lab {
    /// A fabric bridge and `nodes` nodes (node1..nodeN). Removes stale labs of dead
    /// processes first.
    pub fn new(nodes: usize) -> Result<Self> {
        if !(1..=250).contains(&nodes) {
            bail!("a lab has 1..=250 nodes, not {nodes}");
        }
        let host = host::host()?;
        if let Err(e) = cleanup::cleanup_stale() {
            eprintln!("kplb lab: removing stale labs failed: {e:#}");
        }
        let prefix = cleanup::new_prefix();
        let mut lab = Self {
            tmp: std::env::temp_dir().join(&prefix),
            cgroup: host.cgroup2.join(&prefix),
            prefix,
            nodes: Vec::new(),
            spaces: BTreeMap::new(),
            links: 0,
            logs: AtomicU32::new(0),
            backends: Mutex::new(Vec::new()),
        };
        // From here on, Drop removes whatever part was built if a step fails.
        fs::create_dir(&lab.tmp).with_context(|| format!("creating {}", lab.tmp.display()))?;
        fs::create_dir(&lab.cgroup)
            .with_context(|| format!("creating {}", lab.cgroup.display()))?;
        let fabric = lab.add_ns(FABRIC, Role::Fabric, lab.cgroup.join(FABRIC), None, None)?;
        let batch = [
            "link set lo up",
            "link add br0 type bridge mcast_snooping 0",
            "link set br0 up",
        ];
        netns::ip_batch(&fabric, &batch.map(String::from))?;
        for k in 1..=nodes {
            lab.add_node(k, nodes)?;
        }
        Ok(lab)
    }

    fn add_node(&mut self, k: usize, total: usize) -> Result<()> {
        let name = format!("node{k}");
        let node = Node {
            index: k,
            bpffs: PathBuf::from(host::BPFFS).join(format!("{}-{name}", self.prefix)),
            cgroup: self.cgroup.join(&name),
            netns: self.netns_name(&name),
            ipv4: node_ipv4(k),
            ipv6: node_ipv6(k),
            name: name.clone(),
        };
        self.add_ns(
            &name,
            Role::Node(k),
            node.cgroup.clone(),
            Some(node.ipv4),
            Some(node.ipv6),
        )?;
        netns::sysctls(&node.netns, &ROUTER_SYSCTLS)?;
        netns::ip_batch(
            &self.netns_name(FABRIC),
            &[
                format!(
                    "link add n{k} type veth peer name eth0 netns {}",
                    node.netns
                ),
                format!("link set n{k} master br0"),
                format!("link set n{k} up"),
            ],
        )?;
        let mut batch = vec![
            "link set lo up".to_owned(),
            "link set eth0 up".to_owned(),
            format!("addr add {}/24 dev eth0", node.ipv4),
            format!("addr add {}/64 dev eth0 nodad", node.ipv6),
            // The pods' next hop; link scope keeps it out of source address selection.
            "addr add 169.254.1.1/32 dev lo scope link".to_owned(),
            // External clients share the L2 segment (see add_external_client).
            "route add 203.0.113.0/24 dev eth0".to_owned(),
        ];
        for j in (1..=total).filter(|&j| j != k) {
            let (v4, v6) = pod_cidrs(j);
            batch.push(format!("route add {v4} via {}", node_ipv4(j)));
            batch.push(format!("route add {v6} via {}", node_ipv6(j)));
        }
        netns::ip_batch(&node.netns, &batch)?;
        fs::create_dir_all(&node.bpffs)
            .with_context(|| format!("creating {}", node.bpffs.display()))?;
        self.nodes.push(node);
        Ok(())
    }

    /// A pod netns on node `node` (1-based) with `eth0` = `v4`/32 (and `v6`/128), default
    /// route via the node, and cgroup `<node cgroup>/<name>`.
    pub fn add_pod(&mut self, node: usize, name: &str, v4: &str, v6: Option<&str>) -> Result<&Ns> {
        let host = self.node(node)?.clone();
        let ipv4: Ipv4Addr = v4.parse().with_context(|| format!("pod IPv4 {v4:?}"))?;
        let ipv6: Option<Ipv6Addr> = v6
            .map(|a| a.parse().with_context(|| format!("pod IPv6 {a:?}")))
            .transpose()?;
        let pod_netns = self.add_ns(
            name,
            Role::Pod { node },
            host.cgroup.join(name),
            Some(ipv4),
            ipv6,
        )?;
        self.links += 1;
        let veth = format!("lxc{}", self.links);
        let mut on_node = vec![
            format!("link add {veth} type veth peer name eth0 netns {pod_netns}"),
            format!("link set {veth} up"),
            format!("route add {ipv4}/32 dev {veth} src {}", host.ipv4),
        ];
        let mut in_pod = vec![
            "link set lo up".to_owned(),
            "link set eth0 up".to_owned(),
            format!("addr add {ipv4}/32 dev eth0"),
            "route add 169.254.1.1/32 dev eth0 scope link".to_owned(),
            "route add default via 169.254.1.1 dev eth0".to_owned(),
        ];
        if let Some(ipv6) = ipv6 {
            on_node.push(format!("addr add fe80::1/64 dev {veth} nodad"));
            on_node.push(format!("route add {ipv6}/128 dev {veth}"));
            in_pod.push(format!("addr add {ipv6}/128 dev eth0 nodad"));
            in_pod.push("route add ::/0 via fe80::1 dev eth0".to_owned());
        }
        netns::ip_batch(&host.netns, &on_node)?;
        netns::ip_batch(&pod_netns, &in_pod)?;
        self.ns(name)
    }

    /// A client outside the cluster: `eth0` on the bridge with `v4`/24 (use 203.0.113.0/24,
    /// which every node routes on-link), an on-link route to the node subnet 192.168.0.0/24,
    /// and a default route via node1, so ExternalIPs and LoadBalancer IPs go to node1. Its
    /// cgroup is `<lab cgroup>/<name>`, outside every node's subtree.
    pub fn add_external_client(&mut self, name: &str, v4: &str) -> Result<&Ns> {
        self.external_client(name, v4, None)
    }

    /// [`Lab::add_external_client`] with IPv6 too: `v6`/64 on `eth0` (use an address in the
    /// nodes' 2001:db8::/64, so node IPs are on-link) and an IPv6 default route via node1.
    pub fn add_external_client_v6(&mut self, name: &str, v4: &str, v6: &str) -> Result<&Ns> {
        let ipv6: Ipv6Addr = v6
            .parse()
            .with_context(|| format!("external IPv6 {v6:?}"))?;
        self.external_client(name, v4, Some(ipv6))
    }

    fn external_client(&mut self, name: &str, v4: &str, ipv6: Option<Ipv6Addr>) -> Result<&Ns> {
        let ipv4: Ipv4Addr = v4
            .parse()
            .with_context(|| format!("external IPv4 {v4:?}"))?;
        let client_netns = self.add_ns(
            name,
            Role::External,
            self.cgroup.join(name),
            Some(ipv4),
            ipv6,
        )?;
        self.links += 1;
        let port = format!("x{}", self.links);
        netns::ip_batch(
            &self.netns_name(FABRIC),
            &[
                format!("link add {port} type veth peer name eth0 netns {client_netns}"),
                format!("link set {port} master br0"),
                format!("link set {port} up"),
            ],
        )?;
        let mut batch = vec![
            "link set lo up".to_owned(),
            "link set eth0 up".to_owned(),
            format!("addr add {ipv4}/24 dev eth0"),
            "route add 192.168.0.0/24 dev eth0".to_owned(),
            format!("route add default via {}", node_ipv4(1)),
        ];
        if let Some(ipv6) = ipv6 {
            batch.push(format!("addr add {ipv6}/64 dev eth0 nodad"));
            batch.push(format!("route add ::/0 via {}", node_ipv6(1)));
        }
        netns::ip_batch(&client_netns, &batch)?;
        self.ns(name)
    }

    /// Creates netns + cgroup and registers them; returns the full netns name.
    fn add_ns(
        &mut self,
        name: &str,
        role: Role,
        cgroup: PathBuf,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<String> {
        let valid = !name.is_empty()
            && name.len() <= 40
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            bail!("namespace name {name:?}: use 1-40 of [a-z0-9-]");
        }
        if self.spaces.contains_key(name) {
            bail!("the lab already has a namespace called {name}");
        }
        let full = self.netns_name(name);
        netns::add(&full)?;
        fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        let ns = Ns {
            name: name.into(),
            netns: full.clone(),
            cgroup,
            role,
            ipv4,
            ipv6,
        };
        self.spaces.insert(name.into(), ns);
        netns::sysctls(&full, &COMMON_SYSCTLS)?;
        Ok(full)
    }

    fn netns_name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// `kplab-<pid>-<n>`: carried by every netns, cgroup and bpffs dir of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A scratch directory removed with the lab (logs, manifests).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// The lab's cgroup, parent of the node cgroups.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Node `k`, 1-based.
    pub fn node(&self, k: usize) -> Result<&Node> {
        k.checked_sub(1)
            .and_then(|i| self.nodes.get(i))
            .with_context(|| format!("no node {k} in this lab"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn ns(&self, name: &str) -> Result<&Ns> {
        self.spaces
            .get(name)
            .with_context(|| format!("no namespace {name:?} in this lab"))
    }

    /// A command for `argv` that will run inside `ns`'s netns and cgroup.
    pub fn command(&self, ns: &str, argv: &[&str]) -> Result<Command> {
        let ns = self.ns(ns)?;
        netns::command(&ns.netns, Some(&ns.cgroup), argv)
    }

    /// Spawns `argv` in `ns` (netns + cgroup): stdin null, stdout piped (take it from the
    /// child), stderr appended to a log file in [`Lab::tmp_dir`]. Killed when dropped.
    pub fn spawn(&self, ns: &str, argv: &[&str]) -> Result<LabChild> {
        let mut cmd = self.command(ns, argv)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log_file(ns)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {argv:?} in {ns}"))?;
        Ok(LabChild::new(child, format!("{argv:?} in {ns}")))
    }

    /// Runs `argv` in `ns` to completion (killed after 2 minutes) and captures its output.
    pub fn run(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        output_with_timeout(self.command(ns, argv)?, Duration::from_secs(120))
    }

    /// Like [`Lab::run`] but fails on a non-zero exit; returns stdout.
    pub fn run_ok(&self, ns: &str, argv: &[&str]) -> Result<String> {
        let out = self.run(ns, argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {ns}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread inside `ns`'s netns (not its cgroup): for probes from the test
    /// process itself, which no load balancer hook sees.
    pub fn in_netns<T: Send>(&self, ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        netns::run_in(&self.ns(ns)?.netns, f)
    }

    fn log_file(&self, ns: &str) -> Result<fs::File> {
        let n = self.logs.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{ns}-{n}.log"));
        fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
    }

    /// Starts `netexec serve --name <ns>` in `ns` and waits until every TCP port accepts
    /// connections and every UDP port answers. The lab owns the process.
    pub fn start_backend(&self, ns: &str, tcp: &[u16], udp: &[u16]) -> Result<()> {
        let bin = netexec_bin()?;
        let join = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let (tcp_list, udp_list) = (join(tcp), join(udp));
        let mut argv = vec![
            bin.to_str().context("netexec path is not UTF-8")?,
            "serve",
            "--name",
            ns,
        ];
        if !tcp.is_empty() {
            argv.extend(["--tcp", &tcp_list]);
        }
        if !udp.is_empty() {
            argv.extend(["--udp", &udp_list]);
        }
        let log = self.tmp.join(format!("{ns}-netexec.log"));
        let mut cmd = self.command(ns, &argv)?;
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning netexec in {ns}"))?;
        self.lock_backends().push((
            ns.to_owned(),
            LabChild::new(child, format!("netexec serve in {ns}")),
        ));

        poll_until(
            Duration::from_secs(10),
            Duration::from_millis(10),
            &format!("netexec in {ns}"),
            || {
                if let Some(status) = self.backend_exit(ns)? {
                    bail!(
                        "netexec in {ns} exited ({status}): {}",
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                self.in_netns(ns, || Ok(probe_ports(ns, tcp, udp)))
            },
        )
    }

    /// SIGTERMs the backend started in `ns` and waits for it.
    pub fn stop_backend(&self, ns: &str) -> Result<()> {
        let mut backends = self.lock_backends();
        let i = backends
            .iter()
            .position(|(n, _)| n == ns)
            .with_context(|| format!("no backend in {ns}"))?;
        let (_, mut child) = backends.remove(i);
        drop(backends);
        child.signal_and_wait(libc::SIGTERM, Duration::from_secs(5))?;
        Ok(())
    }

    fn backend_exit(&self, ns: &str) -> Result<Option<std::process::ExitStatus>> {
        let mut backends = self.lock_backends();
        match backends.iter_mut().rev().find(|(n, _)| n == ns) {
            Some((_, child)) => child.exited(),
            None => bail!("backend in {ns} is gone"),
        }
    }

    fn lock_backends(&self) -> std::sync::MutexGuard<'_, Vec<(String, LabChild)>> {
        // A panicking test may poison the lock; the list itself is still fine.
        self.backends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `netexec client` in `ns` and returns one [`Attempt`] per request.
    pub fn request(&self, ns: &str, req: &Request) -> Result<Vec<Attempt>> {
        let bin = netexec_bin()?;
        let args = req.args();
        let mut argv = vec![bin.to_str().context("netexec path is not UTF-8")?, "client"];
        argv.extend(args.iter().map(String::as_str));
        let out = output_with_timeout(self.command(ns, &argv)?, req.worst_case())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "netexec client {args:?} in {ns}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        client::parse_output(&stdout, req.attempts())
    }

    /// `count` HTTP GETs of `path` from `ns` to `target` (`ip:port`), 2 s timeout each.
    pub fn http(&self, ns: &str, target: &str, path: &str, count: u32) -> Result<Vec<Attempt>> {
        self.request(ns, &Request::http(target, path).count(count))
    }

    /// `count` UDP datagrams `msg` from `ns` to `target`, each from a new socket.
    pub fn udp(&self, ns: &str, target: &str, msg: &str, count: u32) -> Result<Vec<Attempt>> {
        self.request(ns, &Request::udp(target, msg).count(count))
    }
}

/// True when every TCP port accepts on loopback and every UDP port answers `hostname`.
fn probe_ports(name: &str, tcp: &[u16], udp: &[u16]) -> bool {
    let timeout = Duration::from_millis(200);
    let tcp_ok = tcp
        .iter()
        .all(|&p| TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, p).into(), timeout).is_ok());
    tcp_ok
        && udp.iter().all(|&p| {
            let answer = || -> std::io::Result<bool> {
                let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
                sock.set_read_timeout(Some(timeout))?;
                sock.send_to(b"hostname", (Ipv4Addr::LOCALHOST, p))?;
                let mut buf = [0u8; 256];
                let n = sock.recv(&mut buf)?;
                Ok(&buf[..n] == name.as_bytes())
            };
            answer().unwrap_or(false)
        })
}

fn node_ipv4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 0, (k + 1) as u8)
}

fn node_ipv6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, (k + 1) as u16)
}

/// The netexec binary: `$KPLB_NETEXEC_BIN`, else next to the running test binary's target
/// dir (`target/debug/netexec`; cargo builds it for this package's integration tests).
pub fn netexec_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KPLB_NETEXEC_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("netexec"))
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "netexec not found (looked at {candidates:?}); build it with `cargo build -p lb-tests --bins` \
             or set KPLB_NETEXEC_BIN"
        )
    })
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop(std::mem::take(&mut *self.lock_backends()));
        if let Err(e) = cleanup::remove_prefix(&self.prefix) {
            eprintln!("kplb lab {}: cleanup incomplete: {e:#}", self.prefix);
        }
    }
}
