//! ICMP and ICMPv6 errors about translated flows (fragmentation needed / packet too big,
//! unreachable, time exceeded) are translated back so the original sender gets them: path MTU
//! discovery keeps working through the load balancer. The quoted packet and the outer
//! destination are reverse-translated and every checksum involved is fixed incrementally
//! (ICMPv6's covers its pseudo header, so the outer address change enters it too).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, addr,
    ct::{CT_F_LOCAL, CT_F_REPLY, CT_F_SNAT, CtKey},
    types::counter,
};

use crate::{
    csum::Diff,
    ct, fwd,
    maps::count,
    nat::Tuple,
    parse::{Hdr, IPPROTO_ICMP, IPPROTO_ICMPV6, ptr_at},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;

/// Internal verdict of [`inbound`]: route the translated error to `to.dst`
/// (`fwd::forward`, called by the entry point so the translators' frames stay off its stack).
pub const ROUTE: u32 = u32::MAX - 2;

#[inline(always)]
pub fn inbound(ctx: &XdpContext, h: &Hdr, to: &mut Tuple) -> u32 {
    let r = match (h.v6, h.proto) {
        (false, IPPROTO_ICMP) => translate_error(ctx, h, to),
        (true, IPPROTO_ICMPV6) => translate_error_v6(ctx, h, to),
        _ => None,
    };
    r.unwrap_or(XDP_PASS)
}

/// The quoted packet `isrc:sport -> idst:dport` went out as the reverse of a tracked direction:
/// the key of that direction.
#[inline(always)]
fn key_of_quote(isrc: &[u32; 4], idst: &[u32; 4], pw: &[u16; 4], proto: u8) -> CtKey {
    CtKey {
        src: *idst,
        dst: *isrc,
        sport: pw[1],
        dport: pw[0],
        proto,
        _pad: [0, 0, 0],
    }
}

/// The conntrack flags of the flow `k`, and into `kt` its `K'`: what packets of the tracked
/// direction are translated to. The quote's translation back is the reverse of `K'`.
#[inline(always)]
fn flow_of(k: &CtKey, kt: &mut Tuple) -> Option<u8> {
    let p = ct::lookup(k)?;
    // SAFETY: copied out of a live map value.
    let v = unsafe { *p };
    let snat = v.flags & CT_F_SNAT != 0;
    *kt = if v.flags & CT_F_REPLY == 0 {
        let (s, sp) = if snat {
            (v.nat2_addr, v.nat2_port)
        } else {
            (k.src, k.sport)
        };
        Tuple {
            src: s,
            sport: sp,
            dst: v.nat_addr,
            dport: v.nat_port,
        }
    } else {
        let (d, dp) = if snat {
            (v.nat2_addr, v.nat2_port)
        } else {
            (k.dst, k.dport)
        };
        Tuple {
            src: v.nat_addr,
            sport: v.nat_port,
            dst: d,
            dport: dp,
        }
    };
    Some(v.flags)
}

/// Hands the translated error to the kernel (local backend) or has it routed on: `kt` (the
/// flow's `K'`) becomes the route request, the error goes to `K'.dst`.
#[inline(always)]
fn send(h: &Hdr, flags: u8, kt: &mut Tuple) -> u32 {
    count(counter::ICMP_XLATE);
    if flags & CT_F_LOCAL != 0 {
        return XDP_PASS;
    }
    kt.src = h.src;
    kt.sport = 0;
    kt.dport = 0;
    ROUTE
}

/// An error we would route on with no hop left dies, as in the kernel (no errors about errors).
#[inline(always)]
fn expired(ctx: &XdpContext, h: &Hdr, flags: u8) -> bool {
    if flags & CT_F_LOCAL == 0 && fwd::ttl_expired(ctx.data(), ctx.data_end(), h) {
        count(counter::XDP_TTL_EXCEEDED);
        return true;
    }
    false
}

/// Inner ports (and the quoted UDP checksum when in use) := the reverse of `kt`. Adds every
/// changed word to `icmp`; `ia` is the inner address change (the UDP pseudo header).
#[inline(always)]
fn quote_ports(pw: [u16; 4], proto: u8, kt: &Tuple, ia: Diff, icmp: &mut Diff) -> [u16; 4] {
    let (nsport, ndport) = (kt.dport, kt.sport);
    let mut l4 = ia;
    l4.word(pw[0], nsport);
    l4.word(pw[1], ndport);
    icmp.word(pw[0], nsport);
    icmp.word(pw[1], ndport);
    let mut np = pw;
    np[0] = nsport;
    np[1] = ndport;
    if proto == IPPROTO_UDP && pw[3] != 0 {
        let mut uc = l4.apply(pw[3]);
        if uc == 0 {
            uc = 0xffff;
        }
        icmp.word(pw[3], uc);
        np[3] = uc;
    }
    np
}

#[inline(never)]
fn translate_error(ctx: &XdpContext, h: &Hdr, kt: &mut Tuple) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let icmp = ptr_at::<[u8; 8]>(data, end, h.l4)?;
    // SAFETY: bounds checked.
    let ty = unsafe { (*icmp)[0] };
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED {
        return None;
    }
    // The quoted packet: an IPv4 header without options and the first 8 bytes of L4.
    let inner = h.l4 + 8;
    let ip = ptr_at::<[u8; 20]>(data, end, inner)?;
    // SAFETY: bounds checked.
    let ib = unsafe { ip.read_unaligned() };
    let proto = ib[9];
    if ib[0] != 0x45 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let ports = ptr_at::<[u16; 4]>(data, end, inner + 20)?;
    // SAFETY: bounds checked.
    let pw = unsafe { ports.read_unaligned() };
    let isrc = addr::from_v4_word(u32::from_ne_bytes([ib[12], ib[13], ib[14], ib[15]]));
    let idst = addr::from_v4_word(u32::from_ne_bytes([ib[16], ib[17], ib[18], ib[19]]));
    let flags = flow_of(&key_of_quote(&isrc, &idst, &pw, proto), kt)?;
    if expired(ctx, h, flags) {
        return Some(XDP_DROP);
    }
    // The quote becomes the reverse of K': kt.dst -> kt.src.
    let mut ia = Diff::new();
    ia.addr(&isrc, &kt.dst, false);
    ia.addr(&idst, &kt.src, false);
    let mut icmp_diff = ia;
    // Inner IP header: addresses and checksum.
    let old_ic = u16::from_ne_bytes([ib[10], ib[11]]);
    let new_ic = ia.apply(old_ic);
    icmp_diff.word(old_ic, new_ic);
    let w = ptr_at::<[u32; 2]>(data, end, inner + 12)?;
    let c = ptr_at::<u16>(data, end, inner + 10)?;
    // SAFETY: bounds checked.
    unsafe {
        w.write_unaligned([kt.dst[3], kt.src[3]]);
        c.write_unaligned(new_ic);
    }
    let np = quote_ports(pw, proto, kt, ia, &mut icmp_diff);
    let ports = ptr_at::<[u16; 4]>(data, end, inner + 20)?;
    let ic = ptr_at::<u16>(data, end, h.l4 + 2)?;
    // SAFETY: bounds checked.
    unsafe {
        ports.write_unaligned(np);
        ic.write_unaligned(icmp_diff.apply(ic.read_unaligned()));
    }
    // Outer destination.
    let mut outer = Diff::new();
    outer.addr(&h.dst, &kt.dst, false);
    let od = ptr_at::<u32>(data, end, h.l3 + 16)?;
    let oc = ptr_at::<u16>(data, end, h.l3 + 10)?;
    // SAFETY: bounds checked.
    unsafe {
        od.write_unaligned(kt.dst[3]);
        oc.write_unaligned(outer.apply(oc.read_unaligned()));
    }
    Some(send(h, flags, kt))
}

