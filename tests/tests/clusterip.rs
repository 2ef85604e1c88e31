//! ClusterIP end to end: two nodes, one agent each, real sockets from pods.
//!
//! Service `web` 172.30.0.10: http 80->8080/TCP, dns 53->5353/UDP, metrics 9090->8081/TCP,
//! backed by pod-a (node1), pod-b and pod-c (node2); clients client1 (node1), client2 (node2).

use std::{collections::BTreeMap, time::Duration};

use lb_tests::{
    Attempt, Cluster, Lab, Request,
    manifests::Endpoint,
    poll_until, require_root,
    scenario::{
        self, BACKENDS, CLIENTS, DNS, HTTP, METRICS, POD_A, POD_B, POD_C, POD_D, Pod, ready,
        web_cluster, web_slice,
    },
    tally,
};

/// How long an agent may take to apply a manifest change.
const APPLY: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

fn cluster() -> Cluster {
    web_cluster().unwrap()
}

fn add_backend(lab: &mut Lab, pod: Pod) {
    scenario::add_backend(lab, pod).unwrap();
}

/// Every attempt succeeded and the set of answering backends is exactly `expected`.
fn assert_backends(replies: &[Attempt], expected: &[&str], context: &str) {
    let counts = tally(replies);
    let seen: Vec<&str> = counts.keys().map(String::as_str).collect();
    let mut want = expected.to_vec();
    want.sort_unstable();
    assert_eq!(seen, want, "{context}: {counts:?}");
}

fn hostnames(c: &Cluster, client: &str, count: u32) -> BTreeMap<String, usize> {
    tally(&c.lab.http(client, HTTP, "/hostname", count).unwrap())
}

#[test]
fn clusterip_reaches_every_backend_over_tcp_and_udp() {
    if !require_root("clusterip spread") {
        return;
    }
    let c = cluster();
    for (client, ..) in CLIENTS {
        let replies = c.lab.http(client, HTTP, "/hostname", 60).unwrap();
        assert_backends(
            &replies,
            &["pod-a", "pod-b", "pod-c"],
            &format!("tcp from {client}"),
        );
        // Socket-level LB rewrites getpeername: the app keeps seeing the ClusterIP.
        assert!(
            replies.iter().all(|r| r.peer.as_deref() == Some(HTTP)),
            "{client}: {replies:?}"
        );

        let replies = c.lab.udp(client, DNS, "hostname", 60).unwrap();
        assert_backends(
            &replies,
            &["pod-a", "pod-b", "pod-c"],
            &format!("udp from {client}"),
        );
        assert!(
            replies.iter().all(|r| r.from.as_deref() == Some(DNS)),
            "{client}: {replies:?}"
        );
    }
}

/// A `connect()`ed UDP socket is translated once, on connect: every datagram goes to the one
/// backend picked then, and its replies come from the ClusterIP (kept in the socket's own
/// storage, not the per-datagram map unconnected sockets use).
#[test]
fn connected_udp_sees_the_clusterip_as_its_peer() {
    if !require_root("clusterip connected udp") {
        return;
    }
    let c = cluster();
    for (client, ..) in CLIENTS {
        let replies = c
            .lab
            .request(client, &Request::udp(DNS, "hostname").connected().count(10))
            .unwrap();
        assert!(replies.iter().all(|r| r.ok), "{client}: {replies:?}");
        assert_eq!(
            tally(&replies).len(),
            1,
            "{client}: one backend per socket: {replies:?}"
        );
        assert!(
            replies.iter().all(|r| r.from.as_deref() == Some(DNS)),
            "{client}: replies must come from the ClusterIP: {replies:?}"
        );
    }
}

