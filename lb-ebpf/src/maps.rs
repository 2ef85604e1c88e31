//! Every map of the datapath, declared once with BTF definitions (structured `bpftool map dump`).
//! Names and capacities come from `lb_common::maps`; the agent pins each under `--bpffs-dir`.

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    btf_maps::{
        Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, SkStorage,
    },
    macros::btf_map,
};
use lb_common::{
    AffinityKey, AffinityVal, Backend, MaglevSlot, RevSkKey, RevSkVal, SkFrontend, SvcCounters,
    SvcKey, SvcSlot, SvcVal,
    ct::{Config, CtKey, CtVal, FragKey, FragVal, SrcRangeKey},
    maps::{
        BPF_F_NO_PREALLOC, DEFAULT_CT_MAX, MAGLEV_MAX_SLABS, MAGLEV_SLAB_MIN_SLOTS,
        MAGLEV_TABLE_FLAGS, MAX_AFFINITY, MAX_BACKENDS, MAX_FRAGS, MAX_GROUPS, MAX_REV_SK,
        MAX_SERVICES, MAX_SRC_RANGES, SVC_HOT_SLOTS,
    },
    types::counter,
};

use crate::{
    mem,
    nat::Tuple,
    parse::{Hdr, Skip, parse_into},
};

#[btf_map(name = "KPLB_SVC")]
pub static SERVICES: HashMap<
    SvcKey,
    SvcVal,
    { MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map(name = "KPLB_BACKENDS")]
pub static BACKENDS: HashMap<
    u32,
    Backend,
    { MAX_BACKENDS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The inner template only fixes the type; `BPF_F_INNER_MAP` lets slabs differ in size.
pub type MaglevSlab =
    Array<MaglevSlot, { MAGLEV_SLAB_MIN_SLOTS as usize }, { MAGLEV_TABLE_FLAGS as usize }>;

/// Slabs of Maglev tables; a frontend's `table_loc` names its slab and first slot.
#[btf_map(name = "KPLB_MAGLEV")]
pub static MAGLEV: ArrayOfMaps<MaglevSlab, { MAGLEV_MAX_SLABS as usize }> = ArrayOfMaps::new();

#[btf_map(name = "KPLB_REV_SK")]
pub static REV_SK: LruHashMap<RevSkKey, RevSkVal, { MAX_REV_SK as usize }> = LruHashMap::new();

#[btf_map(name = "KPLB_SK_FE")]
pub static SK_FRONTEND: SkStorage<SkFrontend> = SkStorage::new();

#[btf_map(name = "KPLB_STATS")]
pub static STATS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

/// North-south conntrack; the agent sets the real capacity (`--conntrack-max`) at load time.
/// Per-CPU LRU lists: inserts of new flows never contend on one global list lock.
#[btf_map(name = "KPLB_CT")]
pub static CT: LruHashMap<
    CtKey,
    CtVal,
    { DEFAULT_CT_MAX as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

#[btf_map(name = "KPLB_FRAG")]
pub static FRAGS: LruHashMap<FragKey, FragVal, { MAX_FRAGS as usize }> = LruHashMap::new();

#[btf_map(name = "KPLB_CONFIG")]
pub static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "KPLB_SRC_RANGE")]
pub static SRC_RANGES: LpmTrie<SrcRangeKey, u8, { MAX_SRC_RANGES as usize }> = LpmTrie::new();

/// sessionAffinity: ClientIP: the backend each client was last sent to, per group.
#[btf_map(name = "KPLB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityVal, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// Per-service-port counters, counted into by slot (`SvcSlot`): a per-CPU array lookup per
/// packet instead of a hash lookup.
#[btf_map(name = "KPLB_SVC_HOT")]
static SVC_HOT: PerCpuArray<SvcSlot, { SVC_HOT_SLOTS as usize }> = PerCpuArray::new();

/// Counters moved out of `SVC_HOT` when another group took their slot. Group ids are not
/// dense, so a per-CPU LRU hash (an idle service's entry may be evicted: counters are best
/// effort, like any Prometheus counter reset).
#[btf_map(name = "KPLB_SVC_STATS")]
static SVC_STATS: LruPerCpuHashMap<u32, SvcCounters, { MAX_GROUPS as usize }> =
    LruPerCpuHashMap::new();

/// Adds to group `group`'s counters on this CPU.
#[inline(always)]
pub fn account(group: u32, packets: u64, bytes: u64, connections: u64) {
    let Some(slot) = SVC_HOT.get_ptr_mut(group % SVC_HOT_SLOTS) else {
        return;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        if (*slot).group != group {
            if (*slot).group != 0 {
                move_out((*slot).group, &(*slot).counters);
            }
            (*slot).group = group;
            mem::zero(&raw mut (*slot).counters);
        }
        (*slot).counters.packets += packets;
        (*slot).counters.bytes += bytes;
        (*slot).counters.connections += connections;
    }
}

/// Adds `c` to group `group`'s `SVC_STATS` entry on this CPU (its slot is being taken).
#[inline(never)]
fn move_out(group: u32, c: &SvcCounters) {
    match SVC_STATS.get_ptr_mut(group) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(t) => unsafe {
            (*t).packets += c.packets;
            (*t).bytes += c.bytes;
            (*t).connections += c.connections;
        },
        None => {
            let _ = SVC_STATS.insert(group, *c, 0);
        }
    }
}

/// Per-packet working state kept in a per-CPU map instead of the 512-byte stack.
pub struct Scratch {
    pub hdr: Hdr,
    /// The frontend the packet is addressed to.
    pub svc: SvcVal,
    /// Original-direction conntrack key and value of the packet's flow.
    pub fkey: CtKey,
    pub v: CtVal,
    /// Reply-direction key and value (new flows).
    pub rkey: CtKey,
    pub r: CtVal,
    /// Addresses/ports the packet is translated to.
    pub to: Tuple,
    /// sessionAffinity key of a new flow's client.
    pub aff: AffinityKey,
    /// DSR: the MTU to report in "fragmentation needed".
    pub mtu: u16,
}

#[btf_map(name = "KPLB_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Parses the frame into this CPU's scratch slot and returns it. The verifier does not track
/// map contents, so every parse path (VLAN or not, IPv4 options, each IPv6 extension-header
/// chain) continues with the same abstract state and the rest of the program is verified once
/// instead of once per path; it also keeps the headers off the 512-byte stack.
#[inline(always)]
pub fn parsed(data: usize, end: usize, len: usize) -> Result<&'static mut Scratch, Skip> {
    let p = SCRATCH.get_ptr_mut(0).ok_or(Skip::NotIp)?;
    // SAFETY: per-CPU slot owned by this program invocation (programs are not re-entered on
    // one CPU while they run).
    match parse_into(data, end, len, unsafe { &raw mut (*p).hdr }) {
        0 => {
            // SAFETY: as above; the headers were just written.
            Ok(unsafe { &mut *p })
        }
        1 => Err(Skip::NotIp),
        _ => Err(Skip::Malformed),
    }
}

/// The agent's runtime settings (an all-zero default before it writes them).
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(c) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
