//! `#[repr(C)]` map keys and values. No `bool`, `Option` or enums inside: only integers with
//! explicit padding, so layouts cannot drift between the BPF target and the host.

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Frontend lookup scope. In-cluster sockets (cgroup hooks) use [`SCOPE_INTERNAL`]; packets
/// arriving on external interfaces (XDP) use [`SCOPE_EXTERNAL`], so `externalTrafficPolicy:
/// Local` can serve external clients from local endpoints while pods still reach all of them.
pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// A service frontend: address (IPv4 stored IPv4-mapped, see [`crate::addr`]), port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SvcKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// What a frontend resolves to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SvcVal {
    /// The frontend's group (one service port, family and endpoint selection): the key of its
    /// session-affinity pins, source ranges and per-service counters. Stable while the service
    /// exists, whatever happens to its table.
    pub group_id: u32,
    /// Where the group's Maglev table starts in [`crate::maps::MAGLEV`] (see
    /// [`crate::maps::table_loc`]). A table is written whole before any frontend points at it
    /// and never changes afterwards (except dropping previous owners), so a frontend value
    /// always describes a complete table: location, size and backend count change together in
    /// one atomic map update.
    pub table_loc: u32,
    /// Entries in that table (a prime). Slot = flow hash % table_size.
    pub table_size: u32,
    /// Usable backends behind the table. 0 means reject (ECONNREFUSED / RST / ICMP).
    pub backend_count: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// sessionAffinity: ClientIP's `timeoutSeconds`; 0 without affinity (then
    /// [`SVC_F_AFFINITY`] is clear too). A client's connections within this long of its last
    /// one stay on its backend (see [`AffinityKey`]).
    pub affinity_timeout: u32,
}

/// sessionAffinity: ClientIP (set exactly when `affinity_timeout` is non-zero). Clients are
/// pinned through [`crate::maps::AFFINITY`]; the XDP selection hash also ignores the client port,
/// so a client's first pick is the same on every node.
pub const SVC_F_AFFINITY: u32 = 1 << 0;
/// externalTrafficPolicy: Local (external scope): only local backends; with none, drop (other
/// nodes may have one) instead of rejecting.
pub const SVC_F_EXT_LOCAL: u32 = 1 << 1;
/// loadBalancerSourceRanges: the client must match the frontend group's entries in
/// [`crate::maps::SRC_RANGES`], else the packet is dropped.
pub const SVC_F_SRC_RANGES: u32 = 1 << 2;
/// Marker entry `{addr, port 0, proto 0, SCOPE_EXTERNAL}`: the address is a LoadBalancer or
/// external IP, so traffic to a port no service uses is rejected (not routed on).
pub const SVC_F_FRONTEND_IP: u32 = 1 << 3;

/// A backend (endpoint address + targetPort).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// The IP of the node the endpoint runs on (same family as `addr`; from the EndpointSlice's
    /// `nodeName` and that Node's addresses), or all zero when unknown or local. `--lb-mode
    /// dsr` tunnels to it; without it a remote backend is reached through SNAT.
    pub node: [u32; 4],
}

/// The endpoint runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;
/// The endpoint is serving but terminating (used only when no ready endpoint exists).
pub const BACKEND_F_TERMINATING: u8 = 1 << 1;

/// One Maglev table slot. Kernel arrays round elements up to 8 bytes anyway, so the previous
/// owner (kept for a bounded window after a change) costs no extra memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MaglevSlot {
    /// Backend id owning this slot.
    pub backend: u32,
    /// Backend id that owned it before the last change, or 0.
    pub prev: u32,
}

/// Socket-LB reverse translation key: the socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevSkKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// The frontend the application addressed, restored by recvmsg/getpeername.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevSkVal {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// A connected socket's translation, in the socket's own storage ([`crate::maps::SK_FRONTEND`]):
/// what it connected to and what that became. Lives exactly as long as the socket, and reading
/// it back touches only the socket, not a shared hash table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SkFrontend {
    pub frontend: [u32; 4],
    pub backend: [u32; 4],
    /// Network byte order.
    pub frontend_port: u16,
    /// Network byte order; 0 when the socket was connected again, elsewhere.
    pub backend_port: u16,
    pub _pad: [u8; 4],
}

/// sessionAffinity: ClientIP entry in [`crate::maps::AFFINITY`]: one client of one Maglev group.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// [`AFFINITY_CLIENT_IP`]: the source address (16-byte form). [`AFFINITY_NETNS`]: the
    /// client's network namespace cookie in words 0 (low) and 1 (high), words 2 and 3 zero.
    pub client: [u32; 4],
    pub group_id: u32,
    /// `AFFINITY_*`: which kind of client identity `client` holds.
    pub kind: u32,
}

/// XDP path: clients are source addresses.
pub const AFFINITY_CLIENT_IP: u32 = 0;
/// Socket path: clients are network namespaces (a pod; the host network is one client).
pub const AFFINITY_NETNS: u32 = 1;