/// A socket connected to the ClusterIP and then connected again straight to the pod it was
/// balanced to must see the pod as its peer from then on: the socket's remembered frontend is
/// forgotten, not shown for a connection that no longer goes through the service.
#[test]
fn a_socket_connected_again_elsewhere_forgets_the_clusterip() {
    if !require_root("clusterip reconnect") {
        return;
    }
    let c = cluster();
    // One backend, so the pod the socket reconnects to is the one it was balanced to.
    c.write("web-slice.yaml", &[web_slice(ready(&[POD_A]))])
        .unwrap();
    converge("only pod-a serving", |client| {
        Ok(c.lab
            .udp(client, DNS, "hostname", 10)?
            .iter()
            .all(|r| r.body.as_deref() == Some("pod-a")))
    });
    let pod = format!("{}:5353", POD_A.2);
    for (client, ..) in CLIENTS {
        let replies = c
            .lab
            .request(
                client,
                &Request::udp(DNS, "hostname")
                    .connected()
                    .count(5)
                    .reconnect(&pod),
            )
            .unwrap();
        assert!(
            replies
                .iter()
                .all(|r| r.ok && r.body.as_deref() == Some("pod-a")),
            "{client}: {replies:?}"
        );
        let from: Vec<_> = replies
            .iter()
            .map(|r| r.from.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(
            from[..5],
            [DNS; 5],
            "{client}: through the service: {replies:?}"
        );
        assert_eq!(
            from[5..],
            [pod.as_str(); 5],
            "{client}: straight to the pod: {replies:?}"
        );
    }
}

#[test]
fn named_ports_reach_their_own_target_ports() {
    if !require_root("clusterip named ports") {
        return;
    }
    let c = cluster();
    let backend_ips: Vec<&str> = BACKENDS.iter().map(|(_, _, ip)| *ip).collect();
    for (service_port, target_port) in [(HTTP, 8080), (METRICS, 8081)] {
        for r in c
            .lab
            .http("client1", service_port, "/localaddr", 30)
            .unwrap()
        {
            assert!(r.ok, "{service_port}: {r:?}");
            let body = r.body.clone().unwrap_or_default();
            let (ip, port) = body.rsplit_once(':').unwrap_or_default();
            assert_eq!(port, target_port.to_string(), "{service_port}: {r:?}");
            assert!(backend_ips.contains(&ip), "{service_port} went to {ip}");
            assert_eq!(r.peer.as_deref(), Some(service_port));
        }
    }
}

#[test]
fn endpoint_and_service_changes_apply_within_seconds() {
    if !require_root("clusterip updates") {
        return;
    }
    let mut c = cluster();

    add_backend(&mut c.lab, POD_D);
    c.write(
        "web-slice.yaml",
        &[web_slice(ready(&[POD_A, POD_B, POD_C, POD_D]))],
    )
    .unwrap();
    converge("pod-d to be load balanced", |client| {
        Ok(hostnames(&c, client, 20).contains_key("pod-d"))
    });

    c.write(
        "web-slice.yaml",
        &[web_slice(ready(&[POD_A, POD_C, POD_D]))],
    )
    .unwrap();
    converge("pod-b to leave", |client| {
        Ok(!hostnames(&c, client, 20).contains_key("pod-b"))
    });
    for (client, ..) in CLIENTS {
        let replies = c.lab.http(client, HTTP, "/hostname", 60).unwrap();
        assert_backends(
            &replies,
            &["pod-a", "pod-c", "pod-d"],
            &format!("after removing pod-b, from {client}"),
        );
    }

    c.remove("web-svc.yaml").unwrap();
    let once = Request::http(HTTP, "/hostname").timeout_ms(500);
    converge("the deleted service to stop answering", |client| {
        Ok(!c.lab.request(client, &once)?[0].ok)
    });
    for (client, ..) in CLIENTS {
        let replies = c.lab.request(client, &once.clone().count(5)).unwrap();
        assert!(
            replies.iter().all(|r| !r.ok),
            "deleted service still answers {client}: {replies:?}"
        );
    }
}

/// Waits until `check` holds for every client: each node's agent applies changes on its own.
fn converge(what: &str, check: impl Fn(&str) -> anyhow::Result<bool>) {
    for (client, ..) in CLIENTS {
        poll_until(APPLY, POLL, &format!("{what} (seen from {client})"), || {
            check(client)
        })
        .unwrap();
    }
}

/// TCP is refused fast and UDP sends fail (rather than time out) without usable endpoints.
fn assert_rejected(c: &Cluster, context: &str) {
    let once = Request::http(HTTP, "/hostname").timeout_ms(1000);
    converge(&format!("{context}: connections refused"), |client| {
        Ok(c.lab.request(client, &once)?[0].error.as_deref() == Some("ECONNREFUSED"))
    });
    for (client, ..) in CLIENTS {
        for r in c.lab.request(client, &once.clone().count(3)).unwrap() {
            assert_eq!(
                r.error.as_deref(),
                Some("ECONNREFUSED"),
                "{context}, {client}: {r:?}"
            );
            assert!(r.ms < 1000.0, "{context}: refusal took {} ms", r.ms);
        }
        let udp = Request::udp(DNS, "hostname").timeout_ms(1000).count(3);
        for r in c.lab.request(client, &udp).unwrap() {
            assert!(
                !r.ok && r.error.as_deref() != Some("timeout"),
                "{context}, {client}: udp {r:?}"
            );
        }
    }
}

#[test]
fn service_without_ready_endpoints_rejects() {
    if !require_root("clusterip without endpoints") {
        return;
    }
    let c = cluster();
    c.write("web-slice.yaml", &[web_slice([])]).unwrap();
    assert_rejected(&c, "empty slice");

    c.write("web-slice.yaml", &[web_slice(ready(&BACKENDS))])
        .unwrap();
    converge("endpoints to come back", |client| {
        Ok(hostnames(&c, client, 5).len() > 1)
    });

    // Not ready and not serving: nothing to fall back to (terminating-but-serving would be).
    let unready = BACKENDS.iter().map(|(name, node, ip)| {
        Endpoint::new(ip)
            .node(&format!("node{node}"))
            .pod(name)
            .conditions(Some(false), Some(false), Some(false))
    });
    c.write("web-slice.yaml", &[web_slice(unready)]).unwrap();
    assert_rejected(&c, "all endpoints unready");
}

#[test]
fn backends_see_the_client_pod_ip() {
    if !require_root("clusterip client IP") {
        return;
    }
    let c = cluster();
    for (client, _, ip) in CLIENTS {
        for r in c.lab.http(client, HTTP, "/clientip", 30).unwrap() {
            assert!(r.ok, "{client}: {r:?}");
            // No SNAT: the backend sees exactly the client's socket address.
            assert_eq!(r.body, r.local, "{client}");
            assert!(
                r.body
                    .as_deref()
                    .is_some_and(|b| b.starts_with(&format!("{ip}:"))),
                "{r:?}"
            );
        }
        for r in c.lab.udp(client, DNS, "clientip", 30).unwrap() {
            let port = r
                .local
                .as_deref()
                .and_then(|l| l.rsplit_once(':'))
                .map(|(_, p)| p.to_owned());
            assert_eq!(
                r.body,
                port.map(|p| format!("{ip}:{p}")),
                "{client}: udp {r:?}"
            );
        }
    }
}

#[test]
fn hairpin_backend_reaches_the_service_and_itself() {
    if !require_root("clusterip hairpin") {
        return;
    }
    let c = cluster();
    let replies = c.lab.http("pod-a", HTTP, "/hostname", 60).unwrap();
    assert_backends(&replies, &["pod-a", "pod-b", "pod-c"], "tcp from pod-a");
    assert!(
        replies.iter().all(|r| r.peer.as_deref() == Some(HTTP)),
        "{replies:?}"
    );
    for r in c.lab.http("pod-a", HTTP, "/clientip", 20).unwrap() {
        assert!(
            r.body
                .as_deref()
                .is_some_and(|b| b.starts_with("10.0.1.10:")),
            "{r:?}"
        );
    }
    let replies = c.lab.udp("pod-a", DNS, "hostname", 60).unwrap();
    assert_backends(&replies, &["pod-a", "pod-b", "pod-c"], "udp from pod-a");
    assert!(
        replies.iter().all(|r| r.from.as_deref() == Some(DNS)),
        "{replies:?}"
    );
}

#[test]
fn endpoint_updates_never_blackhole_requests() {
    if !require_root("clusterip hitless updates") {
        return;
    }
    let c = cluster();
    // Requests every 10 ms from both nodes while the slice cycles through 2, 3, 0 and 3
    // endpoints (pod-b keeps running): each must reach a backend or, while there are no
    // endpoints, be refused. A timeout or ENETUNREACH means a window without the service.
    let load = Request::http(HTTP, "/hostname")
        .count(150)
        .interval_ms(10)
        .timeout_ms(1000);
    let (c, load) = (&c, &load);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        let clients =
            CLIENTS.map(|(client, ..)| s.spawn(move || (client, c.lab.request(client, load))));
        let phases: [&[Pod]; 4] = [&[POD_A, POD_C], &BACKENDS, &[], &BACKENDS];
        let mut changes = Vec::new();
        for pods in phases.iter().cycle().take(8) {
            c.write("web-slice.yaml", &[web_slice(ready(pods))])
                .unwrap();
            changes.push((started.elapsed().as_millis(), pods.len()));
            std::thread::sleep(Duration::from_millis(200)); // pacing the changes, not waiting
        }
        for handle in clients {
            let (client, replies) = handle.join().unwrap();
            let replies = replies.unwrap();
            let bad: Vec<(f64, String)> = replies
                .iter()
                .filter(|r| !r.ok && r.error.as_deref() != Some("ECONNREFUSED"))
                .map(|r| (r.at, r.outcome()))
                .collect();
            assert!(
                bad.is_empty(),
                "{client}: {:?}\nfailures (ms since the client started): {bad:?}\n\
                 slice changes (ms since the test's clock started, endpoints): {changes:?}",
                tally(&replies)
            );
        }
    });
}
