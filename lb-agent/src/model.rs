//! The desired datapath state as a pure function of the valid objects and this node's identity.
//!
//! Nothing here touches the kernel. Each service's part is computed on its own
//! ([`service_desired`]) and merged into one [`Desired`] by [`DesiredState`], which can also
//! replace one service's part without recomputing the others; [`desired_state`] is the whole
//! computation at once. Everything is deterministic (BTreeMaps, sorted backend lists) so equal
//! inputs give equal outputs, and the sync layer can diff two results.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_AFFINITY, SVC_F_EXT_LOCAL, SVC_F_FRONTEND_IP,
    SVC_F_SRC_RANGES, SvcKey, addr,
    maglev::{self, DEFAULT_TABLE_SIZE},
};

use crate::{
    objects::{
        EndpointInfo, Inventory, Protocol, ServiceInfo, ServiceName, ServicePort, SliceInfo,
        TrafficPolicy,
    },
    topology,
};

/// What the desired state depends on besides the objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_name: String,
    /// Maglev table size of groups with external frontends (`--maglev-table-size`), and the
    /// largest size chosen for the others.
    pub maglev_table_size: u32,
    /// This node's `topology.kubernetes.io/zone`, for topology-aware endpoint selection.
    pub zone: Option<String>,
    /// This node's addresses that accept NodePort traffic (node IPs filtered by
    /// `--nodeport-addresses`).
    pub nodeport_ips: Vec<IpAddr>,
    /// Every known node's addresses by node name (Node objects; preferred address first), so
    /// a remote backend carries its node's IP (`--lb-mode dsr` tunnels to it).
    pub node_addresses: BTreeMap<String, Vec<IpAddr>>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            maglev_table_size: DEFAULT_TABLE_SIZE,
            zone: None,
            nodeport_ips: Vec::new(),
            node_addresses: BTreeMap::new(),
        }
    }
}

/// A set of backends sharing one Maglev table: one service port seen with one traffic policy.
/// Its id in the maps stays the same while the service exists, even when its table is replaced
/// by one of another size.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub service: ServiceName,
    pub port_name: String,
    pub protocol: Protocol,
    /// Address family of the group's frontends and backends: a dual-stack service has one
    /// group per family, so an IPv4 ClusterIP is never balanced to an IPv6 endpoint.
    pub ipv6: bool,
    /// Only this node's endpoints (a `Local` traffic policy).
    pub local_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The endpoint runs on this node.
    pub local: bool,
    /// The IP (same family) of the node a remote endpoint runs on, when its Node is known.
    pub node_ip: Option<IpAddr>,
}

impl BackendSpec {
    pub fn identity(&self) -> maglev::Identity {
        maglev::Identity::new(self.addr, self.port)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Group {
    /// Sorted, unique. Shared with the reconciler's record of what it wrote (no copy).
    pub backends: Arc<[BackendSpec]>,
    /// Maglev table size (a supported prime larger than the backend count).
    pub table_size: u32,
    /// The service has sessionAffinity: ClientIP (clients may be pinned to its backends).
    pub affinity: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub group: GroupKey,
    /// `SVC_F_*`.
    pub flags: u32,
    /// ClientIP session affinity's timeout in seconds (0 without affinity), for the sync layer
    /// to copy into the frontend's map value.
    pub affinity_timeout_s: u32,
}

/// A healthCheckNodePort the agent serves (kube-proxy's contract).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceName,
    /// Ready (not terminating) endpoints on this node.
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<SvcKey, Frontend>,
    pub groups: BTreeMap<GroupKey, Group>,
    /// loadBalancerSourceRanges by the group their LoadBalancer frontends point at.
    pub src_ranges: BTreeMap<GroupKey, BTreeSet<(IpAddr, u8)>>,
    /// healthCheckNodePort -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

impl Desired {
    pub fn backend_count(&self) -> usize {
        self.groups
            .values()
            .flat_map(|g| g.backends.iter())
            .collect::<BTreeSet<_>>()
            .len()
    }
}

/// One service's part of the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceDesired {
    pub frontends: BTreeMap<SvcKey, Frontend>,
    pub groups: BTreeMap<GroupKey, Group>,
    pub src_ranges: BTreeMap<GroupKey, BTreeSet<(IpAddr, u8)>>,
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// The keys a sync has to look at: everything one or more services' parts had or have now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub frontends: BTreeSet<SvcKey>,
    pub groups: BTreeSet<GroupKey>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.groups.is_empty()
    }
}

