//! Direct server return (`--lb-mode dsr`, IPv4): the node a client reached picks the backend
//! as usual, DNATs the packet to `pod:targetPort` keeping the client's source, and tunnels it
//! in IPIP to the backend's node. That node strips the tunnel in XDP, remembers the frontend
//! for the reply (a conntrack entry the tc egress program applies, as for local backends) and
//! hands the inner packet to the kernel. Replies leave the backend's node straight to the
//! client with the frontend as their source.
//!
//! The outer header carries the frontend (address and port) in an IPv4 option, because the
//! inner packet no longer has it and the backend's node cannot derive it (several frontends
//! may share one `pod:targetPort`): type 0x9e (copied, class 0, number 30, the RFC 4727
//! experimental value), length 8, port, address. Outer header: 28 bytes.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, addr,
    ct::{CT_F_DSR, CT_F_LOCAL, CT_F_REPLY, Config, CtKey, LB_MODE_DSR},
    types::counter,
};

use crate::{
    csum::fold,
    ct, fwd,
    maps::{CT, Scratch, count},
    mem,
    nat::{self, Tuple},
    parse::{Frag, Hdr, ptr_at},
};

pub const IPPROTO_IPIP: u8 = 4;
const OPT_FRONTEND: u8 = 0x9e;
const OPT_LEN: u8 = 8;
/// Bytes the tunnel adds: outer IPv4 header with the frontend option.
pub const ENCAP_LEN: usize = 28;
const AF_INET: u8 = 2;

/// Internal verdicts of [`encap`] for the entry point to finish (their answers need a frame of
/// their own): send the DSR flow's packet through the tunnel; answer "fragmentation needed".
pub const ENCAP: u32 = u32::MAX - 3;
pub const TOO_BIG: u32 = u32::MAX - 4;

/// Whether a new flow to backend node `node` may use the tunnel.
#[inline(always)]
pub fn eligible(cfg: &Config, h: &Hdr, node: &[u32; 4]) -> bool {
    cfg.lb_mode == LB_MODE_DSR
        && !h.v6
        && !h.vlan
        && h.frag == Frag::None
        && *node != [0; 4]
        && cfg.node_ip4 != [0; 4]
}

#[inline(always)]
fn sum20(b: &[u8; ENCAP_LEN]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < ENCAP_LEN {
        s += u64::from(u16::from_ne_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    s
}

/// The outer header: node -> backend's node, protocol IPIP, DF copied from the inner packet
/// (RFC 2003), the frontend option.
#[inline(always)]
fn outer(src: u32, dst: u32, tot: u16, df: u8, fe_addr: u32, fe_port: u16) -> [u8; ENCAP_LEN] {
    let (s, d, l) = (src.to_ne_bytes(), dst.to_ne_bytes(), tot.to_be_bytes());
    let (a, p) = (fe_addr.to_ne_bytes(), fe_port.to_ne_bytes());
    let mut b = [
        0x47,
        0,
        l[0],
        l[1],
        0,
        0,
        df,
        0,
        64,
        IPPROTO_IPIP,
        0,
        0,
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
        OPT_FRONTEND,
        OPT_LEN,
        p[0],
        p[1],
        a[0],
        a[1],
        a[2],
        a[3],
    ];
    let c = (!fold(sum20(&b))).to_ne_bytes();
    b[10] = c[0];
    b[11] = c[1];
    b
}

/// Front node: DNAT the packet of a DSR flow (`s.v`: backend, its node in `nat2_addr`) and
/// send it through the tunnel. The MTU is checked for the encapsulated size before anything is
/// changed: an oversize packet with DF gets "fragmentation needed" ([`TOO_BIG`], MTU in
/// `s.mtu`), one without DF is dropped (XDP cannot fragment); nothing leaves oversize.
#[inline(never)]
pub fn encap(ctx: &XdpContext, s: &mut Scratch, cfg: &Config) -> u32 {
    let h = &s.hdr;
    let (data, end) = (ctx.data(), ctx.data_end());
    if fwd::ttl_expired(data, end, h) {
        return crate::xdp::TTL_EXPIRED;
    }
    let inner_len = h.l3_end - h.l3;
    let Some(ff) = ptr_at::<[u8; 2]>(data, end, h.l3 + 6) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked.
    let df = unsafe { (*ff)[0] } & 0x40;
    let mut slot = MaybeUninit::<bpf_fib_lookup>::uninit();
    // SAFETY: plain-old-data, all-zero is a valid request.
    let p = unsafe { mem::zeroed_in(&mut slot) };
    p.family = AF_INET;
    p.l4_protocol = IPPROTO_IPIP;
    p.__bindgen_anon_1.tot_len = (inner_len + ENCAP_LEN) as u16;
    // SAFETY: context field read.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    p.ifindex = ingress;
    p.__bindgen_anon_3.ipv4_src = cfg.node_ip4[3];
    p.__bindgen_anon_4.ipv4_dst = s.v.nat2_addr[3];
    // SAFETY: helper call with a stack buffer of the declared size.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let resolved = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        count(counter::DSR_TOO_BIG);
        // SAFETY: the helper wrote the MTU into the union on this result.
        let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
        if df == 0 || (mtu as usize) <= ENCAP_LEN + 68 {
            return XDP_DROP;
        }
        s.mtu = mtu - ENCAP_LEN as u16;
        return TOO_BIG;
    }
    if !resolved && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        count(counter::XDP_FIB_MISS);
        return XDP_DROP;
    }
    let to = Tuple {
        src: h.src,
        sport: h.sport,
        dst: s.v.nat_addr,
        dport: s.v.nat_port,
    };
    let (fe_addr, fe_port) = (h.dst[3], h.dport);
    if nat::rewrite(data, end, h, &to).is_none() || fwd::decrement_ttl(data, end, h).is_none() {
        return XDP_DROP;
    }
    let Some(eth) = ptr_at::<[u8; 12]>(data, end, 0) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked.
    let old = unsafe { eth.read_unaligned() };
    // SAFETY: growing the head of this program's frame.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), -(ENCAP_LEN as i32)) } != 0 {
        return XDP_DROP;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let (Some(e), Some(o)) = (
        ptr_at::<[u8; 14]>(data, end, 0),
        ptr_at::<[u8; ENCAP_LEN]>(data, end, 14),
    ) else {
        return XDP_DROP;
    };
    let mut eh = [0u8; 14];
    let mut i = 0;
    while i < 6 {
        // Unresolved neighbour: keep the old MACs; the kernel (tc ingress) resolves it.
        eh[i] = if resolved { p.dmac[i] } else { old[i] };
        eh[6 + i] = if resolved { p.smac[i] } else { old[6 + i] };
        i += 1;
    }
    eh[12] = 0x08;
    let hdr = outer(
        cfg.node_ip4[3],
        s.v.nat2_addr[3],
        (inner_len + ENCAP_LEN) as u16,
        df,
        fe_addr,
        fe_port,
    );
    // SAFETY: bounds checked.
    unsafe {
        e.write_unaligned(eh);
        o.write_unaligned(hdr);
    }
    count(counter::DSR_ENCAP);
    if !resolved {
        XDP_PASS
    } else if p.ifindex == ingress {
        XDP_TX
    } else {
        // SAFETY: helper call.
        unsafe { bpf_redirect(p.ifindex, 0) as u32 }
    }
}

