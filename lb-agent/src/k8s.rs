//! Kubernetes API source: reflectors on Services, EndpointSlices and this node's Node object
//! (every Node in DSR mode, for their addresses).
//!
//! Watch events only queue a change ([`ChangeQueue`]); the sync loop reads whole snapshots from
//! the stores, so the desired state is always computed from a consistent view. A relist
//! replaces a store atomically when it completes (kube-runtime buffers the list until its
//! `InitDone`), so a relist never empties the maps in between. Watch errors back off and
//! re-list.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _, reflector,
        reflector::{ObjectRef, Store},
        utils::Backoff,
        watcher::{self, DefaultBackoff, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{
    changes::{Batch, ChangeQueue, Changed},
    objects::{self, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, NodeInfo, ObjKey},
    view::ClusterView,
};

/// Set by the EndpointSlice controller to when the change behind a slice update happened
/// (a pod became ready, ...): the start of kube-proxy's network programming latency.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// kube-proxy's selector: services owned by another proxy and headless ones are not ours.
/// EndpointSlices carry their service's labels, so the same selector applies to them.
pub fn proxy_label_selector() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error("a watcher stopped before its first list completed")]
    NotReady,
}

/// How the watchers report and retry.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Where changes are queued for the sync loop.
    pub changes: Arc<ChangeQueue>,
    /// Fixed delay before retrying after a watch error. `None`: client-go's backoff (800 ms
    /// doubling to 30 s, jittered), kind to a struggling API server when every node retries.
    pub retry_delay: Option<Duration>,
    /// Watch every Node, not only this one: DSR needs the other nodes' addresses.
    pub all_nodes: bool,
}

impl WatchOptions {
    pub fn new(changes: Arc<ChangeQueue>) -> Self {
        Self {
            changes,
            retry_delay: None,
            all_nodes: false,
        }
    }
}

pub struct KubeSource {
    /// Owned by a source made with [`KubeSource::start`]; otherwise the caller's runtime runs
    /// the watchers.
    rt: Option<tokio::runtime::Runtime>,
    tasks: Vec<JoinHandle<()>>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// This node's object, or every Node with [`WatchOptions::all_nodes`].
    node: Store<Node>,
    node_name: String,
    changes: Arc<ChangeQueue>,
}

