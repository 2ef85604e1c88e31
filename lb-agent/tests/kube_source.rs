//! The Kubernetes source against a fake API server (kube-rs' mock service): lists, watch events,
//! relists and errors flow through the real watchers and reflector stores into the agent's
//! pipeline (the changed objects into the cluster view -> the affected services' desired state
//! -> the reconciler) and an in-memory datapath, and the test checks what ends up in the maps,
//! and that no sync ever empties them on the way.

mod common;
mod fake_apiserver;

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use common::{Ep, NODE, Slice, Svc, tcp};
use fake_apiserver::{FakeApi, Kind};
use k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
use lb_agent::{
    changes::{ChangeQueue, Changed},
    k8s::{ANNOTATION_TRIGGER_TIME, KubeSource, WatchOptions},
    model::NodeConfig,
    objects,
    sync::{Datapath, Reconciler, Scope, TableLoc},
    view::ClusterView,
};
use lb_common::{Backend, MaglevSlot, SvcKey, SvcVal, addr};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(20);
const VIP_A: &str = "172.30.0.10";
const VIP_B: &str = "172.30.0.11";
const VIP_C: &str = "172.30.0.12";

// ---- An in-memory datapath ---------------------------------------------------------------------

#[derive(Default)]
struct Maps {
    backends: BTreeMap<u32, Backend>,
    /// Tables by location; locations are handed out in order and never reused.
    tables: BTreeMap<u32, Vec<MaglevSlot>>,
    next_loc: u32,
    frontends: BTreeMap<SvcKey, SvcVal>,
}

impl Maps {
    /// The backends a frontend leads to, as sorted "ip:port" strings (empty: rejects).
    fn resolve(&self, key: &SvcKey) -> Option<Vec<String>> {
        let v = self.frontends.get(key)?;
        if v.backend_count == 0 {
            return Some(Vec::new());
        }
        let ids: BTreeSet<u32> = self.tables[&v.table_loc]
            .iter()
            .map(|s| s.backend)
            .collect();
        let mut out: Vec<String> = ids
            .iter()
            .map(|id| {
                let b = &self.backends[id];
                format!("{}:{}", addr::to_ip(&b.addr), u16::from_be(b.port))
            })
            .collect();
        out.sort();
        Some(out)
    }
}

impl Datapath for Maps {
    type Error = Infallible;
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), Infallible> {
        self.backends.insert(id, *b);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), Infallible> {
        self.backends.remove(&id);
        Ok(())
    }
    fn write_table(&mut self, t: &[MaglevSlot]) -> Result<TableLoc, Infallible> {
        self.next_loc += 1;
        self.tables.insert(self.next_loc, t.to_vec());
        Ok(TableLoc {
            loc: self.next_loc,
            size: t.len() as u32,
        })
    }
    fn rewrite_table(&mut self, loc: TableLoc, t: &[MaglevSlot]) -> Result<(), Infallible> {
        self.tables.insert(loc.loc, t.to_vec());
        Ok(())
    }
    fn retire_table(&mut self, loc: TableLoc) {
        self.tables.remove(&loc.loc);
    }
    fn set_frontend(&mut self, k: &SvcKey, v: &SvcVal) -> Result<(), Infallible> {
        self.frontends.insert(*k, *v);
        Ok(())
    }
    fn del_frontend(&mut self, k: &SvcKey) -> Result<(), Infallible> {
        self.frontends.remove(k);
        Ok(())
    }
}

// ---- The agent's sync loop, driven by the test ----------------------------------------------

struct Agent {
    source: KubeSource,
    changes: Arc<ChangeQueue>,
    view: ClusterView,
    reconciler: Reconciler,
    synced: bool,
    maps: Maps,
    /// Frontends in the maps after each sync.
    history: Vec<usize>,
    /// Trigger times the syncs applied.
    triggers: Vec<SystemTime>,
    api: FakeApi,
    // Last, so it is dropped after the watchers and the fake server it runs.
    _rt: tokio::runtime::Runtime,
}

impl Agent {
    /// Starts a fake API server holding what `setup` puts there, and the source on it; waits
    /// for the first lists and does the first sync.
    fn start(setup: impl FnOnce(&FakeApi)) -> Self {
        Self::start_with(setup, |_| {})
    }

