//! Header parsing for the north-south programs. Every read is bounds-checked against the real
//! header lengths (VLAN tag, IPv4 IHL and total length, IPv6 extension headers, TCP data
//! offset); L4 is never read at a fixed offset.

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, addr};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Fragment position of a datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    None,
    /// Offset 0 with more fragments: carries the L4 header.
    First,
    /// Offset > 0: no L4 header.
    Later,
}

/// Offsets are from the start of the frame (`data`).
#[derive(Clone, Copy)]
pub struct Hdr {
    pub l3: usize,
    pub l4: usize,
    /// End of the IP datagram (`l3 + total length`), <= data_end.
    pub l3_end: usize,
    pub v6: bool,
    pub vlan: bool,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub proto: u8,
    /// Network order; 0 for non-TCP/UDP and later fragments.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub frag: Frag,
    /// IPv4 identification (network order) for fragments.
    pub frag_id: u32,
}

/// Why a frame is left to the kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not IPv4/IPv6.
    NotIp,
    /// Malformed: truncated, IHL < 5, bad lengths, unparseable extension headers.
    Malformed,
}

const MAX_OFF: usize = 0x7ff;

/// A bounds-checked pointer to `T` at `off` bytes from `data`.
#[inline(always)]
pub fn ptr_at<T>(data: usize, end: usize, off: usize) -> Option<*mut T> {
    // Header offsets are small; the mask gives the verifier a bound even for offsets it cannot
    // track (see `maps::launder`).
    let start = data + (off & MAX_OFF);
    if start + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start as *mut T)
}

#[inline(always)]
fn rd<T: Copy>(data: usize, end: usize, off: usize) -> Option<T> {
    // SAFETY: bounds checked by ptr_at; unaligned because headers are not aligned.
    ptr_at::<T>(data, end, off).map(|p| unsafe { p.read_unaligned() })
}

/// A reference into the packet (no copy onto the stack).
#[inline(always)]
fn at<'a, const N: usize>(data: usize, end: usize, off: usize) -> Option<&'a [u8; N]> {
    // SAFETY: bounds checked by ptr_at; byte arrays have alignment 1.
    ptr_at::<[u8; N]>(data, end, off).map(|p| unsafe { &*p })
}

/// [`parse`] into `out` (a map slot): 0 parsed, 1 not IP, 2 malformed. A separate function so
/// its many paths end in one place (see `maps::parsed`).
#[inline(never)]
pub fn parse_into(data: usize, end: usize, len: usize, out: *mut Hdr) -> u32 {
    // SAFETY: `out` is a valid, exclusive per-CPU map slot.
    match parse(data, end, len, unsafe { &mut *out }) {
        Ok(()) => 0,
        Err(Skip::NotIp) => 1,
        Err(Skip::Malformed) => 2,
    }
}

