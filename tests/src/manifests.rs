//! Kubernetes Service and EndpointSlice manifests for the agent's `--manifests` directory.
//!
//! Documents are written as JSON, which is valid YAML, one per `---`-separated document.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// A Service port. `targetPort` may be a number or a container port name.
#[derive(Debug, Clone)]
pub struct Port {
    name: Option<String>,
    protocol: Protocol,
    port: u16,
    target_port: Option<Value>,
    node_port: Option<u16>,
}

impl Port {
    pub fn tcp(port: u16, target_port: u16) -> Self {
        Self::new(Protocol::Tcp, port, target_port)
    }

    pub fn udp(port: u16, target_port: u16) -> Self {
        Self::new(Protocol::Udp, port, target_port)
    }

    pub fn new(protocol: Protocol, port: u16, target_port: u16) -> Self {
        Self {
            name: None,
            protocol,
            port,
            target_port: Some(json!(target_port)),
            node_port: None,
        }
    }

    /// Required by Kubernetes when a Service has more than one port.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A named targetPort (resolved through the EndpointSlice port of that name).
    pub fn target_port_name(mut self, name: &str) -> Self {
        self.target_port = Some(json!(name));
        self
    }

    pub fn node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(name) = &self.name {
            m.insert("name".into(), json!(name));
        }
        m.insert("protocol".into(), json!(self.protocol.as_str()));
        m.insert("port".into(), json!(self.port));
        if let Some(t) = &self.target_port {
            m.insert("targetPort".into(), t.clone());
        }
        if let Some(np) = self.node_port {
            m.insert("nodePort".into(), json!(np));
        }
        Value::Object(m)
    }
}

/// A `v1/Service`.
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    namespace: String,
    type_: ServiceType,
    cluster_ips: Vec<String>,
    ports: Vec<Port>,
    external_traffic_policy: Option<String>,
    internal_traffic_policy: Option<String>,
    session_affinity: Option<Option<u32>>,
    external_ips: Vec<String>,
    load_balancer_ips: Vec<String>,
    annotations: BTreeMap<String, String>,
}

impl Service {
    /// A ClusterIP Service in namespace `default`; add IPs with [`Service::cluster_ip`].
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            type_: ServiceType::ClusterIp,
            cluster_ips: Vec::new(),
            ports: Vec::new(),
            external_traffic_policy: None,
            internal_traffic_policy: None,
            session_affinity: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    pub fn type_(mut self, type_: ServiceType) -> Self {
        self.type_ = type_;
        self
    }

    /// Appends to `clusterIPs` (the first is also `clusterIP`); `"None"` makes it headless.
    pub fn cluster_ip(mut self, ip: &str) -> Self {
        self.cluster_ips.push(ip.into());
        self
    }

    pub fn port(mut self, port: Port) -> Self {
        self.ports.push(port);
        self
    }

