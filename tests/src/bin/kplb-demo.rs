//! `cargo xtask demo`: a 2-node lab with one agent per node, real ClusterIP traffic from pods on
//! both nodes, and what the load balancer did with it. Everything is torn down at the end.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};
use lb_tests::{
    Cluster, Lab, Request,
    manifests::{EndpointSlice, Port, Protocol, Service, ServiceType},
    poll_until,
    scenario::{self, BACKENDS, CLIENTS, VIP, ready, web_service, web_slice},
    tally,
};

const EXTERNAL: &str = "203.0.113.10";

/// Service web-np: NodePort 30080 -> the same pods' 8080.
fn nodeport_service() -> Vec<serde_json::Value> {
    let svc = Service::new("web-np")
        .type_(ServiceType::NodePort)
        .cluster_ip("172.30.0.11")
        .port(Port::tcp(80, 8080).named("http").node_port(30080));
    let slice = ready(&BACKENDS).into_iter().fold(
        EndpointSlice::new("web-np-1", "web-np").port(Some("http"), Protocol::Tcp, 8080),
        EndpointSlice::endpoint,
    );
    vec![svc.to_json(), slice.to_json()]
}

fn spread(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    println!("== kplb demo: 2 nodes, one lb-agent each, ClusterIP {VIP} ==\n");
    let mut lab = Lab::new(2).context("creating the lab")?;
    println!(
        "lab: node1 192.168.0.2 and node2 192.168.0.3 on a shared bridge (prefix {})",
        lab.prefix()
    );
    for (name, node, ip) in BACKENDS {
        scenario::add_backend(&mut lab, (name, node, ip))?;
        println!("  backend {name} on node{node}: {ip} (netexec: TCP 8080 and 8081, UDP 5353)");
    }
    for (name, node, ip) in CLIENTS {
        lab.add_pod(node, name, ip, None)?;
        println!("  client  {name} on node{node}: {ip}");
    }
    lab.add_external_client("ext", EXTERNAL)?;
    println!("  external client ext: {EXTERNAL} (outside the cluster, on the nodes' network)");
    let mut c = Cluster::new(lab)?;
    c.write("web.yaml", &[web_service(), web_slice(ready(&BACKENDS))])?;
    c.write("web-np.yaml", &nodeport_service())?;
    println!(
        "\nService default/web: {VIP}:80/TCP -> 8080, {VIP}:53/UDP -> 5353, {VIP}:9090/TCP -> 8081; EndpointSlice with 3 pods"
    );
    // Generic XDP: native XDP_TX on a veth needs NAPI on its peer, which the lab does not set up.
    c.start_agents(&["--xdp-mode", "generic"], Duration::from_secs(30))?;
    println!(
        "lb-agent running on node1 and node2 (standalone mode, manifests in {})",
        c.manifests_dir().display()
    );

    for (client, node, _) in CLIENTS {
        println!("\n-- {client} (node{node}): 6 new TCP connections to {VIP}:80, GET /hostname --");
        for r in c.lab.http(client, &format!("{VIP}:80"), "/hostname", 6)? {
            println!(
                "   answered by {:<6} | the app's peer (getpeername): {}",
                r.body.as_deref().unwrap_or("?"),
                r.peer.as_deref().unwrap_or("?")
            );
        }
        let seen = c.lab.http(client, &format!("{VIP}:80"), "/clientip", 1)?;
        println!(
            "   GET /clientip: the backend saw {} (the pod itself: no NAT)",
            seen.first().and_then(|r| r.body.as_deref()).unwrap_or("?")
        );
        let tcp = tally(&c.lab.http(client, &format!("{VIP}:80"), "/hostname", 60)?);
        println!("   spread over 60 TCP connections: {}", spread(&tcp));
        let udp = tally(&c.lab.udp(client, &format!("{VIP}:53"), "hostname", 60)?);
        println!("   spread over 60 UDP datagrams:   {}", spread(&udp));
    }

    println!(
        "\n-- north-south: {EXTERNAL} to NodePort 30080 on each node (XDP, externalTrafficPolicy Cluster) --"
    );
    for node_ip in ["192.168.0.2", "192.168.0.3"] {
        let target = format!("{node_ip}:30080");
        let spread_np = tally(&c.lab.http("ext", &target, "/hostname", 30)?);
        println!("   via {target}, 30 connections: {}", spread(&spread_np));
        let mut seen = BTreeMap::new();
        for r in c.lab.http("ext", &target, "/whoami", 12)? {
            let body = r.body.unwrap_or_default();
            if let Some((pod, client)) = body.split_once(' ') {
                let ip = client.rsplit_once(':').map_or(client, |(a, _)| a);
                seen.insert(pod.to_owned(), ip.to_owned());
            }
        }
        for (pod, client) in seen {
            println!("      a backend ({pod}) saw the client as {client}");
        }
    }
    println!("   (local backends see the client itself; remote ones see the entry node: SNAT)");

    println!("\n-- scale down: pod-c leaves the EndpointSlice --");
    c.write(
        "web.yaml",
        &[web_service(), web_slice(ready(&BACKENDS[..2]))],
    )?;
    poll_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        "pod-c gone",
        || {
            Ok(!tally(
                &c.lab
                    .http("client1", &format!("{VIP}:80"), "/hostname", 20)?,
            )
            .contains_key("pod-c"))
        },
    )?;
    let tcp = tally(
        &c.lab
            .http("client1", &format!("{VIP}:80"), "/hostname", 60)?,
    );
    println!("   client1, 60 connections: {}", spread(&tcp));

    println!("\n-- no endpoints: connect() is refused at once (kube-proxy's REJECT) --");
    c.write("web.yaml", &[web_service(), web_slice([])])?;
    let refused = poll_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        "reject",
        || {
            let r = c.lab.request(
                "client1",
                &Request::http(&format!("{VIP}:80"), "/hostname").count(1),
            )?;
            Ok(r.into_iter()
                .find(|a| a.error.as_deref() == Some("ECONNREFUSED")))
        },
    )?;
    println!(
        "   client1: connect to {VIP}:80 -> ECONNREFUSED after {} ms",
        refused.ms
    );

    println!("\ntearing down (agents, namespaces, cgroups, pins) ...");
    drop(c);
    println!("done.");
    Ok(())
}
