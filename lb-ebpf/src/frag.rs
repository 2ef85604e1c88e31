//! IP fragments: only the first fragment carries ports, so its translation is remembered by
//! (addresses, IP id, protocol) and applied to the later fragments. A later fragment with no
//! remembered first fragment (lost, reordered, not ours) goes to the kernel untouched.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use lb_common::{
    ct::{CT_F_LOCAL, FragKey, FragVal},
    types::counter,
};

use crate::{
    fwd,
    maps::{FRAGS, count},
    nat::{self, Tuple},
    parse::{Frag, Hdr},
};

#[inline(always)]
fn key(h: &Hdr) -> FragKey {
    FragKey {
        src: h.src,
        dst: h.dst,
        id: h.frag_id,
        proto: h.proto,
        _pad: [0, 0, 0],
    }
}

/// Remembers the translation of a first fragment.
#[inline(always)]
pub fn record(h: &Hdr, to: &Tuple, ct_flags: u8) {
    if h.frag != Frag::First {
        return;
    }
    let v = FragVal {
        src: to.src,
        dst: to.dst,
        flags: u32::from(ct_flags),
        _pad: 0,
    };
    // Losing this entry only loses the later fragments, which the kernel then drops.
    let _ = FRAGS.insert(key(h), v, 0);
}

/// The remembered translation for a later fragment, if any.
#[inline(always)]
pub fn lookup(h: &Hdr) -> Option<FragVal> {
    // SAFETY: copied out immediately.
    unsafe { FRAGS.get(key(h)).copied() }
}

/// XDP: applies a first fragment's translation to a later fragment.
#[inline(never)]
pub fn follow(ctx: &XdpContext, h: &Hdr) -> u32 {
    let Some(v) = lookup(h) else {
        return XDP_PASS;
    };
    let local = v.flags & u32::from(CT_F_LOCAL) != 0;
    if !local && fwd::ttl_expired(ctx.data(), ctx.data_end(), h) {
        // The kernel answers only first fragments; later ones just die.
        count(counter::XDP_TTL_EXCEEDED);
        return XDP_DROP;
    }
    let to = Tuple {
        src: v.src,
        dst: v.dst,
        sport: 0,
        dport: 0,
    };
    if nat::rewrite(ctx.data(), ctx.data_end(), h, &to).is_none() {
        return XDP_PASS;
    }
    count(counter::XDP_FRAG);
    if local {
        return XDP_PASS;
    }
    fwd::forward(ctx, h, &to)
}
