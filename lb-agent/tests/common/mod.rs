//! Helpers shared by the integration tests: the pure pipeline, frontend keys, and small
//! builders for Services and EndpointSlices.
#![allow(dead_code)] // each test crate uses a different subset

pub mod pkt;

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_agent::{
    model::{self, BackendSpec, Desired, Frontend, Group, NodeConfig},
    objects::{self, Protocol},
    standalone,
};
use lb_common::{SCOPE_INTERNAL, SvcKey, addr};

pub const NODE: &str = "node1";

pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("test address {s:?}: {e}"))
}

pub fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Several YAML streams as one.
pub fn join(texts: &[&str]) -> String {
    texts.join("\n---\n")
}

pub fn node(name: &str) -> NodeConfig {
    NodeConfig {
        node_name: name.to_string(),
        ..NodeConfig::default()
    }
}

/// The result of the pure pipeline and everything it reported, in order.
#[derive(Debug)]
pub struct Run {
    pub desired: Desired,
    pub warnings: Vec<String>,
}

impl Run {
    /// The frontend for `key`, which must exist.
    pub fn frontend(&self, key: &SvcKey) -> &Frontend {
        self.desired
            .frontends
            .get(key)
            .unwrap_or_else(|| panic!("no frontend {}", show_key(key)))
    }

    /// The group behind the frontend `key`.
    pub fn group(&self, key: &SvcKey) -> &Group {
        let fe = self.frontend(key);
        self.desired
            .groups
            .get(&fe.group)
            .expect("frontend's group is in the desired state")
    }

    /// The backends behind the frontend `key` as sorted `(address, port)` pairs.
    pub fn backends(&self, key: &SvcKey) -> Vec<(IpAddr, u16)> {
        let fe = self.frontend(key);
        let group = self.group(key);
        for b in group.backends.iter() {
            assert_eq!(
                b.protocol, fe.group.protocol,
                "backend protocol follows the port"
            );
        }
        let mut out: Vec<_> = group.backends.iter().map(|b| (b.addr, b.port)).collect();
        out.sort();
        out
    }

    /// Warnings that mention `needle`.
    pub fn warnings_about(&self, needle: &str) -> Vec<&String> {
        self.warnings
            .iter()
            .filter(|w| w.contains(needle))
            .collect()
    }
}

/// YAML text -> objects -> inventory -> desired state. A syntax error fails the test.
pub fn run_yaml(text: &str, node: &NodeConfig) -> Run {
    let mut problems = Vec::new();
    let objects = standalone::parse_documents(text, &mut problems)
        .unwrap_or_else(|e| panic!("fixture does not parse: {e}"));
    let mut run = run_objects(&objects.services, &objects.slices, node);
    problems.append(&mut run.warnings);
    run.warnings = problems;
    run
}

/// Objects -> inventory -> desired state.
pub fn run_objects(services: &[Service], slices: &[EndpointSlice], node: &NodeConfig) -> Run {
    let mut warnings = Vec::new();
    let inv = objects::inventory(services, slices, &mut |w| warnings.push(w));
    let desired = model::desired_state(&inv, node, &mut |w| warnings.push(w));
    Run { desired, warnings }
}

/// The ClusterIP frontend key for `ip:port/proto` (IPv4 stored as `::ffff:a.b.c.d`, port in
/// network byte order).
pub fn key(ip_text: &str, port: u16, proto: Protocol) -> SvcKey {
    SvcKey {
        addr: addr::from_ip(ip(ip_text)),
        port: port.to_be(),
        proto: proto.number(),
        scope: SCOPE_INTERNAL,
    }
}

pub fn tcp(ip_text: &str, port: u16) -> SvcKey {
    key(ip_text, port, Protocol::Tcp)
}

pub fn udp(ip_text: &str, port: u16) -> SvcKey {
    key(ip_text, port, Protocol::Udp)
}

pub fn show_key(k: &SvcKey) -> String {
    format!(
        "{}:{}/{} scope {}",
        addr::to_ip(&k.addr),
        u16::from_be(k.port),
        k.proto,
        k.scope
    )
}

/// `(address, port)` pairs from text, sorted.
pub fn eps(list: &[(&str, u16)]) -> Vec<(IpAddr, u16)> {
    let mut out: Vec<_> = list.iter().map(|&(a, p)| (ip(a), p)).collect();
    out.sort();
    out
}

