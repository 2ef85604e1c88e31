//! Node documents in the manifest directory: the one named --node-name gives this node's zone
//! (and deletion state) in standalone mode, so a lab can exercise topology.

use std::fs;

use k8s_openapi::api::core::v1::Node;
use lb_agent::{
    objects::{self, NodeInfo},
    standalone::{self, ManifestDir},
};

const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node1
  labels: {topology.kubernetes.io/zone: zone-a}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  labels: {topology.kubernetes.io/zone: zone-b}
---
apiVersion: v1
kind: NodeList
items:
  - apiVersion: v1
    kind: Node
    metadata: {name: node3}
"#;

fn info(n: Option<&Node>) -> Option<NodeInfo> {
    n.map(|n| objects::node(n).expect("named node"))
}

#[test]
fn node_documents_are_read_with_services_and_slices() {
    let mut problems = Vec::new();
    let objs = standalone::parse_documents(NODES, &mut problems).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let names: Vec<_> = objs
        .nodes
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["node1", "node2", "node3"]);
    assert!(objs.services.is_empty() && objs.slices.is_empty());
}

#[test]
fn the_directory_picks_the_node_by_name() {
    let dir = std::env::temp_dir().join(format!("kplb-standalone-node-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("nodes.yaml"), NODES).unwrap();
    let mut md = ManifestDir::new(&dir);
    let mut problems = Vec::new();
    assert!(!md.poll(&mut problems).unwrap().is_empty());
    assert!(problems.is_empty(), "{problems:?}");

    let zone = |name: &str| info(md.node(name)).and_then(|i| i.zone);
    assert_eq!(zone("node1").as_deref(), Some("zone-a"));
    assert_eq!(zone("node2").as_deref(), Some("zone-b"));
    assert_eq!(zone("node3"), None, "no zone label");
    assert!(md.node("node9").is_none());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn deletion_and_the_autoscaler_taint_mark_a_node_as_going_away() {
    let parse = |yaml: &str| {
        let mut problems = Vec::new();
        let objs = standalone::parse_documents(yaml, &mut problems).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        objects::node(&objs.nodes[0]).unwrap()
    };
    let plain =
        parse("kind: Node\nmetadata: {name: n, labels: {topology.kubernetes.io/zone: ''}}\n");
    assert_eq!(
        plain,
        NodeInfo {
            name: "n".into(),
            zone: None,
            deleting: false,
            addresses: vec![],
        },
        "an empty zone label is no zone"
    );
    let addressed = parse(
        "kind: Node\nmetadata: {name: n}\nstatus:\n  addresses:\n  \
         - {type: Hostname, address: n}\n  - {type: ExternalIP, address: 203.0.113.7}\n  \
         - {type: InternalIP, address: 192.168.0.3}\n  - {type: InternalIP, address: 2001:db8::3}\n  \
         - {type: InternalIP, address: not-an-ip}\n",
    );
    assert_eq!(
        addressed.addresses,
        ["192.168.0.3", "2001:db8::3", "203.0.113.7"]
            .map(|a| a.parse::<std::net::IpAddr>().unwrap())
            .to_vec(),
        "InternalIPs first, then ExternalIPs; hostnames and junk skipped"
    );
    let deleted =
        parse("kind: Node\nmetadata: {name: n, deletionTimestamp: '2024-05-01T10:00:00Z'}\n");
    assert!(deleted.deleting);
    let tainted = parse(
        "kind: Node\nmetadata: {name: n}\nspec:\n  taints:\n  - {key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}\n",
    );
    assert!(tainted.deleting);
}

#[test]
fn a_malformed_node_is_reported_and_skipped() {
    let mut problems = Vec::new();
    let objs = standalone::parse_documents(
        "kind: Node\nmetadata: {name: n}\nspec: [1, 2]\n",
        &mut problems,
    )
    .unwrap();
    assert!(objs.nodes.is_empty());
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("Node n"), "{problems:?}");
}
