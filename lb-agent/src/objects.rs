//! Validation of Kubernetes objects into the agent's own plain types.
//!
//! Everything the datapath needs is checked here once: an invalid object is rejected with a
//! reason (the caller logs it with the object's name and skips it), so nothing downstream ever
//! sees a bad address, port or protocol.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

/// Label that joins an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy (kube-proxy skips them too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Headless services, as labelled by the control plane.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Per-service Maglev table size override.
pub const ANNOTATION_MAGLEV_SIZE: &str = "kplb.io/maglev-table-size";
/// The zone of a node (and, through the EndpointSlice's `zone`, of an endpoint).
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// The cluster autoscaler's taint on a node it is about to delete (kube-proxy's /healthz then
/// fails so load balancers drain the node).
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (the API server's default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The largest timeout the API server accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

/// `spec.trafficDistribution`: where the service prefers its traffic to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficDistribution {
    /// `PreferSameZone` (and its older name `PreferClose`): endpoints in this node's zone.
    PreferSameZone,
    /// `PreferSameNode`: endpoints on this node, else in its zone.
    PreferSameNode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub id: ServiceName,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub internal_policy: TrafficPolicy,
    pub external_policy: TrafficPolicy,
    pub session_affinity: bool,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` with ClientIP affinity, else 0.
    pub affinity_timeout_s: u32,
    pub external_ips: Vec<IpAddr>,
    pub lb_ips: Vec<IpAddr>,
    pub maglev_table_size: Option<u32>,
    pub traffic_distribution: Option<TrafficDistribution>,
    /// loadBalancerSourceRanges: `None` when unset (everyone may connect); `Some` (possibly
    /// empty when every entry was invalid: nobody may) restricts the LoadBalancer IPs.
    pub source_ranges: Option<Vec<(IpAddr, u8)>>,
    /// healthCheckNodePort (externalTrafficPolicy: Local).
    pub health_check_node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint, kept compact: a large cluster holds hundreds of thousands (node and zone
/// names are shared, hints are rare and boxed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: IpAddr,
    pub node_name: Option<Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: Option<Arc<str>>,
    /// `None`: no hints of either kind.
    pub hints: Option<Box<EndpointHints>>,
}

impl EndpointInfo {
    /// The endpoint's own hints (empty without any).
    pub fn own_hints(&self) -> &EndpointHints {
        static NONE: EndpointHints = EndpointHints {
            for_zones: BTreeSet::new(),
            for_nodes: BTreeSet::new(),
        };
        self.hints.as_deref().unwrap_or(&NONE)
    }
}

/// One shared copy of each node or zone name: every endpoint of a node names it.
pub fn shared_name(name: &str) -> Arc<str> {
    static NAMES: Mutex<BTreeSet<Arc<str>>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(name) {
        return n.clone();
    }
    let n: Arc<str> = Arc::from(name);
    names.insert(n.clone());
    n
}

/// An endpoint's topology hints (`hints.forZones`, `hints.forNodes`); an empty set means the
/// endpoint has no hint of that kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointHints {
    pub for_zones: BTreeSet<String>,
    pub for_nodes: BTreeSet<String>,
}

/// What the agent needs from its Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `topology.kubernetes.io/zone`, if set and not empty.
    pub zone: Option<String>,
    /// The node is going away (deletionTimestamp, or the autoscaler's to-be-deleted taint).
    pub deleting: bool,
    /// `status.addresses`: InternalIPs first, then ExternalIPs (unparsable ones skipped).
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub name: String,
    pub service: ServiceName,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
}

/// Why an object (or a part of one) was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("missing metadata.name")]
    NoName,
    #[error("invalid IP address {0:?}")]
    BadIp(String),
    #[error("invalid port {0} (must be 1-65535)")]
    BadPort(i32),
    #[error("invalid CIDR {0:?}")]
    BadCidr(String),
    #[error("unknown protocol {0:?}")]
    BadProtocol(String),
    #[error("missing label {LABEL_SERVICE_NAME}")]
    NoServiceLabel,
    #[error("address {0} may not be a backend ({1})")]
    ForbiddenBackend(IpAddr, &'static str),
    #[error("unknown addressType {0:?}")]
    BadAddressType(String),
    #[error(
        "sessionAffinityConfig.clientIP.timeoutSeconds {0} (must be 1-{MAX_AFFINITY_TIMEOUT_S})"
    )]
    BadAffinityTimeout(i32),
}

/// Outcome for a Service that is valid but not ours to program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    Headless,
    ExternalName,
    OtherProxy(String),
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Headless => f.write_str("headless (no cluster IP)"),
            Self::ExternalName => f.write_str("type ExternalName"),
            Self::OtherProxy(p) => write!(f, "handled by service proxy {p:?}"),
        }
    }
}

#[derive(Debug)]
pub enum ServiceOutcome {
    Use(ServiceInfo),
    Ignore(Ignored),
}

/// Strict IP parsing: Rust's parser already refuses leading-zero IPv4 octets, so "010.0.0.1"
/// can never be read as octal (CVE-2021-29923).
pub fn parse_ip(s: &str) -> Result<IpAddr, Invalid> {
    s.trim().parse().map_err(|_| Invalid::BadIp(s.to_string()))
}

/// `a.b.c.d/n` or `v6/n`, surrounding spaces trimmed; the address is masked to the prefix.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), Invalid> {
    let bad = || Invalid::BadCidr(s.to_string());
    let (a, n) = s.trim().split_once('/').ok_or_else(bad)?;
    let ip = parse_ip(a).map_err(|_| bad())?;
    let n: u8 = n.trim().parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if n > max || a.trim() != a || n.to_string() != n_text(s) {
        return Err(bad());
    }
    let masked = match ip {
        IpAddr::V4(v) => {
            IpAddr::V4((u32::from(v) & u32::MAX.checked_shl(32 - u32::from(n)).unwrap_or(0)).into())
        }
        IpAddr::V6(v) => IpAddr::V6(
            (u128::from(v) & u128::MAX.checked_shl(128 - u32::from(n)).unwrap_or(0)).into(),
        ),
    };
    Ok((masked, n))
}

fn n_text(s: &str) -> &str {
    s.trim()
        .rsplit_once('/')
        .map(|(_, n)| n)
        .unwrap_or_default()
}

fn parse_port(p: i32) -> Result<u16, Invalid> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(Invalid::BadPort(p))
}

/// `None` for protocols the datapath does not balance (SCTP): valid Kubernetes, skipped here.
fn parse_protocol(p: Option<&str>) -> Result<Option<Protocol>, Invalid> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Some(Protocol::Tcp)),
        "UDP" => Ok(Some(Protocol::Udp)),
        "SCTP" => Ok(None),
        other => Err(Invalid::BadProtocol(other.to_string())),
    }
}

fn policy(p: Option<&str>) -> TrafficPolicy {
    match p {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    }
}

/// Backends must be real pod/node addresses: never loopback, link-local (cloud metadata
/// 169.254.169.254), unspecified or multicast.
pub fn check_backend_addr(ip: IpAddr) -> Result<IpAddr, Invalid> {
    let forbidden = match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => Some("multicast"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("loopback"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Some("IPv4-mapped"),
        _ => None,
    };
    match forbidden {
        Some(why) => Err(Invalid::ForbiddenBackend(ip, why)),
        None => Ok(ip),
    }
}

pub fn service_name(ns: Option<&String>, name: Option<&String>) -> Result<ServiceName, Invalid> {
    Ok(ServiceName {
        namespace: ns.cloned().unwrap_or_else(|| "default".to_string()),
        name: name.cloned().ok_or(Invalid::NoName)?,
    })
}

/// Validates a Service. Skipped ports (SCTP) are reported through `warn`.
pub fn service(svc: &Service, warn: &mut dyn FnMut(String)) -> Result<ServiceOutcome, Invalid> {
    let id = service_name(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref())?;
    let labels = svc.metadata.labels.as_ref();
    if let Some(p) = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME)) {
        return Ok(ServiceOutcome::Ignore(Ignored::OtherProxy(p.clone())));
    }
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return Ok(ServiceOutcome::Ignore(Ignored::Headless));
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(ServiceOutcome::Ignore(Ignored::Headless));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(ServiceOutcome::Ignore(Ignored::ExternalName));
    }
    let mut ip_texts: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ip_texts.is_empty() {
        ip_texts.extend(spec.cluster_ip.iter());
    }
    if ip_texts.is_empty()
        || ip_texts
            .iter()
            .any(|s| s.as_str() == "None" || s.is_empty())
    {
        return Ok(ServiceOutcome::Ignore(Ignored::Headless));
    }
    let cluster_ips = ip_texts
        .into_iter()
        .map(|s| parse_ip(s))
        .collect::<Result<Vec<_>, _>>()?;

    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let port = parse_port(p.port)?;
        let node_port = p
            .node_port
            .filter(|&n| n != 0)
            .map(parse_port)
            .transpose()?;
        let name = p.name.clone().unwrap_or_default();
        match parse_protocol(p.protocol.as_deref())? {
            Some(protocol) => ports.push(ServicePort {
                name,
                protocol,
                port,
                node_port,
            }),
            None => warn(format!(
                "port {name:?} ({port}/SCTP) skipped: SCTP is not supported"
            )),
        }
    }
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .map(|s| parse_ip(s))
        .collect::<Result<Vec<_>, _>>()?;
    let lb_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref())
        .map(parse_ip)
        .collect::<Result<Vec<_>, _>>()?;
    let maglev_table_size = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_MAGLEV_SIZE))
    {
        None => None,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(m) => Some(m),
            Err(_) => {
                warn(format!(
                    "annotation {ANNOTATION_MAGLEV_SIZE}={v:?} is not a number; using the default"
                ));
                None
            }
        },
    };
    let session_affinity = spec.session_affinity.as_deref() == Some("ClientIP");
    let affinity_timeout_s = if session_affinity {
        affinity_timeout(spec)?
    } else {
        0
    };
    Ok(ServiceOutcome::Use(ServiceInfo {
        id,
        cluster_ips,
        ports,
        internal_policy: policy(spec.internal_traffic_policy.as_deref()),
        external_policy: policy(spec.external_traffic_policy.as_deref()),
        session_affinity,
        affinity_timeout_s,
        external_ips,
        lb_ips,
        maglev_table_size,
        traffic_distribution: traffic_distribution(spec.traffic_distribution.as_deref(), warn),
        source_ranges: spec
            .load_balancer_source_ranges
            .as_ref()
            .filter(|r| !r.is_empty())
            .map(|ranges| {
                ranges
                    .iter()
                    .filter_map(|r| match parse_cidr(r) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            warn(format!(
                                "loadBalancerSourceRanges: {e}; ignored (it never widens access)"
                            ));
                            None
                        }
                    })
                    .collect()
            }),
        health_check_node_port: spec
            .health_check_node_port
            .filter(|&p| p != 0)
            .map(parse_port)
            .transpose()?,
    }))
}

/// ClientIP affinity's timeout: the API server defaults it to 10800 s and accepts 1-86400.
fn affinity_timeout(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<u32, Invalid> {
    let set = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match set {
        None => Ok(DEFAULT_AFFINITY_TIMEOUT_S),
        Some(t) => u32::try_from(t)
            .ok()
            .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
            .ok_or(Invalid::BadAffinityTimeout(t)),
    }
}

/// Unknown values are ignored (the service keeps cluster-wide distribution), as the
/// EndpointSlice controller does for values newer than itself.
fn traffic_distribution(
    value: Option<&str>,
    warn: &mut dyn FnMut(String),
) -> Option<TrafficDistribution> {
    match value? {
        "PreferClose" | "PreferSameZone" => Some(TrafficDistribution::PreferSameZone),
        "PreferSameNode" => Some(TrafficDistribution::PreferSameNode),
        other => {
            warn(format!(
                "trafficDistribution {other:?} is not known; distributing cluster-wide"
            ));
            None
        }
    }
}

/// The parts of a Node the agent uses.
pub fn node(node: &Node) -> Result<NodeInfo, Invalid> {
    let name = node.metadata.name.clone().ok_or(Invalid::NoName)?;
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    let listed = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let of_type = |t: &'static str| {
        listed
            .iter()
            .filter(move |a| a.type_ == t)
            .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
    };
    let addresses = of_type("InternalIP").chain(of_type("ExternalIP")).collect();
    Ok(NodeInfo {
        name,
        zone,
        deleting: node.metadata.deletion_timestamp.is_some() || tainted,
        addresses,
    })
}

/// Validates an EndpointSlice. `None` for slices kube-proxy ignores (FQDN address type).
/// Individual endpoints with unusable addresses are dropped and reported through `warn`.
pub fn endpoint_slice(
    slice: &EndpointSlice,
    warn: &mut dyn FnMut(String),
) -> Result<Option<SliceInfo>, Invalid> {
    let name = slice.metadata.name.clone().ok_or(Invalid::NoName)?;
    let svc_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .ok_or(Invalid::NoServiceLabel)?;
    let service = service_name(slice.metadata.namespace.as_ref(), Some(svc_name))?;
    let want_v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(None),
        other => return Err(Invalid::BadAddressType(other.to_string())),
    };
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let Some(port) = p.port else { continue };
        let port = parse_port(port)?;
        if let Some(protocol) = parse_protocol(p.protocol.as_deref())? {
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port,
            });
        }
    }
    let mut endpoints = Vec::new();
    for ep in &slice.endpoints {
        // kube-proxy uses the first address only.
        let Some(text) = ep.addresses.first() else {
            continue;
        };
        let addr = match parse_ip(text).and_then(check_backend_addr) {
            Ok(a) if a.is_ipv6() == want_v6 => a,
            Ok(a) => {
                warn(format!(
                    "endpoint {a} does not match addressType {}",
                    slice.address_type
                ));
                continue;
            }
            Err(e) => {
                warn(format!("endpoint skipped: {e}"));
                continue;
            }
        };
        let cond = ep.conditions.as_ref();
        // Defaults from the EndpointSlice API (and kube-proxy): ready and serving unset mean
        // true; terminating unset means false.
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(true);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        let hints = EndpointHints {
            for_zones: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            for_nodes: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        };
        endpoints.push(EndpointInfo {
            addr,
            node_name: ep.node_name.as_deref().map(shared_name),
            ready,
            serving,
            terminating,
            zone: ep
                .zone
                .as_deref()
                .filter(|z| !z.is_empty())
                .map(shared_name),
            hints: (!hints.for_zones.is_empty() || !hints.for_nodes.is_empty())
                .then(|| Box::new(hints)),
        });
    }
    Ok(Some(SliceInfo {
        name,
        service,
        ports,
        endpoints,
    }))
}

/// All valid objects of one snapshot, keyed for deterministic iteration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub services: BTreeMap<ServiceName, ServiceInfo>,
    /// Keyed by (namespace, slice name).
    pub slices: BTreeMap<(String, String), SliceInfo>,
}

/// Validates every object of a snapshot. Invalid ones are reported through `warn` with their
/// kind, name and reason, and left out; valid ones never depend on invalid ones.
pub fn inventory<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    warn: &mut dyn FnMut(String),
) -> Inventory {
    let mut inv = Inventory::default();
    for svc in services {
        if let Some(info) = service_info(svc, warn) {
            inv.services.insert(info.id.clone(), info);
        }
    }
    for slice in slices {
        if let Some(info) = slice_info(slice, warn) {
            inv.slices
                .insert((info.service.namespace.clone(), info.name.clone()), info);
        }
    }
    inv
}

/// A Service to program, or `None` when it is invalid or not ours (problems reported through
/// `warn`, prefixed with the object's kind and name).
pub fn service_info(svc: &Service, warn: &mut dyn FnMut(String)) -> Option<ServiceInfo> {
    let label = object_label("Service", &svc.metadata);
    let mut w = |m: String| warn(format!("{label}: {m}"));
    match service(svc, &mut w) {
        Ok(ServiceOutcome::Use(info)) => Some(info),
        Ok(ServiceOutcome::Ignore(_)) => None,
        Err(e) => {
            w(format!("invalid, skipped: {e}"));
            None
        }
    }
}

/// An EndpointSlice to use, or `None` (see [`service_info`]).
pub fn slice_info(slice: &EndpointSlice, warn: &mut dyn FnMut(String)) -> Option<SliceInfo> {
    let label = object_label("EndpointSlice", &slice.metadata);
    let mut w = |m: String| warn(format!("{label}: {m}"));
    match endpoint_slice(slice, &mut w) {
        Ok(info) => info,
        Err(e) => {
            w(format!("invalid, skipped: {e}"));
            None
        }
    }
}

/// An object's (namespace, name) as the sources key it; the namespace defaults like the API.
pub type ObjKey = (String, String);

/// The key of an object with this metadata; `None` without a name.
pub fn object_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjKey> {
    Some((
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        meta.name.clone()?,
    ))
}

fn object_label(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

#[cfg(test)]
mod cidr_tests {
    use super::parse_cidr;

    #[test]
    fn cidrs_are_trimmed_and_strict() {
        assert_eq!(
            parse_cidr(" 203.0.113.5/28 ").unwrap(),
            ("203.0.113.0".parse().unwrap(), 28)
        );
        assert_eq!(
            parse_cidr("2001:db8::1/64").unwrap(),
            ("2001:db8::".parse().unwrap(), 64)
        );
        for bad in [
            "not-a-cidr",
            "10.0.0.0/33",
            "10.0.0.0",
            "010.0.0.0/8",
            "10.0.0.0 / 8",
            "10.0.0.0/+8",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
