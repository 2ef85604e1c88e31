//! sessionAffinity: ClientIP with `timeoutSeconds` on the socket path, with kube-proxy's
//! semantics: a client keeps its backend while it connects within the timeout of its last
//! connection, even when endpoints are added; after the timeout of inactivity it gets a fresh
//! pick; and it moves at once when its backend leaves the service, even while that backend
//! still serves another service (the agent purges the pins).

use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use lb_common::{SCOPE_INTERNAL, SvcKey, addr};
use lb_tests::{
    Cluster, Lab, Request, bpfmaps,
    manifests::{EndpointSlice, Port, Protocol, Service},
    poll_until, require_root,
    scenario::{self, BACKENDS, CLIENTS, HTTP, POD_D, Pod, VIP, ready, web_slice},
    tally,
};

/// The service's `timeoutSeconds`.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long an agent may take to apply a change.
const APPLY: Duration = Duration::from_secs(5);
/// Interval of a client that keeps connecting (well within the timeout).
const ACTIVE: Duration = Duration::from_millis(300);
/// Bound on waiting for an idle client's fresh pick to differ from its old backend.
const REPICK: Duration = Duration::from_secs(20);

/// Another service over the same pods (so their backend entries outlive `web`'s endpoints).
const OTHER_VIP: &str = "172.30.0.11";

fn web(pods: &[Pod]) -> Vec<serde_json::Value> {
    let svc = Service::new("web")
        .cluster_ip(VIP)
        .port(Port::tcp(80, 8080).named("http"))
        .session_affinity_client_ip(Some(TIMEOUT.as_secs() as u32))
        .to_json();
    vec![svc, web_slice(ready(pods))]
}

fn other(pods: &[Pod]) -> Vec<serde_json::Value> {
    let svc = Service::new("other")
        .cluster_ip(OTHER_VIP)
        .port(Port::tcp(80, 8080).named("http"))
        .to_json();
    let slice = ready(pods).into_iter().fold(
        EndpointSlice::new("other-1", "other").port(Some("http"), Protocol::Tcp, 8080),
        EndpointSlice::endpoint,
    );
    vec![svc, slice.to_json()]
}

/// The one backend `client`'s `n` connections reached (fails if they spread or failed).
fn stuck(c: &Cluster, client: &str, n: u32) -> String {
    let t = tally(&c.lab.http(client, HTTP, "/hostname", n).unwrap());
    assert_eq!(t.len(), 1, "{client} reached {t:?}");
    let backend = t.into_keys().next().unwrap();
    assert!(!backend.starts_with("error:"), "{client}: {backend}");
    backend
}

/// Whether every node's agent has `ip` in `web`'s table.
fn web_table_has(c: &Cluster, ip: &str) -> anyhow::Result<bool> {
    let key = SvcKey {
        addr: addr::from_ip(VIP.parse()?),
        port: 80u16.to_be(),
        proto: 6,
        scope: SCOPE_INTERNAL,
    };
    let ip: std::net::IpAddr = ip.parse()?;
    for node in c.lab.nodes() {
        if !bpfmaps::resolved_table(&node.bpffs, &key)?
            .iter()
            .any(|(a, _)| *a == ip)
        {
            return Ok(false);
        }
    }
    Ok(true)
}

