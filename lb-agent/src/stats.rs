//! The datapath's per-CPU counters (`KPLB_STATS`), read from the pinned map so the metrics
//! server does not need the loader's handles.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use aya::maps::{Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use lb_common::{SvcCounters, maps};

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
        let open = |source| StatsError::Open {
            path: path.to_path_buf(),
            source,
        };
        let data = MapData::from_pin(path).map_err(open)?;
        let map = Map::from_map_data(data).map_err(open)?;
        let map = PerCpuArray::try_from(map).map_err(open)?;
        Ok(Self { map })
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

/// A handle on `<bpffs-dir>/maps/KPLB_SVC_STATS`: per-service-port counters by group id.
pub struct ServiceStats {
    map: PerCpuHashMap<MapData, u32, SvcCounters>,
}

impl ServiceStats {
    pub fn open(bpffs_dir: &Path) -> Result<Self, StatsError> {
        let path = Paths::new(bpffs_dir).maps.join(maps::SVC_STATS);
        let open = |source| StatsError::Open {
            path: path.clone(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(open)?;
        let map = Map::from_map_data(data).map_err(open)?;
        Ok(Self {
            map: PerCpuHashMap::try_from(map).map_err(open)?,
        })
    }

    /// Every group's counters, summed over CPUs.
    pub fn read_all(&self) -> Result<BTreeMap<u32, SvcCounters>, StatsError> {
        let mut out = BTreeMap::new();
        for entry in self.map.iter() {
            let (group, per_cpu) = entry.map_err(StatsError::Read)?;
            let total = per_cpu
                .iter()
                .fold(SvcCounters::default(), |a, c| SvcCounters {
                    packets: a.packets.wrapping_add(c.packets),
                    bytes: a.bytes.wrapping_add(c.bytes),
                    connections: a.connections.wrapping_add(c.connections),
                });
            out.insert(group, total);
        }
        Ok(out)
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
