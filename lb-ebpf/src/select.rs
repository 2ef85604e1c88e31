//! Frontend lookup and backend choice through the service's Maglev table: shared by every hook.

use lb_common::{Backend, SvcKey, SvcVal};

use crate::maps::{BACKENDS, MAGLEV, SERVICES};

pub enum Pick {
    /// A frontend with no usable endpoints: reject like kube-proxy.
    NoBackends,
    /// Frontend known but its table or backend is missing (a transient state during sync).
    Miss,
    /// The backend and its id.
    Backend(u32, Backend),
}

#[inline(always)]
pub fn lookup(key: &SvcKey) -> Option<SvcVal> {
    // SAFETY: the value is copied out immediately; hash entries may be reused after return.
    unsafe { SERVICES.get(key).copied() }
}

/// Picks the backend for `hash` from the frontend's table.
#[inline(always)]
pub fn pick(svc: &SvcVal, hash: u32) -> Pick {
    if svc.backend_count == 0 {
        return Pick::NoBackends;
    }
    if svc.table_size == 0 {
        return Pick::Miss;
    }
    let slot = hash % svc.table_size;
    // SAFETY: inner tables are arrays (stable slots); the id is copied out.
    let Some(id) = (unsafe { MAGLEV.get_value(&svc.group_id, &slot) }).map(|s| s.backend) else {
        return Pick::Miss;
    };
    // SAFETY: copied out immediately.
    match unsafe { BACKENDS.get(id) } {
        Some(b) => Pick::Backend(id, *b),
        None => Pick::Miss,
    }
}
