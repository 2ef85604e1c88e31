//! `/healthz`, `/livez` and `/metrics` over real HTTP on a loopback port: status codes,
//! headers, kube-proxy's JSON fields, and a well-formed Prometheus exposition.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, SystemTime},
};

use lb_agent::{
    changes::ChangeQueue,
    health::{self, Health},
    metrics::CounterSource,
    sync::SyncStats,
};
use serde_json::Value;

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// A health server on a free loopback port.
fn serve(timeout: Duration) -> (Arc<Health>, SocketAddr) {
    let health = Arc::new(Health::new(Arc::new(ChangeQueue::default()), timeout));
    let addr = health::serve("127.0.0.1:0".parse().unwrap(), health.clone()).unwrap();
    (health, addr)
}

fn synced(health: &Health, triggers: &[SystemTime]) {
    let stats = SyncStats {
        frontends: 3,
        groups: 2,
        backends: 5,
        ..SyncStats::default()
    };
    health.record_sync(&stats, Duration::from_millis(3), triggers);
    health.metrics.set_table_usage(1530, 65536);
}

fn is_rfc3339(s: &str) -> bool {
    s.len() == 30 && s.ends_with('Z') && s.as_bytes()[10] == b'T'
}

#[test]
fn healthz_is_503_until_the_first_sync_and_livez_is_200() {
    let (health, addr) = serve(Duration::from_secs(60));
    let r = get(addr, "/healthz");
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["content-length"], r.body.len().to_string());
    let j = r.json();
    assert_eq!(j["lastUpdated"], "", "never synced");
    assert!(is_rfc3339(j["currentTime"].as_str().unwrap()), "{j}");
    assert_eq!(j["nodeEligible"], true);
    assert_eq!(get(addr, "/livez").status, 200, "starting up is alive");

    synced(&health, &[]);
    let r = get(addr, "/healthz?verbose");
    assert_eq!(r.status, 200);
    let j = r.json();
    // kube-proxy reports lastUpdated = currentTime when healthy.
    assert_eq!(j["lastUpdated"], j["currentTime"]);
    let l = get(addr, "/livez").json();
    assert_eq!(
        l.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["currentTime", "lastUpdated"]
    );
}

#[test]
fn a_node_being_deleted_fails_healthz_but_not_livez() {
    let (health, addr) = serve(Duration::from_secs(60));
    synced(&health, &[]);
    health.set_node_eligible(false);
    let r = get(addr, "/healthz");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["nodeEligible"], false);
    assert_eq!(get(addr, "/livez").status, 200);
    health.set_node_eligible(true);
    assert_eq!(get(addr, "/healthz").status, 200);
}

#[test]
fn a_change_waiting_past_the_timeout_fails_both_until_applied() {
    // A zero timeout makes any queued change late, without waiting.
    let (health, addr) = serve(Duration::ZERO);
    synced(&health, &[]);
    assert_eq!(get(addr, "/healthz").status, 200, "nothing queued");
    health.changes().queued();
    let r = get(addr, "/healthz");
    assert_eq!(r.status, 503);
    let j = r.json();
    assert_ne!(j["lastUpdated"], j["currentTime"], "the real last update");
    assert!(is_rfc3339(j["lastUpdated"].as_str().unwrap()));
    assert_eq!(get(addr, "/livez").status, 503, "a stuck loop is not alive");

    // Taken by a sync but not yet applied: still late.
    let batch = health.changes().take(Duration::ZERO).unwrap();
    assert_eq!(get(addr, "/livez").status, 503);
    let _ = health.changes().applied(batch);
    synced(&health, &[]);
    assert_eq!(get(addr, "/healthz").status, 200);
    assert_eq!(get(addr, "/livez").status, 200);
}

#[test]
fn a_recent_change_is_not_late() {
    let (health, addr) = serve(Duration::from_secs(60));
    synced(&health, &[]);
    health.changes().queued();
    assert_eq!(get(addr, "/healthz").status, 200);
    assert_eq!(get(addr, "/livez").status, 200);
}

#[test]
fn unknown_paths_are_404() {
    let (_, addr) = serve(Duration::from_secs(60));
    assert_eq!(get(addr, "/").status, 404);
    assert_eq!(get(addr, "/healthzz").status, 404);
}

struct FakeCounters(Vec<u64>);

impl CounterSource for FakeCounters {
    fn read(&mut self) -> Result<Vec<u64>, String> {
        Ok(self.0.clone())
    }
}

/// Sample value by exact series text, e.g. `x_total{event="a"}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap();
            let v = match v {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("{l}: {e}")),
            };
            (series.to_string(), v)
        })
        .collect()
}

