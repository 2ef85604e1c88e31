//! Frontend lookup and backend choice through the service's Maglev table: shared by every hook.

use lb_common::{
    Backend, MaglevSlot, SvcKey, SvcVal,
    maps::{loc_first, loc_slab},
};

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

/// Copies the frontend `key`'s value into `out` (XDP keeps it in its per-CPU scratch: the
/// ICMPv6 translator's call chain leaves no stack for it); false when there is none.
#[inline(always)]
pub fn lookup_into(key: &SvcKey, out: &mut SvcVal) -> bool {
    match SERVICES.get_ptr(key) {
        Some(p) => {
            // SAFETY: copied out immediately; hash entries may be reused after return.
            *out = unsafe { *p };
            true
        }
        None => false,
    }
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
    let Some(id) = slot(svc, hash).map(|s| s.backend) else {
        return Pick::Miss;
    };
    // SAFETY: copied out immediately.
    match unsafe { BACKENDS.get(id) } {
        Some(b) => Pick::Backend(id, *b),
        None => Pick::Miss,
    }
}

/// The slot `hash` selects in the frontend's table (`table_size` must be non-zero).
#[inline(always)]
pub fn slot(svc: &SvcVal, hash: u32) -> Option<MaglevSlot> {
    let index = loc_first(svc.table_loc) + hash % svc.table_size;
    MAGLEV.get_value(loc_slab(svc.table_loc), &index).copied()
}