/// The keys of a service's part (what to take out when it changes).
#[derive(Debug, Default)]
struct PartKeys {
    frontends: Vec<SvcKey>,
    groups: Vec<GroupKey>,
    health_checks: Vec<u16>,
}

/// [`Desired`] as the merge of every service's part, kept up to date one service at a time.
///
/// Frontend keys and healthCheckNodePorts can be claimed by several services (two Services
/// listing the same external IP and port, or sharing a LoadBalancer IP's "other ports" marker):
/// the claimant with the greatest name wins, whatever order the parts arrived in, and the
/// others' values are kept so the next one takes over when the winner goes.
#[derive(Debug, Default)]
pub struct DesiredState {
    desired: Desired,
    parts: HashMap<ServiceName, PartKeys>,
    /// Every claimant's value of each frontend key claimed more than once.
    shared_frontends: HashMap<SvcKey, BTreeMap<ServiceName, Frontend>>,
    /// Every claimant's value of each healthCheckNodePort claimed more than once.
    shared_health_checks: HashMap<u16, BTreeMap<ServiceName, HealthCheck>>,
}

impl DesiredState {
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn into_desired(self) -> Desired {
        self.desired
    }

    /// Replaces service `name`'s part (`None`: the service is gone). Adds the keys it had or
    /// has to `touched`.
    pub fn set(&mut self, name: &ServiceName, part: Option<ServiceDesired>, touched: &mut Touched) {
        if let Some(old) = self.parts.remove(name) {
            for k in old.frontends {
                self.unclaim_frontend(&k, name);
                touched.frontends.insert(k);
            }
            for g in old.groups {
                self.desired.groups.remove(&g);
                self.desired.src_ranges.remove(&g);
                touched.groups.insert(g);
            }
            for p in old.health_checks {
                unclaim(
                    &mut self.desired.health_checks,
                    &mut self.shared_health_checks,
                    p,
                    name,
                );
            }
        }
        let Some(part) = part else { return };
        let keys = PartKeys {
            frontends: part.frontends.keys().copied().collect(),
            groups: part.groups.keys().cloned().collect(),
            health_checks: part.health_checks.keys().copied().collect(),
        };
        for (k, fe) in part.frontends {
            touched.frontends.insert(k);
            claim(
                &mut self.desired.frontends,
                &mut self.shared_frontends,
                k,
                name,
                fe,
                |f| &f.group.service,
            );
        }
        for (g, group) in part.groups {
            touched.groups.insert(g.clone());
            self.desired.groups.insert(g, group);
        }
        self.desired.src_ranges.extend(part.src_ranges);
        for (p, hc) in part.health_checks {
            claim(
                &mut self.desired.health_checks,
                &mut self.shared_health_checks,
                p,
                name,
                hc,
                |h| &h.service,
            );
        }
        self.parts.insert(name.clone(), keys);
    }

    fn unclaim_frontend(&mut self, k: &SvcKey, name: &ServiceName) {
        unclaim(
            &mut self.desired.frontends,
            &mut self.shared_frontends,
            *k,
            name,
        );
    }
}

/// Adds `name`'s claim on `key` with `value`; the greatest claimant's value is the merged one.
fn claim<K: Copy + Ord + std::hash::Hash, V: Clone>(
    merged: &mut BTreeMap<K, V>,
    shared: &mut HashMap<K, BTreeMap<ServiceName, V>>,
    key: K,
    name: &ServiceName,
    value: V,
    owner: impl Fn(&V) -> &ServiceName,
) {
    match merged.get(&key) {
        Some(cur) if owner(cur) != name => {
            let claims = shared
                .entry(key)
                .or_insert_with(|| BTreeMap::from([(owner(cur).clone(), cur.clone())]));
            claims.insert(name.clone(), value);
            if let Some((_, winner)) = claims.last_key_value() {
                merged.insert(key, winner.clone());
            }
        }
        _ => {
            merged.insert(key, value);
        }
    }
}