/// Checks the text format: every sample belongs to a family announced by HELP and TYPE
/// before it, each family once; histogram buckets are cumulative and end at +Inf = _count.
fn check_exposition(text: &str) {
    assert!(text.ends_with('\n'));
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helped.insert(name.to_string()), "HELP twice for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(helped.contains(name), "TYPE before HELP for {name}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "{name} twice"
            );
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample before its TYPE: {line}");
        }
    }
    let values = samples(text);
    for (name, _) in types.iter().filter(|(_, k)| *k == "histogram") {
        let buckets: Vec<(&String, f64)> = values
            .iter()
            .filter(|(s, _)| s.starts_with(&format!("{name}_bucket{{")))
            .map(|(s, v)| (s, *v))
            .collect();
        assert!(!buckets.is_empty(), "{name} has buckets");
        let mut by_le: Vec<(f64, f64)> = buckets
            .iter()
            .map(|(s, v)| {
                let le = s.split("le=\"").nth(1).unwrap().trim_end_matches("\"}");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, *v)
            })
            .collect();
        by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(
            by_le.last().unwrap().0,
            f64::INFINITY,
            "{name} ends at +Inf"
        );
        assert!(
            by_le.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} cumulative"
        );
        assert_eq!(by_le.last().unwrap().1, values[&format!("{name}_count")]);
        assert!(values.contains_key(&format!("{name}_sum")));
    }
}

#[test]
fn metrics_use_kube_proxys_names_and_a_valid_exposition() {
    let (health, addr) = serve(Duration::from_secs(60));
    health
        .metrics
        .set_counter_source(Box::new(FakeCounters(vec![
            5, 0, 2, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 9, 0,
        ])));
    health.changes().queued();
    let two_s_ago = SystemTime::now() - Duration::from_secs(2);
    synced(&health, &[two_s_ago]);
    get(addr, "/healthz");
    get(addr, "/livez");

    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    check_exposition(&r.body);
    let v = samples(&r.body);

    assert_eq!(v["kubeproxy_sync_proxy_rules_duration_seconds_count"], 1.0);
    assert_eq!(
        v["kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"}"], 1.0,
        "3 ms falls in the 4 ms bucket"
    );
    assert_eq!(
        v["kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"}"],
        0.0
    );
    // Programming latency: about 2 s (above the 2 s bound, within 3 s).
    assert_eq!(
        v["kubeproxy_network_programming_duration_seconds_count"],
        1.0
    );
    assert_eq!(
        v["kubeproxy_network_programming_duration_seconds_bucket{le=\"3\"}"],
        1.0
    );
    assert_eq!(
        v["kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"}"],
        0.0
    );
    let sum = v["kubeproxy_network_programming_duration_seconds_sum"];
    assert!((2.0..3.0).contains(&sum), "{sum}");

    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for g in [
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    ] {
        assert!((now - v[g]).abs() < 60.0, "{g} = {}", v[g]);
    }
    assert_eq!(v["kubeproxy_proxy_healthz_total{code=\"200\"}"], 1.0);
    assert_eq!(v["kubeproxy_proxy_livez_total{code=\"200\"}"], 1.0);
    assert_eq!(v["kubeproxy_proxy_healthz_total{code=\"503\"}"], 0.0);

    assert_eq!(v["kplb_map_entries{map=\"KPLB_SVC\"}"], 3.0);
    assert_eq!(v["kplb_map_entries{map=\"KPLB_BACKENDS\"}"], 5.0);
    // Maglev storage is counted in slots: in use, and in the slabs allocated so far.
    assert_eq!(v["kplb_map_entries{map=\"KPLB_MAGLEV\"}"], 1530.0);
    assert_eq!(v["kplb_map_capacity{map=\"KPLB_MAGLEV\"}"], 65536.0);
    assert_eq!(
        v["kplb_map_capacity{map=\"KPLB_BACKENDS\"}"],
        f64::from(lb_common::maps::MAX_BACKENDS)
    );
    assert_eq!(v["kplb_syncs_total"], 1.0);

    assert_eq!(v["kplb_datapath_counters_up"], 1.0);
    assert_eq!(v["kplb_datapath_events_total{event=\"sock_xlate\"}"], 5.0);
    assert_eq!(v["kplb_datapath_events_total{event=\"sock_reject\"}"], 0.0);
    assert_eq!(
        v["kplb_datapath_events_total{event=\"sock_rev_xlate\"}"],
        2.0
    );
    assert_eq!(v["kplb_datapath_events_total{event=\"xdp_drop\"}"], 4.0);
    assert_eq!(
        v["kplb_datapath_events_total{event=\"xdp_ttl_exceeded\"}"],
        3.0
    );
    assert_eq!(
        v["kplb_datapath_events_total{event=\"counter_20\"}"], 9.0,
        "unnamed index"
    );
    assert!(
        !r.body.contains("counter_21"),
        "unnamed zero counters are left out"
    );
}

struct Broken;

impl CounterSource for Broken {
    fn read(&mut self) -> Result<Vec<u64>, String> {
        Err("map gone".into())
    }
}

#[test]
fn unreadable_datapath_counters_are_reported_not_fatal() {
    let (health, addr) = serve(Duration::from_secs(60));
    health.metrics.set_counter_source(Box::new(Broken));
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    check_exposition(&r.body);
    let v = samples(&r.body);
    assert_eq!(v["kplb_datapath_counters_up"], 0.0);
    assert!(!r.body.contains("kplb_datapath_events_total"));
    assert_eq!(
        v["kubeproxy_sync_proxy_rules_last_timestamp_seconds"], 0.0,
        "never synced"
    );
}
