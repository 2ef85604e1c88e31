//! ICMP errors about translated flows (fragmentation needed, unreachable, time exceeded) are
//! translated back so the original sender gets them: path MTU discovery keeps working through
//! the load balancer. IPv4 only; ICMPv6 errors go to the kernel untouched.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
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
    parse::{Hdr, IPPROTO_ICMP, ptr_at},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

#[inline(never)]
pub fn inbound(ctx: &XdpContext, h: &Hdr) -> u32 {
    if h.v6 || h.proto != IPPROTO_ICMP {
        return XDP_PASS;
    }
    translate_error(ctx, h).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn translate_error(ctx: &XdpContext, h: &Hdr) -> Option<u32> {
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
    // The quoted packet went out as the reverse of a tracked direction.
    let k = CtKey {
        src: idst,
        dst: isrc,
        sport: pw[1],
        dport: pw[0],
        proto,
        _pad: [0; 3],
    };
    let p = ct::lookup(&k)?;
    // SAFETY: copied out of a live map value.
    let v = unsafe { *p };
    let snat = v.flags & CT_F_SNAT != 0;
    // K' = what packets matching K are translated to.
    let kt = if v.flags & CT_F_REPLY == 0 {
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
    // The quote becomes the reverse of K'; the error goes to K'.dst, who sent that packet.
    let (nsrc, ndst, nsport, ndport) = (kt.dst, kt.src, kt.dport, kt.sport);

    let mut ia = Diff::new();
    ia.addr(&isrc, &nsrc, false);
    ia.addr(&idst, &ndst, false);
    let mut icmp_diff = ia;
    // Inner IP header: addresses and checksum.
    let old_ic = u16::from_ne_bytes([ib[10], ib[11]]);
    let new_ic = ia.apply(old_ic);
    icmp_diff.word(old_ic, new_ic);
    let w = ptr_at::<[u32; 2]>(data, end, inner + 12)?;
    let c = ptr_at::<u16>(data, end, inner + 10)?;
    // SAFETY: bounds checked.
    unsafe {
        w.write_unaligned([nsrc[3], ndst[3]]);
        c.write_unaligned(new_ic);
    }
    // Inner ports, and the UDP checksum when it is quoted and in use.
    let mut l4 = ia;
    l4.word(pw[0], nsport);
    l4.word(pw[1], ndport);
    icmp_diff.word(pw[0], nsport);
    icmp_diff.word(pw[1], ndport);
    let mut np = pw;
    np[0] = nsport;
    np[1] = ndport;
    if proto == IPPROTO_UDP && pw[3] != 0 {
        let mut uc = l4.apply(pw[3]);
        if uc == 0 {
            uc = 0xffff;
        }
        icmp_diff.word(pw[3], uc);
        np[3] = uc;
    }
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
    count(counter::ICMP_XLATE);
    if v.flags & CT_F_LOCAL != 0 {
        return Some(XDP_PASS);
    }
    let to = Tuple {
        src: h.src,
        dst: kt.dst,
        sport: 0,
        dport: 0,
    };
    Some(fwd::forward(ctx, h, &to))
}
