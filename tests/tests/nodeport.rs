//! NodePort, LoadBalancer and external IPs through XDP, end to end on the two-node lab with an
//! external client (203.0.113.10, default route via node1).
//!
//! Backends: pod-a on node1 (10.0.1.10), pod-b on node2 (10.0.2.10).

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    Cluster, Lab, Request,
    manifests::{Endpoint, EndpointSlice, Port, Protocol, Service, ServiceType},
    poll_until, require_root, tally,
};
use serde_json::{Value, json};

const CLIENT: &str = "ext";
const CLIENT_IP: &str = "203.0.113.10";
const OUTSIDER: &str = "ext2";
const NODE1: &str = "192.168.0.2";
const NODE2: &str = "192.168.0.3";
const APPLY: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

fn service(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    udp_node_port: u16,
    policy: &str,
) -> Service {
    Service::new(name)
        .type_(ServiceType::LoadBalancer)
        .cluster_ip(cluster_ip)
        .port(Port::tcp(80, 8080).named("http").node_port(node_port))
        .port(Port::udp(53, 5353).named("dns").node_port(udp_node_port))
        .external_traffic_policy(policy)
}

fn slice(name: &str, service: &str, pods: &[(&str, usize, &str)]) -> Value {
    let mut s = EndpointSlice::new(name, service)
        .port(Some("http"), Protocol::Tcp, 8080)
        .port(Some("dns"), Protocol::Udp, 5353);
    for (pod, node, ip) in pods {
        s = s.endpoint(Endpoint::ready_on(ip, &format!("node{node}")).pod(pod));
    }
    s.to_json()
}

const POD_A: (&str, usize, &str) = ("pod-a", 1, "10.0.1.10");
const POD_B: (&str, usize, &str) = ("pod-b", 2, "10.0.2.10");

fn cluster() -> Cluster {
    let mut lab = Lab::new(2).unwrap();
    for (name, node, ip) in [POD_A, POD_B] {
        lab.add_pod(node, name, ip, None).unwrap();
        lab.start_backend(name, &[8080], &[5353]).unwrap();
    }
    lab.add_pod(1, "client1", "10.0.1.100", None).unwrap();
    lab.add_external_client(CLIENT, CLIENT_IP).unwrap();
    // Outside the LoadBalancer's source ranges (203.0.113.0/28).
    lab.add_external_client(OUTSIDER, "203.0.113.100").unwrap();
    let mut c = Cluster::new(lab).unwrap();
    let mut lb = service("web", "172.30.0.10", 30080, 30053, "Cluster")
        .external_ip("192.168.99.10")
        .load_balancer_ip("1.2.3.4")
        .to_json();
    lb["spec"]["loadBalancerSourceRanges"] = json!([" 203.0.113.0/28 ", "not-a-cidr"]);
    let local = service("local", "172.30.0.11", 30081, 30054, "Local").to_json();
    let mut local = local;
    local["spec"]["healthCheckNodePort"] = json!(32001);
    let empty = Service::new("empty")
        .type_(ServiceType::NodePort)
        .cluster_ip("172.30.0.12")
        .port(Port::tcp(80, 8080).named("http").node_port(30082))
        .port(Port::udp(53, 5353).named("dns").node_port(30055))
        .to_json();
    c.write("svc.yaml", &[lb, local, empty]).unwrap();
    c.write(
        "slices.yaml",
        &[
            slice("web-1", "web", &[POD_A, POD_B]),
            slice("local-1", "local", &[POD_A]),
            slice("empty-1", "empty", &[]),
        ],
    )
    .unwrap();
    // Generic XDP: native XDP_TX on a veth needs NAPI on its peer (the fabric side), which the
    // lab does not enable; real NICs have no such requirement.
    c.start_agents(
        &["--service-cidr", "172.30.0.0/16", "--xdp-mode", "generic"],
        Duration::from_secs(30),
    )
    .unwrap();
    c
}

/// Dropped traffic: the attempt timed out (connect or read), it was not refused.
fn timed_out(a: &lb_tests::Attempt) -> bool {
    matches!(a.error.as_deref(), Some("timeout" | "ETIMEDOUT"))
}

/// `GET /clientip` answers `ip:port` as the backend saw it; `/hostname` the pod.
fn who(c: &Cluster, from: &str, target: &str, n: u32) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut pods = BTreeSet::new();
    let mut peers = BTreeSet::new();
    for a in c.lab.http(from, target, "/hostname", n).unwrap() {
        assert!(a.ok, "{from} -> {target}: {a:?}");
        pods.insert(a.body.unwrap());
    }
    for a in c.lab.http(from, target, "/clientip", n).unwrap() {
        assert!(a.ok, "{from} -> {target}: {a:?}");
        let body = a.body.unwrap();
        peers.insert(
            body.rsplit_once(':')
                .map(|(ip, _)| ip.to_owned())
                .unwrap_or(body),
        );
    }
    (pods, peers)
}