/// Drops `name`'s claim on `key`; the greatest remaining claimant (if any) takes over.
fn unclaim<K: Copy + Ord + std::hash::Hash, V: Clone>(
    merged: &mut BTreeMap<K, V>,
    shared: &mut HashMap<K, BTreeMap<ServiceName, V>>,
    key: K,
    name: &ServiceName,
) {
    match shared.get_mut(&key) {
        Some(claims) => {
            claims.remove(name);
            if let Some((_, winner)) = claims.last_key_value() {
                merged.insert(key, winner.clone());
            }
            if claims.len() <= 1 {
                shared.remove(&key);
            }
        }
        None => {
            merged.remove(&key);
        }
    }
}

/// Endpoints of one service port after kube-proxy's categorisation.
struct PortEndpoints {
    all: Vec<BackendSpec>,
    local: Vec<BackendSpec>,
    /// Ready local endpoints (what healthCheckNodePort reports; terminating ones don't count).
    local_ready: usize,
}

/// Builds the desired state of every valid object at once. Problems that only affect one
/// service (an unusable table size) are reported through `warn` and resolved safely.
pub fn desired_state(inv: &Inventory, node: &NodeConfig, warn: &mut dyn FnMut(String)) -> Desired {
    // Each service's slices, found once (not by scanning every slice per service port).
    let mut slices: BTreeMap<&ServiceName, Vec<&SliceInfo>> = BTreeMap::new();
    for s in inv.slices.values() {
        slices.entry(&s.service).or_default().push(s);
    }
    let mut state = DesiredState::default();
    let mut touched = Touched::default();
    for svc in inv.services.values() {
        let svc_slices = slices.get(&svc.id).map_or(&[][..], Vec::as_slice);
        let part = service_desired(svc, svc_slices, node, warn);
        state.set(&svc.id, Some(part), &mut touched);
    }
    state.into_desired()
}

/// One service's frontends, groups, source ranges and health checks. `slices` are the
/// service's EndpointSlices in (namespace, name) order.
pub fn service_desired(
    svc: &ServiceInfo,
    slices: &[&SliceInfo],
    node: &NodeConfig,
    warn: &mut dyn FnMut(String),
) -> ServiceDesired {
    let mut out = ServiceDesired::default();
    for (port, ipv6) in svc.ports.iter().flat_map(|p| [(p, false), (p, true)]) {
        if !svc.cluster_ips.iter().any(|c| c.is_ipv6() == ipv6) {
            continue;
        }
        let eps = port_endpoints(slices, svc, port, ipv6, node);
        let external = ExternalIps::of(svc, port, ipv6, node);
        let internal = match svc.internal_policy {
            TrafficPolicy::Cluster => &eps.all,
            TrafficPolicy::Local => &eps.local,
        };
        let local_only = svc.internal_policy == TrafficPolicy::Local;
        // This group is also the one XDP reads when the port has external frontends with the
        // same locality (eTP Cluster for the cluster-wide group, eTP Local for the local one);
        // then every node must build its table alike.
        let ext_local = svc.external_policy == TrafficPolicy::Local;
        let reached_from_outside = !external.is_empty() && ext_local == local_only;
        let group = add_group(
            &mut out,
            svc,
            port,
            ipv6,
            local_only,
            internal,
            reached_from_outside,
            node,
            warn,
        );
        let flags = if svc.session_affinity {
            SVC_F_AFFINITY
        } else {
            0
        };
        for ip in svc.cluster_ips.iter().filter(|c| c.is_ipv6() == ipv6) {
            // Internal scope only: like Cilium's default (unlike kube-proxy), a ClusterIP is
            // not served to packets arriving on --interfaces; with --service-cidr they are
            // dropped there.
            put(
                &mut out,
                *ip,
                port.port,
                port,
                SCOPE_INTERNAL,
                frontend(&group, flags, svc),
            );
        }
        external_frontends(
            &mut out, svc, port, ipv6, &eps, &external, node, flags, warn,
        );
    }
    out
}

/// The group of one service port, family and endpoint selection (created on first use).
/// `external`: its table is used by XDP, where every node must pick alike.
#[allow(clippy::too_many_arguments)]
fn add_group(
    out: &mut ServiceDesired,
    svc: &ServiceInfo,
    port: &ServicePort,
    ipv6: bool,
    local_only: bool,
    backends: &[BackendSpec],
    external: bool,
    node: &NodeConfig,
    warn: &mut dyn FnMut(String),
) -> GroupKey {
    let key = GroupKey {
        service: svc.id.clone(),
        port_name: port.name.clone(),
        protocol: port.protocol,
        ipv6,
        local_only,
    };
    out.groups.entry(key.clone()).or_insert_with(|| Group {
        backends: Arc::from(backends),
        table_size: table_size(svc, backends.len(), external, node, warn),
        affinity: svc.session_affinity,
    });
    key
}

