//! Restarts lose nothing: the datapath is pinned, so killing the agent (SIGKILL, no cleanup)
//! and starting it again never fails a connection, new or established.

use std::time::Duration;

use lb_tests::{
    Agent, Cluster, Lab, Request, require_root,
    scenario::{CLIENTS, HTTP, web_cluster},
};

#[test]
fn kill_9_and_restart_loses_no_connection() {
    if !require_root("agent restart") {
        return;
    }
    let mut c = web_cluster().unwrap();
    let dir = c.manifests_dir().to_path_buf();
    let Cluster { agents, lab, .. } = &mut c;
    let lab: &Lab = lab;
    // 2 clients x 600 new connections, 5 ms apart, plus a long-lived echo stream.
    let load = Request::http(HTTP, "/hostname").count(600).interval_ms(5);
    let stream = Request::stream(HTTP, Duration::from_secs(6));
    let (results, stream_result) = std::thread::scope(|s| {
        let clients: Vec<_> = CLIENTS
            .iter()
            .map(|(name, ..)| s.spawn(|| lab.request(name, &load)))
            .collect();
        let streamer = s.spawn(|| lab.request("client1", &stream));
        // Kill each node's agent twice with SIGKILL (no cleanup runs) and start a new one.
        for node in [1, 2, 1, 2] {
            let agent = agents.iter_mut().find(|a| a.node().index == node).unwrap();
            agent.kill9().unwrap();
            *agent = Agent::start(lab, node, &dir, &[]).unwrap();
            agent.wait_synced(Duration::from_secs(30)).unwrap();
            assert!(agent.log().contains("synced"));
        }
        let results: Vec<_> = clients
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        (results, streamer.join().unwrap().unwrap())
    });
    let attempts: Vec<_> = results.into_iter().flatten().collect();
    assert_eq!(attempts.len(), 1200);
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "{} of 1200 connections failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let s = &stream_result[0];
    assert!(s.ok && s.bytes.unwrap_or(0) > 0, "the stream broke: {s:?}");
    // Each restart replaced the pinned links: exactly one set of programs stays attached.
    for node in c.lab.nodes() {
        let out = std::process::Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&node.cgroup)
            .output()
            .unwrap();
        let attached = String::from_utf8_lossy(&out.stdout)
            .matches("kplb_")
            .count();
        assert_eq!(
            attached,
            8,
            "{}: {}",
            node.name,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
