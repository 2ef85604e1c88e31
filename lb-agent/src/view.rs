//! The agent's view of the cluster, kept up to date one object at a time: validated Services
//! and EndpointSlices by key, each service's part of the desired state, and which services a
//! change made stale. A change re-validates only the changed object and recomputes only the
//! services it affects, so its cost does not grow with the size of the cluster.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    model::{self, Desired, DesiredState, NodeConfig, Touched},
    objects::{self, ObjKey, ServiceInfo, ServiceName, SliceInfo},
};

#[derive(Debug, Default)]
pub struct ClusterView {
    /// Valid Services to program, by name.
    services: HashMap<ServiceName, ServiceInfo>,
    /// Valid EndpointSlices by key.
    slices: HashMap<ObjKey, SliceInfo>,
    /// Each service's slice keys, sorted (the order endpoint rules read them in). Usually one
    /// or two: a Vec, not a tree.
    slices_of: HashMap<ServiceName, Vec<ObjKey>>,
    /// Services whose part of the desired state is stale.
    dirty: BTreeSet<ServiceName>,
    node: Option<NodeConfig>,
    state: DesiredState,
}

impl ClusterView {
    pub fn desired(&self) -> &Desired {
        self.state.desired()
    }

    /// Valid services known.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The valid services, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    /// Sets the node's identity and settings; a change makes every service stale.
    pub fn set_node(&mut self, node: &NodeConfig) {
        if self.node.as_ref() != Some(node) {
            self.node = Some(node.clone());
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// The Service `key` is now `obj` (`None`: deleted). Problems are reported through `warn`.
    pub fn set_service(
        &mut self,
        key: &ObjKey,
        obj: Option<&Service>,
        warn: &mut dyn FnMut(String),
    ) {
        let name = ServiceName {
            namespace: key.0.clone(),
            name: key.1.clone(),
        };
        let info = obj.and_then(|s| objects::service_info(s, warn));
        if self.services.get(&name) == info.as_ref() {
            return;
        }
        match info {
            Some(info) => self.services.insert(name.clone(), info),
            None => self.services.remove(&name),
        };
        self.dirty.insert(name);
    }

    /// The EndpointSlice `key` is now `obj` (`None`: deleted).
    pub fn set_slice(
        &mut self,
        key: &ObjKey,
        obj: Option<&EndpointSlice>,
        warn: &mut dyn FnMut(String),
    ) {
        let info = obj.and_then(|s| objects::slice_info(s, warn));
        if self.slices.get(key) == info.as_ref() {
            return;
        }
        if let Some(old) = self.slices.remove(key) {
            if let Some(keys) = self.slices_of.get_mut(&old.service) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.slices_of.remove(&old.service);
                }
            }
            self.dirty.insert(old.service);
        }
        if let Some(info) = info {
            let keys = self.slices_of.entry(info.service.clone()).or_default();
            if let Err(at) = keys.binary_search(key) {
                keys.insert(at, key.clone());
            }
            self.dirty.insert(info.service.clone());
            self.slices.insert(key.clone(), info);
        }
    }

    /// Replaces everything with a complete snapshot (a first list, a relist, a directory read
    /// from scratch): objects that did not change leave their services untouched.
    pub fn resync<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        warn: &mut dyn FnMut(String),
    ) {
        let mut seen_services = BTreeSet::new();
        for s in services {
            let Some(key) = objects::object_key(&s.metadata) else {
                objects::service_info(s, warn); // reports the missing name
                continue;
            };
            self.set_service(&key, Some(s), warn);
            seen_services.insert(key);
        }
        let gone: Vec<ObjKey> = self
            .services
            .keys()
            .map(|n| (n.namespace.clone(), n.name.clone()))
            .filter(|k| !seen_services.contains(k))
            .collect();
        for k in gone {
            self.set_service(&k, None, warn);
        }
        let mut seen_slices = BTreeSet::new();
        for s in slices {
            let Some(key) = objects::object_key(&s.metadata) else {
                objects::slice_info(s, warn);
                continue;
            };
            self.set_slice(&key, Some(s), warn);
            seen_slices.insert(key);
        }
        let gone: Vec<ObjKey> = self
            .slices
            .keys()
            .filter(|k| !seen_slices.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.set_slice(&k, None, warn);
        }
    }

    /// Recomputes the stale services' parts of the desired state; returns the keys that may
    /// differ from before. Nothing is computed before [`ClusterView::set_node`].
    pub fn recompute(&mut self, warn: &mut dyn FnMut(String)) -> Touched {
        let mut touched = Touched::default();
        let Some(node) = &self.node else {
            return touched;
        };
        for name in std::mem::take(&mut self.dirty) {
            let part = self.services.get(&name).map(|svc| {
                let slices: Vec<&SliceInfo> = self
                    .slices_of
                    .get(&name)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| self.slices.get(k))
                    .collect();
                model::service_desired(svc, &slices, node, warn)
            });
            self.state.set(&name, part, &mut touched);
        }
        touched
    }
}
