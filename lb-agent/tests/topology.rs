//! Topology-aware routing, re-expressed from kube-proxy's topology_test.go (CategorizeEndpoints):
//! zone and node hints in EndpointSlices, and `spec.trafficDistribution` for slices without
//! hints (what the EndpointSlice controller would have written).

mod common;

use common::*;
use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};
use lb_agent::model::NodeConfig;

const VIP: &str = "172.30.0.10";

fn node_in(zone: Option<&str>) -> NodeConfig {
    NodeConfig {
        zone: zone.map(str::to_string),
        ..node(NODE)
    }
}

/// A ready endpoint with zone hints (empty: none) and node hints (empty: none).
fn hinted(addr: &str, zones: &[&str], nodes: &[&str]) -> Ep {
    let mut ep = Ep::new(addr);
    ep.0.hints = Some(EndpointHints {
        for_zones: (!zones.is_empty()).then(|| {
            zones
                .iter()
                .map(|z| ForZone {
                    name: z.to_string(),
                })
                .collect()
        }),
        for_nodes: (!nodes.is_empty()).then(|| {
            nodes
                .iter()
                .map(|n| ForNode {
                    name: n.to_string(),
                })
                .collect()
        }),
    });
    ep
}

/// An endpoint in `zone` on `node_name` without hints.
fn placed(addr: &str, zone: &str, node_name: &str) -> Ep {
    let mut ep = Ep::new(addr).on(node_name);
    ep.0.zone = Some(zone.to_string());
    ep
}

fn svc() -> Svc {
    Svc::new("svc", VIP).port("", "TCP", 80)
}

fn distributed(dist: &str) -> Svc {
    let mut s = svc();
    s.0.spec.as_mut().unwrap().traffic_distribution = Some(dist.to_string());
    s
}

/// Cluster-wide backends of VIP:80 on `node`, as addresses.
fn used(service: Svc, eps: Vec<Ep>, node: &NodeConfig) -> Vec<String> {
    let mut s = Slice::v4("svc-1", "svc").port("", "TCP", 80);
    for ep in eps {
        s = s.ep(ep);
    }
    let r = run_objects(&[service.build()], &[s.build()], node);
    assert!(r.warnings.is_empty(), "{:#?}", r.warnings);
    r.backends(&tcp(VIP, 80))
        .into_iter()
        .map(|(a, _)| a.to_string())
        .collect()
}

// ---- Zone hints (kube-proxy reads only the hints) ---------------------------------------------

fn four_zoned() -> Vec<Ep> {
    vec![
        hinted("10.1.2.3", &["zone-a"], &[]),
        hinted("10.1.2.4", &["zone-b"], &[]),
        hinted("10.1.2.5", &["zone-c"], &[]),
        hinted("10.1.2.6", &["zone-a"], &[]),
    ]
}

#[test]
fn zone_hints_keep_the_endpoints_hinted_for_this_zone() {
    assert_eq!(
        used(svc(), four_zoned(), &node_in(Some("zone-a"))),
        ["10.1.2.3", "10.1.2.6"]
    );
}

#[test]
fn hints_are_ignored_when_the_node_has_no_zone() {
    assert_eq!(
        used(svc(), four_zoned(), &node_in(None)),
        ["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"]
    );
}

#[test]
fn hints_are_ignored_when_none_is_for_this_zone() {
    let eps = vec![
        hinted("10.1.2.3", &["zone-b"], &[]),
        hinted("10.1.2.4", &["zone-c"], &[]),
    ];
    assert_eq!(
        used(svc(), eps, &node_in(Some("zone-a"))),
        ["10.1.2.3", "10.1.2.4"]
    );
}

#[test]
fn hints_are_ignored_when_one_ready_endpoint_lacks_them() {
    let mut eps = four_zoned();
    eps[2] = Ep::new("10.1.2.5");
    assert_eq!(
        used(svc(), eps, &node_in(Some("zone-a"))),
        ["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"]
    );
}

#[test]
fn unready_endpoints_neither_count_for_hints_nor_get_used() {
    // The one endpoint without hints is not ready, so hints stay on.
    let mut eps = four_zoned();
    eps[1] = Ep::new("10.1.2.4").not_ready();
    eps[3] = hinted("10.1.2.6", &["zone-a"], &[]).not_ready();
    assert_eq!(used(svc(), eps, &node_in(Some("zone-a"))), ["10.1.2.3"]);
}

#[test]
fn an_endpoint_may_be_hinted_for_several_zones() {
    let eps = vec![
        hinted("10.1.2.3", &["zone-a", "zone-b"], &[]),
        hinted("10.1.2.4", &["zone-c"], &[]),
    ];
    assert_eq!(used(svc(), eps, &node_in(Some("zone-b"))), ["10.1.2.3"]);
}

#[test]
fn without_ready_endpoints_the_terminating_fallback_ignores_hints() {
    // kube-proxy decides the mode from ready endpoints only: with none, there is no topology
    // and every serving-terminating endpoint is used.
    let eps = vec![
        hinted("10.1.2.3", &["zone-a"], &[]).serving_terminating(),
        hinted("10.1.2.4", &["zone-b"], &[]).serving_terminating(),
    ];
    assert_eq!(
        used(svc(), eps, &node_in(Some("zone-a"))),
        ["10.1.2.3", "10.1.2.4"]
    );
}

