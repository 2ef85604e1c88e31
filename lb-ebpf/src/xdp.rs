//! XDP on the external interfaces: NodePort, LoadBalancer and external IP frontends
//! (`SCOPE_EXTERNAL` entries), replies of SNATed flows, REJECT/DROP like kube-proxy.
//!
//! Order of checks per TCP/UDP packet: frontend lookup (hit: conntrack, else Maglev pick),
//! then conntrack for replies addressed to this node, then "known frontend IP on an unknown
//! port" (reject) and the service CIDR (drop). Everything else is left to the kernel.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    btf_maps::lpm_trie::Key,
    programs::XdpContext,
};
use lb_common::{
    AFFINITY_CLIENT_IP, AffinityKey, BACKEND_F_LOCAL, Backend, IPPROTO_TCP, IPPROTO_UDP,
    SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_EXT_LOCAL, SVC_F_FRONTEND_IP, SVC_F_SRC_RANGES, SvcKey,
    SvcVal, addr,
    ct::{
        CFG_F_SVC_CIDR, CT_F_DSR, CT_F_LOCAL, CT_F_REPLY, CT_F_SNAT, Config, CtKey, CtVal, NextHop,
        SrcRangeKey,
    },
    hash::flow_hash,
    types::counter,
};

use crate::{
    affinity, ct, dsr, frag, fwd, icmp,
    maps::{BACKENDS, CT, SRC_RANGES, Scratch, account, config, count, parsed},
    nat::{self, Tuple},
    parse::{Frag, Hdr, IPPROTO_ICMP, IPPROTO_ICMPV6, Skip, TCP_ACK, TCP_SYN},
    reject::{self, reject, time_exceeded},
    select,
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let s = match parsed(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data()) {
        Ok(s) => s,
        Err(Skip::NotIp) => return XDP_PASS,
        Err(Skip::Malformed) => {
            count(counter::XDP_BAD);
            return XDP_PASS;
        }
    };
    let Some(cfg) = config() else { return XDP_PASS };
    let h = &s.hdr;
    match h.proto {
        IPPROTO_TCP | IPPROTO_UDP => {}
        dsr::IPPROTO_IPIP => return dsr::decap(ctx, s, cfg),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let v = icmp::inbound(ctx, h, &mut s.to);
            if v == icmp::ROUTE {
                return fwd::forward(ctx, &s.hdr, &s.to);
            }
            return v;
        }
        _ => return XDP_PASS,
    }
    if h.frag == Frag::Later {
        return frag::follow(ctx, h);
    }
    let key = SvcKey {
        addr: h.dst,
        port: h.dport,
        proto: h.proto,
        scope: SCOPE_EXTERNAL,
    };
    let mut v = if select::lookup_into(&key, &mut s.svc) {
        frontend(ctx, s, cfg)
    } else {
        let v = reply(ctx, s, cfg);
        if v == NOT_A_REPLY {
            return other(ctx, &s.hdr, cfg);
        }
        v
    };
    if v == dsr::ENCAP {
        v = dsr::encap(ctx, s, cfg);
    }
    if v == dsr::TOO_BIG {
        return reject::frag_needed(ctx, &s.hdr, s.mtu);
    }
    if v == TTL_EXPIRED {
        // Answered from here, not deeper down: the answer's frame would not fit on the
        // translators' stacks.
        count(counter::XDP_TTL_EXCEEDED);
        return time_exceeded(ctx, &s.hdr);
    }
    v
}

/// Internal verdict: the packet would be routed on with no hop left (see `fwd::ttl_expired`).
pub const TTL_EXPIRED: u32 = u32::MAX - 1;

/// Not a frontend port: reject on LoadBalancer/external IPs, drop unused service IPs.
#[inline(never)]
fn other(ctx: &XdpContext, h: &Hdr, cfg: &Config) -> u32 {
    let marker = SvcKey {
        addr: h.dst,
        port: 0,
        proto: 0,
        scope: SCOPE_EXTERNAL,
    };
    if let Some(m) = select::lookup(&marker)
        && m.flags & SVC_F_FRONTEND_IP != 0
    {
        count(counter::XDP_REJECT);
        return reject(ctx, h);
    }
    if cfg.flags & CFG_F_SVC_CIDR != 0
        && (in_net(&h.dst, &cfg.svc_net[0], &cfg.svc_mask[0])
            || in_net(&h.dst, &cfg.svc_net[1], &cfg.svc_mask[1]))
    {
        count(counter::XDP_DROP);
        return XDP_DROP;
    }
    XDP_PASS
}