impl KubeSource {
    /// Connects (in-cluster config or KUBECONFIG), starts the watchers on a runtime of their
    /// own and waits until each has listed once, so the first sync never sees a partial cluster.
    pub fn start(
        node_name: &str,
        changes: Arc<ChangeQueue>,
        all_nodes: bool,
    ) -> Result<Self, KubeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("kube")
            .build()
            .map_err(KubeError::Runtime)?;
        let client = rt
            .block_on(Client::try_default())
            .map_err(KubeError::Client)?;
        let mut source = {
            let _guard = rt.enter();
            let opts = WatchOptions {
                all_nodes,
                ..WatchOptions::new(changes)
            };
            Self::with_client(client, node_name, opts)
        };
        rt.block_on(source.ready())?;
        info!("Kubernetes watchers listed Services, EndpointSlices and Node");
        source.rt = Some(rt);
        Ok(source)
    }

    /// Starts the watchers with `client` on the current Tokio runtime (it panics outside one,
    /// like `tokio::spawn`). Tests pass a client backed by a mock API server.
    pub fn with_client(client: Client, node_name: &str, opts: WatchOptions) -> Self {
        let selector = proxy_label_selector();
        let changes = opts.changes.clone();
        let mut tasks = Vec::new();

        let queue = changes.clone();
        let services = spawn_reflector::<Service>(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            &opts,
            &mut tasks,
            move |e| match e {
                Event::Init | Event::InitApply(_) => {}
                Event::InitDone => queue.queued(),
                Event::Apply(s) | Event::Delete(s) => queue.queued_objects(
                    Changed {
                        services: [key(s)].into(),
                        ..Changed::default()
                    },
                    None,
                ),
            },
        );

        let queue = changes.clone();
        let mut triggers = TriggerTimes::new(SystemTime::now());
        let slices = spawn_reflector::<EndpointSlice>(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            &opts,
            &mut tasks,
            move |e| triggers.on_event(e, &queue),
        );

        let queue = changes.clone();
        let (node_reader, node_writer) = reflector::store();
        let reader = node_reader.clone();
        let mut last: Option<Vec<NodeInfo>> = None;
        let node_filter = if opts.all_nodes {
            watcher::Config::default()
        } else {
            watcher::Config::default().fields(&format!("metadata.name={node_name}"))
        };
        spawn_with_store::<Node>(
            Api::all(client),
            node_filter,
            node_writer,
            &opts,
            &mut tasks,
            move |e| {
                if matches!(e, Event::Init | Event::InitApply(_)) {
                    return;
                }
                // Node status is rewritten often; only the zone, deletion and addresses
                // matter here.
                let mut now: Vec<NodeInfo> = reader
                    .state()
                    .iter()
                    .filter_map(|n| objects::node(n).ok())
                    .collect();
                now.sort_by(|a, b| a.name.cmp(&b.name));
                if last.as_ref() != Some(&now) {
                    debug!(node = ?now, "node changed");
                    last = Some(now);
                    queue.queued_objects(
                        Changed {
                            nodes: true,
                            ..Changed::default()
                        },
                        None,
                    );
                }
            },
        );

        Self {
            rt: None,
            tasks,
            services,
            slices,
            node: node_reader,
            node_name: node_name.to_owned(),
            changes,
        }
    }

    /// Resolves once every watcher has completed its first list.
    pub async fn ready(&self) -> Result<(), KubeError> {
        for ready in [
            self.services.wait_until_ready().await,
            self.slices.wait_until_ready().await,
            self.node.wait_until_ready().await,
        ] {
            ready.map_err(|_| KubeError::NotReady)?;
        }
        Ok(())
    }

    /// The changes since the last batch, once the oldest is `coalesce` old (see
    /// [`ChangeQueue::take`]).
    pub fn take_change(&self, coalesce: Duration) -> Option<Batch> {
        self.changes.take(coalesce)
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services.state()
    }

    pub fn slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.slices.state()
    }

    /// Brings `view` up to date with the objects `changed` names (everything after a relist).
    pub fn update_view(
        &self,
        view: &mut ClusterView,
        changed: &Changed,
        warn: &mut dyn FnMut(String),
    ) {
        if changed.all {
            let (services, slices) = (self.services(), self.slices());
            view.resync(
                services.iter().map(|s| &**s),
                slices.iter().map(|s| &**s),
                warn,
            );
            return;
        }
        for k in &changed.services {
            view.set_service(k, self.service(k).as_deref(), warn);
        }
        for k in &changed.slices {
            view.set_slice(k, self.slice(k).as_deref(), warn);
        }
    }

    /// The Service `key` as the store has it now (`None`: deleted).
    pub fn service(&self, key: &ObjKey) -> Option<Arc<Service>> {
        self.services.get(&ObjectRef::new(&key.1).within(&key.0))
    }

    /// The EndpointSlice `key` as the store has it now (`None`: deleted).
    pub fn slice(&self, key: &ObjKey) -> Option<Arc<EndpointSlice>> {
        self.slices.get(&ObjectRef::new(&key.1).within(&key.0))
    }

    /// This node's object, if it exists (absent: being deleted or not yet registered).
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
    }

    /// What the agent uses of every watched Node (only this one unless
    /// [`WatchOptions::all_nodes`]).
    pub fn node_infos(&self) -> Vec<NodeInfo> {
        self.node
            .state()
            .iter()
            .filter_map(|n| objects::node(n).ok())
            .collect()
    }

    /// What the agent uses of this node's object; `None` while it does not exist.
    pub fn node_info(&self) -> Option<NodeInfo> {
        self.node().and_then(|n| objects::node(&n).ok())
    }

    pub fn shutdown(mut self) {
        self.stop_tasks();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }

    fn stop_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.stop_tasks();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Tracks EndpointSlice trigger times the way kube-proxy does: only for changes after the agent
/// started, once per slice and time, never for deletions (a deleted slice's annotation dates
/// from its last update). Times seen during a relist are queued when the relist is in the
/// store, not before.
struct TriggerTimes {
    started: SystemTime,
    last: HashMap<ObjKey, SystemTime>,
    relisted: HashSet<ObjKey>,
    relist_triggers: Vec<SystemTime>,
}

impl TriggerTimes {
    fn new(started: SystemTime) -> Self {
        Self {
            started,
            last: HashMap::new(),
            relisted: HashSet::new(),
            relist_triggers: Vec::new(),
        }
    }

    fn on_event(&mut self, e: &Event<EndpointSlice>, queue: &ChangeQueue) {
        match e {
            Event::Init => {
                self.relisted.clear();
                self.relist_triggers.clear();
            }
            Event::InitApply(s) => {
                self.relisted.insert(key(s));
                if let Some(t) = self.fresh(s) {
                    self.relist_triggers.push(t);
                }
            }
            Event::InitDone => {
                let relisted = std::mem::take(&mut self.relisted);
                self.last.retain(|k, _| relisted.contains(k));
                queue.queued();
                for t in self.relist_triggers.drain(..) {
                    queue.queued_with_trigger(t);
                }
            }
            Event::Apply(s) => {
                let trigger = self.fresh(s);
                queue.queued_objects(one_slice(s), trigger);
            }
            Event::Delete(s) => {
                self.last.remove(&key(s));
                queue.queued_objects(one_slice(s), None);
            }
        }
    }

    fn fresh(&mut self, s: &EndpointSlice) -> Option<SystemTime> {
        let t = trigger_time(s).filter(|t| *t > self.started)?;
        let prev = self.last.insert(key(s), t);
        (prev != Some(t)).then_some(t)
    }
}

