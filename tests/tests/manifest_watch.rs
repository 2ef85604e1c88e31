//! The agent notices manifest changes as they happen (inotify), not at its next poll: with a
//! poll interval of ten minutes, an added endpoint, a new service and a removed file still reach
//! the pinned maps within seconds.

use std::time::Duration;

use lb_common::{IPPROTO_TCP, SCOPE_INTERNAL, SvcKey, addr};
use lb_tests::{
    Agent, Lab, bpfmaps,
    manifests::{self, Endpoint, EndpointSlice, Port, Protocol, Service},
    poll_until, require_root,
};

fn key(vip: &str) -> SvcKey {
    SvcKey {
        addr: addr::from_ip(vip.parse().unwrap()),
        port: 80u16.to_be(),
        proto: IPPROTO_TCP,
        scope: SCOPE_INTERNAL,
    }
}

fn service(name: &str, vip: &str, endpoints: &[&str]) -> Vec<serde_json::Value> {
    let svc = Service::new(name)
        .cluster_ip(vip)
        .port(Port::tcp(80, 8080).named("http"));
    let slice = endpoints.iter().fold(
        EndpointSlice::new(&format!("{name}-1"), name).port(Some("http"), Protocol::Tcp, 8080),
        |s, ip| s.endpoint(Endpoint::ready_on(ip, "node1")),
    );
    vec![svc.to_json(), slice.to_json()]
}

/// Waits until the frontend `vip:80` has `count` backends (`None`: no frontend).
fn wait_backends(agent: &Agent, vip: &str, count: Option<u32>) {
    poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        &format!("{vip}:80 with {count:?} backends"),
        || {
            let fe = bpfmaps::frontends(&agent.node().bpffs)?;
            Ok((fe.get(&key(vip)).map(|v| v.backend_count) == count).then_some(()))
        },
    )
    .unwrap();
}

#[test]
fn manifest_changes_reach_the_maps_without_waiting_for_a_poll() {
    if !require_root("manifest directory watch") {
        return;
    }
    let lab = Lab::new(1).unwrap();
    let dir = lab.tmp_dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    manifests::write(
        &dir,
        "web.yaml",
        &service("web", "172.30.0.10", &["10.0.1.10"]),
    )
    .unwrap();
    let mut agent = Agent::start(&lab, 1, &dir, &["--poll-interval-ms", "600000"]).unwrap();
    agent.wait_synced(Duration::from_secs(30)).unwrap();
    wait_backends(&agent, "172.30.0.10", Some(1));

    // An endpoint more (the file is replaced by a rename), a second file, a removed file.
    let two = service("web", "172.30.0.10", &["10.0.1.10", "10.0.1.11"]);
    manifests::write(&dir, "web.yaml", &two).unwrap();
    wait_backends(&agent, "172.30.0.10", Some(2));
    manifests::write(
        &dir,
        "api.yaml",
        &service("api", "172.30.0.11", &["10.0.1.12"]),
    )
    .unwrap();
    wait_backends(&agent, "172.30.0.11", Some(1));
    manifests::remove(&dir, "web.yaml").unwrap();
    wait_backends(&agent, "172.30.0.10", None);
    wait_backends(&agent, "172.30.0.11", Some(1));
}
