//! Test-side packet builder and checker: its own RFC 1071 checksums, written independently of
//! the datapath's incremental updates, so a fixture's expected bytes prove the program right.

#![allow(dead_code)]

use std::net::IpAddr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// RFC 1071 one's complement sum of `data` (odd length padded with zero).
pub fn sum(data: &[u8]) -> u32 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    s
}

pub fn finish(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data))
}

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut p = ip_bytes(src);
    p.extend(ip_bytes(dst));
    if src.is_ipv4() {
        p.extend([0, proto]);
        p.extend((len as u16).to_be_bytes());
    } else {
        p.extend((len as u32).to_be_bytes());
        p.extend([0, 0, 0, proto]);
    }
    sum(&p)
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Zero UDP checksum (IPv4 only).
    UdpNoCsum {
        sport: u16,
        dport: u16,
    },
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;

/// A frame description; `build` produces bytes with correct checksums.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options (multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv6 extension header (destination options) of 8 bytes before L4.
    pub v6_dest_opts: bool,
    pub ip_id: u16,
    pub ttl: u8,
}

impl Pkt {
    pub fn new(src: &str, dst: &str, l4: L4) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            vlan: None,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            l4,
            payload: Vec::new(),
            ip_options: Vec::new(),
            v6_dest_opts: false,
            ip_id: 0x1234,
            ttl: 64,
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                seq: 1000,
                ack: if flags & ACK != 0 { 5000 } else { 0 },
                flags,
            },
        )
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport }).payload(b"hostname")
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } | L4::UdpNoCsum { .. } => 17,
            L4::Raw { proto, .. } => proto,
        }
    }

    /// The L4 segment (header + payload) with its checksum.
    pub fn segment(&self) -> Vec<u8> {
        let mut seg = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
            } => {
                let mut t = Vec::new();
                t.extend(sport.to_be_bytes());
                t.extend(dport.to_be_bytes());
                t.extend(seq.to_be_bytes());
                t.extend(ack.to_be_bytes());
                t.extend([0x50, *flags]);
                t.extend(64240u16.to_be_bytes());
                t.extend([0, 0, 0, 0]);
                t
            }
            L4::Udp { sport, dport } | L4::UdpNoCsum { sport, dport } => {
                let mut u = Vec::new();
                u.extend(sport.to_be_bytes());
                u.extend(dport.to_be_bytes());
                u.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                u.extend([0, 0]);
                u
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        };
        seg.extend(&self.payload);
        let off = match self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            _ => None,
        };
        if let Some(off) = off {
            let mut c = finish(pseudo(self.src, self.dst, self.proto(), seg.len()) + sum(&seg));
            if c == 0 && self.proto() == 17 {
                c = 0xffff;
            }
            seg[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        seg
    }

    /// The IP packet (header + segment).
    pub fn ip(&self) -> Vec<u8> {
        let seg = self.segment();
        self.ip_with(&seg, 0)
    }

    /// An IP header around `body`; `frag` is the IPv4 flags/offset field.
    pub fn ip_with(&self, body: &[u8], frag: u16) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let ihl = 20 + self.ip_options.len();
                let mut h = vec![(0x40 | (ihl / 4)) as u8, 0];
                h.extend(((ihl + body.len()) as u16).to_be_bytes());
                h.extend(self.ip_id.to_be_bytes());
                h.extend(frag.to_be_bytes());
                h.extend([self.ttl, self.proto(), 0, 0]);
                h.extend(s.octets());
                h.extend(d.octets());
                h.extend(&self.ip_options);
                let c = checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h.extend(body);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext = if self.v6_dest_opts { 8 } else { 0 };
                let mut h = vec![0x60, 0, 0, 0];
                h.extend(((ext + body.len()) as u16).to_be_bytes());
                h.extend([if self.v6_dest_opts { 60 } else { self.proto() }, self.ttl]);
                h.extend(s.octets());
                h.extend(d.octets());
                if self.v6_dest_opts {
                    // Next header, length 0 (8 bytes), PadN option of 4 bytes.
                    h.extend([self.proto(), 0, 1, 4, 0, 0, 0, 0]);
                }
                h.extend(body);
                h
            }
            _ => panic!("mixed address families"),
        }
    }

    pub fn eth(&self, ip: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        if let Some(tci) = self.vlan {
            f.extend([0x81, 0x00]);
            f.extend(tci.to_be_bytes());
        }
        f.extend(if self.src.is_ipv4() {
            [0x08, 0x00]
        } else {
            [0x86, 0xdd]
        });
        f.extend(ip);
        f
    }

    pub fn build(&self) -> Vec<u8> {
        self.eth(&self.ip())
    }
}

/// Independent verification of every checksum in an Ethernet frame: the IPv4 header, and the
/// TCP/UDP/ICMP/ICMPv6 checksum of unfragmented packets. Returns a description of the first
/// bad one.
pub fn verify(frame: &[u8]) -> Result<(), String> {
    let mut off = 12;
    let mut et = u16::from_be_bytes([frame[off], frame[off + 1]]);
    if et == 0x8100 {
        off += 4;
        et = u16::from_be_bytes([frame[off], frame[off + 1]]);
    }
    let l3 = off + 2;
    let ip = &frame[l3..];
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match et {
        0x0800 => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            if checksum(&ip[..ihl]) != 0 {
                return Err("IPv4 header checksum".into());
            }
            let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if frag & 0x3fff != 0 {
                return Ok(()); // fragment: L4 checksum spans all fragments
            }
            let s: [u8; 4] = ip[12..16].try_into().unwrap();
            let d: [u8; 4] = ip[16..20].try_into().unwrap();
            (s.into(), d.into(), ip[9], &ip[ihl..tot])
        }
        0x86dd => {
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s: [u8; 16] = ip[8..24].try_into().unwrap();
            let d: [u8; 16] = ip[24..40].try_into().unwrap();
            let mut nh = ip[6];
            let mut o = 40;
            if nh == 60 {
                nh = ip[o];
                o += (usize::from(ip[o + 1]) + 1) * 8;
            }
            (s.into(), d.into(), nh, &ip[o..40 + plen])
        }
        _ => return Ok(()),
    };
    let ok = match proto {
        6 | 17 | 58 => {
            if proto == 17 && src.is_ipv4() && l4[6] == 0 && l4[7] == 0 {
                true
            } else {
                finish(pseudo(src, dst, proto, l4.len()) + sum(l4)) == 0
            }
        }
        1 => checksum(l4) == 0,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("L4 checksum (proto {proto})"))
    }
}

/// An ICMP (IPv4) or ICMPv6 error `from` -> `to` of type `ty`, code `code`, with the 4 bytes
/// after the checksum set to `rest`, quoting `quote`; checksum computed here (ICMPv6 over its
/// pseudo header). MACs: node -> client, like an answer sent back out.
pub fn icmp_error(from: &str, to: &str, ty: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Pkt {
    let mut body = vec![ty, code, 0, 0];
    body.extend(rest);
    body.extend(quote);
    let src: IpAddr = from.parse().unwrap();
    let dst: IpAddr = to.parse().unwrap();
    let (proto, c) = if src.is_ipv4() {
        (1, checksum(&body))
    } else {
        (58, finish(pseudo(src, dst, 58, body.len()) + sum(&body)))
    };
    body[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = Pkt::new(from, to, L4::Raw { proto, bytes: body });
    p.src_mac = NODE_MAC;
    p.dst_mac = CLIENT_MAC;
    p
}