/// An object's key as [`crate::objects::object_key`] makes it (the API always sets both).
fn key<K: Resource>(o: &K) -> ObjKey {
    (
        o.meta()
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        o.meta().name.clone().unwrap_or_default(),
    )
}

fn one_slice(s: &EndpointSlice) -> Changed {
    Changed {
        slices: [key(s)].into(),
        ..Changed::default()
    }
}

/// The slice's `endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339), if valid.
pub fn trigger_time(s: &EndpointSlice) -> Option<SystemTime> {
    let text = s.annotations().get(ANNOTATION_TRIGGER_TIME)?;
    match text.parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(t) => Some(SystemTime::from(t)),
        Err(e) => {
            debug!(slice = %s.name_any(), "unparsable {ANNOTATION_TRIGGER_TIME} {text:?}: {e}");
            None
        }
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    opts: &WatchOptions,
    tasks: &mut Vec<JoinHandle<()>>,
    on_event: impl FnMut(&Event<K>) + Send + 'static,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    spawn_with_store(api, config, writer, opts, tasks, on_event);
    reader
}

/// Runs one watcher into `writer`; `on_event` sees each event after the store has applied it.
fn spawn_with_store<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    opts: &WatchOptions,
    tasks: &mut Vec<JoinHandle<()>>,
    mut on_event: impl FnMut(&Event<K>) + Send + 'static,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let backoff: Box<dyn Backoff> = match opts.retry_delay {
        None => Box::new(DefaultBackoff::default()),
        Some(d) => Box::new(FixedBackoff(d)),
    };
    let stream = watcher::watcher(api, config)
        .backoff(backoff)
        .modify(|o| {
            // Managed fields are large and never used.
            o.meta_mut().managed_fields = None;
        })
        .reflect(writer);
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(e) => on_event(&e),
                Err(e) => warn!(kind, "watch error (backing off, will re-list): {e}"),
            }
        }
    }));
}

/// The same delay after every error.
struct FixedBackoff(Duration);

impl Iterator for FixedBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(self.0)
    }
}

impl Backoff for FixedBackoff {
    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn slice(name: &str, trigger: Option<&str>) -> EndpointSlice {
        let mut s = EndpointSlice {
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        };
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("default".into());
        if let Some(t) = trigger {
            s.metadata.annotations = Some(BTreeMap::from([(
                ANNOTATION_TRIGGER_TIME.to_string(),
                t.to_string(),
            )]));
        }
        s
    }

    fn secs(t: SystemTime) -> u64 {
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
    }

    fn drain(q: &ChangeQueue) -> Vec<u64> {
        let batch = q.take(Duration::ZERO).expect("a change was queued");
        q.applied(batch).into_iter().map(secs).collect()
    }

    #[test]
    fn trigger_time_parses_rfc3339() {
        let s = slice("a", Some("2024-05-01T10:00:00Z"));
        assert_eq!(trigger_time(&s).map(secs), Some(1_714_557_600));
        assert_eq!(trigger_time(&slice("a", Some("yesterday"))), None);
        assert_eq!(trigger_time(&slice("a", None)), None);
    }

    #[test]
    fn trigger_times_are_counted_once_and_only_after_start() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_557_600);
        let mut tt = TriggerTimes::new(started);
        let q = ChangeQueue::default();
        // Older than the agent: a change it never saw happen.
        tt.on_event(&Event::Apply(slice("a", Some("2024-05-01T09:59:59Z"))), &q);
        assert_eq!(drain(&q), Vec::<u64>::new());
        let later = slice("a", Some("2024-05-01T10:00:05Z"));
        tt.on_event(&Event::Apply(later.clone()), &q);
        assert_eq!(drain(&q), vec![1_714_557_605]);
        // The same trigger again (a label change): queued, not measured twice.
        tt.on_event(&Event::Apply(later.clone()), &q);
        assert_eq!(drain(&q), Vec::<u64>::new());
        // Deletion: queued, never measured.
        tt.on_event(&Event::Delete(later), &q);
        assert_eq!(drain(&q), Vec::<u64>::new());
    }

    #[test]
    fn relist_triggers_wait_for_init_done() {
        let started = SystemTime::UNIX_EPOCH;
        let mut tt = TriggerTimes::new(started);
        let q = ChangeQueue::default();
        tt.on_event(&Event::Init, &q);
        tt.on_event(
            &Event::InitApply(slice("a", Some("2024-05-01T10:00:00Z"))),
            &q,
        );
        assert!(q.take(Duration::ZERO).is_none(), "store not swapped yet");
        tt.on_event(&Event::InitDone, &q);
        assert_eq!(drain(&q), vec![1_714_557_600]);
    }

    #[test]
    fn selector_excludes_other_proxies_and_headless() {
        assert_eq!(
            proxy_label_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }
}