    /// Like [`Agent::start`], with faults injected before the source connects.
    fn start_with(setup: impl FnOnce(&FakeApi), faults: impl FnOnce(&FakeApi)) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let changes = Arc::new(ChangeQueue::default());
        let (api, source) = {
            let _guard = rt.enter();
            let (service, handle) = tower_test::mock::pair();
            let api = FakeApi::start(handle);
            setup(&api);
            faults(&api);
            let client = kube::Client::new(service, "default");
            let opts = WatchOptions {
                changes: changes.clone(),
                retry_delay: Some(Duration::from_millis(5)),
                all_nodes: false,
            };
            (api, KubeSource::with_client(client, NODE, opts))
        };
        rt.block_on(async {
            tokio::time::timeout(TIMEOUT, source.ready())
                .await
                .expect("first lists in time")
                .expect("watchers ready")
        });
        let mut agent = Self {
            source,
            changes,
            view: ClusterView::default(),
            reconciler: Reconciler::new(0x6b70_6c62),
            synced: false,
            maps: Maps::default(),
            history: Vec::new(),
            triggers: Vec::new(),
            api,
            _rt: rt,
        };
        assert!(agent.sync(), "the first lists queue a change");
        agent
    }

    /// One pass of the agent's loop: takes the queued changes, if any, and applies them.
    fn sync(&mut self) -> bool {
        let Some(batch) = self.source.take_change(Duration::ZERO) else {
            return false;
        };
        self.apply(&batch.changed);
        self.triggers.extend(self.changes.applied(batch));
        true
    }

    /// Applies whatever the stores hold now, queued change or not.
    fn apply_snapshot(&mut self) {
        self.apply(&Changed {
            all: true,
            ..Changed::default()
        });
    }

    /// What the agent does with a batch: the objects it names into the view, the services
    /// they affect recomputed, only those keys synced (all of them the first time).
    fn apply(&mut self, changed: &Changed) {
        let node = NodeConfig {
            node_name: NODE.to_string(),
            zone: self.source.node_info().and_then(|n| n.zone),
            ..NodeConfig::default()
        };
        let mut warn = |w: String| panic!("unexpected warning: {w}");
        self.source.update_view(&mut self.view, changed, &mut warn);
        self.view.set_node(&node);
        let touched = self.view.recompute(&mut warn);
        let scope = if self.synced {
            Scope::Touched(&touched)
        } else {
            Scope::All
        };
        let stats = self
            .reconciler
            .apply(self.view.desired(), scope, &mut self.maps, &mut |e| {
                panic!("sync: {e}")
            });
        self.synced = true;
        assert_eq!(stats.errors, 0);
        self.history.push(self.maps.frontends.len());
    }

    /// Syncs as changes arrive until `done` holds over the maps, or panics at the deadline.
    fn sync_until(&mut self, what: &str, done: impl Fn(&Maps) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.sync();
            if done(&self.maps) {
                return;
            }
            if !self.changes.wait_pending(deadline) {
                let state: Vec<_> = self
                    .maps
                    .frontends
                    .keys()
                    .map(|k| (addr::to_ip(&k.addr), self.maps.resolve(k)))
                    .collect();
                panic!("timed out waiting for {what}; frontends -> backends: {state:?}");
            }
        }
    }

    fn backends(&self, vip: &str) -> Option<Vec<String>> {
        self.maps.resolve(&tcp(vip, 80))
    }

    /// Waits until the fake server has an open watch of every kind (set up after a list).
    fn wait_watching(&self) {
        for kind in [Kind::Services, Kind::EndpointSlices, Kind::Nodes] {
            self.api.wait_watching(kind, TIMEOUT);
        }
    }

    /// Waits until every watcher is past its first list and syncs what that queued: a watcher
    /// requests its watch only after handling the list's end, so nothing more is on its way.
    fn settle(&mut self) {
        self.wait_watching();
        self.sync();
    }

    fn assert_never_emptied(&self) {
        assert!(
            self.history.iter().all(|n| *n > 0),
            "a snapshot emptied the maps: frontends after each sync {:?}",
            self.history
        );
    }
}

/// Spins (yielding, no sleep) until `cond` holds, or panics at the deadline.
fn spin_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

// ---- Objects ---------------------------------------------------------------------------------

fn svc(name: &str, vip: &str) -> Svc {
    Svc::new(name, vip).port("", "TCP", 80)
}

fn slice(svc: &str, name: &str, addrs: &[&str]) -> Slice {
    Slice::v4(name, svc).port("", "TCP", 8080).ready(addrs)
}

fn json_of(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap()
}

fn node(zone: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone}},
    })
}

fn eps(list: &[&str]) -> Option<Vec<String>> {
    Some(list.iter().map(|a| format!("{a}:8080")).collect())
}

