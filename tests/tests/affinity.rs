//! sessionAffinity: ClientIP on the socket path: every connection (and datagram) of one client
//! pod reaches the same backend, while different clients still spread.

use std::time::Duration;

use lb_tests::{
    Cluster, Lab,
    manifests::{Port, Service},
    require_root,
    scenario::{self, BACKENDS, CLIENTS, DNS, HTTP, VIP, ready, web_slice},
    tally,
};

#[test]
fn client_ip_affinity_keeps_each_client_on_one_backend() {
    if !require_root("session affinity") {
        return;
    }
    let mut lab = Lab::new(2).unwrap();
    for pod in BACKENDS {
        scenario::add_backend(&mut lab, pod).unwrap();
    }
    for (name, node, ip) in CLIENTS {
        lab.add_pod(node, name, ip, None).unwrap();
    }
    let mut c = Cluster::new(lab).unwrap();
    let svc = Service::new("web")
        .cluster_ip(VIP)
        .port(Port::tcp(80, 8080).named("http"))
        .port(Port::udp(53, 5353).named("dns"))
        .port(Port::tcp(9090, 8081).named("metrics"))
        .session_affinity_client_ip(Some(600))
        .to_json();
    c.write("web.yaml", &[svc, web_slice(ready(&BACKENDS))])
        .unwrap();
    c.start_agents(&[], Duration::from_secs(30)).unwrap();
    for (client, ..) in CLIENTS {
        let tcp = tally(&c.lab.http(client, HTTP, "/hostname", 30).unwrap());
        assert_eq!(tcp.len(), 1, "{client} over TCP reached {tcp:?}");
        let udp = tally(&c.lab.udp(client, DNS, "hostname", 30).unwrap());
        assert_eq!(udp.len(), 1, "{client} over UDP reached {udp:?}");
    }
}
