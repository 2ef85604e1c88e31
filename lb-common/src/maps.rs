//! Map names and capacities: the single definition used by the programs, the agent and tests.
//!
//! Kernel map names are cut at 15 bytes, so every name here stays within that.

/// Frontends: [`crate::SvcKey`] -> [`crate::SvcVal`].
pub const SERVICES: &str = "KPLB_SVC";
/// Backends by id: `u32` -> [`crate::Backend`].
pub const BACKENDS: &str = "KPLB_BACKENDS";
/// Maglev lookup tables: an array of slabs, each an mmapable inner array of
/// [`crate::MaglevSlot`]s holding many tables back to back. A frontend names its table by
/// location ([`table_loc`]) and size, so writing a table is a memory copy into free slab space
/// plus one frontend update: no map-in-map update (each of those waits for an RCU grace period).
pub const MAGLEV: &str = "KPLB_MAGLEV";
/// Socket-LB reverse translation of datagrams sent without `connect()`: [`crate::RevSkKey`]
/// -> [`crate::RevSkVal`] (LRU).
pub const REV_SK: &str = "KPLB_REV_SK";
/// Socket-LB reverse translation of connected sockets: socket-local storage holding a
/// [`crate::SkFrontend`].
pub const SK_FRONTEND: &str = "KPLB_SK_FE";
/// Per-CPU datapath counters indexed by [`crate::Counter`].
pub const STATS: &str = "KPLB_STATS";

/// North-south conntrack (LRU): [`crate::ct::CtKey`] -> [`crate::ct::CtVal`]. Capacity is
/// `--conntrack-max` (set at load time); this is the object's default.
pub const CT: &str = "KPLB_CT";
/// First fragments of translated datagrams: [`crate::ct::FragKey`] -> [`crate::ct::FragVal`].
pub const FRAG: &str = "KPLB_FRAG";
/// Runtime configuration, one [`crate::ct::Config`] at index 0.
pub const CONFIG: &str = "KPLB_CONFIG";
/// loadBalancerSourceRanges (LPM trie): [`crate::ct::SrcRangeKey`] -> `u8` (1).
pub const SRC_RANGES: &str = "KPLB_SRC_RANGE";

/// sessionAffinity: ClientIP (LRU): [`crate::AffinityKey`] -> [`crate::AffinityVal`].
pub const AFFINITY: &str = "KPLB_AFFINITY";
/// Per-service-port counters moved out of [`SVC_HOT`]: group id -> per-CPU
/// [`crate::SvcCounters`] (LRU).
pub const SVC_STATS: &str = "KPLB_SVC_STATS";
/// Per-service-port counters by slot (`group % SVC_HOT_SLOTS`): per-CPU [`crate::SvcSlot`]s,
/// counted into without a hash lookup.
pub const SVC_HOT: &str = "KPLB_SVC_HOT";

/// Per-CPU scratch slot of the north-south programs (parsed headers); private to one loaded
/// object, never pinned.
pub const SCRATCH: &str = "KPLB_SCRATCH";

/// Every map the agent pins under `--bpffs-dir`, in creation order.
pub const ALL: [&str; 13] = [
    SERVICES,
    BACKENDS,
    MAGLEV,
    REV_SK,
    SK_FRONTEND,
    STATS,
    CT,
    FRAG,
    CONFIG,
    SRC_RANGES,
    AFFINITY,
    SVC_STATS,
    SVC_HOT,
];

pub const DEFAULT_CT_MAX: u32 = 262_144;
pub const MAX_FRAGS: u32 = 16_384;
pub const MAX_SRC_RANGES: u32 = 16_384;

/// Frontends (`KPLB_SVC`). Allocated on demand (`BPF_F_NO_PREALLOC`), so the capacity only
/// costs its bucket array (16 bytes per entry) until it is used, and a deleted entry is freed
/// after an RCU grace period instead of being reused under a reader.
pub const MAX_SERVICES: u32 = 524_288;
/// Backends (`KPLB_BACKENDS`), allocated on demand like the frontends.
pub const MAX_BACKENDS: u32 = 262_144;
/// Group ids in the per-service counters (an LRU: idle groups may lose their counters).
pub const MAX_GROUPS: u32 = 65_536;
pub const MAX_REV_SK: u32 = 262_144;
/// Slots of [`SVC_HOT`] per CPU (groups with traffic beyond this share slots, taking them
/// over from each other).
pub const SVC_HOT_SLOTS: u32 = 4096;
/// Clients x services remembered for sessionAffinity (the least recently used go first).
pub const MAX_AFFINITY: u32 = 65_536;

/// `BPF_F_NO_PREALLOC`: hash map elements allocated on insert and freed after a grace period.
pub const BPF_F_NO_PREALLOC: u32 = 1 << 0;
/// `BPF_F_INNER_MAP`: lets inner arrays of one outer map differ in `max_entries`, so slabs can
/// grow geometrically.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: the agent writes tables through a shared mapping of the slab (a memory
/// copy instead of a syscall per slot).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of every Maglev slab (the template's and the agent's must be equal).
pub const MAGLEV_TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

/// Default Maglev table size (a prime) for groups with external frontends.
pub const MAGLEV_DEFAULT_SIZE: u32 = 16381;

/// A table location is `slab << MAGLEV_SLAB_SHIFT | first slot`: a slab holds at most
/// 2^20 slots, enough for the largest supported table (1048573).
pub const MAGLEV_SLAB_SHIFT: u32 = 20;
/// Slots a slab can address.
pub const MAGLEV_SLAB_MAX_SLOTS: u32 = 1 << MAGLEV_SLAB_SHIFT;
/// Slots of the first slab; later ones double up to [`MAGLEV_SLAB_MAX_SLOTS`] (8 MiB).
pub const MAGLEV_SLAB_MIN_SLOTS: u32 = 1 << 16;
/// Slabs the outer array holds: 4096 x 8 MiB = 32 GiB of tables at most.
pub const MAGLEV_MAX_SLABS: u32 = 4096;

/// The location of a table starting at slot `first` of slab `slab`.
#[inline(always)]
pub const fn table_loc(slab: u32, first: u32) -> u32 {
    slab << MAGLEV_SLAB_SHIFT | first
}

/// The slab of a table location.
#[inline(always)]
pub const fn loc_slab(loc: u32) -> u32 {
    loc >> MAGLEV_SLAB_SHIFT
}

/// The first slot (within its slab) of a table location.
#[inline(always)]
pub const fn loc_first(loc: u32) -> u32 {
    loc & (MAGLEV_SLAB_MAX_SLOTS - 1)
}
