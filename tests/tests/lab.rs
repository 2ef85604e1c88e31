//! The lab on its own, without any agent: plain routed connectivity and complete cleanup.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb_tests::{Lab, Request, cleanup, host, require_root, tally};

/// node1: client (10.0.1.20) and local (10.0.1.30); node2: server (10.0.2.10); all dual-stack.
fn two_node_lab() -> Lab {
    let mut lab = Lab::new(2).expect("lab");
    lab.add_pod(1, "client", "10.0.1.20", Some("fd00:10:0:1::20"))
        .unwrap();
    lab.add_pod(1, "local", "10.0.1.30", Some("fd00:10:0:1::30"))
        .unwrap();
    lab.add_pod(2, "server", "10.0.2.10", Some("fd00:10:0:2::10"))
        .unwrap();
    lab
}

fn assert_no_leftovers(prefix: &str) {
    let left = cleanup::leftovers(prefix).unwrap();
    assert!(left.is_empty(), "lab {prefix} left {left:?}");
}

#[test]
fn pods_reach_pods_across_and_within_nodes() {
    if !require_root("lab connectivity") {
        return;
    }
    let started = Instant::now();
    let lab = two_node_lab();
    eprintln!("lab with 3 pods built in {:?}", started.elapsed());
    lab.start_backend("server", &[8080], &[8080]).unwrap();
    lab.start_backend("local", &[8080], &[8080]).unwrap();

    for (target, server) in [
        ("10.0.2.10:8080", "server"),
        ("[fd00:10:0:2::10]:8080", "server"),
        ("10.0.1.30:8080", "local"),
        ("[fd00:10:0:1::30]:8080", "local"),
    ] {
        let client_ip = if target.starts_with('[') {
            "[fd00:10:0:1::20]"
        } else {
            "10.0.1.20"
        };
        let replies = lab.http("client", target, "/hostname", 3).unwrap();
        assert_eq!(
            tally(&replies).get(server),
            Some(&3),
            "{target}: {replies:?}"
        );
        assert!(
            replies.iter().all(|r| r.peer.as_deref() == Some(target)),
            "{replies:?}"
        );

        // No NAT anywhere in the lab: the server sees exactly the client's socket.
        for r in lab.http("client", target, "/clientip", 2).unwrap() {
            assert!(r.ok, "{r:?}");
            assert_eq!(r.body, r.local, "{target}");
            assert!(
                r.body
                    .as_deref()
                    .is_some_and(|b| b.starts_with(&format!("{client_ip}:"))),
                "{r:?}"
            );
        }

        let replies = lab.udp("client", target, "hostname", 3).unwrap();
        assert_eq!(
            tally(&replies).get(server),
            Some(&3),
            "udp {target}: {replies:?}"
        );
        assert!(
            replies.iter().all(|r| r.from.as_deref() == Some(target)),
            "{replies:?}"
        );
        let fixed = &lab
            .request(
                "client",
                &Request::udp(target, "clientip").local_port(41000),
            )
            .unwrap()[0];
        assert_eq!(
            fixed.body.as_deref(),
            Some(format!("{client_ip}:41000").as_str()),
            "{fixed:?}"
        );
    }
    // A long connection across nodes: the echo stream used by the "survives changes" tests.
    let stream = Request::stream("10.0.2.10:8080", Duration::from_millis(300));
    let r = &lab.request("client", &stream).unwrap()[0];
    assert!(r.ok && r.bytes.unwrap_or(0) >= 17 * 10, "{r:?}");
    eprintln!("pods test done in {:?}", started.elapsed());
}

#[test]
fn nodes_reach_nodes_pods_and_external_clients() {
    if !require_root("lab node connectivity") {
        return;
    }
    let mut lab = two_node_lab();
    lab.add_external_client("outside", "203.0.113.10").unwrap();
    lab.start_backend("node2", &[9000], &[9000]).unwrap();
    lab.start_backend("server", &[8080], &[]).unwrap();

    for from in ["node1", "client", "outside"] {
        let r = lab.http(from, "192.168.0.3:9000", "/hostname", 1).unwrap();
        assert_eq!(r[0].body.as_deref(), Some("node2"), "{from}: {r:?}");
    }
    let r = lab
        .http("node1", "[2001:db8::3]:9000", "/clientip", 1)
        .unwrap();
    assert!(
        r[0].body
            .as_deref()
            .is_some_and(|b| b.starts_with("[2001:db8::2]:")),
        "{r:?}"
    );
    let r = lab.udp("node1", "192.168.0.3:9000", "clientip", 1).unwrap();
    assert!(
        r[0].body
            .as_deref()
            .is_some_and(|b| b.starts_with("192.168.0.2:")),
        "{r:?}"
    );
    // A node talks to a remote pod from its node IP (the lab's routes carry `src`).
    let r = lab.http("node1", "10.0.2.10:8080", "/clientip", 1).unwrap();
    assert!(
        r[0].body
            .as_deref()
            .is_some_and(|b| b.starts_with("192.168.0.2:")),
        "{r:?}"
    );
    let r = lab.http("node2", "10.0.2.10:8080", "/clientip", 1).unwrap();
    assert!(
        r[0].body
            .as_deref()
            .is_some_and(|b| b.starts_with("192.168.0.3:")),
        "{r:?}"
    );
    // External clients reach nodes but, without a load balancer, not pods.
    let r = lab
        .http("outside", "192.168.0.2:9000", "/hostname", 1)
        .unwrap();
    assert!(!r[0].ok, "nothing listens on node1:9000: {r:?}");
}

