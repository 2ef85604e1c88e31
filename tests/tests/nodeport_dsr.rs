//! `--lb-mode dsr` end to end on the two-node lab: the external client (203.0.113.10, default
//! route via node1) reaches a NodePort and a LoadBalancer IP on node1 for a service whose only
//! backend, pod-b (10.0.2.10), runs on node2. node1 tunnels the DNATed packets in IPIP to
//! node2, which strips the tunnel and lets the pod answer the client directly with the
//! frontend as source.
//!
//! Proof that it is DSR and not SNAT: the backend sees the client's own address, node1 counts
//! encapsulations and node2 decapsulations, and TCP connections and connected UDP sockets (which
//! accept replies only from the address they sent to) work.

use std::time::Duration;

use lb_tests::{
    Cluster, Lab, Request,
    manifests::{Endpoint, EndpointSlice, Port, Protocol, Service, ServiceType},
    require_root, tally,
};
use serde_json::{Value, json};

const CLIENT: &str = "ext";
const CLIENT_IP: &str = "203.0.113.10";
const NODE1: &str = "192.168.0.2";

/// A Node document with its InternalIP: how the agents learn where pod-b's node is.
fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [
            {"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": ip},
        ]},
    })
}

fn cluster() -> Cluster {
    let mut lab = Lab::new(2).unwrap();
    lab.add_pod(2, "pod-b", "10.0.2.10", None).unwrap();
    lab.start_backend("pod-b", &[8080], &[5353]).unwrap();
    lab.add_external_client(CLIENT, CLIENT_IP).unwrap();
    let mut c = Cluster::new(lab).unwrap();
    let svc = Service::new("web")
        .type_(ServiceType::LoadBalancer)
        .cluster_ip("172.30.0.10")
        .port(Port::tcp(80, 8080).named("http").node_port(30080))
        .port(Port::udp(53, 5353).named("dns").node_port(30053))
        .external_traffic_policy("Cluster")
        .load_balancer_ip("1.2.3.4")
        .to_json();
    let slice = EndpointSlice::new("web-1", "web")
        .port(Some("http"), Protocol::Tcp, 8080)
        .port(Some("dns"), Protocol::Udp, 5353)
        .endpoint(Endpoint::ready_on("10.0.2.10", "node2").pod("pod-b"))
        .to_json();
    c.write(
        "nodes.yaml",
        &[node("node1", NODE1), node("node2", "192.168.0.3")],
    )
    .unwrap();
    c.write("svc.yaml", &[svc, slice]).unwrap();
    c.start_agents(
        &[
            "--lb-mode",
            "dsr",
            "--service-cidr",
            "172.30.0.0/16",
            "--xdp-mode",
            "generic",
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    c
}

/// `kplb_datapath_events_total{event="..."}` of node `k`.
fn events(c: &Cluster, k: usize, event: &str) -> f64 {
    let text = c
        .lab
        .run_ok(
            &format!("node{k}"),
            &["curl", "-s", "http://127.0.0.1:10249/metrics"],
        )
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("kplb_datapath_events_total") && l.contains(&format!("\"{event}\""))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn dsr_nodeport_and_lb_ip_keep_the_client_ip() {
    if !require_root("dsr") {
        return;
    }
    let c = cluster();
    for target in [format!("{NODE1}:30080"), "1.2.3.4:80".to_owned()] {
        let hosts = c.lab.http(CLIENT, &target, "/hostname", 8).unwrap();
        assert!(hosts.iter().all(|a| a.ok), "{target}: {:?}", tally(&hosts));
        assert!(
            hosts.iter().all(|a| a.body.as_deref() == Some("pod-b")),
            "{target}: {:?}",
            tally(&hosts)
        );
        for a in c.lab.http(CLIENT, &target, "/clientip", 8).unwrap() {
            assert!(a.ok, "{target}: {a:?}");
            let body = a.body.unwrap();
            let ip = body.rsplit_once(':').map_or(body.as_str(), |(ip, _)| ip);
            assert_eq!(ip, CLIENT_IP, "{target}: the backend saw {body}");
        }
    }
    // UDP from a connected socket: replies count only if they come from the frontend.
    for target in [format!("{NODE1}:30053"), "1.2.3.4:53".to_owned()] {
        let udp = c
            .lab
            .request(
                CLIENT,
                &Request::udp(&target, "hostname")
                    .connected()
                    .count(8)
                    .timeout_ms(2000),
            )
            .unwrap();
        assert!(udp.iter().all(|a| a.ok), "udp {target}: {:?}", tally(&udp));
        assert!(
            udp.iter().all(|a| a.body.as_deref() == Some("pod-b")),
            "udp {target}: {:?}",
            tally(&udp)
        );
    }
    let (encap, decap) = (events(&c, 1, "dsr_encap"), events(&c, 2, "dsr_decap"));
    assert!(encap >= 32.0, "node1 tunnelled {encap} packets");
    assert!(decap >= 32.0, "node2 decapsulated {decap} packets");
    // The replies left node2 with the frontend as their source (tc egress), not via node1.
    let replies = events(&c, 2, "tc_reverse_xlate");
    assert!(replies >= 32.0, "node2 rewrote {replies} replies");
}
