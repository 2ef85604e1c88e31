//! Every node picks the same backend for the same flow. 1000 UDP flows with fixed 5-tuples to a
//! LoadBalancer IP enter once through node1 and once through node2 (the external client's route
//! to the LB IP is switched between them, as an upstream ECMP router re-hashing would), and each
//! flow lands on the same backend both times: Maglev tables are identical on every node and the
//! XDP path hashes the 5-tuple, so no state needs to be shared.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::Context as _;
use lb_tests::{
    Cluster, Lab,
    manifests::{Endpoint, EndpointSlice, Port, Protocol, Service, ServiceType},
    require_root,
};

const CLIENT: &str = "ext";
const CLIENT_IP: &str = "203.0.113.10";
const LB_IP: &str = "1.2.3.4";
const FLOWS: u16 = 1000;
const FIRST_PORT: u16 = 20000;
const PODS: [(&str, usize, &str); 3] = [
    ("pod-a", 1, "10.0.1.10"),
    ("pod-b", 2, "10.0.2.10"),
    ("pod-c", 2, "10.0.2.11"),
];

fn cluster() -> Cluster {
    let mut lab = Lab::new(2).unwrap();
    for (name, node, ip) in PODS {
        lab.add_pod(node, name, ip, None).unwrap();
        lab.start_backend(name, &[], &[5353]).unwrap();
    }
    lab.add_external_client(CLIENT, CLIENT_IP).unwrap();
    let mut c = Cluster::new(lab).unwrap();
    let svc = Service::new("dns")
        .type_(ServiceType::LoadBalancer)
        .cluster_ip("172.30.0.53")
        .port(Port::udp(53, 5353).named("dns").node_port(30053))
        .load_balancer_ip(LB_IP)
        .to_json();
    let slice = PODS.iter().fold(
        EndpointSlice::new("dns-1", "dns").port(Some("dns"), Protocol::Udp, 5353),
        |s, (pod, node, ip)| s.endpoint(Endpoint::ready_on(ip, &format!("node{node}")).pod(pod)),
    );
    c.write("dns.yaml", &[svc, slice.to_json()]).unwrap();
    c.start_agents(&["--xdp-mode", "generic"], Duration::from_secs(30))
        .unwrap();
    c
}

/// Sends one `hostname` query per flow (source port FIRST_PORT + i) and returns who answered.
fn backends_per_flow(lab: &Lab) -> Vec<String> {
    lab.in_netns(CLIENT, || {
        let to: SocketAddr = format!("{LB_IP}:53").parse()?;
        let mut seen = Vec::with_capacity(FLOWS.into());
        for i in 0..FLOWS {
            let sock = UdpSocket::bind(format!("{CLIENT_IP}:{}", FIRST_PORT + i))?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut buf = [0u8; 256];
            // A lost datagram is retried on the same 5-tuple; a wrong answer is not hidden.
            let answer = (0..3).find_map(|_| {
                sock.send_to(b"hostname", to).ok()?;
                let (n, from) = sock.recv_from(&mut buf).ok()?;
                Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
            });
            let (name, from) = answer.with_context(|| format!("flow {i}: no answer"))?;
            anyhow::ensure!(from == to, "flow {i}: reply from {from}, not the LB IP");
            seen.push(name);
        }
        Ok(seen)
    })
    .unwrap()
}

fn route_lb_ip_via(lab: &Lab, node_ip: &str) {
    lab.run_ok(
        CLIENT,
        &[
            "ip",
            "route",
            "replace",
            &format!("{LB_IP}/32"),
            "via",
            node_ip,
        ],
    )
    .unwrap();
}

#[test]
fn thousand_udp_flows_pick_the_same_backend_through_either_node() {
    if !require_root("maglev flow consistency across nodes") {
        return;
    }
    let c = cluster();
    route_lb_ip_via(&c.lab, "192.168.0.2");
    let via_node1 = backends_per_flow(&c.lab);
    route_lb_ip_via(&c.lab, "192.168.0.3");
    let via_node2 = backends_per_flow(&c.lab);

    let differ: Vec<usize> = (0..via_node1.len())
        .filter(|&i| via_node1[i] != via_node2[i])
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {FLOWS} flows changed backend between nodes, e.g. flow {:?}",
        differ.len(),
        differ.first()
    );
    // And the flows really are spread (not all on one backend).
    for (pod, ..) in PODS {
        let n = via_node1.iter().filter(|p| p.as_str() == pod).count();
        assert!(n > 200, "{pod} got only {n} of {FLOWS} flows");
    }
}
