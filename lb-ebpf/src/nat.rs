//! In-place address/port translation with incremental checksum updates (XDP: no checksum
//! offload state, the packet holds complete checksums).

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    csum::Diff,
    parse::{Frag, Hdr, ptr_at},
};

/// The addresses and ports a packet should carry after translation.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
fn write_addr(data: usize, end: usize, off: usize, a: &[u32; 4], v6: bool) -> Option<()> {
    if v6 {
        let p = ptr_at::<[u32; 4]>(data, end, off)?.cast::<u32>();
        // SAFETY: bounds checked. Word by word: a whole-array write would be a call to an
        // out-of-line memmove (see `mem`).
        unsafe {
            p.write_unaligned(a[0]);
            p.add(1).write_unaligned(a[1]);
            p.add(2).write_unaligned(a[2]);
            p.add(3).write_unaligned(a[3]);
        }
    } else {
        let p = ptr_at::<u32>(data, end, off)?;
        // SAFETY: bounds checked.
        unsafe { p.write_unaligned(a[3]) };
    }
    Some(())
}

/// Rewrites `h`'s packet to carry `to`. Later fragments only get the L3 change (their L4
/// checksum lives in the first fragment, which got the pseudo-header change).
#[inline(always)]
pub fn rewrite(data: usize, end: usize, h: &Hdr, to: &Tuple) -> Option<()> {
    let mut l3 = Diff::new();
    l3.addr(&h.src, &to.src, h.v6);
    l3.addr(&h.dst, &to.dst, h.v6);
    let (src_off, dst_off) = if h.v6 { (8, 24) } else { (12, 16) };
    write_addr(data, end, h.l3 + src_off, &to.src, h.v6)?;
    write_addr(data, end, h.l3 + dst_off, &to.dst, h.v6)?;
    if !h.v6 {
        let c = ptr_at::<u16>(data, end, h.l3 + 10)?;
        // SAFETY: bounds checked.
        unsafe { c.write_unaligned(l3.apply(c.read_unaligned())) };
    }
    if h.frag == Frag::Later {
        return Some(());
    }
    let check_off = match h.proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => return Some(()),
    };
    let mut l4 = l3;
    l4.word(h.sport, to.sport);
    l4.word(h.dport, to.dport);
    let ports = ptr_at::<[u16; 2]>(data, end, h.l4)?;
    let c = ptr_at::<u16>(data, end, h.l4 + check_off)?;
    // SAFETY: bounds checked.
    unsafe {
        ports.write_unaligned([to.sport, to.dport]);
        let old = c.read_unaligned();
        if h.proto == IPPROTO_UDP && !h.v6 && old == 0 {
            return Some(()); // IPv4 UDP without checksum stays without
        }
        let mut new = l4.apply(old);
        if h.proto == IPPROTO_UDP && new == 0 {
            new = 0xffff;
        }
        c.write_unaligned(new);
    }
    Some(())
}