#[test]
fn client_ip_affinity_honours_timeout_and_membership() {
    if !require_root("session affinity timeout") {
        return;
    }
    let mut lab = Lab::new(2).unwrap();
    for pod in BACKENDS {
        scenario::add_backend(&mut lab, pod).unwrap();
    }
    // pod-d runs from the start; it joins `web` later.
    scenario::add_backend(&mut lab, POD_D).unwrap();
    for (name, node, ip) in CLIENTS {
        lab.add_pod(node, name, ip, None).unwrap();
    }
    let mut c = Cluster::new(lab).unwrap();
    let all = [BACKENDS[0], BACKENDS[1], BACKENDS[2], POD_D];
    c.write("web.yaml", &web(&BACKENDS)).unwrap();
    c.write("other.yaml", &other(&all)).unwrap();
    c.start_agents(&[], Duration::from_secs(30)).unwrap();

    // 1. Each client sticks to one backend over 30 connections.
    let pinned: Vec<String> = CLIENTS.iter().map(|(n, ..)| stuck(&c, n, 30)).collect();

    // 2. A 4th endpoint joins while the clients keep connecting: nobody moves.
    let keep_connecting = Request::http(HTTP, "/hostname")
        .count(25)
        .interval_ms(ACTIVE.as_millis() as u64);
    thread::scope(|s| {
        let runs: Vec<_> = CLIENTS
            .iter()
            .map(|(client, ..)| {
                let (lab, req) = (&c.lab, &keep_connecting);
                s.spawn(move || lab.request(client, req))
            })
            .collect();
        thread::sleep(Duration::from_millis(500));
        c.write("web.yaml", &web(&all)).unwrap();
        poll_until(
            APPLY,
            Duration::from_millis(100),
            "pod-d in web's tables",
            || web_table_has(&c, POD_D.2),
        )
        .unwrap();
        for ((client, ..), (run, was)) in CLIENTS.iter().zip(runs.into_iter().zip(&pinned)) {
            let t = tally(&run.join().unwrap().unwrap());
            assert_eq!(
                t.keys().collect::<Vec<_>>(),
                [was],
                "{client} moved while active as pod-d joined"
            );
        }
    });

    // 3. An idle gap shorter than the timeout keeps the backend.
    thread::sleep(Duration::from_millis(700));
    for ((client, ..), was) in CLIENTS.iter().zip(&pinned) {
        assert_eq!(&stuck(&c, client, 1), was, "{client} after a short pause");
    }

    // 4. After the timeout of inactivity a fresh pick is made: it may coincide with the old
    // backend (then the client is pinned anew), so wait out the timeout between tries.
    for ((client, ..), was) in CLIENTS.iter().zip(&pinned) {
        let start = Instant::now();
        let moved = loop {
            thread::sleep(TIMEOUT + Duration::from_millis(500));
            let now = stuck(&c, client, 1);
            if now != *was {
                break now;
            }
            assert!(
                start.elapsed() < REPICK,
                "{client} never left {was} after idle periods longer than the timeout"
            );
        };
        // The fresh pick is sticky in turn.
        assert_eq!(
            stuck(&c, client, 10),
            moved,
            "{client} after its fresh pick"
        );
    }

    // 5. The backends the clients are pinned to leave `web` (they still serve `other`, so
    // only the agent's purge can move the clients): each client moves within the apply
    // deadline although it keeps connecting (so its pin never times out), and sticks to its
    // new backend. Pins are refreshed first: step 4 left the first client idle for a while.
    let pinned: Vec<String> = CLIENTS.iter().map(|(n, ..)| stuck(&c, n, 3)).collect();
    let removed: BTreeSet<&str> = pinned.iter().map(String::as_str).collect();
    let remaining: Vec<Pod> = all
        .iter()
        .copied()
        .filter(|(name, ..)| !removed.contains(name))
        .collect();
    assert!(remaining.len() >= 2, "{removed:?}");
    c.write("web.yaml", &web(&remaining)).unwrap();
    let mut moved: Vec<Option<String>> = vec![None; CLIENTS.len()];
    poll_until(APPLY, ACTIVE, "clients to leave removed backends", || {
        for (((client, ..), was), m) in CLIENTS.iter().zip(&pinned).zip(moved.iter_mut()) {
            let now = stuck(&c, client, 1);
            if now != *was {
                m.get_or_insert(now);
            }
        }
        Ok(moved.iter().all(Option::is_some))
    })
    .unwrap();
    for ((client, ..), now) in CLIENTS.iter().zip(moved.into_iter().flatten()) {
        assert!(!removed.contains(now.as_str()), "{client} went to {now}");
        assert_eq!(
            stuck(&c, client, 10),
            now,
            "{client} after its backend left"
        );
    }
    // The removed backends still serve `other`.
    let other_backends = tally(
        &c.lab
            .http(CLIENTS[0].0, &format!("{OTHER_VIP}:80"), "/hostname", 40)
            .unwrap(),
    );
    assert!(
        other_backends.keys().all(|b| !b.starts_with("error:")),
        "{other_backends:?}"
    );
}