#[inline(always)]
fn in_net(a: &[u32; 4], net: &[u32; 4], mask: &[u32; 4]) -> bool {
    mask[0] | mask[1] | mask[2] | mask[3] != 0
        && a[0] & mask[0] == net[0]
        && a[1] & mask[1] == net[1]
        && a[2] & mask[2] == net[2]
        && a[3] & mask[3] == net[3]
}

/// A reply of a translated flow addressed to this node (SNAT): back to the client with the
/// frontend as source. Only SNAT ports can be such replies, so packets to other ports of the
/// node (ssh, the kubelet, ...) cost no conntrack lookup.
const NOT_A_REPLY: u32 = u32::MAX;

#[inline(never)]
fn reply(ctx: &XdpContext, s: &mut Scratch, cfg: &Config) -> u32 {
    reply_inner(ctx, s, cfg).unwrap_or(NOT_A_REPLY)
}

/// The reply entry is copied into `s.r` (off the stack: forwarding needs it).
#[inline(always)]
fn reply_inner(ctx: &XdpContext, s: &mut Scratch, cfg: &Config) -> Option<u32> {
    let h = &s.hdr;
    let node = if h.v6 { &cfg.node_ip6 } else { &cfg.node_ip4 };
    let port = u16::from_be(h.dport);
    if h.dst != *node || port < cfg.snat_port_min || port > cfg.snat_port_max {
        return None;
    }
    s.rkey = ct::key_of(h);
    let p = ct::lookup(&s.rkey)?;
    // SAFETY: copied out of a live map value (one inlined memcpy; an assignment through a
    // temporary would be an out-of-line memmove, see `mem`).
    unsafe { core::ptr::copy_nonoverlapping(p, &raw mut s.r, 1) };
    let (h, v) = (&s.hdr, &s.r);
    if v.flags & CT_F_REPLY == 0 {
        return None;
    }
    let now = ct::now();
    ct::touch(p, cfg, h, now);
    if fwd::ttl_expired(ctx.data(), ctx.data_end(), h) {
        return Some(TTL_EXPIRED);
    }
    s.to = Tuple {
        src: v.nat_addr,
        sport: v.nat_port,
        dst: v.nat2_addr,
        dport: v.nat2_port,
    };
    nat::rewrite(ctx.data(), ctx.data_end(), h, &s.to)?;
    frag::record(h, &s.to, v.flags);
    count(counter::XDP_CT_HIT);
    let cached = v.hop.until;
    let verdict = fwd::forward_via(ctx, &s.hdr, &s.to, &mut s.r.hop, now);
    keep_hop(p, cached, &s.r.hop);
    Some(verdict)
}

/// Stores `hop` in the flow's entry `p` if forwarding looked it up again (its `until` is no
/// longer `cached`).
#[inline(always)]
fn keep_hop(p: *mut CtVal, cached: u64, hop: &NextHop) {
    if hop.until != cached {
        // SAFETY: p points into a live map value; racing writers store equally valid hops.
        unsafe { core::ptr::copy_nonoverlapping(hop, &raw mut (*p).hop, 1) };
    }
}

#[inline(always)]
fn src_allowed(group: u32, src: &[u32; 4]) -> bool {
    let key = Key::new(
        160,
        SrcRangeKey {
            group_be: group.to_be(),
            addr: *src,
        },
    );
    SRC_RANGES.get(&key).is_some()
}

