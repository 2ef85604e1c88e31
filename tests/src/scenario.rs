//! The standard end-to-end scenario shared by tests and the demo: Service `web` on ClusterIP
//! 172.30.0.10 (http 80->8080/TCP, dns 53->5353/UDP, metrics 9090->8081/TCP), backed by pod-a
//! (node1), pod-b and pod-c (node2), with a client pod on each node.

use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use crate::{
    Cluster, Lab,
    manifests::{Endpoint, EndpointSlice, Port, Protocol, Service},
};

pub const VIP: &str = "172.30.0.10";
pub const HTTP: &str = "172.30.0.10:80";
pub const DNS: &str = "172.30.0.10:53";
pub const METRICS: &str = "172.30.0.10:9090";

/// (name, node, IPv4)
pub type Pod = (&'static str, usize, &'static str);
pub const POD_A: Pod = ("pod-a", 1, "10.0.1.10");
pub const POD_B: Pod = ("pod-b", 2, "10.0.2.10");
pub const POD_C: Pod = ("pod-c", 2, "10.0.2.11");
pub const POD_D: Pod = ("pod-d", 1, "10.0.1.11");
pub const BACKENDS: [Pod; 3] = [POD_A, POD_B, POD_C];
pub const CLIENTS: [Pod; 2] = [("client1", 1, "10.0.1.100"), ("client2", 2, "10.0.2.100")];

pub fn web_service() -> Value {
    Service::new("web")
        .cluster_ip(VIP)
        .port(Port::tcp(80, 8080).named("http"))
        .port(Port::udp(53, 5353).named("dns"))
        .port(Port::tcp(9090, 8081).named("metrics"))
        .to_json()
}

pub fn web_slice(endpoints: impl IntoIterator<Item = Endpoint>) -> Value {
    let slice = EndpointSlice::new("web-1", "web")
        .port(Some("http"), Protocol::Tcp, 8080)
        .port(Some("dns"), Protocol::Udp, 5353)
        .port(Some("metrics"), Protocol::Tcp, 8081);
    endpoints
        .into_iter()
        .fold(slice, EndpointSlice::endpoint)
        .to_json()
}

/// Ready endpoints for `pods`, on their nodes.
pub fn ready(pods: &[Pod]) -> Vec<Endpoint> {
    pods.iter()
        .map(|(name, node, ip)| Endpoint::ready_on(ip, &format!("node{node}")).pod(name))
        .collect()
}

/// Adds a pod running netexec on the scenario's ports.
pub fn add_backend(lab: &mut Lab, (name, node, ip): Pod) -> Result<()> {
    lab.add_pod(node, name, ip, None)?;
    lab.start_backend(name, &[8080, 8081], &[5353])
}

/// Lab, backends, clients, manifests, and synced agents on both nodes.
pub fn web_cluster() -> Result<Cluster> {
    let mut lab = Lab::new(2)?;
    for pod in BACKENDS {
        add_backend(&mut lab, pod)?;
    }
    for (name, node, ip) in CLIENTS {
        lab.add_pod(node, name, ip, None)?;
    }
    let mut cluster = Cluster::new(lab)?;
    cluster.write("web-svc.yaml", &[web_service()])?;
    cluster.write("web-slice.yaml", &[web_slice(ready(&BACKENDS))])?;
    cluster.start_agents(&[], Duration::from_secs(30))?;
    Ok(cluster)
}
