//! Every map of the datapath, declared once with BTF definitions (structured `bpftool map dump`).
//! Names and capacities come from `lb_common::maps`; the agent pins each under `--bpffs-dir`.

use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    Backend, MaglevSlot, RevSkKey, RevSkVal, SvcKey, SvcVal,
    maps::{
        MAGLEV_DEFAULT_SIZE, MAGLEV_TABLE_FLAGS, MAX_BACKENDS, MAX_GROUPS, MAX_REV_SK, MAX_SERVICES,
    },
    types::counter,
};

#[btf_map(name = "KPLB_SVC")]
pub static SERVICES: HashMap<SvcKey, SvcVal, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map(name = "KPLB_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

/// Inner template only fixes the type; `BPF_F_INNER_MAP` lets each service's table have its own
/// size. The agent swaps a whole table in with one outer-map update.
pub type MaglevTable =
    Array<MaglevSlot, { MAGLEV_DEFAULT_SIZE as usize }, { MAGLEV_TABLE_FLAGS as usize }>;

#[btf_map(name = "KPLB_MAGLEV")]
pub static MAGLEV: HashOfMaps<u32, MaglevTable, { MAX_GROUPS as usize }> = HashOfMaps::new();

#[btf_map(name = "KPLB_REV_SK")]
pub static REV_SK: LruHashMap<RevSkKey, RevSkVal, { MAX_REV_SK as usize }> = LruHashMap::new();

#[btf_map(name = "KPLB_STATS")]
pub static STATS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(c) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