#[test]
fn nodeport_cluster_policy_from_outside() {
    if !require_root("nodeport cluster policy") {
        return;
    }
    let c = cluster();
    for node in [NODE1, NODE2] {
        let target = format!("{node}:30080");
        let (pods, peers) = who(&c, CLIENT, &target, 24);
        assert_eq!(
            pods,
            BTreeSet::from(["pod-a".into(), "pod-b".into()]),
            "via {node}"
        );
        // Local backends see the client; remote ones the forwarding node's IP (SNAT).
        let expected: BTreeSet<String> = [CLIENT_IP.to_owned(), node.to_owned()].into();
        assert_eq!(peers, expected, "source addresses backends saw via {node}");
        let udp = c
            .lab
            .udp(CLIENT, &format!("{node}:30053"), "hostname", 24)
            .unwrap();
        let answers = tally(&udp);
        assert!(udp.iter().all(|a| a.ok), "udp via {node}: {answers:?}");
        assert_eq!(
            answers.len(),
            2,
            "udp via {node} reaches both backends: {answers:?}"
        );
    }
    // The XDP path counted that traffic per service port (external scope, all endpoints).
    let text = c
        .lab
        .run_ok("node1", &["curl", "-s", "http://127.0.0.1:10249/metrics"])
        .unwrap();
    let packets: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("kplb_service_packets_total")
                && l.contains("service=\"web\"")
                && l.contains("port=\"http\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(
        packets >= 24.0,
        "web/http packets counted on node1: {packets}\n{text}"
    );
}

#[test]
fn nodeport_local_policy_keeps_client_ip_and_other_node_drops() {
    if !require_root("nodeport local policy") {
        return;
    }
    let c = cluster();
    let (pods, peers) = who(&c, CLIENT, &format!("{NODE1}:30081"), 10);
    assert_eq!(pods, BTreeSet::from(["pod-a".into()]));
    assert_eq!(peers, BTreeSet::from([CLIENT_IP.to_owned()]));
    let r = c
        .lab
        .request(
            CLIENT,
            &Request::http(&format!("{NODE2}:30081"), "/hostname").timeout_ms(500),
        )
        .unwrap();
    assert!(timed_out(&r[0]), "node2 has no local endpoint: drop, {r:?}");
    // Health check: 200 with one endpoint on node1, 503 on node2.
    let hc = |node: &str| {
        c.lab
            .http(CLIENT, &format!("{node}:32001"), "/healthz", 1)
            .unwrap()
            .remove(0)
    };
    let one = hc(NODE1);
    assert!(one.ok, "{one:?}");
    let body: Value = serde_json::from_str(one.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], "local");
    assert_eq!(body["serviceProxyHealthy"], true);
    assert_eq!(hc(NODE2).error.as_deref(), Some("HTTP 503"));
    // Switching the service to Cluster closes the port.
    let mut cluster_svc = service("local", "172.30.0.11", 30081, 30054, "Cluster").to_json();
    cluster_svc["spec"]["healthCheckNodePort"] = json!(32001);
    let lb = service("web", "172.30.0.10", 30080, 30053, "Cluster").to_json();
    c.write("svc.yaml", &[lb, cluster_svc]).unwrap();
    poll_until(APPLY, POLL, "health check port to close", || {
        let r = c.lab.request(
            CLIENT,
            &Request::http(&format!("{NODE1}:32001"), "/healthz").timeout_ms(500),
        )?;
        Ok(r[0].error.as_deref() == Some("ECONNREFUSED"))
    })
    .unwrap();
}

#[test]
fn lb_ip_external_ip_source_ranges_and_reject() {
    if !require_root("lb ip and external ip") {
        return;
    }
    let c = cluster();
    // The external client routes 1.2.3.4 and 192.168.99.0/24 via node1 (default route).
    let (pods, _) = who(&c, CLIENT, "1.2.3.4:80", 16);
    assert_eq!(pods.len(), 2, "LB IP reaches both backends: {pods:?}");
    let (pods, _) = who(&c, CLIENT, "192.168.99.10:80", 16);
    assert_eq!(pods.len(), 2, "external IP reaches both backends: {pods:?}");
    // loadBalancerSourceRanges: the LB IP drops other sources; the NodePort does not.
    let r = c
        .lab
        .request(
            OUTSIDER,
            &Request::http("1.2.3.4:80", "/hostname").timeout_ms(500),
        )
        .unwrap();
    assert!(timed_out(&r[0]), "outside the source ranges: {r:?}");
    let r = c
        .lab
        .http(OUTSIDER, &format!("{NODE1}:30080"), "/hostname", 4)
        .unwrap();
    assert!(
        r.iter().all(|a| a.ok),
        "NodePort ignores source ranges: {:?}",
        tally(&r)
    );
    // A known frontend IP on an unknown port, and a service without endpoints: refused fast.
    for target in ["1.2.3.4:81", "192.168.99.10:81", &format!("{NODE1}:30082")] {
        let r = c
            .lab
            .request(CLIENT, &Request::http(target, "/hostname").timeout_ms(1000))
            .unwrap();
        assert_eq!(
            r[0].error.as_deref(),
            Some("ECONNREFUSED"),
            "{target}: {r:?}"
        );
    }
    let udp = c
        .lab
        .request(
            CLIENT,
            &Request::udp(&format!("{NODE1}:30055"), "hostname")
                .connected()
                .timeout_ms(1000),
        )
        .unwrap();
    assert!(
        !udp[0].ok && udp[0].error.as_deref() != Some("timeout"),
        "udp reject: {udp:?}"
    );
    // Unused service IP: dropped, not routed.
    let r = c
        .lab
        .request(CLIENT, &Request::http("172.30.9.9:80", "/").timeout_ms(300))
        .unwrap();
    assert!(timed_out(&r[0]), "unused service IP: {r:?}");
}

