//! Kubernetes API source: reflectors on Services, EndpointSlices and this node's Node object.
//!
//! Watch events only mark the state dirty; the sync loop reads whole snapshots from the stores,
//! so the desired state is always computed from a consistent view. A relist replaces a store
//! atomically when it completes (kube-runtime buffers the initial list), so a relist never
//! empties the maps in between. Watch errors back off and re-list.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::objects::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

/// kube-proxy's selector: services owned by another proxy and headless ones are not ours.
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

pub struct KubeSource {
    rt: tokio::runtime::Runtime,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    dirty: Arc<AtomicBool>,
}

impl KubeSource {
    /// Connects, starts the watchers and waits until each has listed once.
    pub fn start(node_name: &str) -> Result<Self, KubeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("kube")
            .build()
            .map_err(KubeError::Runtime)?;
        let client = rt
            .block_on(Client::try_default())
            .map_err(KubeError::Client)?;
        let dirty = Arc::new(AtomicBool::new(true));
        let selector = proxy_label_selector();
        let services = spawn_reflector::<Service>(
            &rt,
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            dirty.clone(),
        );
        let slices = spawn_reflector::<EndpointSlice>(
            &rt,
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            dirty.clone(),
        );
        let node = spawn_reflector::<Node>(
            &rt,
            Api::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            dirty.clone(),
        );
        rt.block_on(async {
            for ready in [
                services.wait_until_ready().await,
                slices.wait_until_ready().await,
                node.wait_until_ready().await,
            ] {
                ready.map_err(|_| KubeError::NotReady)?;
            }
            Ok::<(), KubeError>(())
        })?;
        info!("Kubernetes watchers listed Services, EndpointSlices and Node");
        Ok(Self {
            rt,
            services,
            slices,
            node,
            dirty,
        })
    }

    /// Whether anything changed since the last call. Changes arriving within `coalesce` of the
    /// first one are taken together (bounded: at most one window per sync).
    pub fn take_change(&self, coalesce: Duration) -> bool {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return false;
        }
        std::thread::sleep(coalesce);
        self.dirty.store(false, Ordering::Release);
        true
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services.state()
    }

    pub fn slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.slices.state()
    }

    /// This node's object, if it exists (absent: being deleted or not yet registered).
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.state().into_iter().next()
    }

    pub fn shutdown(self) {
        self.rt.shutdown_timeout(Duration::from_secs(1));
    }
}

fn spawn_reflector<K>(
    rt: &tokio::runtime::Runtime,
    api: Api<K>,
    config: watcher::Config,
    dirty: Arc<AtomicBool>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o| {
            // Managed fields are large and never used.
            o.meta_mut().managed_fields = None;
        })
        .reflect(writer);
    rt.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => dirty.store(true, Ordering::Release),
                Err(e) => warn!(kind, "watch error (backing off, will re-list): {e}"),
            }
        }
    });
    reader
}