    /// `Cluster` or `Local` (NodePort/LoadBalancer only).
    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.external_traffic_policy = Some(policy.into());
        self
    }

    /// `Cluster` or `Local`.
    pub fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.internal_traffic_policy = Some(policy.into());
        self
    }

    /// `sessionAffinity: ClientIP`, with `timeoutSeconds` when given (Kubernetes default 10800).
    pub fn session_affinity_client_ip(mut self, timeout_seconds: Option<u32>) -> Self {
        self.session_affinity = Some(timeout_seconds);
        self
    }

    pub fn external_ip(mut self, ip: &str) -> Self {
        self.external_ips.push(ip.into());
        self
    }

    /// A `status.loadBalancer.ingress[].ip` (what a cloud controller would publish).
    pub fn load_balancer_ip(mut self, ip: &str) -> Self {
        self.load_balancer_ips.push(ip.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut spec = Map::new();
        let type_ = match self.type_ {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        };
        spec.insert("type".into(), json!(type_));
        if let Some(first) = self.cluster_ips.first() {
            spec.insert("clusterIP".into(), json!(first));
            spec.insert("clusterIPs".into(), json!(self.cluster_ips));
            if first != "None" {
                let families: Vec<&str> = self
                    .cluster_ips
                    .iter()
                    .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
                    .collect();
                let policy = if families.len() > 1 {
                    "RequireDualStack"
                } else {
                    "SingleStack"
                };
                spec.insert("ipFamilies".into(), json!(families));
                spec.insert("ipFamilyPolicy".into(), json!(policy));
            }
        }
        spec.insert(
            "ports".into(),
            Value::Array(self.ports.iter().map(Port::to_json).collect()),
        );
        if let Some(p) = &self.external_traffic_policy {
            spec.insert("externalTrafficPolicy".into(), json!(p));
        }
        if let Some(p) = &self.internal_traffic_policy {
            spec.insert("internalTrafficPolicy".into(), json!(p));
        }
        match self.session_affinity {
            None => spec.insert("sessionAffinity".into(), json!("None")),
            Some(timeout) => {
                spec.insert("sessionAffinity".into(), json!("ClientIP"));
                spec.insert(
                    "sessionAffinityConfig".into(),
                    json!({"clientIP": {"timeoutSeconds": timeout.unwrap_or(10800)}}),
                )
            }
        };
        if !self.external_ips.is_empty() {
            spec.insert("externalIPs".into(), json!(self.external_ips));
        }
        let mut doc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(&self.name, &self.namespace, &BTreeMap::new(), &self.annotations),
            "spec": spec,
        });
        if !self.load_balancer_ips.is_empty() {
            let ingress: Vec<Value> = self
                .load_balancer_ips
                .iter()
                .map(|ip| json!({"ip": ip}))
                .collect();
            doc["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        doc
    }
}

fn metadata(
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Value {
    let mut m = json!({"name": name, "namespace": namespace});
    if !labels.is_empty() {
        m["labels"] = json!(labels);
    }
    if !annotations.is_empty() {
        m["annotations"] = json!(annotations);
    }
    m
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone)]
pub struct Endpoint {
    addresses: Vec<String>,
    node_name: Option<String>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    zone: Option<String>,
    pod: Option<String>,
}

impl Endpoint {
    /// An endpoint with no conditions set (Kubernetes reads absent `ready` as true).
    pub fn new(address: &str) -> Self {
        Self {
            addresses: vec![address.into()],
            node_name: None,
            ready: None,
            serving: None,
            terminating: None,
            zone: None,
            pod: None,
        }
    }

    /// A ready, serving, not terminating endpoint on `node`: what a healthy pod looks like.
    pub fn ready_on(address: &str, node: &str) -> Self {
        Self::new(address)
            .node(node)
            .conditions(Some(true), Some(true), Some(false))
    }

    pub fn node(mut self, node: &str) -> Self {
        self.node_name = Some(node.into());
        self
    }