#[test]
fn in_cluster_clients_reach_nodeports() {
    if !require_root("nodeport from pods and nodes") {
        return;
    }
    let c = cluster();
    for target in [
        format!("{NODE1}:30080"),
        format!("{NODE2}:30080"),
        "1.2.3.4:80".into(),
    ] {
        let replies = c.lab.http("client1", &target, "/hostname", 16).unwrap();
        assert!(
            replies.iter().all(|a| a.ok),
            "client1 -> {target}: {:?}",
            tally(&replies)
        );
        let replies = c.lab.http("node2", &target, "/hostname", 8).unwrap();
        assert!(
            replies.iter().all(|a| a.ok),
            "node2 -> {target}: {:?}",
            tally(&replies)
        );
    }
}

#[test]
fn long_stream_survives_endpoint_changes() {
    if !require_root("nodeport stream") {
        return;
    }
    let c = cluster();
    let target = format!("{NODE1}:30080");
    let stream = std::thread::scope(|s| {
        let h = s.spawn(|| {
            c.lab
                .request(CLIENT, &Request::stream(&target, Duration::from_secs(4)))
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(500));
        // Endpoints come and go while the stream runs (its own backend stays): the Maglev
        // table changes, conntrack keeps the flow where it is.
        let extra = [
            POD_A,
            POD_B,
            ("pod-c", 2, "10.0.2.11"),
            ("pod-d", 1, "10.0.1.11"),
        ];
        let others = [
            slice("local-1", "local", &[POD_A]),
            slice("empty-1", "empty", &[]),
        ];
        c.write(
            "slices.yaml",
            &[
                slice("web-1", "web", &extra),
                others[0].clone(),
                others[1].clone(),
            ],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        c.write(
            "slices.yaml",
            &[
                slice("web-1", "web", &extra[..3]),
                others[0].clone(),
                others[1].clone(),
            ],
        )
        .unwrap();
        h.join().unwrap()
    });
    assert!(stream[0].ok, "stream broke: {:?}", stream[0]);
    assert!(stream[0].bytes.unwrap_or(0) > 0);
}

#[test]
fn restart_keeps_serving_and_cleanup_detaches() {
    if !require_root("nodeport restart and cleanup") {
        return;
    }
    let mut c = cluster();
    let target = format!("{NODE1}:30080");
    let all_ok = |c: &Cluster, what: &str| {
        let r = c.lab.http(CLIENT, &target, "/hostname", 8).unwrap();
        assert!(r.iter().all(|a| a.ok), "{what}: {:?}", tally(&r));
    };
    // A stopped agent leaves XDP, tc and the maps pinned: traffic keeps flowing.
    c.agents[0].stop().unwrap();
    all_ok(&c, "agent stopped");
    // A restarted agent swaps its program into the pinned XDP link (no gap, no EBUSY).
    let args = ["--service-cidr", "172.30.0.0/16", "--xdp-mode", "generic"];
    let dir = c.manifests_dir().to_path_buf();
    c.agents[0] = lb_tests::Agent::start(&c.lab, 1, &dir, &args).unwrap();
    c.agents[0].wait_synced(Duration::from_secs(30)).unwrap();
    all_ok(&c, "agent restarted");
    let link = c
        .lab
        .run_ok("node1", &["ip", "-d", "link", "show", "eth0"])
        .unwrap();
    assert!(
        link.contains("xdpgeneric"),
        "XDP attached in generic mode:\n{link}"
    );
    let links_dir = c.lab.node(1).unwrap().bpffs.join("links");
    for pin in ["tc_egress_eth0", "tc_ingress_eth0", "xdp_eth0"] {
        let path = links_dir.join(pin);
        let out = std::process::Command::new("bpftool")
            .args(["link", "show", "pinned"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("prog"),
            "{}: {text}",
            path.display()
        );
    }
    // cleanup detaches everything from eth0.
    c.agents[0].stop().unwrap();
    let out = c.agents[0].cleanup().unwrap();
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = c
        .lab
        .run_ok("node1", &["ip", "-d", "link", "show", "eth0"])
        .unwrap();
    assert!(
        !link.contains("xdp"),
        "XDP still attached after cleanup:\n{link}"
    );
    assert!(!links_dir.exists(), "pinned links left after cleanup");
}
