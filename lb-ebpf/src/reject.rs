//! kube-proxy's REJECT, generated in XDP: a TCP RST, or an ICMP/ICMPv6 port unreachable for
//! UDP, sent back out of the interface the packet came in on (XDP_TX); and ICMP time exceeded
//! for packets we would route on with an expired TTL. The frame is rebuilt in
//! place; packets we cannot answer exactly (IP options, IPv6 extension headers, a RST) are
//! dropped, never answered with a malformed reply.

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    csum::{fold, sum_addr, sum_words},
    parse::{Frag, Hdr, IPPROTO_ICMP, IPPROTO_ICMPV6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
};

#[inline(always)]
fn sum_bytes<const N: usize>(b: &[u8; N]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < N {
        s += u64::from(u16::from_ne_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    s
}

#[inline(always)]
fn word(hi: u8, lo: u8) -> u64 {
    u64::from(u16::from_ne_bytes([hi, lo]))
}

#[inline(always)]
fn addr_bytes(a: &[u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        o[i * 4] = w[0];
        o[i * 4 + 1] = w[1];
        o[i * 4 + 2] = w[2];
        o[i * 4 + 3] = w[3];
        i += 1;
    }
    o
}

/// An IPv4 header from `src` to `dst` without options.
#[inline(always)]
fn ipv4_header(src: &[u32; 4], dst: &[u32; 4], proto: u8, tot_len: u16) -> [u8; 20] {
    let s = src[3].to_ne_bytes();
    let d = dst[3].to_ne_bytes();
    let l = tot_len.to_be_bytes();
    let mut b = [
        0x45, 0, l[0], l[1], 0, 0, 0x40, 0, 64, proto, 0, 0, s[0], s[1], s[2], s[3], d[0], d[1],
        d[2], d[3],
    ];
    let c = (!fold(sum_bytes(&b))).to_ne_bytes();
    b[10] = c[0];
    b[11] = c[1];
    b
}

#[inline(always)]
fn ipv6_header(src: &[u32; 4], dst: &[u32; 4], nh: u8, payload: u16) -> [u8; 40] {
    let mut b = [0u8; 40];
    b[0] = 0x60;
    let l = payload.to_be_bytes();
    b[4] = l[0];
    b[5] = l[1];
    b[6] = nh;
    b[7] = 64;
    let s = addr_bytes(src);
    let d = addr_bytes(dst);
    let mut i = 0;
    while i < 16 {
        b[8 + i] = s[i];
        b[24 + i] = d[i];
        i += 1;
    }
    b
}

/// Pseudo-header sum for an upper-layer packet of `len` bytes.
#[inline(always)]
fn pseudo(src: &[u32; 4], dst: &[u32; 4], v6: bool, proto: u8, len: u16) -> u64 {
    let l = len.to_be_bytes();
    sum_addr(src, v6) + sum_addr(dst, v6) + word(0, proto) + word(l[0], l[1])
}

/// Swaps the MAC addresses of the frame at `data`.
#[inline(always)]
fn swap_macs(data: usize, end: usize) -> Option<()> {
    let p = ptr_at::<[u8; 12]>(data, end, 0)?;
    // SAFETY: bounds checked.
    unsafe {
        let m = p.read_unaligned();
        let mut o = [0u8; 12];
        let mut i = 0;
        while i < 6 {
            o[i] = m[6 + i];
            o[6 + i] = m[i];
            i += 1;
        }
        p.write_unaligned(o);
    }
    Some(())
}

#[inline(always)]
fn write<T>(data: usize, end: usize, off: usize, v: T) -> Option<()> {
    let p = ptr_at::<T>(data, end, off)?;
    // SAFETY: bounds checked.
    unsafe { p.write_unaligned(v) };
    Some(())
}

/// Answers `h` (a TCP or UDP packet to a frontend that rejects) and returns the verdict.
#[inline(never)]
pub fn reject(ctx: &XdpContext, h: &Hdr) -> u32 {
    match h.proto {
        IPPROTO_TCP => tcp_rst(ctx, h).unwrap_or(XDP_DROP),
        IPPROTO_UDP => icmp_error(ctx, h, PORT_UNREACHABLE).unwrap_or(XDP_DROP),
        _ => XDP_DROP,
    }
}

/// ICMP (v4 type, code) and ICMPv6 (type, code) of an error, and the 4 bytes after the
/// checksum (unused, or the next-hop MTU).
#[derive(Clone, Copy)]
pub struct IcmpKind {
    v4: [u8; 2],
    v6: [u8; 2],
    rest: [u8; 4],
}

const PORT_UNREACHABLE: IcmpKind = IcmpKind {
    v4: [3, 3],
    v6: [1, 4],
    rest: [0; 4],
};
/// TTL / hop limit exceeded in transit.
const TIME_EXCEEDED: IcmpKind = IcmpKind {
    v4: [11, 0],
    v6: [3, 0],
    rest: [0; 4],
};

/// IPv4 "fragmentation needed" (3/4) with the next-hop `mtu`, for a packet with DF set that
/// does not fit once encapsulated (DSR).
#[inline(never)]
pub fn frag_needed(ctx: &XdpContext, h: &Hdr, mtu: u16) -> u32 {
    if h.v6 || h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP || h.frag == Frag::Later {
        return XDP_DROP;
    }
    let m = mtu.to_be_bytes();
    let kind = IcmpKind {
        v4: [3, 4],
        v6: [2, 0],
        rest: [0, 0, m[0], m[1]],
    };
    icmp_error(ctx, h, kind).unwrap_or(XDP_DROP)
}

/// Answers a TCP/UDP packet we would route on with TTL <= 1 the way the kernel's forwarding
/// path does: ICMP time exceeded, from the address the client sent to. Later fragments, ICMP
/// and anything we cannot quote exactly are dropped (the kernel never answers those either).
#[inline(never)]
pub fn time_exceeded(ctx: &XdpContext, h: &Hdr) -> u32 {
    if h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP || h.frag == Frag::Later {
        return XDP_DROP;
    }
    icmp_error(ctx, h, TIME_EXCEEDED).unwrap_or(XDP_DROP)
}

#[inline(always)]
fn tcp_rst(ctx: &XdpContext, h: &Hdr) -> Option<u32> {
    if h.tcp_flags & TCP_RST != 0 || h.l4 != h.l3 + if h.v6 { 40 } else { 20 } {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let t = ptr_at::<[u8; 20]>(data, end, h.l4)?;
    // SAFETY: bounds checked.
    let t = unsafe { t.read_unaligned() };
    let doff = ((t[12] >> 4) as usize) * 4;
    let payload = (h.l3_end - h.l4).checked_sub(doff)? as u32;
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    let (rseq, rack, flags) = if h.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let syn_fin = u32::from(h.tcp_flags & TCP_SYN != 0) + u32::from(h.tcp_flags & TCP_FIN != 0);
        (
            0,
            seq.wrapping_add(payload).wrapping_add(syn_fin),
            TCP_RST | TCP_ACK,
        )
    };
    let new_len = h.l4 + 20;
    let delta = new_len as i32 - (end - data) as i32;
    // SAFETY: shrinking the frame of this program's context.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.as_ptr().cast(), delta) } != 0 {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    swap_macs(data, end)?;
    let (src, dst) = (h.dst, h.src);
    if h.v6 {
        write(data, end, h.l3, ipv6_header(&src, &dst, IPPROTO_TCP, 20))?;
    } else {
        write(data, end, h.l3, ipv4_header(&src, &dst, IPPROTO_TCP, 40))?;
    }
    let (sp, dp) = (h.dport.to_ne_bytes(), h.sport.to_ne_bytes());
    let (s, a) = (rseq.to_be_bytes(), rack.to_be_bytes());
    let mut tcp = [
        sp[0], sp[1], dp[0], dp[1], s[0], s[1], s[2], s[3], a[0], a[1], a[2], a[3], 0x50, flags, 0,
        0, 0, 0, 0, 0,
    ];
    let c = (!fold(pseudo(&src, &dst, h.v6, IPPROTO_TCP, 20) + sum_bytes(&tcp))).to_ne_bytes();
    tcp[16] = c[0];
    tcp[17] = c[1];
    write(data, end, h.l4, tcp)?;
    Some(XDP_TX)
}

/// An ICMP/ICMPv6 error of `kind` back to the sender, quoting the IP header and 8 bytes of L4.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, h: &Hdr, kind: IcmpKind) -> Option<u32> {
    let ip_len: usize = if h.v6 { 40 } else { 20 };
    if h.l4 != h.l3 + ip_len {
        return None;
    }
    // The quote: original IP header + 8 bytes. The new headers go in front of it.
    let quote = ip_len + 8;
    let grow = ip_len + 8; // new IP header + ICMP header
    let (data, end) = (ctx.data(), ctx.data_end());
    let delta = (h.l3 + quote) as i32 - (end - data) as i32;
    // SAFETY: resizing the frame of this program's context.
    unsafe {
        if delta != 0 && bpf_xdp_adjust_tail(ctx.as_ptr().cast(), delta) != 0 {
            return None;
        }
        if bpf_xdp_adjust_head(ctx.as_ptr().cast(), -(grow as i32)) != 0 {
            return None;
        }
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    // Old Ethernet header (and VLAN tag) now sits at `grow`; rebuild it at 0 with swapped MACs.
    let old = ptr_at::<[u8; 18]>(data, end, grow)?;
    // SAFETY: bounds checked.
    let e = unsafe { old.read_unaligned() };
    let mut eth = [0u8; 18];
    let mut i = 0;
    while i < 6 {
        eth[i] = e[6 + i];
        eth[6 + i] = e[i];
        i += 1;
    }
    let mut k = 12;
    while k < 18 {
        eth[k] = e[k]; // ethertype, or VLAN tag + ethertype
        k += 1;
    }
    if h.vlan {
        write(data, end, 0, eth)?;
    } else {
        let mut e14 = [0u8; 14];
        let mut j = 0;
        while j < 14 {
            e14[j] = eth[j];
            j += 1;
        }
        write(data, end, 0, e14)?;
    }
    let (src, dst) = (h.dst, h.src);
    let icmp_off = h.l3 + ip_len;
    if h.v6 {
        let icmp_len = (8 + quote) as u16;
        write(
            data,
            end,
            h.l3,
            ipv6_header(&src, &dst, IPPROTO_ICMPV6, icmp_len),
        )?;
        let q = ptr_at::<[u8; 48]>(data, end, icmp_off + 8)?;
        let r = kind.rest;
        let mut icmp = [kind.v6[0], kind.v6[1], 0, 0, r[0], r[1], r[2], r[3]];
        let sum =
            pseudo(&src, &dst, true, IPPROTO_ICMPV6, icmp_len) + sum_words::<24>(q as *const u8);
        let c = (!fold(sum + sum_bytes(&icmp))).to_ne_bytes();
        icmp[2] = c[0];
        icmp[3] = c[1];
        write(data, end, icmp_off, icmp)?;
    } else {
        write(
            data,
            end,
            h.l3,
            ipv4_header(&src, &dst, IPPROTO_ICMP, (20 + 8 + quote) as u16),
        )?;
        let q = ptr_at::<[u8; 28]>(data, end, icmp_off + 8)?;
        let r = kind.rest;
        let mut icmp = [kind.v4[0], kind.v4[1], 0, 0, r[0], r[1], r[2], r[3]];
        let c = (!fold(sum_words::<14>(q as *const u8) + sum_bytes(&icmp))).to_ne_bytes();
        icmp[2] = c[0];
        icmp[3] = c[1];
        write(data, end, icmp_off, icmp)?;
    }
    Some(XDP_TX)
}
