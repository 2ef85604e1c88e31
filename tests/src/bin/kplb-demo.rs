//! `cargo xtask demo`: a 2-node lab with one agent per node, real ClusterIP traffic from pods on
//! both nodes, and what the load balancer did with it. Everything is torn down at the end.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};
use lb_tests::{
    Cluster, Lab, Request,
    manifests::{Endpoint, EndpointSlice, Port, Protocol, Service},
    poll_until, tally,
};
use serde_json::Value;

const VIP: &str = "172.30.0.10";
/// (pod, node, IPv4)
const BACKENDS: [(&str, usize, &str); 3] = [
    ("pod-a", 1, "10.0.1.10"),
    ("pod-b", 2, "10.0.2.10"),
    ("pod-c", 2, "10.0.2.11"),
];
const CLIENTS: [(&str, usize, &str); 2] =
    [("client1", 1, "10.0.1.100"), ("client2", 2, "10.0.2.100")];

fn service() -> Value {
    Service::new("web")
        .cluster_ip(VIP)
        .port(Port::tcp(80, 8080).named("http"))
        .port(Port::udp(53, 5353).named("dns"))
        .to_json()
}

fn slice(pods: &[(&str, usize, &str)]) -> Value {
    pods.iter()
        .fold(
            EndpointSlice::new("web-1", "web")
                .port(Some("http"), Protocol::Tcp, 8080)
                .port(Some("dns"), Protocol::Udp, 5353),
            |s, (name, node, ip)| {
                s.endpoint(Endpoint::ready_on(ip, &format!("node{node}")).pod(name))
            },
        )
        .to_json()
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
        lab.add_pod(node, name, ip, None)?;
        lab.start_backend(name, &[8080], &[5353])?;
        println!("  backend {name} on node{node}: {ip} (netexec: TCP 8080, UDP 5353)");
    }
    for (name, node, ip) in CLIENTS {
        lab.add_pod(node, name, ip, None)?;
        println!("  client  {name} on node{node}: {ip}");
    }
    let mut c = Cluster::new(lab)?;
    c.write("web.yaml", &[service(), slice(&BACKENDS)])?;
    println!(
        "\nService default/web: {VIP}:80/TCP -> 8080, {VIP}:53/UDP -> 5353; EndpointSlice with 3 pods"
    );
    c.start_agents(&[], Duration::from_secs(30))?;
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

    println!("\n-- scale down: pod-c leaves the EndpointSlice --");
    c.write("web.yaml", &[service(), slice(&BACKENDS[..2])])?;
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
    c.write("web.yaml", &[service(), slice(&[])])?;
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
