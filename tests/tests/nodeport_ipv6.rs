//! NodePort over IPv6 from an external client (2001:db8::100, on the nodes' 2001:db8::/64):
//! XDP translates to the local backend (client address kept) or SNATs to the remote one, in
//! TCP and UDP, through either node. Backends: pod-a on node1, pod-b on node2 (dual-stack).

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    Agent, Cluster, Lab, Request,
    manifests::{AddressType, Endpoint, EndpointSlice, Port, Protocol, Service, ServiceType},
    require_root, tally,
};

const CLIENT: &str = "ext6";
const CLIENT_V6: &str = "2001:db8::100";
/// (name, node, IPv4, IPv6)
const PODS: [(&str, usize, &str, &str); 2] = [
    ("pod-a", 1, "10.0.1.10", "fd00:10:0:1::10"),
    ("pod-b", 2, "10.0.2.10", "fd00:10:0:2::10"),
];

fn slice(name: &str, v6: bool) -> serde_json::Value {
    let family = if v6 {
        AddressType::IPv6
    } else {
        AddressType::IPv4
    };
    PODS.iter()
        .fold(
            EndpointSlice::new(name, "web")
                .address_type(family)
                .port(Some("http"), Protocol::Tcp, 8080)
                .port(Some("dns"), Protocol::Udp, 5353),
            |s, (pod, node, ip4, ip6)| {
                let ip = if v6 { ip6 } else { ip4 };
                s.endpoint(Endpoint::ready_on(ip, &format!("node{node}")).pod(pod))
            },
        )
        .to_json()
}

fn cluster() -> Cluster {
    let mut lab = Lab::new(2).unwrap();
    for (name, node, ip4, ip6) in PODS {
        lab.add_pod(node, name, ip4, Some(ip6)).unwrap();
        lab.start_backend(name, &[8080], &[5353]).unwrap();
    }
    lab.add_external_client_v6(CLIENT, "203.0.113.10", CLIENT_V6)
        .unwrap();
    let mut c = Cluster::new(lab).unwrap();
    let svc = Service::new("web")
        .type_(ServiceType::NodePort)
        .cluster_ip("fd00:172:30::10")
        .cluster_ip("172.30.0.10")
        .port(Port::tcp(80, 8080).named("http").node_port(30080))
        .port(Port::udp(53, 5353).named("dns").node_port(30053))
        .external_traffic_policy("Cluster")
        .to_json();
    c.write(
        "svc.yaml",
        &[svc, slice("web-v4", false), slice("web-v6", true)],
    )
    .unwrap();
    // Each node's IPv6 address is a NodePort address too: the fixture passes the IPv4 one,
    // and a repeated --node-ips adds to the list.
    for k in 1..=2 {
        let v6 = c.lab.node(k).unwrap().ipv6.to_string();
        let args = ["--node-ips", &v6, "--xdp-mode", "generic"];
        let agent = Agent::start(&c.lab, k, c.manifests_dir(), &args).unwrap();
        c.agents.push(agent);
    }
    for agent in &mut c.agents {
        agent.wait_synced(Duration::from_secs(30)).unwrap();
    }
    c
}

#[test]
fn nodeport_over_ipv6_from_outside() {
    if !require_root("nodeport over IPv6") {
        return;
    }
    let c = cluster();
    for node in ["2001:db8::2", "2001:db8::3"] {
        let target = format!("[{node}]:30080");
        let mut pods = BTreeSet::new();
        for a in c.lab.http(CLIENT, &target, "/hostname", 24).unwrap() {
            assert!(a.ok, "{target}: {a:?}");
            pods.insert(a.body.unwrap());
        }
        assert_eq!(pods, BTreeSet::from(["pod-a".into(), "pod-b".into()]));
        let mut peers = BTreeSet::new();
        for a in c.lab.http(CLIENT, &target, "/clientip", 24).unwrap() {
            assert!(a.ok, "{target}: {a:?}");
            let body = a.body.unwrap();
            let ip = body
                .rsplit_once(':')
                .map_or(body.clone(), |(ip, _)| ip.to_owned());
            peers.insert(ip.trim_matches(|c| c == '[' || c == ']').to_owned());
        }
        // The local backend sees the client; the remote one this node (SNAT).
        assert_eq!(
            peers,
            BTreeSet::from([CLIENT_V6.to_owned(), node.to_owned()]),
            "addresses the backends saw via {target}"
        );
        // New sockets spread over both backends; a connected one accepts replies only from
        // the NodePort it sent to.
        let udp = c
            .lab
            .udp(CLIENT, &format!("[{node}]:30053"), "hostname", 24)
            .unwrap();
        assert!(udp.iter().all(|a| a.ok), "udp {node}: {:?}", tally(&udp));
        assert_eq!(tally(&udp).len(), 2, "udp {node}: {:?}", tally(&udp));
        let connected = c
            .lab
            .request(
                CLIENT,
                &Request::udp(&format!("[{node}]:30053"), "hostname")
                    .connected()
                    .count(4)
                    .timeout_ms(2000),
            )
            .unwrap();
        assert!(
            connected.iter().all(|a| a.ok),
            "connected udp {node}: {connected:?}"
        );
    }
}