/// Service A with two endpoints, and this node in zone "a".
fn cluster_a(api: &FakeApi) {
    api.apply(Kind::Services, svc("a", VIP_A).build());
    api.apply(
        Kind::EndpointSlices,
        slice("a", "a-1", &["10.0.1.1", "10.0.2.1"]).build(),
    );
    api.apply(Kind::Nodes, node("a"));
}

// ---- Tests -----------------------------------------------------------------------------------

#[test]
fn watch_events_add_modify_and_delete_reach_the_maps() {
    let mut agent = Agent::start(cluster_a);
    assert_eq!(agent.backends(VIP_A), eps(&["10.0.1.1", "10.0.2.1"]));
    agent.wait_watching();

    // ADDED: a second service and its endpoints.
    agent.api.apply(Kind::Services, svc("b", VIP_B).build());
    agent.api.apply(
        Kind::EndpointSlices,
        slice("b", "b-1", &["10.0.1.5"]).build(),
    );
    agent.sync_until("service b", |m| {
        m.resolve(&tcp(VIP_B, 80)) == eps(&["10.0.1.5"])
    });

    // MODIFIED: an endpoint replaced.
    agent.api.apply(
        Kind::EndpointSlices,
        slice("a", "a-1", &["10.0.1.1", "10.0.2.9"]).build(),
    );
    agent.sync_until("a's new endpoint", |m| {
        m.resolve(&tcp(VIP_A, 80)) == eps(&["10.0.1.1", "10.0.2.9"])
    });

    // DELETED: the service goes, then its slice.
    agent.api.delete(Kind::Services, "default", "b");
    agent.sync_until("b removed", |m| m.resolve(&tcp(VIP_B, 80)).is_none());
    agent.api.delete(Kind::EndpointSlices, "default", "b-1");
    agent.sync_until("b's backend removed", |m| m.backends.len() == 2);
    assert_eq!(agent.backends(VIP_A), eps(&["10.0.1.1", "10.0.2.9"]));
    agent.assert_never_emptied();
}

#[test]
fn requests_use_kube_proxys_selectors() {
    let agent = Agent::start(cluster_a);
    agent.wait_watching();
    let seen = agent.api.seen();
    let selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
    for kind in [Kind::Services, Kind::EndpointSlices] {
        let reqs: Vec<_> = seen.iter().filter(|s| s.kind == kind).collect();
        assert!(reqs.iter().any(|s| !s.watch) && reqs.iter().any(|s| s.watch));
        for r in reqs {
            assert_eq!(
                r.query.get("labelSelector").map(String::as_str),
                Some(selector)
            );
        }
    }
    for r in seen.iter().filter(|s| s.kind == Kind::Nodes) {
        assert_eq!(
            r.query.get("fieldSelector").map(String::as_str),
            Some("metadata.name=node1")
        );
    }
}

#[test]
fn services_of_another_proxy_never_reach_the_maps() {
    let mut other = svc("other", VIP_B);
    other.0.metadata.labels = Some(BTreeMap::from([(
        objects::LABEL_SERVICE_PROXY_NAME.to_string(),
        "someone-else".to_string(),
    )]));
    let mut agent = Agent::start(|api| {
        cluster_a(api);
        api.apply(Kind::Services, other.clone().build());
        api.apply(
            Kind::EndpointSlices,
            slice("other", "o-1", &["10.0.1.9"]).build(),
        );
    });
    agent.sync();
    assert_eq!(
        agent.source.services().len(),
        1,
        "filtered by the API server"
    );
    assert_eq!(agent.backends(VIP_B), None);
}

#[test]
fn a_relist_swaps_the_state_in_whole_and_never_empties_the_maps() {
    let mut agent = Agent::start(|api| {
        cluster_a(api);
        // C's endpoints exist before C itself (the service appears during the gap).
        api.apply(
            Kind::EndpointSlices,
            slice("c", "c-1", &["10.0.1.7"]).build(),
        );
    });
    agent.settle();
    let before = agent.api.seen().len();

    // While the watch is down the service set changes and the history is compacted: the agent
    // gets 410 Gone and must relist. The relist's second page is held back.
    let gate = agent.api.pause_next_list(Kind::Services);
    agent.api.replace_and_compact(
        Kind::Services,
        vec![
            json_of(svc("c", VIP_C).build()),
            json_of(svc("d", "172.30.0.13").build()),
        ],
    );
    agent
        .api
        .wait_for_requests("the relist's first page", TIMEOUT, |seen| {
            seen[before..]
                .iter()
                .any(|s| s.kind == Kind::Services && !s.watch && s.query.contains_key("continue"))
        });

    // Mid-relist: the store still holds the old list, whole.
    let names: Vec<_> = agent
        .source
        .services()
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a"], "a partial relist must not be visible");
    assert!(
        agent.source.take_change(Duration::ZERO).is_none(),
        "nothing to sync before the relist completes"
    );
    agent.apply_snapshot();
    assert_eq!(agent.backends(VIP_A), eps(&["10.0.1.1", "10.0.2.1"]));

    gate.open();
    agent.sync_until("the relisted services", |m| {
        m.resolve(&tcp(VIP_A, 80)).is_none() && m.resolve(&tcp(VIP_C, 80)) == eps(&["10.0.1.7"])
    });
    assert_eq!(
        agent.backends("172.30.0.13"),
        Some(Vec::new()),
        "d has no endpoints"
    );
    agent.assert_never_emptied();

    // And the watch resumed from the relist: events flow again.
    agent.wait_watching();
    agent.api.apply(
        Kind::EndpointSlices,
        slice("c", "c-1", &["10.0.1.8"]).build(),
    );
    agent.sync_until("an event after the relist", |m| {
        m.resolve(&tcp(VIP_C, 80)) == eps(&["10.0.1.8"])
    });
}