/// ICMPv6 destination unreachable, packet too big and time exceeded. The quote must be an
/// IPv6 header without extension headers followed by TCP/UDP; anything else is passed on
/// untouched (as are neighbour discovery and every other ICMPv6 message).
#[inline(never)]
fn translate_error_v6(ctx: &XdpContext, h: &Hdr, kt: &mut Tuple) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let icmp = ptr_at::<[u8; 8]>(data, end, h.l4)?;
    // SAFETY: bounds checked.
    let ty = unsafe { (*icmp)[0] };
    if ty != ICMPV6_DEST_UNREACH && ty != ICMPV6_PKT_TOOBIG && ty != ICMPV6_TIME_EXCEED {
        return None;
    }
    let inner = h.l4 + 8;
    let head = ptr_at::<[u8; 8]>(data, end, inner)?;
    let sp = ptr_at::<[u32; 4]>(data, end, inner + 8)?;
    let dp = ptr_at::<[u32; 4]>(data, end, inner + 24)?;
    let ports = ptr_at::<[u16; 4]>(data, end, inner + 40)?;
    let od = ptr_at::<[u32; 4]>(data, end, h.l3 + 24)?;
    let ic = ptr_at::<u16>(data, end, h.l4 + 2)?;
    // SAFETY: every pointer above is bounds checked.
    unsafe {
        let hb = head.read_unaligned();
        let proto = hb[6];
        if hb[0] >> 4 != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
            return None;
        }
        let pw = ports.read_unaligned();
        let (isrc, idst) = (sp.read_unaligned(), dp.read_unaligned());
        let flags = flow_of(&key_of_quote(&isrc, &idst, &pw, proto), kt)?;
        if expired(ctx, h, flags) {
            return Some(XDP_DROP);
        }
        let mut ia = Diff::new();
        ia.addr(&isrc, &kt.dst, true);
        ia.addr(&idst, &kt.src, true);
        let mut icmp_diff = ia;
        let np = quote_ports(pw, proto, kt, ia, &mut icmp_diff);
        // The outer destination is part of ICMPv6's pseudo header.
        icmp_diff.addr(&h.dst, &kt.dst, true);
        sp.write_unaligned(kt.dst);
        dp.write_unaligned(kt.src);
        ports.write_unaligned(np);
        od.write_unaligned(kt.dst);
        ic.write_unaligned(icmp_diff.apply(ic.read_unaligned()));
        Some(send(h, flags, kt))
    }
}