/// The backend specs of every group, for "which endpoints are used at all" checks.
pub fn all_backends(d: &Desired) -> Vec<&BackendSpec> {
    d.groups.values().flat_map(|g| g.backends.iter()).collect()
}

// ---- Object builders -------------------------------------------------------------------------

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        ..ObjectMeta::default()
    }
}

/// A ClusterIP Service in namespace `default`.
#[derive(Clone, Debug)]
pub struct Svc(pub Service);

impl Svc {
    /// `cluster_ips`: comma-separated, first is `clusterIP`.
    pub fn new(name: &str, cluster_ips: &str) -> Self {
        let ips: Vec<String> = cluster_ips
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        Self(Service {
            metadata: meta("default", name),
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().cloned(),
                cluster_ips: Some(ips),
                ports: Some(Vec::new()),
                ..ServiceSpec::default()
            }),
            status: None,
        })
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.as_mut().expect("builder always has a spec")
    }

    pub fn port(mut self, name: &str, protocol: &str, port: i32) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                name: (!name.is_empty()).then(|| name.to_string()),
                protocol: Some(protocol.to_string()),
                port,
                ..ServicePort::default()
            });
        self
    }

    pub fn internal_local(mut self) -> Self {
        self.spec().internal_traffic_policy = Some("Local".to_string());
        self
    }

    pub fn affinity(mut self) -> Self {
        self.spec().session_affinity = Some("ClientIP".to_string());
        self
    }

    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    pub fn build(self) -> Service {
        self.0
    }
}

/// One endpoint of a slice: ready unless told otherwise, on no node unless told.
#[derive(Clone, Debug)]
pub struct Ep(pub Endpoint);

impl Ep {
    pub fn new(addr: &str) -> Self {
        Self(Endpoint {
            addresses: vec![addr.to_string()],
            ..Endpoint::default()
        })
    }

    pub fn on(mut self, node: &str) -> Self {
        self.0.node_name = Some(node.to_string());
        self
    }

    /// Sets the three conditions explicitly.
    pub fn cond(mut self, ready: bool, serving: bool, terminating: bool) -> Self {
        self.0.conditions = Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        });
        self
    }

    /// A pod being deleted that still passes its readiness probe.
    pub fn serving_terminating(self) -> Self {
        self.cond(false, true, true)
    }

    /// A pod being deleted that no longer passes its readiness probe.
    pub fn terminating(self) -> Self {
        self.cond(false, false, true)
    }

    /// A pod that is not ready (yet) and not being deleted.
    pub fn not_ready(self) -> Self {
        self.cond(false, false, false)
    }
}

/// An EndpointSlice in namespace `default`, joined to its service by label.
#[derive(Clone, Debug)]
pub struct Slice(pub EndpointSlice);

impl Slice {
    pub fn new(name: &str, service: &str, address_type: &str) -> Self {
        let mut metadata = meta("default", name);
        metadata.labels = Some(BTreeMap::from([(
            objects::LABEL_SERVICE_NAME.to_string(),
            service.to_string(),
        )]));
        Self(EndpointSlice {
            metadata,
            address_type: address_type.to_string(),
            endpoints: Vec::new(),
            ports: Some(Vec::new()),
        })
    }

    pub fn v4(name: &str, service: &str) -> Self {
        Self::new(name, service, "IPv4")
    }

    pub fn v6(name: &str, service: &str) -> Self {
        Self::new(name, service, "IPv6")
    }

    pub fn port(mut self, name: &str, protocol: &str, port: i32) -> Self {
        self.0
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: (!name.is_empty()).then(|| name.to_string()),
                protocol: Some(protocol.to_string()),
                port: Some(port),
                app_protocol: None,
            });
        self
    }

    pub fn ep(mut self, ep: Ep) -> Self {
        self.0.endpoints.push(ep.0);
        self
    }

    /// Ready endpoints with no node.
    pub fn ready(mut self, addrs: &[&str]) -> Self {
        for a in addrs {
            self.0.endpoints.push(Ep::new(a).0);
        }
        self
    }

    pub fn build(self) -> EndpointSlice {
        self.0
    }
}

/// Whether the test runs as root; without root it fails under `CI=true` and otherwise says
/// it skips (`what` needs `why`).
pub fn root(what: &str, why: &str) -> bool {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} need root ({why}); CI=true, so failing instead of skipping");
    }
    eprintln!("SKIPPED ({what}): needs root for {why}");
    false
}
