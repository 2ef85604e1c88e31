//! Reading the per-CPU `KPLB_STATS` counters from their pin, as the metrics server does. Needs
//! root and a bpf filesystem at /sys/fs/bpf; elsewhere it says so and passes.

use std::{fs, path::PathBuf};

use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use lb_agent::stats::DatapathStats;
use lb_common::{maps, types::counter};

/// A per-CPU array shaped like the programs' `KPLB_STATS`, pinned where the agent pins it.
struct PinnedStats {
    dir: PathBuf,
}

impl Drop for PinnedStats {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn pin_counters(per_cpu: impl Fn(u32, usize) -> u64) -> Option<PinnedStats> {
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/kplb-stats-test-{}",
        std::process::id()
    ));
    let mut map = match PerCpuArray::<MapData, u64>::create(counter::COUNT, 0) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED (datapath stats): cannot create a BPF map here: {e}");
            return None;
        }
    };
    let cpus = nr_cpus().expect("possible CPUs");
    for i in 0..counter::COUNT {
        let values: Vec<u64> = (0..cpus).map(|cpu| per_cpu(i, cpu)).collect();
        map.set(i, PerCpuValues::try_from(values).unwrap(), 0)
            .unwrap();
    }
    if fs::create_dir_all(dir.join("maps")).is_err() {
        eprintln!("SKIPPED (datapath stats): /sys/fs/bpf is not writable");
        return None;
    }
    let guard = PinnedStats { dir };
    match map.pin(guard.dir.join("maps").join(maps::STATS)) {
        Ok(()) => Some(guard),
        Err(e) => {
            eprintln!("SKIPPED (datapath stats): /sys/fs/bpf is not a bpf filesystem: {e}");
            None
        }
    }
}

#[test]
fn counters_are_summed_over_cpus() {
    // Counter i on CPU c counts 10*i + c + 1.
    let Some(pinned) = pin_counters(|i, cpu| u64::from(10 * i) + cpu as u64 + 1) else {
        return;
    };
    let stats = DatapathStats::open(&pinned.dir).expect("opens the pin");
    let got = stats.read_stats().unwrap();
    let cpus = nr_cpus().unwrap() as u64;
    assert_eq!(got.len(), counter::COUNT as usize);
    for (i, v) in got.iter().enumerate() {
        let want = 10 * i as u64 * cpus + cpus * (cpus + 1) / 2;
        assert_eq!(*v, want, "counter {i}");
    }
}