#[test]
fn failed_lists_and_watches_are_retried() {
    let mut agent = Agent::start_with(cluster_a, |api| {
        api.fail_lists(Kind::Services, 2, 500);
        api.fail_lists(Kind::EndpointSlices, 1, 503);
    });
    // Ready only after the retries succeeded, with the whole state.
    assert_eq!(agent.backends(VIP_A), eps(&["10.0.1.1", "10.0.2.1"]));
    let service_lists = agent
        .api
        .seen()
        .iter()
        .filter(|s| s.kind == Kind::Services && !s.watch)
        .count();
    assert_eq!(service_lists, 3, "two failures, then success");

    // The watch stream ends (server timeout) and the next watch request fails: the agent
    // re-watches from its resourceVersion and misses nothing in between.
    agent.wait_watching();
    agent.api.fail_watches(Kind::EndpointSlices, 1, 500);
    agent.api.close_watches(Kind::EndpointSlices);
    agent.api.apply(
        Kind::EndpointSlices,
        slice("a", "a-1", &["10.0.1.1", "10.0.2.1", "10.0.2.2"]).build(),
    );
    agent.sync_until("the change made while the watch was down", |m| {
        m.resolve(&tcp(VIP_A, 80)) == eps(&["10.0.1.1", "10.0.2.1", "10.0.2.2"])
    });

    // A failed relist after 410 Gone keeps the old state until a relist succeeds.
    agent.api.fail_lists(Kind::EndpointSlices, 2, 500);
    agent.api.replace_and_compact(
        Kind::EndpointSlices,
        vec![json_of(slice("a", "a-1", &["10.0.2.3"]).build())],
    );
    agent.sync_until("the relisted slice", |m| {
        m.resolve(&tcp(VIP_A, 80)) == eps(&["10.0.2.3"])
    });
    agent.assert_never_emptied();
}

