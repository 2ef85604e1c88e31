//! Every node builds the same Maglev table for the same service, whatever order its
//! EndpointSlices list the endpoints in: two agents on two lab nodes, fed the same service
//! through differently ordered and differently split slices, hold identical tables. The service
//! has an external IP, so XDP reads its table and it must be the same everywhere (tables only
//! the socket hooks read are sized per node from the backend count).

use std::{net::IpAddr, path::Path, time::Duration};

use lb_common::{IPPROTO_TCP, SCOPE_INTERNAL, SvcKey, addr};
use lb_tests::{
    Agent, Lab, bpfmaps,
    manifests::{self, Endpoint, EndpointSlice, Port, Protocol, Service},
    poll_until, require_root,
};

const ENDPOINTS: [&str; 7] = [
    "10.0.1.10",
    "10.0.1.11",
    "10.0.1.12",
    "10.0.2.10",
    "10.0.2.11",
    "10.0.2.12",
    "10.0.2.13",
];

fn key() -> SvcKey {
    SvcKey {
        addr: addr::from_ip("172.30.0.10".parse().unwrap()),
        port: 80u16.to_be(),
        proto: IPPROTO_TCP,
        scope: SCOPE_INTERNAL,
    }
}

/// The service with `endpoints`, split over `slices` EndpointSlices.
fn write(dir: &Path, endpoints: &[&str], slices: usize) {
    let svc = Service::new("web")
        .cluster_ip("172.30.0.10")
        .external_ip("192.168.99.10")
        .port(Port::tcp(80, 8080).named("http"));
    let mut docs = vec![svc.to_json()];
    for (i, chunk) in endpoints
        .chunks(endpoints.len().div_ceil(slices))
        .enumerate()
    {
        let slice = chunk.iter().fold(
            EndpointSlice::new(&format!("web-{i}"), "web").port(Some("http"), Protocol::Tcp, 8080),
            |s, ip| {
                let node = format!("node{}", ip.split('.').nth(2).unwrap());
                s.endpoint(Endpoint::ready_on(ip, &node))
            },
        );
        docs.push(slice.to_json());
    }
    manifests::write(dir, "web.yaml", &docs).unwrap();
}

fn tables_converge(agents: &[&Agent], want_backends: usize) -> Vec<Vec<(IpAddr, u16)>> {
    poll_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        "tables on both nodes",
        || {
            // The maps are read one after another while an agent may still be writing them:
            // a read that does not hold together (a slot naming a backend just removed) or
            // that a second read does not repeat is "not yet", not a failure.
            let read = || -> Option<Vec<_>> {
                agents
                    .iter()
                    .map(|a| bpfmaps::resolved_table(&a.node().bpffs, &key()).ok())
                    .collect()
            };
            let (Some(tables), Some(again)) = (read(), read()) else {
                return Ok(None);
            };
            let distinct =
                |t: &Vec<(IpAddr, u16)>| t.iter().collect::<std::collections::BTreeSet<_>>().len();
            Ok(
                (tables == again && tables.iter().all(|t| distinct(t) == want_backends))
                    .then_some(tables),
            )
        },
    )
    .unwrap()
}

#[test]
fn two_nodes_build_identical_tables_from_differently_ordered_slices() {
    if !require_root("maglev consistency across nodes") {
        return;
    }
    let lab = Lab::new(2).unwrap();
    let dirs: Vec<_> = (1..=2)
        .map(|k| lab.tmp_dir().join(format!("manifests-node{k}")))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut reversed = ENDPOINTS;
    reversed.reverse();
    write(&dirs[0], &ENDPOINTS, 1);
    write(&dirs[1], &reversed, 3);
    let mut agents: Vec<Agent> = (1..=2)
        .map(|k| Agent::start(&lab, k, &dirs[k - 1], &[]).unwrap())
        .collect();
    for a in &mut agents {
        a.wait_synced(Duration::from_secs(30)).unwrap();
    }
    let refs: Vec<&Agent> = agents.iter().collect();
    let tables = tables_converge(&refs, ENDPOINTS.len());
    assert_eq!(tables[0].len(), 16381, "default size of a table XDP reads");
    assert!(
        tables[0] == tables[1],
        "node1 and node2 hold different tables"
    );

    // A backend leaves on both nodes (listed differently again): still identical.
    write(&dirs[0], &ENDPOINTS[1..], 2);
    write(&dirs[1], &reversed[..reversed.len() - 1], 1);
    let after = tables_converge(&refs, ENDPOINTS.len() - 1);
    assert!(after[0] == after[1], "tables differ after the change");
    // Minimal disruption: only the removed backend's slots (and the paper's small extra churn)
    // moved.
    let moved = tables[0]
        .iter()
        .zip(&after[0])
        .filter(|(a, b)| a != b)
        .count();
    let owned = tables[0]
        .iter()
        .filter(|(ip, _)| ip.to_string() == ENDPOINTS[0])
        .count();
    assert!(
        moved >= owned && moved <= owned + owned / 5,
        "moved {moved}, removed backend owned {owned}"
    );
    drop(agents);
}
