//! IPv6 and dual-stack ClusterIPs: the v6 socket hooks (connect6, sendmsg6, recvmsg6,
//! getpeername6) on a 2-node lab whose pods have both families.

use std::time::Duration;

use lb_tests::{
    Cluster, Lab,
    manifests::{AddressType, Endpoint, EndpointSlice, Port, Protocol, Service},
    require_root, tally,
};

const V4_HTTP: &str = "172.30.0.20:80";
const V6_HTTP: &str = "[fd00:172:30::20]:80";
const V6_DNS: &str = "[fd00:172:30::20]:53";
/// (name, node, IPv4, IPv6)
const BACKENDS: [(&str, usize, &str, &str); 3] = [
    ("pod-a", 1, "10.0.1.10", "fd00:10:0:1::10"),
    ("pod-b", 2, "10.0.2.10", "fd00:10:0:2::10"),
    ("pod-c", 2, "10.0.2.11", "fd00:10:0:2::11"),
];
const CLIENTS: [(&str, usize, &str, &str); 2] = [
    ("client1", 1, "10.0.1.100", "fd00:10:0:1::100"),
    ("client2", 2, "10.0.2.100", "fd00:10:0:2::100"),
];

fn slice(name: &str, family: AddressType, v6: bool) -> serde_json::Value {
    BACKENDS
        .iter()
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
    for (name, node, ip4, ip6) in BACKENDS {
        lab.add_pod(node, name, ip4, Some(ip6)).unwrap();
        lab.start_backend(name, &[8080], &[5353]).unwrap();
    }
    for (name, node, ip4, ip6) in CLIENTS {
        lab.add_pod(node, name, ip4, Some(ip6)).unwrap();
    }
    let mut c = Cluster::new(lab).unwrap();
    let svc = Service::new("web")
        .cluster_ip("fd00:172:30::20")
        .cluster_ip("172.30.0.20")
        .port(Port::tcp(80, 8080).named("http"))
        .port(Port::udp(53, 5353).named("dns"))
        .to_json();
    c.write("web.yaml", &[svc]).unwrap();
    c.write(
        "web-slices.yaml",
        &[
            slice("web-v4", AddressType::IPv4, false),
            slice("web-v6", AddressType::IPv6, true),
        ],
    )
    .unwrap();
    c.start_agents(&[], Duration::from_secs(30)).unwrap();
    c
}

#[test]
fn dual_stack_clusterip_balances_both_families() {
    if !require_root("dual-stack ClusterIP") {
        return;
    }
    let c = cluster();
    for (client, _, _, ip6) in CLIENTS {
        let v6 = c.lab.http(client, V6_HTTP, "/hostname", 60).unwrap();
        assert_eq!(tally(&v6).len(), 3, "{client} over IPv6: {:?}", tally(&v6));
        assert!(
            v6.iter().all(|r| r.peer.as_deref() == Some(V6_HTTP)),
            "{v6:?}"
        );

        let v4 = c.lab.http(client, V4_HTTP, "/hostname", 60).unwrap();
        assert_eq!(tally(&v4).len(), 3, "{client} over IPv4: {:?}", tally(&v4));

        let udp = c.lab.udp(client, V6_DNS, "hostname", 60).unwrap();
        assert_eq!(
            tally(&udp).len(),
            3,
            "{client} UDP over IPv6: {:?}",
            tally(&udp)
        );
        assert!(
            udp.iter().all(|r| r.from.as_deref() == Some(V6_DNS)),
            "{udp:?}"
        );

        // The backend sees the client's own IPv6 address.
        for r in c.lab.http(client, V6_HTTP, "/clientip", 10).unwrap() {
            let body = r.body.clone().unwrap_or_default();
            assert!(
                body.starts_with(&format!("[{ip6}]:")) || body.starts_with(&format!("{ip6}:")),
                "{r:?}"
            );
        }
    }
}
