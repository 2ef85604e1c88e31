//! sessionAffinity: ClientIP with kube-proxy's semantics: a client's connection within the
//! service's `timeoutSeconds` of its previous one goes to the same backend, as long as that
//! backend still exists; otherwise the normal Maglev pick is made and remembered.
//!
//! Membership: a backend that left the service but still serves another one stays in
//! `KPLB_BACKENDS`; the agent purges this group's entries naming it after the table swap.

use lb_common::{AffinityKey, AffinityVal, Backend};

use crate::maps::{AFFINITY, BACKENDS};

const NS: u64 = 1_000_000_000;

/// The live backend `key`'s client is pinned to (refreshing its last-use time), if it used the
/// service within `timeout_s` seconds and the backend still exists.
#[inline(always)]
pub fn sticky(key: &AffinityKey, timeout_s: u32, now: u64) -> Option<(u32, Backend)> {
    let p = AFFINITY.get_ptr_mut(key)?;
    // SAFETY: pointer into a live map value; fields are copied out or stored whole.
    unsafe {
        if now.wrapping_sub((*p).last_ns) >= u64::from(timeout_s) * NS {
            return None;
        }
        let id = (*p).backend_id;
        let b = *BACKENDS.get(id)?;
        (*p).last_ns = now;
        Some((id, b))
    }
}

/// Pins `key`'s client to backend `id` as of `now`. A failed update only loses stickiness.
#[inline(always)]
pub fn remember(key: &AffinityKey, id: u32, now: u64) {
    let v = AffinityVal {
        backend_id: id,
        _pad: 0,
        last_ns: now,
    };
    let _ = AFFINITY.insert(key, v, 0);
}
