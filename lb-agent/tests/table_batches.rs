//! Maglev tables written and deleted in batches against the kernel's real outer map (one
//! syscall, one RCU grace period, per batch): every element gets its own outcome. Needs root;
//! skips without it (fails under CI=true).

mod common;

use lb_agent::{
    datapath::{BpfDatapath, LoadOptions},
    sync::Datapath as _,
};
use lb_common::MaglevSlot;

fn table(len: u32, seed: u32) -> Vec<MaglevSlot> {
    (0..len)
        .map(|i| MaglevSlot {
            backend: (i * 7 + seed) % 13 + 1,
            prev: if i % 5 == 0 { seed } else { 0 },
        })
        .collect()
}

fn load() -> Option<BpfDatapath> {
    if !common::root("table batches", "loading BPF maps") {
        return None;
    }
    Some(BpfDatapath::load_unpinned(LoadOptions::default()).expect("loading the programs"))
}

#[test]
fn a_batch_writes_each_table_and_replaces_them_whole() {
    let Some(mut dp) = load() else { return };
    let first: Vec<(u32, Vec<MaglevSlot>)> = (1..=40).map(|id| (id, table(251, id))).collect();
    let results = dp.set_tables(&first);
    assert_eq!(results.len(), first.len());
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for (id, t) in &first {
        assert_eq!(dp.table(*id).unwrap().as_ref(), Some(t), "table {id}");
    }
    // A second batch replaces some tables whole (a different size too) and adds others.
    let second: Vec<(u32, Vec<MaglevSlot>)> =
        (30..=50).map(|id| (id, table(509, id + 100))).collect();
    assert!(dp.set_tables(&second).iter().all(Result::is_ok));
    for id in 1..=50 {
        let want = second
            .iter()
            .chain(&first)
            .find(|(i, _)| *i == id)
            .map(|(_, t)| t);
        assert_eq!(dp.table(id).unwrap().as_ref(), want, "table {id}");
    }
}

#[test]
fn one_bad_table_fails_alone() {
    let Some(mut dp) = load() else { return };
    // An empty table cannot exist as a BPF array: that element fails, the others land.
    let tables = vec![(1, table(251, 1)), (2, Vec::new()), (3, table(251, 3))];
    let results = dp.set_tables(&tables);
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(results[1].is_err(), "an empty table must fail");
    assert_eq!(dp.table(1).unwrap(), Some(table(251, 1)));
    assert_eq!(dp.table(2).unwrap(), None);
    assert_eq!(dp.table(3).unwrap(), Some(table(251, 3)));
}

#[test]
fn a_delete_batch_removes_present_tables_and_tolerates_missing_ones() {
    let Some(mut dp) = load() else { return };
    let tables: Vec<(u32, Vec<MaglevSlot>)> = (1..=10).map(|id| (id, table(251, id))).collect();
    assert!(dp.set_tables(&tables).iter().all(Result::is_ok));
    // 11 and 12 were never written; the kernel stops a batch at the first missing key and the
    // rest must still go.
    let doomed = [2, 11, 4, 12, 6, 8];
    let results = dp.del_tables(&doomed);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for id in 1..=12 {
        let present = dp.table(id).unwrap().is_some();
        assert_eq!(present, id <= 10 && !doomed.contains(&id), "table {id}");
    }
}
