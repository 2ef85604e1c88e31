//! Every Kubernetes manifest shipped in manifests/ parses into its k8s-openapi type without
//! losing a field: the typed object, serialised back, must equal the YAML. k8s-openapi ignores
//! unknown fields, so a misspelt field shows up as a difference instead of passing silently.

use std::path::Path;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize as _;
use serde::{Serialize, de::DeserializeOwned};

fn round_trip<T: DeserializeOwned + Serialize>(doc: &serde_json::Value, file: &str) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", doc["kind"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, doc,
        "{file}: {} lost or changed fields in a round trip",
        doc["kind"]
    );
}

#[test]
fn shipped_manifests_match_the_kubernetes_schema() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut checked = 0;
    for file in ["rbac.yaml", "daemonset.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc: serde_json::Value = serde_json::Value::deserialize(de).unwrap();
            match doc["kind"].as_str() {
                Some("DaemonSet") => round_trip::<DaemonSet>(&doc, file),
                Some("ServiceAccount") => round_trip::<ServiceAccount>(&doc, file),
                Some("ClusterRole") => round_trip::<ClusterRole>(&doc, file),
                Some("ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(&doc, file),
                other => panic!("{file}: unexpected kind {other:?}"),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "expected 4 manifests");
}

#[test]
fn daemonset_runs_the_agent_with_the_contract_flags() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let ds: DaemonSet =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap())
            .unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let args = pod.containers[0].args.clone().unwrap_or_default();
    // The agent's own parser must accept exactly these flags.
    let mut argv = vec!["lb-agent".to_string()];
    argv.extend(args.iter().map(|a| a.replace("$(NODE_NAME)", "node1")));
    let cli = <lb_agent::cli::Cli as clap::Parser>::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("daemonset args rejected: {e}"));
    assert_eq!(cli.run.node_name, "node1");
}