#[test]
fn commands_run_in_their_namespace_and_cgroup() {
    if !require_root("lab cgroups") {
        return;
    }
    let lab = two_node_lab();
    let cgroup = |ns: &str| {
        let out = lab.run_ok(ns, &["cat", "/proc/self/cgroup"]).unwrap();
        out.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or_default()
            .to_owned()
    };
    let root = host::host().unwrap().cgroup2.clone();
    let expect = |rel: &str| {
        format!(
            "/{}",
            lab.cgroup()
                .join(rel)
                .strip_prefix(&root)
                .unwrap()
                .display()
        )
    };
    // The socket hooks attach to the node cgroup: pods must be below it.
    assert_eq!(cgroup("client"), expect("node1/client"));
    assert_eq!(cgroup("server"), expect("node2/server"));
    assert_eq!(cgroup("node1"), expect("node1"));
    assert!(Path::new(&lab.node(1).unwrap().bpffs).is_dir());

    let addrs = lab
        .run_ok("server", &["ip", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        addrs.contains("10.0.2.10/32") && addrs.contains("fd00:10:0:2::10/128"),
        "{addrs}"
    );
    let ifaces = lab.run_ok("node1", &["ip", "-o", "link", "show"]).unwrap();
    assert!(
        ifaces.contains("eth0") && ifaces.contains("lxc1"),
        "{ifaces}"
    );
}

#[test]
fn drop_removes_everything() {
    if !require_root("lab cleanup") {
        return;
    }
    let lab = two_node_lab();
    lab.start_backend("server", &[8080], &[8080]).unwrap();
    let mut sleeper = lab.spawn("client", &["sleep", "600"]).unwrap();
    let prefix = lab.prefix().to_owned();
    let expected: BTreeSet<_> = cleanup::leftovers(&prefix).unwrap().into_iter().collect();
    assert!(
        expected.len() >= 10,
        "netns x6, cgroup, bpffs x2, tmp: {expected:?}"
    );
    let started = Instant::now();
    drop(lab);
    eprintln!("lab dropped in {:?}", started.elapsed());
    assert_no_leftovers(&prefix);
    // The spawned child was killed with the lab even though the test still holds it.
    assert!(
        sleeper.exited().unwrap().is_some(),
        "sleep survived the lab"
    );
}

#[test]
fn panicking_test_still_cleans_up() {
    if !require_root("lab cleanup on panic") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = thread::spawn(move || {
        let lab = two_node_lab();
        lab.start_backend("server", &[8080], &[]).unwrap();
        tx.send(lab.prefix().to_owned()).unwrap();
        panic!("deliberate panic with a live lab");
    })
    .join();
    assert!(result.is_err());
    assert_no_leftovers(&rx.recv().unwrap());
}

#[test]
fn stale_labs_of_dead_processes_are_removed() {
    if !require_root("lab stale cleanup") {
        return;
    }
    // A pid that is certainly dead: a child we started and reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let prefix = format!("{}-{dead}-0", cleanup::STEM);
    let netns = format!("{prefix}-node1");
    lb_tests::netns::add(&netns).unwrap();
    let root = host::host().unwrap().cgroup2.clone();
    std::fs::create_dir_all(root.join(&prefix).join("node1/pod")).unwrap();
    std::fs::create_dir_all(Path::new(host::BPFFS).join(format!("{prefix}-node1"))).unwrap();
    assert!(cleanup::leftovers(&prefix).unwrap().len() >= 3);
    // An orphan of the crashed run, still inside its pod's netns and cgroup.
    let pod_cgroup = root.join(&prefix).join("node1/pod");
    let mut orphan = lb_tests::netns::command(&netns, Some(&pod_cgroup), &["sleep", "600"])
        .unwrap()
        .spawn()
        .unwrap();

    // A lab created by a parallel test may get there first; either way it must be gone.
    cleanup::cleanup_stale().unwrap();
    assert_no_leftovers(&prefix);
    assert!(!orphan.wait().unwrap().success(), "the orphan was killed");
}
