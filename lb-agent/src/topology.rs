//! Topology-aware endpoint selection: kube-proxy's topology.go rules for the cluster-wide
//! endpoint set of a service port.
//!
//! kube-proxy reads only the EndpointSlice hints (`hints.forNodes`, `hints.forZones`), which the
//! EndpointSlice controller derives from `spec.trafficDistribution`. Same-node hints are used
//! when every ready endpoint has one and one names this node; otherwise same-zone hints when
//! every ready endpoint has one and one names this node's zone; otherwise every endpoint is used.
//! A standalone agent has no controller, so an endpoint without hints gets the ones the
//! controller would give it (its own zone, and its own node for `PreferSameNode`); hints present
//! in the slice always win.

use std::{borrow::Cow, collections::BTreeSet};

use crate::objects::{EndpointHints, EndpointInfo, TrafficDistribution};

/// Which hints restrict the cluster-wide endpoints on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No restriction.
    Cluster,
    PreferSameZone,
    PreferSameNode,
}

/// The endpoint's hints: its own, else those the EndpointSlice controller derives from the
/// service's traffic distribution (only for ready endpoints, as the controller does).
pub fn hints(ep: &EndpointInfo, dist: Option<TrafficDistribution>) -> Cow<'_, EndpointHints> {
    let (Some(dist), None, true) = (dist, &ep.hints, ep.ready) else {
        return Cow::Borrowed(ep.own_hints());
    };
    let Some(zone) = &ep.zone else {
        // The controller leaves endpoints without a zone unhinted, which turns hints off for
        // the whole service.
        return Cow::Borrowed(ep.own_hints());
    };
    let for_nodes = match (dist, &ep.node_name) {
        (TrafficDistribution::PreferSameNode, Some(n)) => BTreeSet::from([n.to_string()]),
        _ => BTreeSet::new(),
    };
    Cow::Owned(EndpointHints {
        for_zones: BTreeSet::from([zone.to_string()]),
        for_nodes,
    })
}

/// The topology mode for this node, decided from the hints of the ready endpoints.
pub fn mode<'a>(
    ready_hints: impl IntoIterator<Item = &'a EndpointHints>,
    node: &str,
    zone: Option<&str>,
) -> Mode {
    let (mut all_node, mut any_node) = (true, false);
    let (mut all_zone, mut any_zone) = (true, false);
    let mut seen = false;
    for h in ready_hints {
        seen = true;
        if h.for_nodes.is_empty() {
            all_node = false;
        } else if h.for_nodes.contains(node) {
            any_node = true;
        }
        if h.for_zones.is_empty() {
            all_zone = false;
        } else if zone.is_some_and(|z| h.for_zones.contains(z)) {
            any_zone = true;
        }
    }
    if seen && all_node && any_node {
        Mode::PreferSameNode
    } else if seen && all_zone && any_zone {
        Mode::PreferSameZone
    } else {
        Mode::Cluster
    }
}

/// Whether an endpoint may be used from this node under `mode`.
pub fn available(h: &EndpointHints, mode: Mode, node: &str, zone: Option<&str>) -> bool {
    match mode {
        Mode::Cluster => true,
        Mode::PreferSameNode => h.for_nodes.contains(node),
        Mode::PreferSameZone => zone.is_some_and(|z| h.for_zones.contains(z)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(zones: &[&str], nodes: &[&str]) -> EndpointHints {
        EndpointHints {
            for_zones: zones.iter().map(|s| s.to_string()).collect(),
            for_nodes: nodes.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn no_endpoints_means_no_topology() {
        assert_eq!(mode([], "n1", Some("a")), Mode::Cluster);
    }

    #[test]
    fn node_hints_win_over_zone_hints_when_complete_and_matching() {
        let hs = [h(&["a"], &["n1"]), h(&["b"], &["n2"])];
        assert_eq!(mode(&hs, "n1", Some("a")), Mode::PreferSameNode);
        // No hint for this node: fall back to the zone.
        assert_eq!(mode(&hs, "n3", Some("b")), Mode::PreferSameZone);
        // Neither: everything.
        assert_eq!(mode(&hs, "n3", Some("c")), Mode::Cluster);
        assert_eq!(mode(&hs, "n3", None), Mode::Cluster);
    }

    #[test]
    fn one_endpoint_without_hints_turns_them_off() {
        let hs = [h(&["a"], &["n1"]), h(&[], &[])];
        assert_eq!(mode(&hs, "n1", Some("a")), Mode::Cluster);
    }

    #[test]
    fn availability_follows_the_mode() {
        let ep = h(&["a"], &["n1"]);
        assert!(available(&ep, Mode::Cluster, "n9", None));
        assert!(available(&ep, Mode::PreferSameNode, "n1", None));
        assert!(!available(&ep, Mode::PreferSameNode, "n2", Some("a")));
        assert!(available(&ep, Mode::PreferSameZone, "n2", Some("a")));
        assert!(!available(&ep, Mode::PreferSameZone, "n2", None));
    }
}