fn put(out: &mut ServiceDesired, ip: IpAddr, p: u16, port: &ServicePort, scope: u8, fe: Frontend) {
    let key = SvcKey {
        addr: addr::from_ip(ip),
        port: p.to_be(),
        proto: port.protocol.number(),
        scope,
    };
    out.frontends.insert(key, fe);
}

/// A frontend of `svc` on `group`; the affinity timeout only matters with `SVC_F_AFFINITY`.
fn frontend(group: &GroupKey, flags: u32, svc: &ServiceInfo) -> Frontend {
    Frontend {
        group: group.clone(),
        flags,
        affinity_timeout_s: if flags & SVC_F_AFFINITY != 0 {
            svc.affinity_timeout_s
        } else {
            0
        },
    }
}

/// The addresses of one service port and family that traffic from outside reaches.
struct ExternalIps {
    nodeport: Vec<IpAddr>,
    lb: Vec<IpAddr>,
    ext: Vec<IpAddr>,
}

impl ExternalIps {
    fn of(svc: &ServiceInfo, port: &ServicePort, ipv6: bool, node: &NodeConfig) -> Self {
        let fits = |ip: &IpAddr| ip.is_ipv6() == ipv6;
        Self {
            nodeport: match port.node_port {
                Some(_) => node.nodeport_ips.iter().copied().filter(fits).collect(),
                None => Vec::new(),
            },
            lb: svc.lb_ips.iter().copied().filter(fits).collect(),
            ext: svc.external_ips.iter().copied().filter(fits).collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.nodeport.is_empty() && self.lb.is_empty() && self.ext.is_empty()
    }
}

/// NodePort, LoadBalancer and external IP frontends of one service port and family.
///
/// External scope (XDP): `externalTrafficPolicy` picks all or only local endpoints; Local drops
/// where there is none (another node may have one). Internal scope (sockets on this node): all
/// endpoints, as kube-proxy short-circuits in-cluster traffic to these addresses.
#[allow(clippy::too_many_arguments)]
fn external_frontends(
    out: &mut ServiceDesired,
    svc: &ServiceInfo,
    port: &ServicePort,
    ipv6: bool,
    eps: &PortEndpoints,
    ips: &ExternalIps,
    node: &NodeConfig,
    flags: u32,
    warn: &mut dyn FnMut(String),
) {
    if ips.is_empty() {
        return;
    }
    let local = svc.external_policy == TrafficPolicy::Local;
    let cluster = add_group(out, svc, port, ipv6, false, &eps.all, !local, node, warn);
    let (ext_group, ext_flags) = if local {
        (
            add_group(out, svc, port, ipv6, true, &eps.local, true, node, warn),
            flags | SVC_F_EXT_LOCAL,
        )
    } else {
        (cluster.clone(), flags)
    };
    if let Some(np) = port.node_port {
        for ip in &ips.nodeport {
            // The NodePort is not restricted by loadBalancerSourceRanges (as in kube-proxy).
            put(
                out,
                *ip,
                np,
                port,
                SCOPE_EXTERNAL,
                frontend(&ext_group, ext_flags, svc),
            );
            put(
                out,
                *ip,
                np,
                port,
                SCOPE_INTERNAL,
                frontend(&cluster, flags, svc),
            );
        }
    }
    let ranged = svc.source_ranges.is_some();
    for ip in &ips.lb {
        let f = if ranged {
            ext_flags | SVC_F_SRC_RANGES
        } else {
            ext_flags
        };
        put(
            out,
            *ip,
            port.port,
            port,
            SCOPE_EXTERNAL,
            frontend(&ext_group, f, svc),
        );
        put(
            out,
            *ip,
            port.port,
            port,
            SCOPE_INTERNAL,
            frontend(&cluster, flags, svc),
        );
    }
    for ip in &ips.ext {
        put(
            out,
            *ip,
            port.port,
            port,
            SCOPE_EXTERNAL,
            frontend(&ext_group, ext_flags, svc),
        );
        put(
            out,
            *ip,
            port.port,
            port,
            SCOPE_INTERNAL,
            frontend(&cluster, flags, svc),
        );
    }
    // Any other port on these addresses is rejected rather than routed on.
    for ip in ips.lb.iter().chain(&ips.ext) {
        let marker = SvcKey {
            addr: addr::from_ip(*ip),
            port: 0,
            proto: 0,
            scope: SCOPE_EXTERNAL,
        };
        out.frontends
            .insert(marker, frontend(&ext_group, SVC_F_FRONTEND_IP, svc));
    }
    if let Some(ranges) = &svc.source_ranges
        && !ips.lb.is_empty()
    {
        out.src_ranges
            .entry(ext_group.clone())
            .or_default()
            .extend(ranges.iter().copied().filter(|(n, _)| n.is_ipv6() == ipv6));
    }
    if local && let Some(hc) = svc.health_check_node_port {
        out.health_checks.insert(
            hc,
            HealthCheck {
                service: svc.id.clone(),
                local_endpoints: eps.local_ready,
            },
        );
    }
}

/// The table size of a group of `n` backends.
///
/// A group XDP reads (`external`) must be built alike on every node, so its size is the
/// service's annotation or the global `--maglev-table-size`, whatever `n` is. A group only
/// sockets on this node read picks once per connection and needs no cross-node agreement: it
/// gets the smallest supported size with ~100 slots per backend (even balance), at most the
/// global size, so thousands of small services do not cost 128 KiB of kernel memory each.
/// Either way a table too small for its backends is bumped to the smallest size that fits
/// (logged).
fn table_size(
    svc: &ServiceInfo,
    n: usize,
    external: bool,
    node: &NodeConfig,
    warn: &mut dyn FnMut(String),
) -> u32 {
    let mut m = if external {
        node.maglev_table_size
    } else {
        maglev::recommended_min_size(n).min(node.maglev_table_size)
    };
    if let Some(want) = svc.maglev_table_size {
        if maglev::is_supported_size(want) {
            m = want;
        } else {
            warn(format!(
                "service {}: maglev table size {want} is not a supported prime; using {m}",
                svc.id
            ));
        }
    }
    if maglev::check_size(m, n).is_err() {
        let bigger = maglev::SUPPORTED_TABLE_SIZES
            .iter()
            .copied()
            .find(|&s| s as usize > n)
            .unwrap_or(m);
        warn(format!(
            "service {}: {n} backends do not fit a maglev table of {m}; using {bigger}",
            svc.id
        ));
        m = bigger;
    }
    m
}

/// kube-proxy's endpoint rules for one service port and address family: endpoints of that
/// family from every slice of the service whose port matches by name and protocol; an address
/// counted once, a ready copy winning over a terminating one; ready endpoints first, serving-terminating ones only when none is ready
/// (separately for the cluster-wide and the node-local set). The cluster-wide set also follows
/// topology hints (see [`topology`]).
fn port_endpoints(
    slices: &[&SliceInfo],
    svc: &ServiceInfo,
    port: &ServicePort,
    ipv6: bool,
    node_cfg: &NodeConfig,
) -> PortEndpoints {
    let node = node_cfg.node_name.as_str();
    let zone = node_cfg.zone.as_deref();
    let mut by_addr: BTreeMap<IpAddr, (u16, EndpointInfo)> = BTreeMap::new();
    for slice in slices {
        let Some(sp) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if ep.addr.is_ipv6() != ipv6 {
                continue;
            }
            let better = match by_addr.get(&ep.addr) {
                None => true,
                Some((_, old)) => rank(ep) > rank(old),
            };
            if better {
                by_addr.insert(ep.addr, (sp.port, ep.clone()));
            }
        }
    }
    let spec = |(addr, (p, ep)): (&IpAddr, &(u16, EndpointInfo))| {
        let local = ep.node_name.as_deref() == Some(node);
        let node_ip = ep
            .node_name
            .as_ref()
            .filter(|_| !local)
            .and_then(|n| node_cfg.node_addresses.get(&**n))
            .and_then(|ips| ips.iter().find(|ip| ip.is_ipv6() == addr.is_ipv6()))
            .copied();
        BackendSpec {
            addr: *addr,
            port: *p,
            protocol: port.protocol,
            local,
            node_ip,
        }
    };
    let hints: BTreeMap<IpAddr, _> = by_addr
        .iter()
        .map(|(a, (_, ep))| (*a, topology::hints(ep, svc.traffic_distribution)))
        .collect();
    let mode = topology::mode(
        by_addr
            .iter()
            .filter(|(_, (_, ep))| ep.ready)
            .map(|(a, _)| &*hints[a]),
        node,
        zone,
    );
    let hints = &hints;
    // Topology narrows only the cluster-wide set; a Local policy already means "this node".
    let usable = |local_only: bool| -> Vec<BackendSpec> {
        let candidates = || {
            by_addr.iter().filter(move |(a, (_, ep))| {
                if local_only {
                    ep.node_name.as_deref() == Some(node)
                } else {
                    topology::available(&hints[*a], mode, node, zone)
                }
            })
        };
        let ready: Vec<_> = candidates()
            .filter(|(_, (_, ep))| ep.ready)
            .map(spec)
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        candidates()
            .filter(|(_, (_, ep))| ep.serving && ep.terminating)
            .map(spec)
            .collect()
    };
    let local_ready = by_addr
        .values()
        .filter(|(_, ep)| ep.ready && !ep.terminating && ep.node_name.as_deref() == Some(node))
        .count();
    PortEndpoints {
        all: usable(false),
        local: usable(true),
        local_ready,
    }
}

