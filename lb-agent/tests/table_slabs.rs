//! Maglev table storage against the kernel's real maps: tables written into slabs through a
//! shared mapping read back slot for slot, slabs grow on demand, retired space is reused only
//! after a grace period, and a restarted agent keeps the tables its predecessor's frontends
//! still read. Needs root; skips without it (fails under CI=true).

mod common;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_agent::{
    datapath::{self, BpfDatapath, LoadOptions},
    sync::{Datapath as _, TableLoc},
};
use lb_common::{
    MaglevSlot, SvcKey, SvcVal, addr,
    maps::{MAGLEV_SLAB_MIN_SLOTS, loc_first, loc_slab},
};

fn table(len: u32, seed: u32) -> Vec<MaglevSlot> {
    (0..len)
        .map(|i| MaglevSlot {
            backend: (i * 7 + seed) % 13 + 1,
            prev: if i % 5 == 0 { seed } else { 0 },
        })
        .collect()
}

fn load() -> Option<BpfDatapath> {
    if !common::root("Maglev slabs", "loading BPF maps") {
        return None;
    }
    Some(BpfDatapath::load_unpinned(LoadOptions::default()).expect("loading the programs"))
}

/// Slots `[first, first + size)` of each table, per slab, never overlap.
fn assert_disjoint(locs: &[TableLoc]) {
    let mut runs: Vec<(u32, u32, u32)> = locs
        .iter()
        .map(|t| (loc_slab(t.loc), loc_first(t.loc), loc_first(t.loc) + t.size))
        .collect();
    runs.sort();
    for w in runs.windows(2) {
        assert!(
            w[0].0 != w[1].0 || w[0].2 <= w[1].1,
            "overlapping tables {:?} and {:?}",
            w[0],
            w[1]
        );
    }
}

#[test]
fn tables_read_back_slot_for_slot_and_never_overlap() {
    let Some(mut dp) = load() else { return };
    let sizes = [251, 509, 1021, 251, 16381, 2039, 251];
    let tables: Vec<Vec<MaglevSlot>> = (0..40)
        .map(|i| table(sizes[i % sizes.len()], i as u32))
        .collect();
    let locs: Vec<TableLoc> = tables
        .iter()
        .map(|t| dp.write_table(t).expect("write"))
        .collect();
    assert_disjoint(&locs);
    for (t, loc) in tables.iter().zip(&locs) {
        assert_eq!(loc.size as usize, t.len());
        assert_eq!(&dp.table_at(*loc).expect("read"), t, "table at {loc:?}");
    }
    // Dropping previous owners in place changes only the `prev` halves.
    let cleared: Vec<MaglevSlot> = tables[3]
        .iter()
        .map(|s| MaglevSlot { prev: 0, ..*s })
        .collect();
    dp.rewrite_table(locs[3], &cleared).expect("rewrite");
    assert_eq!(dp.table_at(locs[3]).unwrap(), cleared);
    assert_eq!(
        dp.table_at(locs[4]).unwrap(),
        tables[4],
        "a neighbour is untouched"
    );
}

#[test]
fn slabs_grow_on_demand_and_fit_the_largest_table() {
    let Some(mut dp) = load() else { return };
    let before = dp.table_usage();
    assert_eq!(before.0, 0, "no slab before the first table");
    let mut locs = Vec::new();
    for i in 0..10 {
        locs.push(dp.write_table(&table(16381, i)).expect("write"));
    }
    let (slabs, slots, used) = dp.table_usage();
    assert!(slabs >= 2, "163,810 slots need more than the first slab");
    assert!(slots >= 163_810);
    assert_eq!(used, 163_810);
    let big = table(1_048_573, 99);
    let loc = dp.write_table(&big).expect("the largest supported table");
    assert_eq!(dp.table_at(loc).unwrap(), big);
    locs.push(loc);
    assert_disjoint(&locs);
    assert_eq!(
        dp.table_at(locs[0]).unwrap(),
        table(16381, 0),
        "earlier tables are intact"
    );
    // Nothing outside the slabs or of a size no table has.
    assert!(dp.write_table(&[]).is_err());
    let beyond = TableLoc {
        loc: lb_common::maps::table_loc(4000, 0),
        size: 251,
    };
    assert!(dp.rewrite_table(beyond, &table(251, 1)).is_err());
    let past_end = TableLoc {
        loc: lb_common::maps::table_loc(0, MAGLEV_SLAB_MIN_SLOTS - 100),
        size: 251,
    };
    assert!(dp.rewrite_table(past_end, &table(251, 1)).is_err());
}

