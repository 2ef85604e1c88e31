//! Connection tracking, fragment tracking, runtime configuration and source-range keys for the
//! north-south (XDP/tc) datapath. Layouts follow the same rules as [`crate::types`].

/// A flow as seen in one direction: addresses in the shared 16-byte form, ports in network
/// order. The same struct keys the original direction (client -> frontend) and the reply
/// direction (backend -> node/client) of a translated flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// What to do with a packet matching a [`CtKey`].
///
/// Original direction (`CT_F_REPLY` clear): destination := `nat`, and with `CT_F_SNAT` also
/// source := `nat2`. Reply direction (`CT_F_REPLY` set): source := `nat`, and with `CT_F_SNAT`
/// also destination := `nat2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtVal {
    pub nat_addr: [u32; 4],
    pub nat2_addr: [u32; 4],
    /// `CLOCK_MONOTONIC` (bpf_ktime_get_ns) nanoseconds after which the entry is dead: the
    /// datapath treats it as a miss and the agent's GC deletes it.
    pub expires: u64,
    /// Backend the flow is pinned to (checked to still exist, see `backends_gen`).
    pub backend_id: u32,
    /// Network order.
    pub nat_port: u16,
    /// Network order.
    pub nat2_port: u16,
    /// `CT_*` state.
    pub state: u8,
    /// `CT_F_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// The [`Config::backends_gen`] at which `backend_id` was last seen to exist: a hit looks
    /// the backend up again only once the agent has removed backends since.
    pub backends_gen: u32,
    /// Where the flow's translated packets leave this node (routed flows; unused for local
    /// backends).
    pub hop: NextHop,
}

/// A `bpf_fib_lookup` result kept with a routed flow, so its packets are not looked up one by
/// one. It is looked up again once `until` has passed (routes and neighbours change), for a
/// packet arriving on another interface, and for one longer than `mtu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NextHop {
    /// `CLOCK_MONOTONIC` nanoseconds until which it is used as it is; 0 when nothing is cached.
    pub until: u64,
    /// The interface the lookup was made for (the packet's ingress).
    pub iif: u32,
    /// The interface the packet leaves through.
    pub oif: u32,
    /// Destination MAC, then source MAC.
    pub macs: [u8; 12],
    /// The route's MTU.
    pub mtu: u16,
    pub _pad: [u8; 2],
}

pub const CT_F_REPLY: u8 = 1 << 0;
pub const CT_F_SNAT: u8 = 1 << 1;
/// The backend runs on this node: hand the translated packet to the kernel.
pub const CT_F_LOCAL: u8 = 1 << 2;
/// Sent to the backend's node IPIP-encapsulated (DSR).
pub const CT_F_DSR: u8 = 1 << 3;

/// TCP SYN seen, no reply yet (or a UDP flow).
pub const CT_NEW: u8 = 0;
pub const CT_ESTABLISHED: u8 = 1;
/// FIN or RST seen.
pub const CT_CLOSING: u8 = 2;
pub const CT_UDP: u8 = 3;

/// First fragment of a translated datagram, keyed by what later fragments carry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// IPv4 identification (network order, zero-extended).
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The L3 rewrite the first fragment got; later fragments get the same one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragVal {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// `CT_F_*` of the flow (`CT_F_LOCAL`: pass to the kernel, else forward).
    pub flags: u32,
    pub _pad: u32,
}

/// `Config.lb_mode`.
pub const LB_MODE_SNAT: u8 = 0;
pub const LB_MODE_DSR: u8 = 1;

/// `Config.flags`: the service CIDR entries are set (addresses in them that are no frontend are
/// dropped instead of routed out).
pub const CFG_F_SVC_CIDR: u8 = 1 << 0;

/// Runtime settings written by the agent (single-entry array); changing them needs no reload.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// SNAT source for IPv4 flows (IPv4-mapped), or all zero for none.
    pub node_ip4: [u32; 4],
    /// SNAT source for IPv6 flows, or all zero.
    pub node_ip6: [u32; 4],
    /// Up to two service CIDRs (one per family): `dst & mask == net`. Unused: mask and net 0
    /// with `CFG_F_SVC_CIDR` clear.
    pub svc_net: [[u32; 4]; 2],
    pub svc_mask: [[u32; 4]; 2],
    pub timeout_syn_s: u32,
    pub timeout_established_s: u32,
    pub timeout_closing_s: u32,
    pub timeout_udp_s: u32,
    /// SNAT source ports, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub lb_mode: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Moves on (wrapping) after the agent removes backends, and whenever it writes the
    /// configuration (a previous agent may have removed some without saying so): conntrack
    /// hits check that their backend still exists only when this differs from their entry's.
    pub backends_gen: u32,
}

/// Key data of the source-range LPM trie: the frontend's group id (always fully matched) then
/// the client address. Prefix length = 32 + address prefix (+96 for IPv4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SrcRangeKey {
    /// Group id in network order, so the trie's bitwise prefix matches it first.
    pub group_be: u32,
    pub addr: [u32; 4],
}

const _: () = {
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtVal>() == 88);
    assert!(core::mem::size_of::<NextHop>() == 32);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragVal>() == 40);
    assert!(core::mem::size_of::<Config>() == 124);
    assert!(core::mem::size_of::<SrcRangeKey>() == 20);
};

impl CtKey {
    /// The key the other direction of this entry's flow is stored under (for the agent's GC).
    pub const fn twin(&self, v: &CtVal) -> CtKey {
        let snat = v.flags & CT_F_SNAT != 0;
        if v.flags & CT_F_REPLY == 0 {
            // Reply: backend -> (node if SNAT else client).
            let (dst, dport) = if snat {
                (v.nat2_addr, v.nat2_port)
            } else {
                (self.src, self.sport)
            };
            CtKey {
                src: v.nat_addr,
                dst,
                sport: v.nat_port,
                dport,
                proto: self.proto,
                _pad: [0; 3],
            }
        } else {
            // Original: client -> frontend.
            let (src, sport) = if snat {
                (v.nat2_addr, v.nat2_port)
            } else {
                (self.dst, self.dport)
            };
            CtKey {
                src,
                dst: v.nat_addr,
                sport,
                dport: v.nat_port,
                proto: self.proto,
                _pad: [0; 3],
            }
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) integer aggregates without implicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtVal {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragVal {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SrcRangeKey {}
}