    pub fn conditions(
        mut self,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Self {
        (self.ready, self.serving, self.terminating) = (ready, serving, terminating);
        self
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// `targetRef` to this pod (in the slice's namespace).
    pub fn pod(mut self, pod: &str) -> Self {
        self.pod = Some(pod.into());
        self
    }

    fn to_json(&self, namespace: &str) -> Value {
        let mut m = Map::new();
        m.insert("addresses".into(), json!(self.addresses));
        let mut conditions = Map::new();
        for (key, value) in [
            ("ready", self.ready),
            ("serving", self.serving),
            ("terminating", self.terminating),
        ] {
            if let Some(v) = value {
                conditions.insert(key.into(), json!(v));
            }
        }
        m.insert("conditions".into(), Value::Object(conditions));
        if let Some(node) = &self.node_name {
            m.insert("nodeName".into(), json!(node));
        }
        if let Some(zone) = &self.zone {
            m.insert("zone".into(), json!(zone));
        }
        if let Some(pod) = &self.pod {
            m.insert(
                "targetRef".into(),
                json!({"kind": "Pod", "name": pod, "namespace": namespace}),
            );
        }
        Value::Object(m)
    }
}

/// A `discovery.k8s.io/v1` EndpointSlice for a Service.
#[derive(Debug, Clone)]
pub struct EndpointSlice {
    name: String,
    namespace: String,
    service: String,
    address_type: AddressType,
    ports: Vec<(Option<String>, Protocol, u16)>,
    endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    /// An IPv4 slice labelled `kubernetes.io/service-name: <service>`.
    pub fn new(name: &str, service: &str) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            service: service.into(),
            address_type: AddressType::IPv4,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    pub fn address_type(mut self, address_type: AddressType) -> Self {
        self.address_type = address_type;
        self
    }

    /// A port; `name` must match the Service port's name (`None` for an unnamed port, written
    /// as `name: ""` as the EndpointSlice controller does).
    pub fn port(mut self, name: Option<&str>, protocol: Protocol, port: u16) -> Self {
        self.ports.push((name.map(Into::into), protocol, port));
        self
    }

    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    pub fn to_json(&self) -> Value {
        let labels = BTreeMap::from([
            (
                "kubernetes.io/service-name".to_owned(),
                self.service.clone(),
            ),
            (
                "endpointslice.kubernetes.io/managed-by".to_owned(),
                "kplb-lab".to_owned(),
            ),
        ]);
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(name, protocol, port)| {
                json!({"name": name.as_deref().unwrap_or(""), "protocol": protocol.as_str(), "port": port})
            })
            .collect();
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| e.to_json(&self.namespace))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": metadata(&self.name, &self.namespace, &labels, &BTreeMap::new()),
            "addressType": match self.address_type { AddressType::IPv4 => "IPv4", AddressType::IPv6 => "IPv6" },
            "ports": ports,
            "endpoints": endpoints,
        })
    }
}

/// Writes `docs` to `dir/file_name` as a multi-document YAML file, atomically (temp file in
/// the same dir, then rename), so a watching agent never reads half a file.
pub fn write(dir: &Path, file_name: &str, docs: &[Value]) -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut text = String::new();
    for doc in docs {
        text.push_str("---\n");
        text.push_str(&serde_json::to_string_pretty(doc).context("serializing manifest")?);
        text.push('\n');
    }
    let target = dir.join(file_name);
    // A dot-name without a .yaml suffix: not a manifest to the agent while it is being written.
    let tmp = dir.join(format!(
        ".{file_name}.{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &target).with_context(|| format!("renaming to {}", target.display()))?;
    Ok(target)
}

/// Removes `dir/file_name` (fine if it is already gone).
pub fn remove(dir: &Path, file_name: &str) -> Result<()> {
    let path = dir.join(file_name);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_has_the_kubernetes_shape() {
        let svc = Service::new("web")
            .cluster_ip("172.30.0.10")
            .port(Port::tcp(80, 8080).named("http"))
            .port(Port::udp(53, 5353).named("dns").node_port(30053))
            .session_affinity_client_ip(None)
            .to_json();
        assert_eq!(svc["spec"]["clusterIPs"], json!(["172.30.0.10"]));
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4"]));
        assert_eq!(
            svc["spec"]["ports"][1],
            json!({"name":"dns","protocol":"UDP","port":53,"targetPort":5353,"nodePort":30053})
        );
        assert_eq!(
            svc["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
    }

    #[test]
    fn slice_has_the_kubernetes_shape() {
        let slice = EndpointSlice::new("web-1", "web")
            .port(Some("http"), Protocol::Tcp, 8080)
            .endpoint(Endpoint::ready_on("10.0.1.10", "node1").pod("pod-a"))
            .to_json();
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(
            slice["endpoints"][0]["conditions"],
            json!({"ready":true,"serving":true,"terminating":false})
        );
        assert_eq!(slice["endpoints"][0]["nodeName"], "node1");
    }

    #[test]
    fn write_is_atomic_and_multi_document() {
        let dir = std::env::temp_dir().join(format!("kplb-manifests-unit-{}", std::process::id()));
        let path = write(&dir, "web.yaml", &[json!({"a": 1}), json!({"b": 2})]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("---\n").count(), 2);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left behind"
        );
        remove(&dir, "web.yaml").unwrap();
        remove(&dir, "web.yaml").unwrap();
        fs::remove_dir(&dir).unwrap();
    }
}
