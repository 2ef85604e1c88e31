//! The datapath's per-CPU counters (`KPLB_STATS`, and per service `KPLB_SVC_HOT` and
//! `KPLB_SVC_STATS`), read from the pinned maps so the metrics server does not need the
//! loader's handles.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use aya::maps::{Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use lb_common::{SvcCounters, SvcSlot, maps};

use crate::{
    datapath::Paths,
    metrics::{CounterSource, ServiceCounterSource},
};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("opening pinned {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("reading KPLB_STATS: {0}")]
    Read(#[source] MapError),
}

/// A handle on `<bpffs-dir>/maps/KPLB_STATS`.
pub struct DatapathStats {
    map: PerCpuArray<MapData, u64>,
}

impl DatapathStats {
    /// Opens the pinned counters of the agent whose pins are under `bpffs_dir`.
    pub fn open(bpffs_dir: &Path) -> Result<Self, StatsError> {
        Self::open_pin(&Paths::new(bpffs_dir).maps.join(maps::STATS))
    }

    /// Opens a pinned per-CPU `u64` array.
    pub fn open_pin(path: &Path) -> Result<Self, StatsError> {
        Ok(Self {
            map: open_pinned(path)?,
        })
    }

    /// Every counter, summed over CPUs (index = `lb_common::types::counter`).
    pub fn read_stats(&self) -> Result<Vec<u64>, StatsError> {
        let mut out = Vec::with_capacity(self.map.len() as usize);
        for i in 0..self.map.len() {
            let per_cpu = self.map.get(&i, 0).map_err(StatsError::Read)?;
            out.push(sum(per_cpu.iter().copied()));
        }
        Ok(out)
    }
}

/// Handles on `<bpffs-dir>/maps/KPLB_SVC_HOT` and `KPLB_SVC_STATS`: per-service-port counters
/// in their slots, and moved out of them (see `lb_common::SvcSlot`).
pub struct ServiceStats {
    slots: PerCpuArray<MapData, SvcSlot>,
    moved: PerCpuHashMap<MapData, u32, SvcCounters>,
}

/// Reads of the counters made before giving up on one that no slot changed hands during.
const READ_ATTEMPTS: usize = 4;

impl ServiceStats {
    pub fn open(bpffs_dir: &Path) -> Result<Self, StatsError> {
        let maps = Paths::new(bpffs_dir).maps;
        Ok(Self {
            slots: open_pinned(&maps.join(maps::SVC_HOT))?,
            moved: open_pinned(&maps.join(maps::SVC_STATS))?,
        })
    }

    /// Every group's counters, summed over CPUs. Counters move out of a slot when another
    /// group takes it, so the slots are read before and after the moved counters, and again
    /// if a slot changed hands meanwhile: nothing is missed or counted twice.
    pub fn read_all(&self) -> Result<BTreeMap<u32, SvcCounters>, StatsError> {
        let mut attempts = 0;
        loop {
            let before = self.read_slots()?;
            let moved = self.read_moved()?;
            let after = self.read_slots()?;
            attempts += 1;
            if settled(&before, &after) || attempts == READ_ATTEMPTS {
                return Ok(totals(moved, &after));
            }
        }
    }

    /// Every slot of every CPU, in one order.
    fn read_slots(&self) -> Result<Vec<SvcSlot>, StatsError> {
        let mut out = Vec::new();
        for per_cpu in self.slots.iter() {
            out.extend(per_cpu.map_err(StatsError::Read)?.iter().copied());
        }
        Ok(out)
    }

    fn read_moved(&self) -> Result<BTreeMap<u32, SvcCounters>, StatsError> {
        let mut out = BTreeMap::new();
        for entry in self.moved.iter() {
            let (group, per_cpu) = entry.map_err(StatsError::Read)?;
            let total = per_cpu
                .iter()
                .fold(SvcCounters::default(), |a, c| add(&a, c));
            out.insert(group, total);
        }
        Ok(out)
    }
}

/// A pinned map of type `M`.
fn open_pinned<M: TryFrom<Map, Error = MapError>>(path: &Path) -> Result<M, StatsError> {
    let open = |source| StatsError::Open {
        path: path.to_path_buf(),
        source,
    };
    let data = MapData::from_pin(path).map_err(open)?;
    M::try_from(Map::from_map_data(data).map_err(open)?).map_err(open)
}

/// Whether no slot changed hands between two reads of them: the same groups, no counter lower.
fn settled(before: &[SvcSlot], after: &[SvcSlot]) -> bool {
    before.len() == after.len()
        && before.iter().zip(after).all(|(b, a)| {
            b.group == a.group
                && b.counters.packets <= a.counters.packets
                && b.counters.bytes <= a.counters.bytes
                && b.counters.connections <= a.counters.connections
        })
}

/// Each group's counters: what was moved out of its slots plus what its slots hold.
pub fn totals(moved: BTreeMap<u32, SvcCounters>, slots: &[SvcSlot]) -> BTreeMap<u32, SvcCounters> {
    let mut out = moved;
    for s in slots.iter().filter(|s| s.group != 0) {
        let t = out.entry(s.group).or_default();
        *t = add(t, &s.counters);
    }
    out
}

/// Wrapping like the kernel's counters do, so a sum never panics.
fn add(a: &SvcCounters, b: &SvcCounters) -> SvcCounters {
    SvcCounters {
        packets: a.packets.wrapping_add(b.packets),
        bytes: a.bytes.wrapping_add(b.bytes),
        connections: a.connections.wrapping_add(b.connections),
    }
}

impl ServiceCounterSource for ServiceStats {
    fn read(&mut self) -> Result<BTreeMap<u32, SvcCounters>, String> {
        self.read_all().map_err(|e| e.to_string())
    }
}

/// Wrapping like the kernel's counters do, so a sum never panics.
pub fn sum(per_cpu: impl IntoIterator<Item = u64>) -> u64 {
    per_cpu.into_iter().fold(0, u64::wrapping_add)
}

impl CounterSource for DatapathStats {
    fn read(&mut self) -> Result<Vec<u64>, String> {
        self.read_stats().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(group: u32, packets: u64) -> SvcSlot {
        SvcSlot {
            group,
            _pad: 0,
            counters: SvcCounters {
                packets,
                bytes: 100 * packets,
                connections: 1,
            },
        }
    }

    #[test]
    fn totals_add_slots_to_moved_counters() {
        let moved = BTreeMap::from([(7, slot(7, 5).counters)]);
        let slots = [slot(7, 2), slot(0, 0), slot(9, 3), slot(7, 1)];
        let t = totals(moved, &slots);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!((t[&7].packets, t[&7].bytes, t[&7].connections), (8, 800, 3));
        assert_eq!((t[&9].packets, t[&9].connections), (3, 1));
    }

    #[test]
    fn a_slot_changing_hands_unsettles_a_read() {
        let before = [slot(7, 2), slot(9, 3)];
        assert!(settled(&before, &[slot(7, 4), slot(9, 3)]));
        assert!(!settled(&before, &[slot(8, 4), slot(9, 3)]), "taken over");
        assert!(
            !settled(&before, &[slot(7, 1), slot(9, 3)]),
            "taken and taken back"
        );
    }

    #[test]
    fn sums_wrap_instead_of_overflowing() {
        assert_eq!(sum([1, 2, 3]), 6);
        assert_eq!(sum([u64::MAX, 2]), 1);
        assert_eq!(sum([]), 0);
    }

    #[test]
    fn a_missing_pin_is_an_open_error_naming_the_path() {
        let err = DatapathStats::open(Path::new("/nonexistent/kplb"))
            .err()
            .expect("no such pin");
        assert!(
            err.to_string()
                .contains("/nonexistent/kplb/maps/KPLB_STATS"),
            "{err}"
        );
    }
}