#[allow(clippy::needless_borrows_for_generic_args)] // see new_flow
#[inline(never)]
fn frontend(ctx: &XdpContext, s: &mut Scratch, cfg: &Config) -> u32 {
    let svc = s.svc;
    let h = &s.hdr;
    if svc.flags & SVC_F_SRC_RANGES != 0 && !src_allowed(svc.group_id, &h.src) {
        count(counter::XDP_DROP);
        return XDP_DROP;
    }
    let now = ct::now();
    let generation = ct::backends_gen(cfg);
    s.fkey = ct::key_of(h);
    if let Some(p) = ct::lookup(&s.fkey) {
        // SAFETY: copied out of a live map value (see `reply_inner`).
        unsafe { core::ptr::copy_nonoverlapping(p, &raw mut s.v, 1) };
        if s.v.flags & CT_F_REPLY == 0 && s.v.expires > now && ct::backend_live(p, &s.v, generation)
        {
            ct::touch(p, cfg, &s.hdr, now);
            count(counter::XDP_CT_HIT);
            account(svc.group_id, 1, (ctx.data_end() - ctx.data()) as u64, 0);
            let cached = s.v.hop.until;
            let verdict = translate(ctx, s, now);
            keep_hop(p, cached, &s.v.hop);
            return verdict;
        }
    }
    if svc.backend_count == 0 {
        if svc.flags & SVC_F_EXT_LOCAL != 0 {
            count(counter::XDP_DROP);
            return XDP_DROP;
        }
        count(counter::XDP_REJECT);
        return reject(ctx, &s.hdr);
    }
    match new_flow(s, &svc, cfg, now, generation) {
        0 => {
            count(counter::XDP_NEW);
            account(svc.group_id, 1, (ctx.data_end() - ctx.data()) as u64, 1);
            let verdict = translate(ctx, s, now);
            // Inserted after forwarding, so the entry starts out with the next hop.
            if CT.insert(&s.fkey, &s.v, 0).is_err() {
                return XDP_DROP;
            }
            verdict
        }
        verdict => verdict,
    }
}

/// Picks a backend for a new flow and writes the reply-direction conntrack entry; 0 when the
/// packet is to be translated with `s.v` (then stored under `s.fkey`), else the verdict.
// The map helpers get pointers into the scratch map on purpose: a by-value key or value would
// be copied onto the 512-byte stack first.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn new_flow(s: &mut Scratch, svc: &SvcVal, cfg: &Config, now: u64, generation: u32) -> u32 {
    let h = &s.hdr;
    let hash = flow_hash(
        &h.src,
        &h.dst,
        h.sport,
        h.dport,
        h.proto,
        svc.flags & SVC_F_AFFINITY != 0,
    );
    // A TCP packet that is not a connection attempt belongs to a flow established before the
    // table changed: prefer the slot's previous owner while it still exists.
    let mid_flow =
        h.proto == IPPROTO_TCP && (h.tcp_flags & TCP_SYN == 0 || h.tcp_flags & TCP_ACK != 0);
    // sessionAffinity: ClientIP: the client's backend while it keeps connecting within the
    // timeout, else a fresh pick that the client is then pinned to.
    let sticky = if svc.affinity_timeout != 0 {
        s.aff = AffinityKey {
            client: h.src,
            group_id: svc.group_id,
            kind: AFFINITY_CLIENT_IP,
        };
        affinity::sticky(&s.aff, svc.affinity_timeout, now)
    } else {
        None
    };
    let (id, b) = match sticky {
        Some(chosen) => chosen,
        None => {
            let Some((id, b)) = pick(svc, hash, mid_flow) else {
                count(counter::SOCK_MISS);
                return XDP_PASS;
            };
            if svc.affinity_timeout != 0 {
                affinity::remember(&s.aff, id, now);
            }
            (id, b)
        }
    };
    if addr::to_v4_word(&b.addr).is_some() == h.v6 {
        count(counter::XDP_BAD); // family mismatch: never write a mangled address
        return XDP_DROP;
    }
    ct::init(&mut s.v, cfg, h.proto, h.tcp_flags, now, 0);
    s.v.backend_id = id;
    // Picked from the backend set of `generation` (read before the pick).
    s.v.backends_gen = generation;
    s.v.nat_addr = b.addr;
    s.v.nat_port = b.port;
    // The reply entry: backend -> (node or client), translated back to frontend -> client.
    ct::init(&mut s.r, cfg, h.proto, h.tcp_flags, now, CT_F_REPLY);
    s.r.backend_id = id;
    s.r.nat_addr = h.dst;
    s.r.nat_port = h.dport;
    s.rkey = CtKey {
        src: b.addr,
        dst: h.src,
        sport: b.port,
        dport: h.sport,
        proto: h.proto,
        _pad: [0, 0, 0],
    };
    if b.flags & BACKEND_F_LOCAL != 0 {
        s.v.flags |= CT_F_LOCAL;
        s.r.flags |= CT_F_LOCAL;
        if CT.insert(&s.rkey, &s.r, 0).is_err() {
            return XDP_DROP;
        }
    } else if dsr::eligible(cfg, h, &b.node) {
        // The reply leaves the backend's node directly: no reply entry here.
        s.v.flags |= CT_F_DSR;
        s.v.nat2_addr = b.node;
    } else {
        let node = if h.v6 { cfg.node_ip6 } else { cfg.node_ip4 };
        s.r.flags |= CT_F_SNAT;
        s.r.nat2_addr = h.src;
        s.r.nat2_port = h.sport;
        s.rkey.dst = node;
        let port = snat_port(cfg, &mut s.rkey, &s.r, hash, now);
        if port == 0 {
            count(counter::SNAT_EXHAUSTED);
            return XDP_DROP;
        }
        s.v.flags |= CT_F_SNAT;
        s.v.nat2_addr = node;
        s.v.nat2_port = port;
    }
    0
}

