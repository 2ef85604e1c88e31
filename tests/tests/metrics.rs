//! Prometheus metrics from a running agent: per-service counters from the datapath's per-CPU
//! maps, labelled with the service, after real traffic.

use lb_tests::{
    require_root,
    scenario::{HTTP, web_cluster},
};

fn metrics(c: &lb_tests::Cluster, node: &str) -> String {
    c.lab
        .run_ok(node, &["curl", "-s", "http://127.0.0.1:10249/metrics"])
        .unwrap()
}

/// The value of the first sample of `family` whose labels contain every one of `labels`.
fn sample(text: &str, family: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(family) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[test]
fn per_service_counters_follow_real_connections() {
    if !require_root("agent metrics") {
        return;
    }
    let c = web_cluster().unwrap();
    let labels = ["service=\"web\"", "port=\"http\"", "endpoints=\"all\""];
    let before = sample(
        &metrics(&c, "node1"),
        "kplb_service_connections_total",
        &labels,
    )
    .unwrap_or(0.0);
    let replies = c.lab.http("client1", HTTP, "/hostname", 25).unwrap();
    assert!(replies.iter().all(|r| r.ok), "{replies:?}");
    let text = metrics(&c, "node1");
    let after = sample(&text, "kplb_service_connections_total", &labels)
        .unwrap_or_else(|| panic!("no web/http counter in:\n{text}"));
    assert!(
        after - before >= 25.0,
        "connections counted: {before} -> {after}"
    );
    assert!(
        sample(
            &text,
            "kplb_datapath_events_total",
            &["event=\"sock_xlate\""]
        )
        .unwrap_or(0.0)
            >= 25.0
    );
    assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket"));
}
