//! Conntrack on the north-south path: lookups that treat expired entries as misses, TCP-state
//! aware refresh, and entry creation. The agent's GC deletes expired entries; an LRU map keeps
//! the datapath from ever failing an insert when the table is full.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    IPPROTO_TCP,
    ct::{CT_CLOSING, CT_ESTABLISHED, CT_NEW, CT_UDP, Config, CtKey, CtVal},
};

use crate::{
    maps::{BACKENDS, CT},
    mem,
    parse::{Hdr, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS: u64 = 1_000_000_000;
/// An entry's expiry is rewritten at most this often (saves cache-line bouncing on hot flows).
const REFRESH_NS: u64 = NS;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The packet's own flow. (Padding as `[0, 0, 0]`: `[0; 3]` would be a `memset` call, see
/// `mem`.)
#[inline(always)]
pub fn key_of(h: &Hdr) -> CtKey {
    CtKey {
        src: h.src,
        dst: h.dst,
        sport: h.sport,
        dport: h.dport,
        proto: h.proto,
        _pad: [0, 0, 0],
    }
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtVal> {
    CT.get_ptr_mut(key)
}

/// The generation of the backend set (`Config::backends_gen`), read once: before any lookup
/// it vouches for, so a removal that happens meanwhile moves it on after what was seen.
#[inline(always)]
pub fn backends_gen(cfg: &Config) -> u32 {
    // SAFETY: a field of a live map value; volatile keeps it a single, early read.
    unsafe { core::ptr::read_volatile(&cfg.backends_gen) }
}

/// Whether the backend of entry `v` (at `p`) still exists. Looked up only when the agent has
/// removed backends since the entry last looked; a live answer is remembered in the entry.
#[inline(always)]
pub fn backend_live(p: *mut CtVal, v: &CtVal, generation: u32) -> bool {
    if v.backends_gen == generation {
        return true;
    }
    if BACKENDS.get_ptr(v.backend_id).is_none() {
        return false;
    }
    // SAFETY: p points into a live map value; racing writers store the same generation.
    unsafe { (*p).backends_gen = generation };
    true
}

/// State after seeing a packet of `proto` with TCP flags `f`.
#[inline(always)]
pub fn state_after(state: u8, proto: u8, f: u8) -> u8 {
    if proto != IPPROTO_TCP {
        return CT_UDP;
    }
    if f & (TCP_FIN | TCP_RST) != 0 || state == CT_CLOSING {
        CT_CLOSING
    } else if f & TCP_SYN != 0 && f & TCP_ACK == 0 {
        CT_NEW
    } else {
        CT_ESTABLISHED
    }
}

#[inline(always)]
pub fn timeout_ns(cfg: &Config, state: u8) -> u64 {
    let s = match state {
        CT_NEW => cfg.timeout_syn_s,
        CT_ESTABLISHED => cfg.timeout_established_s,
        CT_CLOSING => cfg.timeout_closing_s,
        _ => cfg.timeout_udp_s,
    };
    u64::from(s) * NS
}

/// Refreshes state and expiry of a hit entry; writes only when something changes noticeably.
#[inline(always)]
pub fn touch(v: *mut CtVal, cfg: &Config, h: &Hdr, now: u64) {
    touch_with(v, cfg, h.proto, h.tcp_flags, now);
}

/// [`touch`] for a packet described by protocol and TCP flags (a tunnelled inner packet).
#[inline(always)]
pub fn touch_with(v: *mut CtVal, cfg: &Config, proto: u8, flags: u8, now: u64) {
    // SAFETY: v points into a live map value; racing writers only write the same fields with
    // equally valid values.
    unsafe {
        let state = state_after((*v).state, proto, flags);
        let expires = now + timeout_ns(cfg, state);
        if state != (*v).state || expires > (*v).expires + REFRESH_NS {
            (*v).state = state;
            (*v).expires = expires;
        }
    }
}

/// Makes `v` a new entry for a packet of `proto` with TCP flags `tcp_flags` (its state),
/// translating nothing yet.
#[inline(always)]
pub fn init(v: &mut CtVal, cfg: &Config, proto: u8, tcp_flags: u8, now: u64, flags: u8) {
    // SAFETY: an all-zero entry is valid.
    unsafe { mem::zero(v) };
    v.state = state_after(CT_NEW, proto, tcp_flags);
    v.expires = now + timeout_ns(cfg, v.state);
    v.flags = flags;
}
