//! Sending a translated packet on: to the kernel for local backends, or out through the FIB
//! (next hop MACs from bpf_fib_lookup) with XDP_TX / redirect for remote ones. Tracked flows
//! keep their next hop in their conntrack entry ([`forward_via`]).

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{ct::NextHop, types::counter};

use crate::{
    csum::Diff,
    maps::count,
    mem,
    nat::Tuple,
    parse::{Hdr, ptr_at},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Whether a packet we would route on has no hop left (TTL / hop limit <= 1). Checked before
/// any rewrite, so the answer (see `reject::time_exceeded`) quotes what the sender sent.
#[inline(always)]
pub fn ttl_expired(data: usize, end: usize, h: &Hdr) -> bool {
    ttl_word(data, end, h).is_none_or(|(p, i)| {
        // SAFETY: bounds checked by ttl_word.
        (unsafe { p.read_unaligned() })[i] <= 1
    })
}

/// The 2 bytes holding the TTL (IPv4: TTL, protocol) or hop limit (IPv6: next header, hop
/// limit) and the index of the TTL in them. Two bytes, not one: a 1-byte bounds check
/// compiles to a comparison the verifier cannot use.
#[inline(always)]
fn ttl_word(data: usize, end: usize, h: &Hdr) -> Option<(*mut [u8; 2], usize)> {
    if h.v6 {
        Some((ptr_at::<[u8; 2]>(data, end, h.l3 + 6)?, 1))
    } else {
        Some((ptr_at::<[u8; 2]>(data, end, h.l3 + 8)?, 0))
    }
}

/// One hop less, as a router does (RFC 1812 5.3.1): IPv4 TTL with an incremental header
/// checksum update (TTL and protocol share one 16-bit word), IPv6 hop limit.
#[inline(always)]
pub fn decrement_ttl(data: usize, end: usize, h: &Hdr) -> Option<()> {
    let (w, i) = ttl_word(data, end, h)?;
    // SAFETY: bounds checked.
    unsafe {
        let old = w.read_unaligned();
        let mut new = old;
        new[i] = old[i].saturating_sub(1);
        w.write_unaligned(new);
        if !h.v6 {
            let c = ptr_at::<u16>(data, end, h.l3 + 10)?;
            let mut d = Diff::new();
            d.word(u16::from_ne_bytes(old), u16::from_ne_bytes(new));
            c.write_unaligned(d.apply(c.read_unaligned()));
        }
    }
    Some(())
}

/// How long a flow's next hop is used before it is looked up again.
const HOP_TTL_NS: u64 = 1_000_000_000;

/// Forwards the (already rewritten) packet `h` towards `t.dst`, one hop less, looking the next
/// hop up for this packet alone. Anything the FIB cannot resolve right now (no neighbour entry
/// yet, VLAN sub-interfaces) goes to the kernel, which forwards the translated packet itself
/// (and decrements the TTL then).
#[inline(never)]
pub fn forward(ctx: &XdpContext, h: &Hdr, t: &Tuple) -> u32 {
    if h.vlan {
        return XDP_PASS;
    }
    let iif = ingress(ctx);
    match lookup(ctx, h, t, iif) {
        Ok(hop) => send(ctx, h, &hop, iif),
        Err(verdict) => verdict,
    }
}

/// [`forward`] for a packet of a tracked flow through the flow's next hop `hop`, which is
/// looked up again (and replaced) when it is stale, was resolved for another ingress, or has a
/// smaller MTU than the packet (the fresh lookup then gives the kernel's answer).
#[inline(never)]
pub fn forward_via(ctx: &XdpContext, h: &Hdr, t: &Tuple, hop: &mut NextHop, now: u64) -> u32 {
    if h.vlan {
        return XDP_PASS;
    }
    let iif = ingress(ctx);
    let len = (h.l3_end - h.l3) as u16;
    if hop.until <= now || hop.iif != iif || len > hop.mtu {
        match lookup(ctx, h, t, iif) {
            Ok(fresh) => {
                *hop = fresh;
                hop.until = now + HOP_TTL_NS;
            }
            Err(verdict) => return verdict,
        }
    }
    send(ctx, h, hop, iif)
}

#[inline(always)]
fn ingress(ctx: &XdpContext) -> u32 {
    // SAFETY: context field read.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

/// The next hop towards `t.dst` for `h` arriving on `iif` (`until` left 0), or the verdict for
/// a packet that has none.
#[inline(always)]
fn lookup(ctx: &XdpContext, h: &Hdr, t: &Tuple, iif: u32) -> Result<NextHop, u32> {
    let mut slot = MaybeUninit::<bpf_fib_lookup>::uninit();
    // SAFETY: plain-old-data, all-zero is a valid request.
    let p = unsafe { mem::zeroed_in(&mut slot) };
    p.family = if h.v6 { AF_INET6 } else { AF_INET };
    p.l4_protocol = h.proto;
    p.sport = t.sport;
    p.dport = t.dport;
    p.__bindgen_anon_1.tot_len = (h.l3_end - h.l3) as u16;
    p.ifindex = iif;
    if h.v6 {
        p.__bindgen_anon_3.ipv6_src = t.src;
        p.__bindgen_anon_4.ipv6_dst = t.dst;
    } else {
        p.__bindgen_anon_3.ipv4_src = t.src[3];
        p.__bindgen_anon_4.ipv4_dst = t.dst[3];
    }
    // SAFETY: helper call with a stack buffer of the declared size.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        count(counter::XDP_FIB_MISS);
        return Err(XDP_PASS);
    }
    let mut slot = MaybeUninit::<NextHop>::uninit();
    // SAFETY: all-zero is a valid next hop.
    let hop = unsafe { mem::zeroed_in(&mut slot) };
    hop.iif = iif;
    hop.oif = p.ifindex;
    hop.macs[..6].copy_from_slice(&p.dmac);
    hop.macs[6..].copy_from_slice(&p.smac);
    // SAFETY: on success the union holds the route MTU (or, on kernels that leave it, the
    // length just checked against it): either way, packets up to it fit.
    hop.mtu = unsafe { p.__bindgen_anon_1.mtu_result };
    Ok(*hop)
}

/// Sends the rewritten packet `h` to `hop`, one hop less (callers checked `ttl_expired` before
/// translating).
#[inline(always)]
fn send(ctx: &XdpContext, h: &Hdr, hop: &NextHop, iif: u32) -> u32 {
    if decrement_ttl(ctx.data(), ctx.data_end(), h).is_none() {
        return XDP_PASS;
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx.data(), ctx.data_end(), 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked.
    unsafe { eth.write_unaligned(hop.macs) };
    if hop.oif == iif {
        XDP_TX
    } else {
        // SAFETY: helper call.
        unsafe { bpf_redirect(hop.oif, 0) as u32 }
    }
}