/// Applies the original-direction entry `s.v` and sends the packet on (through `s.v.hop`,
/// refreshed when stale).
#[inline(always)]
fn translate(ctx: &XdpContext, s: &mut Scratch, now: u64) -> u32 {
    let (h, v) = (&s.hdr, &s.v);
    if v.flags & CT_F_DSR != 0 {
        return dsr::ENCAP;
    }
    s.to = Tuple {
        src: h.src,
        sport: h.sport,
        dst: v.nat_addr,
        dport: v.nat_port,
    };
    if v.flags & CT_F_SNAT != 0 {
        s.to.src = v.nat2_addr;
        s.to.sport = v.nat2_port;
    }
    // Routed on (not handed to a local pod): a router's TTL rules apply.
    if v.flags & CT_F_LOCAL == 0 && fwd::ttl_expired(ctx.data(), ctx.data_end(), h) {
        return TTL_EXPIRED;
    }
    if nat::rewrite(ctx.data(), ctx.data_end(), h, &s.to).is_none() {
        return XDP_DROP;
    }
    frag::record(h, &s.to, v.flags);
    if v.flags & CT_F_LOCAL != 0 {
        return XDP_PASS;
    }
    fwd::forward_via(ctx, &s.hdr, &s.to, &mut s.v.hop, now)
}

/// Picks the backend: the slot's owner, or its previous owner for mid-flow TCP packets.
#[inline(always)]
fn pick(svc: &SvcVal, hash: u32, mid_flow: bool) -> Option<(u32, Backend)> {
    if svc.table_size == 0 {
        return None;
    }
    let s = select::slot(svc, hash)?;
    if mid_flow && s.prev != 0 {
        // SAFETY: copied out immediately.
        if let Some(b) = unsafe { BACKENDS.get(s.prev) } {
            return Some((s.prev, *b));
        }
    }
    // SAFETY: copied out immediately.
    let b = unsafe { BACKENDS.get(s.backend) }?;
    Some((s.backend, *b))
}

/// A free SNAT source port (network order, 0 for none) for this backend; writes the reply
/// entry under it. Ports are tried
/// from the flow hash, so a re-created flow gets its old port back.
#[allow(clippy::needless_borrows_for_generic_args)] // see new_flow
#[inline(never)]
fn snat_port(cfg: &Config, rkey: &mut CtKey, r: &CtVal, hash: u32, now: u64) -> u16 {
    if rkey.dst == [0; 4] || cfg.snat_port_min == 0 || cfg.snat_port_max < cfg.snat_port_min {
        return 0;
    }
    let range = u32::from(cfg.snat_port_max - cfg.snat_port_min) + 1;
    for i in 0..4u32 {
        let port = (cfg.snat_port_min
            + ((hash.wrapping_add(i.wrapping_mul(0x9e37_79b1))) % range) as u16)
            .to_be();
        rkey.dport = port;
        // Most ports are free: claim one first, look at its holder only when that fails.
        if CT.insert(&*rkey, r, u64::from(BPF_NOEXIST)).is_ok()
            || (replaceable(rkey, r, now) && CT.insert(&*rkey, r, 0).is_ok())
        {
            return port;
        }
    }
    0
}

/// Whether the entry under `rkey` may give way to `r`: it expired, or it is this client's own
/// earlier entry (a re-created flow).
#[inline(always)]
fn replaceable(rkey: &CtKey, r: &CtVal, now: u64) -> bool {
    // SAFETY: reads of a live map value.
    ct::lookup(rkey).is_some_and(|p| unsafe {
        (*p).expires <= now || ((*p).nat2_addr == r.nat2_addr && (*p).nat2_port == r.nat2_port)
    })
}