/// The backend a client is pinned to and when it last connected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityVal {
    /// Backend id (valid while it still exists in [`crate::maps::BACKENDS`]; the agent purges
    /// entries whose backend left the group).
    pub backend_id: u32,
    pub _pad: u32,
    /// `CLOCK_MONOTONIC` (bpf_ktime_get_ns) of the client's last connection to the service.
    pub last_ns: u64,
}

/// Per-service-port traffic (per CPU), in [`SvcSlot`]s and keyed by group id in
/// [`crate::maps::SVC_STATS`]: packets and bytes the XDP path translated towards backends, and
/// connections the socket and XDP paths balanced.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcCounters {
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

/// A slot of [`crate::maps::SVC_HOT`] (per CPU, index `group % SVC_HOT_SLOTS`): the counters
/// of group `group` since it took the slot. A group that finds another one in its slot moves
/// that one's counters to [`crate::maps::SVC_STATS`] and takes the slot over; a group's total
/// is its slots plus its `SVC_STATS` entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcSlot {
    /// Group id; 0 for a slot never taken (ids are never 0).
    pub group: u32,
    pub _pad: u32,
    pub counters: SvcCounters,
}

/// Indices into the per-CPU [`crate::maps::STATS`] array.
pub mod counter {
    /// connect/sendmsg rewrote a frontend to a backend.
    pub const SOCK_XLATE: u32 = 0;
    /// connect/sendmsg refused: frontend without usable backends.
    pub const SOCK_REJECT: u32 = 1;
    /// recvmsg/getpeername restored a frontend address.
    pub const SOCK_REV_XLATE: u32 = 2;
    /// Frontend found but its table or backend entry was missing (transient during sync).
    pub const SOCK_MISS: u32 = 3;
    /// XDP: a new flow was translated (conntrack entry created).
    pub const XDP_NEW: u32 = 4;
    /// XDP/tc: a conntrack hit was translated.
    pub const XDP_CT_HIT: u32 = 5;
    /// XDP: RST / ICMP unreachable sent for a frontend without endpoints or an unknown port.
    pub const XDP_REJECT: u32 = 6;
    /// XDP: dropped (no local endpoint with policy Local, source range, unused service IP).
    pub const XDP_DROP: u32 = 7;
    /// XDP: malformed packet to a frontend, or a fragment without a tracked first fragment.
    pub const XDP_BAD: u32 = 8;
    /// XDP: a later fragment followed its first fragment's translation.
    pub const XDP_FRAG: u32 = 9;
    /// XDP: FIB lookup failed for a translated packet; handed to the kernel.
    pub const XDP_FIB_MISS: u32 = 10;
    /// tc egress: a reply from a local backend got the frontend as its source.
    pub const TC_REV_XLATE: u32 = 11;
    /// ICMP error about a translated flow was translated back.
    pub const ICMP_XLATE: u32 = 12;
    /// No free SNAT port for a new flow (dropped).
    pub const SNAT_EXHAUSTED: u32 = 13;
    /// XDP: a packet to be routed on had TTL / hop limit <= 1 (time exceeded sent, or dropped).
    pub const XDP_TTL_EXCEEDED: u32 = 14;
    /// DSR: a packet was IPIP-encapsulated to its backend's node.
    pub const DSR_ENCAP: u32 = 15;
    /// DSR: a tunnelled packet was decapsulated for a local backend.
    pub const DSR_DECAP: u32 = 16;
    /// DSR: a packet too big to encapsulate (ICMP frag needed sent, or dropped without DF).
    pub const DSR_TOO_BIG: u32 = 17;
    pub const COUNT: u32 = 32;
}

const _: () = {
    assert!(core::mem::size_of::<SvcKey>() == 20);
    assert!(core::mem::size_of::<SvcVal>() == 24);
    assert!(core::mem::size_of::<AffinityKey>() == 24);
    assert!(core::mem::size_of::<AffinityVal>() == 16);
    assert!(core::mem::size_of::<Backend>() == 36);
    assert!(core::mem::size_of::<RevSkKey>() == 32);
    assert!(core::mem::size_of::<RevSkVal>() == 20);
    assert!(core::mem::size_of::<MaglevSlot>() == 8);
    assert!(core::mem::size_of::<SvcCounters>() == 24);
    assert!(core::mem::size_of::<SvcSlot>() == 32);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) integer aggregates without implicit padding (the size
    // assertions above pin their layout), so every bit pattern is valid.
    unsafe impl aya::Pod for super::SvcKey {}
    unsafe impl aya::Pod for super::SvcVal {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevSkKey {}
    unsafe impl aya::Pod for super::RevSkVal {}
    unsafe impl aya::Pod for super::MaglevSlot {}
    unsafe impl aya::Pod for super::SvcCounters {}
    unsafe impl aya::Pod for super::SvcSlot {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityVal {}
}