#[test]
fn local_traffic_policy_ignores_topology() {
    let eps = vec![
        hinted("10.1.2.3", &["zone-b"], &[]).on(NODE),
        hinted("10.1.2.4", &["zone-a"], &[]).on("node2"),
    ];
    assert_eq!(
        used(svc().internal_local(), eps, &node_in(Some("zone-a"))),
        ["10.1.2.3"]
    );
}

// ---- Node hints (PreferSameNode) ---------------------------------------------------------------

#[test]
fn node_hints_keep_this_nodes_endpoints() {
    let eps = vec![
        hinted("10.0.1.1", &["zone-a"], &[NODE]),
        hinted("10.0.1.2", &["zone-a"], &[NODE]),
        hinted("10.0.2.1", &["zone-a"], &["node2"]),
        hinted("10.0.3.1", &["zone-b"], &["node3"]),
    ];
    assert_eq!(
        used(svc(), eps, &node_in(Some("zone-a"))),
        ["10.0.1.1", "10.0.1.2"]
    );
}

#[test]
fn without_a_node_hint_for_this_node_zone_hints_apply() {
    let eps = vec![
        hinted("10.0.2.1", &["zone-a"], &["node2"]),
        hinted("10.0.3.1", &["zone-b"], &["node3"]),
    ];
    assert_eq!(used(svc(), eps, &node_in(Some("zone-a"))), ["10.0.2.1"]);
}

#[test]
fn incomplete_node_hints_fall_back_to_zone_hints() {
    let eps = vec![
        hinted("10.0.1.1", &["zone-a"], &[NODE]),
        hinted("10.0.2.1", &["zone-a"], &[]),
        hinted("10.0.3.1", &["zone-b"], &["node3"]),
    ];
    assert_eq!(
        used(svc(), eps, &node_in(Some("zone-a"))),
        ["10.0.1.1", "10.0.2.1"]
    );
}

// ---- trafficDistribution without hints (standalone: no EndpointSlice controller) -------------

fn spread() -> Vec<Ep> {
    vec![
        placed("10.0.1.1", "zone-a", NODE),
        placed("10.0.2.1", "zone-a", "node2"),
        placed("10.0.3.1", "zone-b", "node3"),
    ]
}

#[test]
fn prefer_same_zone_and_prefer_close_keep_the_zone() {
    for dist in ["PreferSameZone", "PreferClose"] {
        assert_eq!(
            used(distributed(dist), spread(), &node_in(Some("zone-a"))),
            ["10.0.1.1", "10.0.2.1"],
            "{dist}"
        );
        assert_eq!(
            used(distributed(dist), spread(), &node_in(Some("zone-b"))),
            ["10.0.3.1"],
            "{dist}"
        );
    }
}

#[test]
fn prefer_same_node_falls_back_to_the_zone_then_the_cluster() {
    let on_node1 = node_in(Some("zone-a"));
    assert_eq!(
        used(distributed("PreferSameNode"), spread(), &on_node1),
        ["10.0.1.1"]
    );
    // No local endpoint: the zone.
    let mut eps = spread();
    eps.remove(0);
    assert_eq!(
        used(distributed("PreferSameNode"), eps.clone(), &on_node1),
        ["10.0.2.1"]
    );
    // Nothing in the zone either: everything.
    assert_eq!(
        used(distributed("PreferSameNode"), eps, &node_in(Some("zone-c"))),
        ["10.0.2.1", "10.0.3.1"]
    );
}

#[test]
fn an_endpoint_without_a_zone_turns_distribution_off() {
    let mut eps = spread();
    eps.push(Ep::new("10.0.4.1").on("node4"));
    assert_eq!(
        used(distributed("PreferSameZone"), eps, &node_in(Some("zone-a"))),
        ["10.0.1.1", "10.0.2.1", "10.0.3.1", "10.0.4.1"]
    );
}

#[test]
fn hints_in_the_slice_win_over_traffic_distribution() {
    let eps = vec![
        {
            let mut ep = hinted("10.0.1.1", &["zone-b"], &[]);
            ep.0.zone = Some("zone-a".into());
            ep
        },
        placed("10.0.3.1", "zone-b", "node3"),
    ];
    assert_eq!(
        used(distributed("PreferSameZone"), eps, &node_in(Some("zone-b"))),
        ["10.0.1.1", "10.0.3.1"]
    );
}

#[test]
fn unknown_traffic_distribution_is_reported_and_ignored() {
    let s = Slice::v4("svc-1", "svc").port("", "TCP", 80);
    let s = spread().into_iter().fold(s, Slice::ep).build();
    let r = run_objects(
        &[distributed("PreferSomewhereNice").build()],
        &[s],
        &node_in(Some("zone-a")),
    );
    assert_eq!(r.backends(&tcp(VIP, 80)).len(), 3);
    assert_eq!(
        r.warnings_about("PreferSomewhereNice").len(),
        1,
        "{:#?}",
        r.warnings
    );
}

#[test]
fn no_traffic_distribution_no_hints_means_every_endpoint() {
    assert_eq!(
        used(svc(), spread(), &node_in(Some("zone-a"))),
        ["10.0.1.1", "10.0.2.1", "10.0.3.1"]
    );
}
