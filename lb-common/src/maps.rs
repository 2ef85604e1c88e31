//! Map names and capacities: the single definition used by the programs, the agent and tests.
//!
//! Kernel map names are cut at 15 bytes, so every name here stays within that.

/// Frontends: [`crate::SvcKey`] -> [`crate::SvcVal`].
pub const SERVICES: &str = "KPLB_SVC";
/// Backends by id: `u32` -> [`crate::Backend`].
pub const BACKENDS: &str = "KPLB_BACKENDS";
/// Per-group Maglev lookup tables: `u32` group id -> inner `Array<u32>` of backend ids.
pub const MAGLEV: &str = "KPLB_MAGLEV";
/// Socket-LB reverse translation: [`crate::RevSkKey`] -> [`crate::RevSkVal`].
pub const REV_SK: &str = "KPLB_REV_SK";
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
/// Per-service-port counters: group id -> per-CPU [`crate::SvcCounters`].
pub const SVC_STATS: &str = "KPLB_SVC_STATS";

/// Per-CPU scratch slot of the north-south programs (parsed headers); private to one loaded
/// object, never pinned.
pub const SCRATCH: &str = "KPLB_SCRATCH";

/// Every map the agent pins under `--bpffs-dir`, in creation order.
pub const ALL: [&str; 11] = [
    SERVICES, BACKENDS, MAGLEV, REV_SK, STATS, CT, FRAG, CONFIG, SRC_RANGES, AFFINITY, SVC_STATS,
];

pub const DEFAULT_CT_MAX: u32 = 262_144;
pub const MAX_FRAGS: u32 = 16_384;
pub const MAX_SRC_RANGES: u32 = 16_384;

pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
pub const MAX_GROUPS: u32 = 65_536;
pub const MAX_REV_SK: u32 = 262_144;
/// Clients x services remembered for sessionAffinity (the least recently used go first).
pub const MAX_AFFINITY: u32 = 65_536;

/// `BPF_F_INNER_MAP`: lets inner arrays of one outer map differ in `max_entries`, so each service
/// can have its own Maglev table size.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: the agent fills a new table with one memory copy instead of a syscall per
/// slot (the table is not reachable by programs until it is swapped in).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of every Maglev inner table (the template's and the agent's must be equal).
pub const MAGLEV_TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

/// Default Maglev table size (a prime); also the inner-map template's size.
pub const MAGLEV_DEFAULT_SIZE: u32 = 16381;
