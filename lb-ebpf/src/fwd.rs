//! Sending a translated packet on: to the kernel for local backends, or out through the FIB
//! (next hop MACs from bpf_fib_lookup) with XDP_TX / redirect for remote ones.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::types::counter;

use crate::{
    csum::Diff,
    maps::count,
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

/// Forwards the (already rewritten) packet `h` towards `t.dst`, one hop less. Anything the FIB
/// cannot resolve right now (no neighbour entry yet, VLAN sub-interfaces) goes to the kernel,
/// which forwards the translated packet itself (and decrements the TTL then).
#[inline(never)]
pub fn forward(ctx: &XdpContext, h: &Hdr, t: &Tuple) -> u32 {
    let (v6, proto, ip_len) = (h.v6, h.proto, (h.l3_end - h.l3) as u16);
    if h.vlan {
        return XDP_PASS;
    }
    // SAFETY: plain-old-data, all-zero is a valid request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = if v6 { AF_INET6 } else { AF_INET };
    p.l4_protocol = proto;
    p.sport = t.sport;
    p.dport = t.dport;
    p.__bindgen_anon_1.tot_len = ip_len;
    // SAFETY: context field read.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    p.ifindex = ingress;
    if v6 {
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
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        count(counter::XDP_FIB_MISS);
        return XDP_PASS;
    }
    // Callers checked `ttl_expired` before translating; on XDP_PASS the kernel decrements.
    if decrement_ttl(ctx.data(), ctx.data_end(), h).is_none() {
        return XDP_PASS;
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx.data(), ctx.data_end(), 0) else {
        return XDP_PASS;
    };
    let mut macs = [0u8; 12];
    let mut i = 0;
    while i < 6 {
        macs[i] = p.dmac[i];
        macs[6 + i] = p.smac[i];
        i += 1;
    }
    // SAFETY: bounds checked.
    unsafe { eth.write_unaligned(macs) };
    if p.ifindex == ingress {
        XDP_TX
    } else {
        // SAFETY: helper call.
        unsafe { bpf_redirect(p.ifindex, 0) as u32 }
    }
}