#[test]
fn the_node_object_gives_the_zone_and_deletion() {
    // A PreferSameZone service with one endpoint per zone.
    let zoned = |addr: &str, zone: &str| {
        let mut ep = Ep::new(addr);
        ep.0.zone = Some(zone.to_string());
        ep
    };
    let mut service = svc("a", VIP_A);
    service.0.spec.as_mut().unwrap().traffic_distribution = Some("PreferSameZone".into());
    let mut agent = Agent::start(|api| {
        api.apply(Kind::Services, service.build());
        api.apply(
            Kind::EndpointSlices,
            Slice::v4("a-1", "a")
                .port("", "TCP", 8080)
                .ep(zoned("10.0.1.1", "a"))
                .ep(zoned("10.0.2.1", "b"))
                .build(),
        );
        api.apply(Kind::Nodes, node("a"));
    });
    assert_eq!(agent.backends(VIP_A), eps(&["10.0.1.1"]), "zone a only");
    agent.settle();

    // The node moves to zone b (a relabel): the preferred endpoint follows.
    agent.api.apply(Kind::Nodes, node("b"));
    agent.sync_until("zone b", |m| {
        m.resolve(&tcp(VIP_A, 80)) == eps(&["10.0.2.1"])
    });

    // Status-only updates of the Node do not queue syncs.
    let mut status = node("b");
    status["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]});
    agent.api.apply(Kind::Nodes, status);
    spin_until("the status update in the store", || {
        agent.source.node().is_some_and(|n| n.status.is_some())
    });
    assert!(
        agent.source.take_change(Duration::ZERO).is_none(),
        "a status update queued a change"
    );

    // Deletion starts: the node info says so (health turns 503 from this).
    let mut deleting = node("b");
    deleting["metadata"]["deletionTimestamp"] = json!("2024-05-01T10:00:00Z");
    agent.api.apply(Kind::Nodes, deleting);
    assert!(agent.changes.wait_pending(Instant::now() + TIMEOUT));
    assert!(agent.source.node_info().unwrap().deleting);
    agent.sync();

    agent.api.delete(Kind::Nodes, "", NODE);
    assert!(agent.changes.wait_pending(Instant::now() + TIMEOUT));
    assert_eq!(agent.source.node_info(), None);
    // Without a Node there is no zone: every endpoint again.
    agent.sync_until("no zone", |m| {
        m.resolve(&tcp(VIP_A, 80)) == eps(&["10.0.1.1", "10.0.2.1"])
    });
}

#[test]
fn endpoint_slice_trigger_times_reach_the_sync_that_applies_them() {
    let mut agent = Agent::start(cluster_a);
    assert!(
        agent.triggers.is_empty(),
        "the initial list measures nothing"
    );
    agent.wait_watching();
    let trigger = SystemTime::now();
    let mut s = slice("a", "a-1", &["10.0.1.1"]).build();
    s.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_TRIGGER_TIME.to_string(),
        lb_agent::health::rfc3339(trigger),
    )]));
    agent.api.apply(Kind::EndpointSlices, s);
    agent.sync_until("the update", |m| {
        m.resolve(&tcp(VIP_A, 80)) == eps(&["10.0.1.1"])
    });
    assert_eq!(agent.triggers.len(), 1);
    let got = agent.triggers[0]
        .duration_since(trigger)
        .unwrap_or_else(|e| e.duration());
    assert!(
        got < Duration::from_micros(1),
        "trigger time round-trips: {got:?}"
    );
}

#[test]
fn hints_in_slices_select_endpoints_like_kube_proxy() {
    // The EndpointSlice controller's hints, not trafficDistribution, drive kube-proxy.
    let hinted = |addr: &str, zone: &str| {
        let mut ep = Ep::new(addr);
        ep.0.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone {
                name: zone.to_string(),
            }]),
            for_nodes: None,
        });
        ep
    };
    let agent = Agent::start(|api| {
        api.apply(Kind::Services, svc("a", VIP_A).build());
        api.apply(
            Kind::EndpointSlices,
            Slice::v4("a-1", "a")
                .port("", "TCP", 8080)
                .ep(hinted("10.0.1.1", "a"))
                .ep(hinted("10.0.1.2", "a"))
                .ep(hinted("10.0.2.1", "b"))
                .build(),
        );
        api.apply(Kind::Nodes, node("a"));
    });
    assert_eq!(agent.backends(VIP_A), eps(&["10.0.1.1", "10.0.1.2"]));
}

/// `--lb-mode dsr` watches every Node (no field selector) for the addresses of the nodes that
/// remote backends run on; this node is still found by name.
#[test]
fn dsr_mode_watches_every_node() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let changes = Arc::new(ChangeQueue::default());
    let node_with = |name: &str, ip: &str, zone: &str| {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        })
    };
    let (api, source) = {
        let _guard = rt.enter();
        let (service, handle) = tower_test::mock::pair();
        let api = FakeApi::start(handle);
        api.apply(Kind::Nodes, node_with("node2", "192.168.0.3", "b"));
        api.apply(Kind::Nodes, node_with(NODE, "192.168.0.2", "a"));
        let client = kube::Client::new(service, "default");
        let opts = WatchOptions {
            changes: changes.clone(),
            retry_delay: Some(Duration::from_millis(5)),
            all_nodes: true,
        };
        (api, KubeSource::with_client(client, NODE, opts))
    };
    rt.block_on(async {
        tokio::time::timeout(TIMEOUT, source.ready())
            .await
            .expect("first lists in time")
            .expect("watchers ready")
    });
    assert_eq!(source.node_info().unwrap().zone.as_deref(), Some("a"));
    let mut addrs: Vec<(String, Vec<std::net::IpAddr>)> = source
        .node_infos()
        .into_iter()
        .map(|n| (n.name, n.addresses))
        .collect();
    addrs.sort();
    assert_eq!(
        addrs,
        vec![
            ("node1".to_owned(), vec!["192.168.0.2".parse().unwrap()]),
            ("node2".to_owned(), vec!["192.168.0.3".parse().unwrap()]),
        ]
    );
    for r in api.seen().iter().filter(|s| s.kind == Kind::Nodes) {
        assert_eq!(r.query.get("fieldSelector"), None, "every node: {r:?}");
    }
    source.shutdown();
}