/// Parses Ethernet (one optional 802.1Q/802.1ad tag), IPv4/IPv6 and the TCP/UDP ports.
/// `len` is the frame's real length: headers are read up to `end` (the directly readable
/// part), lengths are checked against `len` (a tc skb's payload may sit beyond `end`).
#[inline(always)]
pub fn parse(data: usize, end: usize, len: usize, h: &mut Hdr) -> Result<(), Skip> {
    let mut ethertype = u16::from_be(rd::<u16>(data, end, 12).ok_or(Skip::NotIp)?);
    let mut l3 = ETH_LEN;
    let mut vlan = false;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(rd::<u16>(data, end, 16).ok_or(Skip::NotIp)?);
        l3 += 4;
        vlan = true;
    }
    match ethertype {
        ETH_P_IP => parse_v4(data, end, len, l3, h)?,
        ETH_P_IPV6 => parse_v6(data, end, len, l3, h)?,
        _ => return Err(Skip::NotIp),
    }
    h.vlan = vlan;
    h.sport = 0;
    h.dport = 0;
    h.tcp_flags = 0;
    if h.frag == Frag::Later {
        return Ok(());
    }
    match h.proto {
        IPPROTO_TCP => {
            // Ports, data offset and flags: the whole fixed header must be in the datagram.
            let b: &[u8; 20] = at(data, end, h.l4).ok_or(Skip::Malformed)?;
            let doff = ((b[12] >> 4) as usize) * 4;
            if doff < 20 || (h.frag == Frag::None && h.l4 + doff > h.l3_end) || h.l4 + 20 > h.l3_end
            {
                return Err(Skip::Malformed);
            }
            h.sport = u16::from_ne_bytes([b[0], b[1]]);
            h.dport = u16::from_ne_bytes([b[2], b[3]]);
            h.tcp_flags = b[13];
        }
        IPPROTO_UDP => {
            let b: &[u8; 8] = at(data, end, h.l4).ok_or(Skip::Malformed)?;
            let len = u16::from_be_bytes([b[4], b[5]]) as usize;
            if h.l4 + 8 > h.l3_end || len < 8 || (h.frag == Frag::None && h.l4 + len != h.l3_end) {
                return Err(Skip::Malformed);
            }
            h.sport = u16::from_ne_bytes([b[0], b[1]]);
            h.dport = u16::from_ne_bytes([b[2], b[3]]);
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn parse_v4(data: usize, end: usize, len: usize, l3: usize, h: &mut Hdr) -> Result<(), Skip> {
    let b: &[u8; 20] = at(data, end, l3).ok_or(Skip::Malformed)?;
    let ihl = ((b[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([b[2], b[3]]) as usize;
    if b[0] >> 4 != 4 || ihl < 20 || tot < ihl || l3 + tot > len {
        return Err(Skip::Malformed);
    }
    let frag_field = u16::from_be_bytes([b[6], b[7]]);
    let frag = if frag_field & 0x1fff != 0 {
        Frag::Later
    } else if frag_field & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    h.l3 = l3;
    h.l4 = l3 + ihl;
    h.l3_end = l3 + tot;
    h.v6 = false;
    h.src = addr::from_v4_word(u32::from_ne_bytes([b[12], b[13], b[14], b[15]]));
    h.dst = addr::from_v4_word(u32::from_ne_bytes([b[16], b[17], b[18], b[19]]));
    h.proto = b[9];
    h.frag = frag;
    h.frag_id = u16::from_ne_bytes([b[4], b[5]]) as u32;
    Ok(())
}

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (left to the kernel as malformed-for-us).
const MAX_EXT_HDRS: usize = 4;

#[inline(always)]
fn parse_v6(data: usize, end: usize, len: usize, l3: usize, h: &mut Hdr) -> Result<(), Skip> {
    let b: &[u8; 40] = at(data, end, l3).ok_or(Skip::Malformed)?;
    let payload = u16::from_be_bytes([b[4], b[5]]) as usize;
    if b[0] >> 4 != 6 || l3 + 40 + payload > len {
        return Err(Skip::Malformed);
    }
    let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    h.l3 = l3;
    h.l4 = l3 + 40;
    h.l3_end = l3 + 40 + payload;
    h.v6 = true;
    h.src = [word(8), word(12), word(16), word(20)];
    h.dst = [word(24), word(28), word(32), word(36)];
    h.proto = b[6];
    h.frag = Frag::None;
    h.frag_id = 0;
    for _ in 0..MAX_EXT_HDRS {
        match h.proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                let e: &[u8; 2] = at(data, end, h.l4).ok_or(Skip::Malformed)?;
                let len = if h.proto == NEXTHDR_AUTH {
                    (e[1] as usize + 2) * 4
                } else {
                    (e[1] as usize + 1) * 8
                };
                h.proto = e[0];
                h.l4 += len;
            }
            NEXTHDR_FRAGMENT => {
                let e: &[u8; 8] = at(data, end, h.l4).ok_or(Skip::Malformed)?;
                let off_m = u16::from_be_bytes([e[2], e[3]]);
                h.frag = if off_m & 0xfff8 != 0 {
                    Frag::Later
                } else if off_m & 1 != 0 {
                    Frag::First
                } else {
                    Frag::None // atomic fragment
                };
                h.frag_id = u32::from_ne_bytes([e[4], e[5], e[6], e[7]]);
                h.proto = e[0];
                h.l4 += 8;
            }
            _ => break,
        }
        if h.l4 > h.l3_end {
            return Err(Skip::Malformed);
        }
    }
    if matches!(
        h.proto,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    ) {
        // Deeper chains than we walk: the kernel handles them untranslated.
        return Err(Skip::Malformed);
    }
    // Keep the verifier's view of the offset small.
    if h.l4 > 512 {
        return Err(Skip::Malformed);
    }
    Ok(())
}