/// Which duplicate of an address wins: ready over serving over anything else.
fn rank(ep: &EndpointInfo) -> u8 {
    u8::from(ep.ready) * 2 + u8::from(ep.serving)
}

#[cfg(test)]
mod external_tests {
    use super::*;
    use crate::objects::{EndpointInfo, SliceInfo, SlicePort};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn inventory(policy: TrafficPolicy, ranges: Option<Vec<(IpAddr, u8)>>) -> Inventory {
        let id = ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        };
        let svc = ServiceInfo {
            id: id.clone(),
            cluster_ips: vec![ip("172.30.0.10")],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
            }],
            internal_policy: TrafficPolicy::Cluster,
            external_policy: policy,
            session_affinity: false,
            external_ips: vec![ip("192.168.99.10")],
            lb_ips: vec![ip("1.2.3.4")],
            maglev_table_size: None,
            source_ranges: ranges,
            health_check_node_port: Some(32001),
            affinity_timeout_s: 0,
            traffic_distribution: None,
        };
        let ep = |a: &str, node: &str, ready: bool| EndpointInfo {
            addr: ip(a),
            node_name: Some(node.into()),
            ready,
            serving: ready,
            terminating: !ready,
            zone: None,
            hints: None,
        };
        let slice = SliceInfo {
            name: "web-1".into(),
            service: id.clone(),
            ports: vec![SlicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: vec![
                ep("10.0.1.10", "node1", true),
                ep("10.0.2.10", "node2", true),
                ep("10.0.1.11", "node1", false),
            ],
        };
        let mut inv = Inventory::default();
        inv.services.insert(id, svc);
        inv.slices.insert(("default".into(), "web-1".into()), slice);
        inv
    }

    fn node() -> NodeConfig {
        NodeConfig {
            node_name: "node1".into(),
            nodeport_ips: vec![ip("192.168.0.2"), ip("2001:db8::2")],
            ..NodeConfig::default()
        }
    }

    fn key(a: &str, port: u16, proto: u8, scope: u8) -> SvcKey {
        SvcKey {
            addr: addr::from_ip(ip(a)),
            port: port.to_be(),
            proto,
            scope,
        }
    }

    #[test]
    fn cluster_policy_external_frontends_use_all_endpoints() {
        let d = desired_state(
            &inventory(TrafficPolicy::Cluster, None),
            &node(),
            &mut |_| {},
        );
        let np = &d.frontends[&key("192.168.0.2", 30080, 6, SCOPE_EXTERNAL)];
        assert_eq!(np.flags, 0);
        assert_eq!(
            d.groups[&np.group].backends.len(),
            2,
            "both ready endpoints, not the terminating one"
        );
        assert!(
            !d.frontends
                .contains_key(&key("172.30.0.10", 80, 6, SCOPE_EXTERNAL))
        );
        // The IPv6 node address is not a NodePort address of an IPv4-only service.
        assert!(
            !d.frontends
                .contains_key(&key("2001:db8::2", 30080, 6, SCOPE_EXTERNAL))
        );
        for (a, p) in [
            ("1.2.3.4", 80),
            ("192.168.99.10", 80),
            ("192.168.0.2", 30080),
        ] {
            assert!(
                d.frontends.contains_key(&key(a, p, 6, SCOPE_EXTERNAL)),
                "{a}:{p} external"
            );
            assert!(
                d.frontends.contains_key(&key(a, p, 6, SCOPE_INTERNAL)),
                "{a}:{p} internal"
            );
        }
        for a in ["1.2.3.4", "192.168.99.10"] {
            assert_eq!(
                d.frontends[&key(a, 0, 0, SCOPE_EXTERNAL)].flags,
                SVC_F_FRONTEND_IP,
                "{a} marker"
            );
        }
        assert!(
            d.health_checks.is_empty(),
            "no health check with policy Cluster"
        );
    }

    #[test]
    fn remote_backends_carry_their_node_ip_of_the_same_family() {
        let mut n = node();
        n.node_addresses
            .insert("node2".into(), vec![ip("2001:db8::3"), ip("192.168.0.3")]);
        n.node_addresses
            .insert("node1".into(), vec![ip("192.168.0.2")]);
        let d = desired_state(&inventory(TrafficPolicy::Cluster, None), &n, &mut |_| {});
        let np = &d.frontends[&key("192.168.0.2", 30080, 6, SCOPE_EXTERNAL)];
        let nodes: Vec<_> = d.groups[&np.group]
            .backends
            .iter()
            .map(|b| (b.addr, b.local, b.node_ip))
            .collect();
        assert_eq!(
            nodes,
            vec![
                (ip("10.0.1.10"), true, None),
                (ip("10.0.2.10"), false, Some(ip("192.168.0.3"))),
            ],
            "local backends need no node IP; remote ones get their node's IPv4"
        );
        let unknown = desired_state(
            &inventory(TrafficPolicy::Cluster, None),
            &node(),
            &mut |_| {},
        );
        assert!(
            unknown.groups[&np.group]
                .backends
                .iter()
                .all(|b| b.node_ip.is_none()),
            "no Node objects: no node IPs (SNAT)"
        );
    }

    #[test]
    fn local_policy_uses_local_endpoints_externally_and_all_internally() {
        let d = desired_state(&inventory(TrafficPolicy::Local, None), &node(), &mut |_| {});
        let ext = &d.frontends[&key("192.168.0.2", 30080, 6, SCOPE_EXTERNAL)];
        assert_eq!(ext.flags & SVC_F_EXT_LOCAL, SVC_F_EXT_LOCAL);
        let local: Vec<IpAddr> = d.groups[&ext.group]
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        assert_eq!(local, vec![ip("10.0.1.10")]);
        let int = &d.frontends[&key("192.168.0.2", 30080, 6, SCOPE_INTERNAL)];
        assert_eq!(
            d.groups[&int.group].backends.len(),
            2,
            "in-cluster clients reach every endpoint"
        );
        let hc = &d.health_checks[&32001];
        assert_eq!(
            hc.local_endpoints, 1,
            "the terminating local endpoint does not count"
        );
    }

    #[test]
    fn source_ranges_restrict_only_the_load_balancer_ip() {
        let ranges = Some(vec![(ip("203.0.113.0"), 28)]);
        let d = desired_state(
            &inventory(TrafficPolicy::Cluster, ranges),
            &node(),
            &mut |_| {},
        );
        let lb = &d.frontends[&key("1.2.3.4", 80, 6, SCOPE_EXTERNAL)];
        assert_eq!(lb.flags & SVC_F_SRC_RANGES, SVC_F_SRC_RANGES);
        assert_eq!(
            d.src_ranges[&lb.group],
            BTreeSet::from([(ip("203.0.113.0"), 28)])
        );
        for (a, p) in [("192.168.0.2", 30080), ("192.168.99.10", 80)] {
            assert_eq!(
                d.frontends[&key(a, p, 6, SCOPE_EXTERNAL)].flags & SVC_F_SRC_RANGES,
                0,
                "{a}"
            );
        }
        // Every listed range invalid: still restricted, with no entries (nobody allowed).
        let d = desired_state(
            &inventory(TrafficPolicy::Cluster, Some(vec![])),
            &node(),
            &mut |_| {},
        );
        let lb = &d.frontends[&key("1.2.3.4", 80, 6, SCOPE_EXTERNAL)];
        assert_eq!(lb.flags & SVC_F_SRC_RANGES, SVC_F_SRC_RANGES);
    }
}