/// Backend node: a tunnelled packet for one of this node's pods. Anything that is not exactly
/// what [`encap`] builds (outer header to our node IP with the frontend option, unfragmented,
/// an inner IPv4 TCP/UDP packet without options) is left to the kernel untouched.
#[inline(never)]
pub fn decap(ctx: &XdpContext, s: &mut Scratch, cfg: &Config) -> u32 {
    decap_inner(ctx, s, cfg).unwrap_or(XDP_PASS)
}

#[allow(clippy::needless_borrows_for_generic_args)] // scratch pointers, see xdp::new_flow
#[inline(always)]
fn decap_inner(ctx: &XdpContext, s: &mut Scratch, cfg: &Config) -> Option<u32> {
    let h = &s.hdr;
    if cfg.lb_mode != LB_MODE_DSR
        || h.v6
        || h.vlan
        || h.frag != Frag::None
        || h.dst != cfg.node_ip4
        || h.l4 != h.l3 + ENCAP_LEN
    {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<[u8; 14]>(data, end, 0)?;
    // SAFETY: bounds checked.
    let e = unsafe { eth.read_unaligned() };
    let opt = ptr_at::<[u8; 8]>(data, end, h.l3 + 20)?;
    let ip = ptr_at::<[u8; 20]>(data, end, h.l4)?;
    let ports = ptr_at::<[u16; 2]>(data, end, h.l4 + 20)?;
    // SAFETY: bounds checked.
    let (o, ib, pw) = unsafe {
        (
            opt.read_unaligned(),
            ip.read_unaligned(),
            ports.read_unaligned(),
        )
    };
    let proto = ib[9];
    if o[0] != OPT_FRONTEND
        || o[1] != OPT_LEN
        || ib[0] != 0x45
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        || u16::from_be_bytes([ib[6], ib[7]]) & 0x3fff != 0
    {
        return None;
    }
    let tcp_flags = if proto == IPPROTO_TCP {
        let f = ptr_at::<[u8; 14]>(data, end, h.l4 + 20)?;
        // SAFETY: bounds checked.
        unsafe { (*f)[13] }
    } else {
        0
    };
    let fe_addr = addr::from_v4_word(u32::from_ne_bytes([o[4], o[5], o[6], o[7]]));
    let fe_port = u16::from_ne_bytes([o[2], o[3]]);
    let client = addr::from_v4_word(u32::from_ne_bytes([ib[12], ib[13], ib[14], ib[15]]));
    let pod = addr::from_v4_word(u32::from_ne_bytes([ib[16], ib[17], ib[18], ib[19]]));
    // The reply direction, as tc egress will see it: pod -> client, source := frontend.
    s.rkey = CtKey {
        src: pod,
        dst: client,
        sport: pw[1],
        dport: pw[0],
        proto,
        _pad: [0, 0, 0],
    };
    let now = ct::now();
    let known = match ct::lookup(&s.rkey) {
        // SAFETY: reads of a live map value.
        Some(p) => unsafe {
            let same = (*p).nat_addr == fe_addr && (*p).nat_port == fe_port;
            if same {
                ct::touch_with(p, cfg, proto, tcp_flags, now);
            }
            same
        },
        None => false,
    };
    if !known {
        ct::init(
            &mut s.r,
            cfg,
            proto,
            tcp_flags,
            now,
            CT_F_REPLY | CT_F_LOCAL | CT_F_DSR,
        );
        s.r.nat_addr = fe_addr;
        s.r.nat_port = fe_port;
        CT.insert(&s.rkey, &s.r, 0).ok()?;
    }
    // Strip the outer header: the Ethernet header moves up over it.
    // SAFETY: shrinking the head of this program's frame.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), ENCAP_LEN as i32) } != 0 {
        return Some(XDP_DROP);
    }
    let eth = ptr_at::<[u8; 14]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: bounds checked.
    unsafe { eth.write_unaligned(e) };
    count(counter::DSR_DECAP);
    Some(XDP_PASS)
}
