//! tc egress on the external interfaces: replies from local backends of translated flows
//! (DNAT without SNAT, e.g. externalTrafficPolicy: Local) leave with the frontend as source.
//! The kernel routed them here, so only the source address/port changes. Checksums go through
//! the skb helpers, which handle CHECKSUM_PARTIAL packets from local pods correctly.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
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
    let h = match parsed(ctx.data(), ctx.data_end()) {
        Ok(s) => &s.hdr,
        Err(Skip::NotIp) => return TC_ACT_OK,
        Err(Skip::Malformed) => {
            // Headers may sit beyond the linear part: pull them in once and retry.
            if ctx.pull_data(128.min(ctx.len())).is_err() {
                return TC_ACT_OK;
            }
            match parsed(ctx.data(), ctx.data_end()) {
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
    // SAFETY: copied out of a live map value.
    let v = unsafe { *p };
    if v.flags & CT_F_REPLY == 0 || v.flags & CT_F_SNAT != 0 {
        return TC_ACT_OK;
    }
    if let Some(cfg) = config() {
        ct::touch(p, &v, cfg, h, ct::now());
    }
    if rewrite_src(ctx, h, &v.nat_addr, v.nat_port).is_some() {
        let to = Tuple {
            src: v.nat_addr,
            dst: h.dst,
            sport: v.nat_port,
            dport: h.dport,
        };
        frag::record(h, &to, v.flags);
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
