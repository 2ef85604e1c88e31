//! tc egress on the external interfaces: replies from local backends of translated flows
//! (DNAT without SNAT, e.g. externalTrafficPolicy: Local) leave with the frontend as source.
//! The kernel routed them here, so only the source address/port changes. Checksums go through
//! the skb helpers, which handle CHECKSUM_PARTIAL packets from local pods correctly.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    ct::{CT_F_REPLY, CT_F_SNAT},
    types::counter,
};

use crate::{
    ct, frag,
    maps::{config, count, parsed},
    nat::Tuple,
    parse::{Frag, Hdr, Skip},
};

#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let h = match parsed(ctx.data(), ctx.data_end(), ctx.len() as usize) {
        Ok(s) => &s.hdr,
        Err(Skip::NotIp) => return TC_ACT_OK,
        Err(Skip::Malformed) => {
            // Headers may sit beyond the linear part: pull them in once and retry.
            if ctx.pull_data(128.min(ctx.len())).is_err() {
                return TC_ACT_OK;
            }
            match parsed(ctx.data(), ctx.data_end(), ctx.len() as usize) {
                Ok(s) => &s.hdr,
                Err(_) => return TC_ACT_OK,
            }
        }
    };
    if h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP {
        return TC_ACT_OK;
    }
    if h.frag == Frag::Later {
        if let Some(f) = frag::lookup(h) {
            let _ = rewrite_src(ctx, h, &f.src, 0);
        }
        return TC_ACT_OK;
    }
    let Some(p) = ct::lookup(&ct::key_of(h)) else {
        return TC_ACT_OK;
    };
    // SAFETY: fields copied out of a live map value.
    let (flags, nat_addr, nat_port) = unsafe { ((*p).flags, (*p).nat_addr, (*p).nat_port) };
    if flags & CT_F_REPLY == 0 || flags & CT_F_SNAT != 0 {
        return TC_ACT_OK;
    }
    if let Some(cfg) = config() {
        ct::touch(p, cfg, h, ct::now());
    }
    if rewrite_src(ctx, h, &nat_addr, nat_port).is_some() {
        let to = Tuple {
            src: nat_addr,
            dst: h.dst,
            sport: nat_port,
            dport: h.dport,
        };
        frag::record(h, &to, flags);
        count(counter::TC_REV_XLATE);
    }
    TC_ACT_OK
}

/// Source address (and port, unless a later fragment) := `addr`/`port`.
#[inline(always)]
fn rewrite_src(ctx: &TcContext, h: &Hdr, addr: &[u32; 4], port: u16) -> Option<()> {
    let l4 = h.frag != Frag::Later;
    let (check, mangled) = if h.proto == IPPROTO_TCP {
        (h.l4 + 16, 0)
    } else {
        (h.l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
    if h.v6 {
        let mut i = 0;
        while i < 4 {
            if l4 {
                ctx.l4_csum_replace(check, u64::from(h.src[i]), u64::from(addr[i]), pseudo)
                    .ok()?;
            }
            i += 1;
        }
        ctx.store(h.l3 + 8, addr, 0).ok()?;
    } else {
        if l4 {
            ctx.l4_csum_replace(check, u64::from(h.src[3]), u64::from(addr[3]), pseudo)
                .ok()?;
        }
        ctx.l3_csum_replace(h.l3 + 10, u64::from(h.src[3]), u64::from(addr[3]), 4)
            .ok()?;
        ctx.store(h.l3 + 12, &addr[3], 0).ok()?;
    }
    if l4 {
        ctx.l4_csum_replace(check, u64::from(h.sport), u64::from(port), mangled | 2)
            .ok()?;
        ctx.store(h.l4, &port, 0).ok()?;
    }
    Some(())
}

/// tc ingress: XDP hands a translated packet to the kernel when the next hop's neighbour entry
/// is missing (bpf_fib_lookup NO_NEIGH). If it now carries one of this node's addresses as
/// source (SNAT, or a reply from a NodePort frontend), the kernel would drop it as martian; send
/// it on with bpf_redirect_neigh, which resolves the neighbour first.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Ok(s) = parsed(ctx.data(), ctx.data_end(), ctx.len() as usize) else {
        return TC_ACT_OK;
    };
    let h = &s.hdr;
    let Some(cfg) = config() else {
        return TC_ACT_OK;
    };
    let node = if h.v6 { &cfg.node_ip6 } else { &cfg.node_ip4 };
    if h.src != *node || h.dst == *node {
        return TC_ACT_OK;
    }
    // SAFETY: plain-old-data, all-zero is a valid request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = if h.v6 { 10 } else { 2 };
    p.l4_protocol = h.proto;
    p.__bindgen_anon_1.tot_len = (h.l3_end - h.l3) as u16;
    // SAFETY: context field read.
    p.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if h.v6 {
        p.__bindgen_anon_3.ipv6_src = h.src;
        p.__bindgen_anon_4.ipv6_dst = h.dst;
    } else {
        p.__bindgen_anon_3.ipv4_src = h.src[3];
        p.__bindgen_anon_4.ipv4_dst = h.dst[3];
    }
    // SAFETY: helper calls with a stack buffer of the declared size.
    unsafe {
        let rc = bpf_fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        );
        if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
            return TC_ACT_OK;
        }
        count(counter::XDP_FIB_MISS);
        bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32
    }
}