#[test]
fn retired_space_is_reused_only_after_a_grace_period() {
    let Some(mut dp) = load() else { return };
    // Fill the first slab exactly: 64 tables of 1024 slots.
    let locs: Vec<TableLoc> = (0..64)
        .map(|i| dp.write_table(&table(1024, i)).expect("write"))
        .collect();
    assert_eq!(dp.table_usage().0, 1);
    let retired: BTreeSet<TableLoc> = locs.iter().step_by(2).copied().collect();
    for t in &retired {
        dp.retire_table(*t);
    }
    assert_eq!(
        dp.table_usage().2,
        64 * 1024,
        "retired space is still in use"
    );
    // Too early for the idle reclaim: nothing is returned.
    dp.reclaim_idle(Instant::now()).unwrap();
    assert_eq!(dp.table_usage().2, 64 * 1024);
    // Out of free space, a write waits for the grace period instead of adding a slab.
    let again = dp.write_table(&table(1024, 500)).expect("write");
    assert!(
        retired.contains(&again),
        "{again:?} reuses a retired table's space"
    );
    assert_eq!(dp.table_usage().0, 1, "no new slab");
    assert_eq!(dp.table_usage().2, 33 * 1024);
    for t in locs.iter().skip(1).step_by(2) {
        let i = locs.iter().position(|l| l == t).unwrap() as u32;
        assert_eq!(
            dp.table_at(*t).unwrap(),
            table(1024, i),
            "live tables intact"
        );
    }

    // Idle: space retired a while ago comes back after a grace period waited for on a helper
    // thread (the caller is not blocked; a later call collects it).
    dp.retire_table(again);
    let later = Instant::now() + Duration::from_secs(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dp.table_usage().2 != 32 * 1024 {
        assert!(Instant::now() < deadline, "retired space never came back");
        dp.reclaim_idle(later).unwrap();
        std::thread::yield_now();
    }
}

/// A pin directory on bpffs, removed again however the test ends.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = datapath::cleanup(&self.0);
    }
}

#[test]
fn a_restarted_agent_keeps_the_tables_frontends_read() {
    if !common::root("Maglev slabs", "pinning BPF maps") {
        return;
    }
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/kplb-test-slabs-{}",
        std::process::id()
    )));
    let key = SvcKey {
        addr: addr::from_ip("172.30.0.1".parse().unwrap()),
        port: 80u16.to_be(),
        proto: 6,
        scope: 0,
    };
    let kept = table(4093, 7);
    let loc = {
        let mut dp = BpfDatapath::load(&pins.0, LoadOptions::default()).expect("load");
        let gone = dp.write_table(&table(4093, 1)).expect("write");
        let loc = dp.write_table(&kept).expect("write");
        dp.set_frontend(
            &key,
            &SvcVal {
                group_id: 1,
                table_loc: loc.loc,
                table_size: loc.size,
                backend_count: 3,
                flags: 0,
                affinity_timeout: 0,
            },
        )
        .expect("frontend");
        assert_ne!(gone, loc);
        loc
    };
    let mut dp = BpfDatapath::load(&pins.0, LoadOptions::default()).expect("reload");
    assert_eq!(
        dp.table_at(loc).unwrap(),
        kept,
        "the table survived the restart"
    );
    assert_eq!(dp.existing().frontends.len(), 1);
    // Space no frontend read is free again; the kept table's is not.
    let new: Vec<TableLoc> = (0..15)
        .map(|i| dp.write_table(&table(4093, 100 + i)).expect("write"))
        .collect();
    let mut all = new.clone();
    all.push(loc);
    assert_disjoint(&all);
    assert_eq!(dp.table_at(loc).unwrap(), kept);
    drop(dp);
    drop(pins);
}

#[test]
fn a_batch_of_tables_is_written_at_once() {
    let Some(mut dp) = load() else { return };
    let tables: Vec<Vec<MaglevSlot>> = (0..40).map(|i| table(16381, i)).collect();
    let refs: Vec<&[MaglevSlot]> = tables.iter().map(Vec::as_slice).collect();
    let locs: Vec<TableLoc> = dp
        .write_tables(&refs)
        .into_iter()
        .map(|r| r.expect("write"))
        .collect();
    assert_disjoint(&locs);
    for (t, loc) in tables.iter().zip(&locs) {
        assert_eq!(&dp.table_at(*loc).unwrap(), t);
    }
    let (slabs, slots, used) = dp.table_usage();
    assert_eq!(used, 40 * 16381);
    assert!(slabs >= 4 && slots >= used, "{slabs} slabs, {slots} slots");
    // One table too big for any slab fails alone.
    let too_big = vec![MaglevSlot::default(); 1 << 21];
    let results = dp.write_tables(&[&tables[0], &too_big, &tables[1]]);
    assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
}

#[test]
fn a_removed_backend_goes_only_after_a_grace_period() {
    let Some(mut dp) = load() else { return };
    let b = lb_common::Backend {
        addr: addr::from_ip("10.0.1.5".parse().unwrap()),
        port: 8080u16.to_be(),
        proto: 6,
        flags: 0,
        node: [0; 4],
    };
    dp.set_backend(7, &b).unwrap();
    dp.del_backend(7).unwrap();
    // A program that read a table naming it just before its frontend moved on may still look
    // it up: it stays until a grace period has passed.
    assert_eq!(dp.existing().backends, vec![(7, b)]);
    dp.settle().unwrap();
    assert!(dp.existing().backends.is_empty());
}
