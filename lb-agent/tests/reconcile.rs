//! `sync::Reconciler` against an in-memory datapath that records every operation and checks,
//! after each one, what a packet could see: every frontend with backends points at an existing
//! table of its size whose entries all name existing backends. Syncs of everything
//! (`Scope::All`) and of what a change touched (`Scope::Touched`, computed by the agent's
//! `ClusterView`) must end in the same maps.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    time::{Duration, Instant},
};

use common::*;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    model::{BackendSpec, Desired, NodeConfig},
    objects::{ANNOTATION_MAGLEV_SIZE, ObjKey, Protocol},
    sync::{Datapath, Existing, Reconciler, Scope, SyncStats, TableLoc, backend_value},
    view::ClusterView,
};
use lb_common::{BACKEND_F_LOCAL, Backend, MaglevSlot, SvcKey, SvcVal, addr, maglev};

const SEED: u64 = 0x6b70_6c62;

// ---- The fake datapath ------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    SetBackend(u32, IpAddr),
    DelBackend(u32),
    /// Table location and the distinct backend ids it names.
    WriteTable(u32, BTreeSet<u32>),
    RewriteTable(u32),
    RetireTable(u32),
    SetFrontend(SvcKey, SvcVal),
    DelFrontend(SvcKey),
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::SetBackend(..) => "set_backend",
            Op::DelBackend(_) => "del_backend",
            Op::WriteTable(..) => "write_table",
            Op::RewriteTable(_) => "rewrite_table",
            Op::RetireTable(_) => "retire_table",
            Op::SetFrontend(..) => "set_frontend",
            Op::DelFrontend(_) => "del_frontend",
        }
    }
}

#[derive(Debug)]
struct MapFull;

impl fmt::Display for MapFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("map full (injected)")
    }
}

impl std::error::Error for MapFull {}

/// The maps, as the programs see them. Tables are kept by location; a location is never
/// handed out twice, so a frontend left pointing at a retired table shows up as a violation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Maps {
    backends: BTreeMap<u32, Backend>,
    tables: BTreeMap<u32, Vec<MaglevSlot>>,
    next_loc: u32,
    frontends: BTreeMap<SvcKey, SvcVal>,
}

type FailIf = Box<dyn Fn(&Op, &Maps) -> bool>;

#[derive(Default)]
struct Fake {
    maps: Maps,
    /// Successful operations, in order.
    ops: Vec<Op>,
    /// Operations refused by `fail_if`.
    failed: Vec<Op>,
    fail_if: Option<FailIf>,
    /// Broken invariants, with the operation after which they were seen.
    violations: Vec<String>,
    /// `purge_affinity_groups` entries: (operations done before it, group, backend ids kept).
    purged: Vec<(usize, u32, BTreeSet<u32>)>,
}

/// A failure rule for [`Fake::fail_if`].
fn fail_when(f: impl Fn(&Op, &Maps) -> bool + 'static) -> Option<FailIf> {
    Some(Box::new(f))
}

impl Fake {
    fn failing(fail_if: impl Fn(&Op, &Maps) -> bool + 'static) -> Self {
        Self {
            fail_if: Some(Box::new(fail_if)),
            ..Self::default()
        }
    }

    fn op(&mut self, op: Op, apply: impl FnOnce(&mut Maps)) -> Result<(), MapFull> {
        if self.fail_if.as_ref().is_some_and(|f| f(&op, &self.maps)) {
            self.failed.push(op);
            return Err(MapFull);
        }
        apply(&mut self.maps);
        self.ops.push(op);
        self.check();
        Ok(())
    }

    /// What a packet could run into right now.
    fn check(&mut self) {
        let last = self.ops.last().cloned();
        let m = &self.maps;
        for (k, v) in &m.frontends {
            if v.backend_count == 0 {
                continue;
            }
            let Some(table) = m.tables.get(&v.table_loc) else {
                self.violations.push(format!(
                    "after {last:?}: {} -> missing table {}",
                    show_key(k),
                    v.table_loc
                ));
                continue;
            };
            if table.len() != v.table_size as usize {
                self.violations.push(format!(
                    "after {last:?}: {} says size {}, table {} has {}",
                    show_key(k),
                    v.table_size,
                    v.table_loc,
                    table.len()
                ));
            }
            let missing: BTreeSet<u32> = table
                .iter()
                .map(|s| s.backend)
                .filter(|b| !m.backends.contains_key(b))
                .collect();
            if !missing.is_empty() {
                self.violations.push(format!(
                    "after {last:?}: {} -> table {} names missing backends {missing:?}",
                    show_key(k),
                    v.table_loc
                ));
            }
        }
    }

    /// Operations since `mark` (an index into `ops`).
    fn since(&self, mark: usize) -> &[Op] {
        &self.ops[mark..]
    }

    fn assert_no_violations(&self) {
        assert!(
            self.violations.is_empty(),
            "{:#?}\nops: {:#?}",
            self.violations,
            self.ops
        );
    }

    /// The distinct backends a frontend leads to, as `(address, port)`.
    fn resolve(&self, key: &SvcKey) -> Vec<(IpAddr, u16)> {
        let v = self.maps.frontends[key];
        if v.backend_count == 0 {
            return Vec::new();
        }
        let ids: BTreeSet<u32> = self.maps.tables[&v.table_loc]
            .iter()
            .map(|s| s.backend)
            .collect();
        let mut out: Vec<_> = ids
            .iter()
            .map(|id| endpoint(&self.maps.backends[id]))
            .collect();
        out.sort();
        out
    }

    /// The table of a frontend as backend `(address, port)` per slot.
    fn table_of(&self, key: &SvcKey) -> Vec<(IpAddr, u16)> {
        let v = self.maps.frontends[key];
        self.maps.tables[&v.table_loc]
            .iter()
            .map(|s| endpoint(&self.maps.backends[&s.backend]))
            .collect()
    }
}

fn endpoint(b: &Backend) -> (IpAddr, u16) {
    (addr::to_ip(&b.addr), u16::from_be(b.port))
}

impl Datapath for Fake {
    type Error = MapFull;

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapFull> {
        let b = *backend;
        self.op(Op::SetBackend(id, addr::to_ip(&b.addr)), |m| {
            m.backends.insert(id, b);
        })
    }

    fn del_backend(&mut self, id: u32) -> Result<(), MapFull> {
        // Like the BPF datapath, deleting a missing entry is not an error.
        self.op(Op::DelBackend(id), |m| {
            m.backends.remove(&id);
        })
    }

    fn write_table(&mut self, table: &[MaglevSlot]) -> Result<TableLoc, MapFull> {
        let named: BTreeSet<u32> = table.iter().map(|s| s.backend).collect();
        let missing: Vec<u32> = named
            .iter()
            .copied()
            .filter(|b| !self.maps.backends.contains_key(b))
            .collect();
        if !missing.is_empty() {
            self.violations
                .push(format!("table written before its backends {missing:?}"));
        }
        let loc = self.maps.next_loc + 1;
        let t = table.to_vec();
        self.op(Op::WriteTable(loc, named), |m| {
            m.next_loc = loc;
            m.tables.insert(loc, t);
        })?;
        Ok(TableLoc {
            loc,
            size: table.len() as u32,
        })
    }

    fn rewrite_table(&mut self, loc: TableLoc, table: &[MaglevSlot]) -> Result<(), MapFull> {
        // Readers see it slot by slot: only the previous owners may change.
        match self.maps.tables.get(&loc.loc) {
            Some(old)
                if old.len() == table.len()
                    && old.iter().zip(table).all(|(o, n)| o.backend == n.backend) => {}
            _ => self
                .violations
                .push(format!("table {loc:?} rewritten with other owners")),
        }
        let t = table.to_vec();
        self.op(Op::RewriteTable(loc.loc), |m| {
            m.tables.insert(loc.loc, t);
        })
    }

    fn retire_table(&mut self, loc: TableLoc) {
        let _ = self.op(Op::RetireTable(loc.loc), |m| {
            m.tables.remove(&loc.loc);
        });
    }

    fn set_frontend(&mut self, key: &SvcKey, val: &SvcVal) -> Result<(), MapFull> {
        let (k, v) = (*key, *val);
        self.op(Op::SetFrontend(k, v), |m| {
            m.frontends.insert(k, v);
        })
    }

    fn del_frontend(&mut self, key: &SvcKey) -> Result<(), MapFull> {
        let k = *key;
        self.op(Op::DelFrontend(k), |m| {
            m.frontends.remove(&k);
        })
    }

    fn purge_affinity_groups(&mut self, purges: &[(u32, Vec<u32>)]) -> Result<(), MapFull> {
        for (group, keep) in purges {
            self.purged
                .push((self.ops.len(), *group, keep.iter().copied().collect()));
        }
        Ok(())
    }
}

/// Applies everything and returns the stats and the errors reported.
fn apply(r: &mut Reconciler, d: &Desired, fake: &mut Fake) -> (SyncStats, Vec<String>) {
    apply_scoped(r, d, Scope::All, fake)
}

fn apply_scoped(
    r: &mut Reconciler,
    d: &Desired,
    scope: Scope<'_>,
    fake: &mut Fake,
) -> (SyncStats, Vec<String>) {
    let mut errors = Vec::new();
    let st = r.apply(d, scope, fake, &mut |e| errors.push(e));
    assert_eq!(st.errors, errors.len());
    (st, errors)
}

fn apply_ok(r: &mut Reconciler, d: &Desired, fake: &mut Fake) -> SyncStats {
    let (st, errors) = apply(r, d, fake);
    assert!(errors.is_empty(), "{errors:#?}");
    fake.assert_no_violations();
    st
}

/// What a restarted agent reads back from the pinned maps.
fn existing(maps: &Maps) -> Existing {
    Existing {
        backends: maps.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        frontends: maps.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
    }
}

/// The maps hold exactly `desired`, nothing more: every frontend resolves to its group's
/// backends through the Maglev table of the sorted backends, and no table or backend is left
/// over.
fn assert_converged(fake: &Fake, d: &Desired) {
    let m = &fake.maps;
    let keys: BTreeSet<&SvcKey> = m.frontends.keys().collect();
    assert_eq!(keys, d.frontends.keys().collect(), "frontend keys");
    let mut tables = BTreeSet::new();
    for (k, fe) in &d.frontends {
        let v = m.frontends[k];
        let group = &d.groups[&fe.group];
        assert_eq!(v.flags, fe.flags, "{}", show_key(k));
        assert_eq!(v.affinity_timeout, fe.affinity_timeout_s, "{}", show_key(k));
        assert_eq!(
            v.backend_count as usize,
            group.backends.len(),
            "{}",
            show_key(k)
        );
        if group.backends.is_empty() {
            continue;
        }
        assert_eq!(v.table_size, group.table_size, "{}", show_key(k));
        tables.insert(v.table_loc);
        let table = &m.tables[&v.table_loc];
        let idents: Vec<maglev::Identity> =
            group.backends.iter().map(BackendSpec::identity).collect();
        let expected = maglev::build(&idents, group.table_size, SEED).expect("buildable");
        assert_eq!(table.len(), expected.len());
        for (slot, want) in table.iter().zip(&expected) {
            let have = m.backends[&slot.backend];
            assert_eq!(
                have,
                backend_value(&group.backends[*want as usize]),
                "{}",
                show_key(k)
            );
        }
    }
    assert_eq!(
        m.tables.keys().copied().collect::<BTreeSet<_>>(),
        tables,
        "no leftover tables"
    );
    let wanted: BTreeSet<Backend> = d
        .groups
        .values()
        .flat_map(|g| g.backends.iter().map(backend_value))
        .collect();
    let have: Vec<Backend> = m.backends.values().copied().collect();
    assert_eq!(
        have.len(),
        wanted.len(),
        "no leftover or duplicate backends"
    );
    assert_eq!(have.into_iter().collect::<BTreeSet<_>>(), wanted);
}

// ---- A small world of services ---------------------------------------------------------------

/// Services a, b and c, each with one slice; b also has a UDP port.
#[derive(Clone)]
struct World {
    services: BTreeMap<&'static str, Service>,
    slices: BTreeMap<&'static str, EndpointSlice>,
}

/// A slice with ready endpoints; 10.0.<n>.x runs on node<n>.
fn ready_slice(name: &str, service: &str, addrs: &[&str]) -> EndpointSlice {
    let mut s = Slice::v4(name, service)
        .port("http", "TCP", 8080)
        .port("dns", "UDP", 5353);
    for a in addrs {
        let node = format!("node{}", a.split('.').nth(2).expect("10.0.n.x"));
        s = s.ep(Ep::new(a).on(&node));
    }
    s.build()
}

impl World {
    fn new() -> Self {
        let mut w = Self {
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
        };
        w.services.insert(
            "a",
            Svc::new("a", "172.30.0.1").port("http", "TCP", 80).build(),
        );
        w.services.insert(
            "b",
            Svc::new("b", "172.30.0.2")
                .port("http", "TCP", 80)
                .port("dns", "UDP", 53)
                .affinity()
                .build(),
        );
        w.services.insert(
            "c",
            Svc::new("c", "172.30.0.3").port("http", "TCP", 80).build(),
        );
        w.slices
            .insert("a", ready_slice("a-1", "a", &["10.0.1.1", "10.0.1.2"]));
        w.slices.insert(
            "b",
            ready_slice("b-1", "b", &["10.0.1.3", "10.0.2.3", "10.0.2.4"]),
        );
        w.slices
            .insert("c", ready_slice("c-1", "c", &["10.0.1.5", "10.0.2.5"]));
        w
    }

    fn desired(&self) -> Desired {
        let services: Vec<Service> = self.services.values().cloned().collect();
        let slices: Vec<EndpointSlice> = self.slices.values().cloned().collect();
        let run = run_objects(&services, &slices, &node(NODE));
        assert!(run.warnings.is_empty(), "{:#?}", run.warnings);
        run.desired
    }

    fn set_endpoints(&mut self, service: &'static str, addrs: &[&str]) {
        self.slices.insert(
            service,
            ready_slice(&format!("{service}-1"), service, addrs),
        );
    }
}

fn a80() -> SvcKey {
    tcp("172.30.0.1", 80)
}
fn b80() -> SvcKey {
    tcp("172.30.0.2", 80)
}
fn b53() -> SvcKey {
    udp("172.30.0.2", 53)
}
fn c80() -> SvcKey {
    tcp("172.30.0.3", 80)
}

/// The frontends of service `name` in the desired state.
fn frontends_of(d: &Desired, name: &str) -> BTreeSet<SvcKey> {
    d.frontends
        .iter()
        .filter(|(_, fe)| fe.group.service.name == name)
        .map(|(k, _)| *k)
        .collect()
}

/// Table locations behind service `name`'s frontends in the maps.
fn tables_of(fake: &Fake, d: &Desired, name: &str) -> BTreeSet<u32> {
    frontends_of(d, name)
        .iter()
        .map(|k| fake.maps.frontends[k].table_loc)
        .collect()
}

fn position(ops: &[Op], pred: impl Fn(&Op) -> bool) -> Vec<usize> {
    ops.iter()
        .enumerate()
        .filter(|(_, o)| pred(o))
        .map(|(i, _)| i)
        .collect()
}

// ---- Tests -------------------------------------------------------------------------------------

#[test]
fn first_apply_writes_backends_then_tables_then_frontends() {
    let d = World::new().desired();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    let st = apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);

    let kinds: Vec<&str> = fake.ops.iter().map(Op::kind).collect();
    let backends = position(&fake.ops, |o| matches!(o, Op::SetBackend(..)));
    let tables = position(&fake.ops, |o| matches!(o, Op::WriteTable(..)));
    let frontends = position(&fake.ops, |o| matches!(o, Op::SetFrontend(..)));
    assert_eq!(backends.len(), 10, "{kinds:?}");
    assert_eq!(tables.len(), 4, "a, b/TCP, b/UDP, c: {kinds:?}");
    assert_eq!(frontends.len(), 4, "{kinds:?}");
    assert_eq!(
        backends.len() + tables.len() + frontends.len(),
        fake.ops.len(),
        "{kinds:?}"
    );
    assert!(backends.iter().max() < tables.iter().min(), "{kinds:?}");
    assert!(tables.iter().max() < frontends.iter().min(), "{kinds:?}");
    assert_eq!(st.writes, fake.ops.len());
    assert_eq!(
        (st.frontends, st.groups, st.backends, st.errors),
        (4, 4, 10, 0)
    );

    assert_eq!(
        fake.resolve(&a80()),
        eps(&[("10.0.1.1", 8080), ("10.0.1.2", 8080)])
    );
    assert_eq!(
        fake.resolve(&b53()),
        eps(&[("10.0.1.3", 5353), ("10.0.2.3", 5353), ("10.0.2.4", 5353)])
    );
    assert_eq!(fake.maps.frontends[&b80()].flags, lb_common::SVC_F_AFFINITY);
    assert_ne!(
        fake.maps.frontends[&b80()].group_id,
        fake.maps.frontends[&b53()].group_id
    );
    // Backends on this node carry the local flag.
    for b in fake.maps.backends.values() {
        let local = addr::to_ip(&b.addr).to_string().starts_with("10.0.1.");
        assert_eq!(b.flags & BACKEND_F_LOCAL != 0, local, "{b:?}");
    }
}

#[test]
fn second_apply_of_the_same_state_writes_nothing() {
    let w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);
    let mark = fake.ops.len();
    for _ in 0..2 {
        // A freshly computed, equal desired state.
        let st = apply_ok(&mut r, &w.desired(), &mut fake);
        assert_eq!(st.writes, 0);
        assert_eq!(fake.since(mark), &[] as &[Op]);
    }
}

#[test]
fn adding_one_endpoint_touches_only_that_service() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    let d1 = w.desired();
    apply_ok(&mut r, &d1, &mut fake);
    let before = fake.maps.clone();
    let mark = fake.ops.len();

    w.set_endpoints("a", &["10.0.1.1", "10.0.1.2", "10.0.2.9"]);
    let d2 = w.desired();
    let st = apply_ok(&mut r, &d2, &mut fake);
    assert_converged(&fake, &d2);

    let a_table = fake.maps.frontends[&a80()].table_loc;
    let old_table = before.frontends[&a80()].table_loc;
    let ops = fake.since(mark).to_vec();
    // The new table goes into new space, the frontend switches to it in one update, and only
    // then is the old table retired.
    assert!(
        matches!(&ops[..], [Op::SetBackend(_, ip), Op::WriteTable(t, _), Op::SetFrontend(k, v), Op::RetireTable(old)]
            if *ip == common::ip("10.0.2.9") && *t == a_table && *k == a80() && v.backend_count == 3
                && *old == old_table),
        "{ops:#?}"
    );
    assert_eq!(st.writes, 3);
    // The group keeps its id (its affinity pins and counters stay).
    assert_eq!(
        before.frontends[&a80()].group_id,
        fake.maps.frontends[&a80()].group_id
    );
    // Nothing of b or c changed.
    for k in [b80(), b53(), c80()] {
        assert_eq!(fake.maps.frontends[&k], before.frontends[&k]);
        let loc = before.frontends[&k].table_loc;
        assert_eq!(fake.maps.tables[&loc], before.tables[&loc]);
    }
}

#[test]
fn removing_a_service_deletes_frontends_then_tables_then_unreferenced_backends() {
    let mut w = World::new();
    // d shares 10.0.1.3 (port 8080/TCP) with b: that backend must survive b's removal.
    w.services.insert(
        "d",
        Svc::new("d", "172.30.0.4").port("http", "TCP", 80).build(),
    );
    w.slices.insert("d", ready_slice("d-1", "d", &["10.0.1.3"]));
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    let d1 = w.desired();
    apply_ok(&mut r, &d1, &mut fake);
    let b_tables = tables_of(&fake, &d1, "b");
    assert_eq!(b_tables.len(), 2);
    let before = fake.maps.clone();
    let mark = fake.ops.len();

    w.services.remove("b");
    let d2 = w.desired();
    apply_ok(&mut r, &d2, &mut fake);
    assert_converged(&fake, &d2);

    let ops = fake.since(mark).to_vec();
    let kinds: Vec<&str> = ops.iter().map(Op::kind).collect();
    // b80 and b53 frontends, b's two tables, and b's backends except the one d shares:
    // 10.0.2.3:8080, 10.0.2.4:8080 and the three :5353 ones.
    assert_eq!(kinds[..2], ["del_frontend"; 2], "{ops:#?}");
    assert_eq!(kinds[2..4], ["retire_table"; 2], "{ops:#?}");
    assert_eq!(kinds[4..], ["del_backend"; 5], "{ops:#?}");
    let deleted_tables: BTreeSet<u32> = ops
        .iter()
        .filter_map(|o| {
            if let Op::RetireTable(t) = o {
                Some(*t)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(deleted_tables, b_tables);
    assert_eq!(
        fake.resolve(&tcp("172.30.0.4", 80)),
        eps(&[("10.0.1.3", 8080)])
    );
    for k in [a80(), c80(), tcp("172.30.0.4", 80)] {
        assert_eq!(fake.maps.frontends[&k], before.frontends[&k]);
    }
}

#[test]
fn affinity_pins_are_purged_when_their_backend_leaves_the_group() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);
    // b has sessionAffinity (10800 s by default), a and c have none.
    assert_eq!(fake.maps.frontends[&b80()].affinity_timeout, 10_800);
    assert_eq!(fake.maps.frontends[&a80()].affinity_timeout, 0);
    assert!(fake.purged.is_empty(), "{:?}", fake.purged);
    let (b_tcp, b_udp) = (
        fake.maps.frontends[&b80()].group_id,
        fake.maps.frontends[&b53()].group_id,
    );

    // A new endpoint moves nobody: no purge.
    w.set_endpoints("b", &["10.0.1.3", "10.0.2.3", "10.0.2.4", "10.0.2.9"]);
    apply_ok(&mut r, &w.desired(), &mut fake);
    assert!(fake.purged.is_empty(), "{:?}", fake.purged);

    // 10.0.2.4 leaves b (and a loses one too, without affinity): b's two groups are purged of
    // everything but the remaining backends, after their new tables are in place.
    w.set_endpoints("b", &["10.0.1.3", "10.0.2.3", "10.0.2.9"]);
    w.set_endpoints("a", &["10.0.1.1"]);
    apply_ok(&mut r, &w.desired(), &mut fake);
    let keep = |port: u16| -> BTreeSet<u32> {
        ["10.0.1.3", "10.0.2.3", "10.0.2.9"]
            .iter()
            .flat_map(|a| ids_of(&fake.maps, a))
            .filter(|id| u16::from_be(fake.maps.backends[id].port) == port)
            .collect()
    };
    let calls: BTreeMap<u32, BTreeSet<u32>> = fake
        .purged
        .iter()
        .map(|(_, g, k)| (*g, k.clone()))
        .collect();
    assert_eq!(
        calls,
        BTreeMap::from([(b_tcp, keep(8080)), (b_udp, keep(5353))]),
        "{:?}",
        fake.purged
    );
    for (at, group, _) in &fake.purged {
        let repointed = position(
            &fake.ops,
            |o| matches!(o, Op::SetFrontend(_, v) if v.group_id == *group && v.backend_count == 3),
        );
        assert!(
            repointed.iter().any(|i| i < at),
            "purge of {group} before its frontends use the new table"
        );
    }

    // Removing b drops every pin of its groups (their ids may be reused).
    fake.purged.clear();
    w.services.remove("b");
    apply_ok(&mut r, &w.desired(), &mut fake);
    let calls: BTreeSet<(u32, BTreeSet<u32>)> = fake
        .purged
        .iter()
        .map(|(_, g, k)| (*g, k.clone()))
        .collect();
    assert_eq!(
        calls,
        BTreeSet::from([(b_tcp, BTreeSet::new()), (b_udp, BTreeSet::new())])
    );
}

#[test]
fn a_service_without_endpoints_keeps_its_frontend_and_loses_its_table() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);
    let old_table = fake.maps.frontends[&c80()].table_loc;
    let mark = fake.ops.len();

    // Every endpoint of c is gone (scaled to zero).
    w.slices.insert(
        "c",
        Slice::v4("c-1", "c")
            .port("http", "TCP", 8080)
            .ep(Ep::new("10.0.1.5").terminating())
            .build(),
    );
    let d2 = w.desired();
    apply_ok(&mut r, &d2, &mut fake); // checked after every op: never a frontend without table
    assert_converged(&fake, &d2);
    let v = fake.maps.frontends[&c80()];
    assert_eq!(v.backend_count, 0);
    assert!(!fake.maps.tables.contains_key(&old_table));
    let kinds: Vec<&str> = fake.since(mark).iter().map(Op::kind).collect();
    assert_eq!(
        kinds,
        ["set_frontend", "retire_table", "del_backend", "del_backend"]
    );
    assert_eq!(apply_ok(&mut r, &d2, &mut fake).writes, 0);

    // And back.
    w.set_endpoints("c", &["10.0.2.6"]);
    let d3 = w.desired();
    apply_ok(&mut r, &d3, &mut fake);
    assert_converged(&fake, &d3);
    assert_eq!(fake.resolve(&c80()), eps(&[("10.0.2.6", 8080)]));
    assert_eq!(apply_ok(&mut r, &d3, &mut fake).writes, 0);
}

#[test]
fn a_new_service_without_endpoints_gets_a_rejecting_frontend_and_no_table() {
    let mut w = World::new();
    w.services.insert(
        "e",
        Svc::new("e", "172.30.0.5").port("http", "TCP", 80).build(),
    );
    let d = w.desired();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
    assert_eq!(fake.maps.frontends[&tcp("172.30.0.5", 80)].backend_count, 0);
    assert_eq!(apply_ok(&mut r, &d, &mut fake).writes, 0);
}

#[test]
fn changing_table_size_repoints_the_frontend_before_retiring_the_old_table() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);
    let old = fake.maps.frontends[&a80()];

    let a = Svc::new("a", "172.30.0.1").port("http", "TCP", 80);
    w.services
        .insert("a", a.annotate(ANNOTATION_MAGLEV_SIZE, "1021").build());
    let d = w.desired();
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
    let new = fake.maps.frontends[&a80()];
    assert_eq!(new.table_size, 1021);
    assert_eq!(new.group_id, old.group_id, "the group keeps its id");
    assert_ne!(new.table_loc, old.table_loc);
    assert!(!fake.maps.tables.contains_key(&old.table_loc));
}

#[test]
fn maglev_table_is_independent_of_endpoint_order() {
    // The same endpoints, listed in another order and split over slices differently.
    let addrs = ["10.0.1.1", "10.0.2.1", "10.0.1.7", "10.0.2.9", "10.0.1.3"];
    let mut reversed = addrs;
    reversed.reverse();
    let mut w1 = World::new();
    w1.set_endpoints("a", &addrs);
    let mut w2 = World::new();
    w2.slices
        .insert("a", ready_slice("a-1", "a", &reversed[..2]));
    w2.slices
        .insert("a2", ready_slice("a-2", "a", &reversed[2..]));
    let (d1, d2) = (w1.desired(), w2.desired());
    assert_eq!(d1, d2);

    let (mut f1, mut f2) = (Fake::default(), Fake::default());
    apply_ok(&mut Reconciler::new(SEED), &d1, &mut f1);
    apply_ok(&mut Reconciler::new(SEED), &d2, &mut f2);
    assert_converged(&f1, &d1); // equals maglev::build over the sorted backends
    assert_converged(&f2, &d2);
    for k in d1.frontends.keys() {
        assert_eq!(f1.table_of(k), f2.table_of(k), "{}", show_key(k));
    }
    // Every backend of a owns a fair share of its table.
    let table = f1.table_of(&a80());
    for ep in eps(&addrs.map(|a| (a, 8080))) {
        let owned = table.iter().filter(|e| **e == ep).count();
        assert!(
            owned == table.len() / 5 || owned == table.len() / 5 + 1,
            "{ep:?}: {owned}"
        );
    }

    // Another seed gives another table (the seed is really used).
    let mut f3 = Fake::default();
    apply_ok(&mut Reconciler::new(SEED + 1), &d1, &mut f3);
    assert_ne!(f1.table_of(&a80()), f3.table_of(&a80()));
}

#[test]
fn adopting_a_previous_agents_maps_converges_safely() {
    let mut w = World::new();
    let mut fake = Fake::default();
    apply_ok(&mut Reconciler::new(SEED), &w.desired(), &mut fake);

    // While the agent was down: b was deleted, c gained an endpoint, d appeared.
    w.services.remove("b");
    w.set_endpoints("c", &["10.0.1.5", "10.0.2.5", "10.0.2.7"]);
    w.services.insert(
        "d",
        Svc::new("d", "172.30.0.4").port("http", "TCP", 80).build(),
    );
    w.slices.insert("d", ready_slice("d-1", "d", &["10.0.1.8"]));
    let d = w.desired();

    let mut r = Reconciler::adopt(SEED, existing(&fake.maps));
    apply_ok(&mut r, &d, &mut fake); // invariants checked after every single operation
    assert_converged(&fake, &d);
    let st = apply_ok(&mut r, &d, &mut fake);
    assert_eq!(st.writes, 0);
}

#[test]
fn adopting_unchanged_state_keeps_backends_and_traffic() {
    let w = World::new();
    let d = w.desired();
    let mut fake = Fake::default();
    apply_ok(&mut Reconciler::new(SEED), &d, &mut fake);
    let before = fake.maps.clone();
    let mark = fake.ops.len();

    let mut r = Reconciler::adopt(SEED, existing(&fake.maps));
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
    // Backend ids are taken over as they are: no backend is rewritten or deleted.
    assert_eq!(fake.maps.backends, before.backends);
    assert!(
        fake.since(mark)
            .iter()
            .all(|o| !matches!(o, Op::SetBackend(..) | Op::DelBackend(_))),
        "{:#?}",
        fake.since(mark)
    );
    // The tables have the same contents under their new ids.
    for k in d.frontends.keys() {
        let old = before.frontends[k];
        let new = fake.maps.frontends[k];
        assert_eq!(
            before.tables.get(&old.table_loc),
            fake.maps.tables.get(&new.table_loc)
        );
    }
    assert_eq!(apply_ok(&mut r, &d, &mut fake).writes, 0);
}

#[test]
fn adopting_cleans_up_leftovers() {
    let w = World::new();
    let d = w.desired();
    let mut fake = Fake::default();
    apply_ok(&mut Reconciler::new(SEED), &d, &mut fake);
    // Left behind by a crash: a backend no table names, and a frontend of a service deleted
    // since, rejecting. (Table space no frontend reads is free by construction: see
    // table_slabs.rs.)
    let stray = Backend {
        addr: addr::from_ip(ip("10.0.3.3")),
        port: 80u16.to_be(),
        proto: 6,
        flags: 0,
        node: [0; 4],
    };
    fake.maps.backends.insert(901, stray);
    let gone = tcp("172.30.0.9", 80);
    fake.maps.frontends.insert(
        gone,
        SvcVal {
            group_id: 902,
            table_loc: 0,
            table_size: 0,
            backend_count: 0,
            flags: 0,
            affinity_timeout: 0,
        },
    );

    let mut r = Reconciler::adopt(SEED, existing(&fake.maps));
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
    assert_eq!(apply_ok(&mut r, &d, &mut fake).writes, 0);
}

#[test]
fn adopted_group_ids_are_never_reused_while_live() {
    // A previous agent with other group ids in use: adopt must not hand out an id a frontend
    // still carries, or two services would share affinity pins and counters.
    let w = World::new();
    let d = w.desired();
    let mut fake = Fake::default();
    apply_ok(&mut Reconciler::new(SEED), &d, &mut fake);
    let old_ids: BTreeSet<u32> = fake.maps.frontends.values().map(|v| v.group_id).collect();
    let mark = fake.ops.len();

    let mut r = Reconciler::adopt(SEED, existing(&fake.maps));
    apply_ok(&mut r, &d, &mut fake);
    for op in fake.since(mark) {
        if let Op::SetFrontend(_, v) = op {
            assert!(
                !old_ids.contains(&v.group_id),
                "group id {} reused",
                v.group_id
            );
        }
    }
    assert_converged(&fake, &d);
}

// ---- Failures ----------------------------------------------------------------------------------

/// The backend ids of address `ip` in the maps.
fn ids_of(maps: &Maps, ip_text: &str) -> BTreeSet<u32> {
    let want = addr::from_ip(ip(ip_text));
    maps.backends
        .iter()
        .filter(|(_, b)| b.addr == want)
        .map(|(id, _)| *id)
        .collect()
}

#[test]
fn a_failed_table_write_is_reported_and_isolated() {
    let d = World::new().desired();
    // b's TCP table cannot be written (its backends are 10.0.x.3/4 on port 8080).
    let mut fake = Fake::failing(|op, maps| match op {
        Op::WriteTable(_, named) => named.iter().any(|id| {
            let b = maps.backends[id];
            addr::to_ip(&b.addr) == ip("10.0.2.4") && u16::from_be(b.port) == 8080
        }),
        _ => false,
    });
    let mut r = Reconciler::new(SEED);
    let (st, errors) = apply(&mut r, &d, &mut fake);
    fake.assert_no_violations();
    assert_eq!(st.errors, 1);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("default/b") && errors[0].contains("map full"),
        "{errors:?}"
    );
    // b's TCP frontend is not written (it would point at nothing); everything else is fine.
    assert!(!fake.maps.frontends.contains_key(&b80()));
    assert_eq!(
        fake.resolve(&a80()),
        eps(&[("10.0.1.1", 8080), ("10.0.1.2", 8080)])
    );
    assert_eq!(fake.resolve(&b53()).len(), 3);
    assert_eq!(fake.resolve(&c80()).len(), 2);

    // The map has room again: the next sync finishes the job.
    fake.fail_if = None;
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
}

#[test]
fn a_backend_written_for_a_failed_table_goes_when_no_longer_wanted() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);

    // a gains 10.0.2.9: its backend is written, but a's new table cannot be.
    fake.fail_if = fail_when(|op, maps| match op {
        Op::WriteTable(_, named) => named
            .iter()
            .any(|id| addr::to_ip(&maps.backends[id].addr) == ip("10.0.2.9")),
        _ => false,
    });
    w.set_endpoints("a", &["10.0.1.1", "10.0.1.2", "10.0.2.9"]);
    let (_, errors) = apply(&mut r, &w.desired(), &mut fake);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(
        ids_of(&fake.maps, "10.0.2.9").len(),
        1,
        "written for the failed table"
    );

    // The endpoint goes away before any table named it: its backend must not stay behind.
    fake.fail_if = None;
    w.set_endpoints("a", &["10.0.1.1", "10.0.1.2"]);
    let d = w.desired();
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
    assert!(ids_of(&fake.maps, "10.0.2.9").is_empty());
}

#[test]
fn a_failed_backend_write_leaves_the_service_on_its_old_table() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    let d1 = w.desired();
    apply_ok(&mut r, &d1, &mut fake);
    let before = fake.maps.clone();

    // a's endpoints are replaced, and the new backend cannot be written.
    fake.fail_if = fail_when(|op, _| matches!(op, Op::SetBackend(_, a) if *a == ip("10.0.2.2")));
    w.set_endpoints("a", &["10.0.2.2"]);
    let d2 = w.desired();
    let (_, errors) = apply(&mut r, &d2, &mut fake);
    assert!(!errors.is_empty());
    assert!(errors.iter().any(|e| e.contains("10.0.2.2")), "{errors:#?}");
    // a still reaches its old backends (no dangling table entries), the others are untouched.
    fake.assert_no_violations();
    assert_eq!(
        fake.resolve(&a80()),
        eps(&[("10.0.1.1", 8080), ("10.0.1.2", 8080)])
    );
    for k in [b80(), b53(), c80()] {
        assert_eq!(fake.maps.frontends[&k], before.frontends[&k]);
    }

    fake.fail_if = None;
    apply_ok(&mut r, &d2, &mut fake);
    assert_converged(&fake, &d2);
}

#[test]
fn a_failed_frontend_write_is_retried() {
    let mut w = World::new();
    w.services.insert(
        "d",
        Svc::new("d", "172.30.0.4").port("http", "TCP", 80).build(),
    );
    w.slices.insert("d", ready_slice("d-1", "d", &["10.0.1.8"]));
    let d = w.desired();
    let d_key = tcp("172.30.0.4", 80);
    let mut fake = Fake::failing(move |op, _| matches!(op, Op::SetFrontend(k, _) if *k == d_key));
    let mut r = Reconciler::new(SEED);
    let (_, errors) = apply(&mut r, &d, &mut fake);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("default/d"), "{errors:?}");
    fake.assert_no_violations();
    assert_eq!(fake.resolve(&a80()).len(), 2);

    fake.fail_if = None;
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
}

#[test]
fn a_failed_frontend_delete_keeps_its_table_until_it_is_gone() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);

    w.services.remove("b");
    let d = w.desired();
    let key = b80();
    fake.fail_if = fail_when(move |op, _| matches!(op, Op::DelFrontend(k) if *k == key));
    let (_, errors) = apply(&mut r, &d, &mut fake);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    // The frontend that could not be removed still leads to b's backends.
    fake.assert_no_violations();
    assert_eq!(fake.resolve(&b80()).len(), 3);

    fake.fail_if = None;
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
}

#[test]
fn a_failed_frontend_update_to_zero_keeps_its_table() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);

    w.set_endpoints("c", &[]);
    let d = w.desired();
    let key = c80();
    fake.fail_if = fail_when(move |op, _| matches!(op, Op::SetFrontend(k, _) if *k == key));
    let (_, errors) = apply(&mut r, &d, &mut fake);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    fake.assert_no_violations();
    assert_eq!(
        fake.resolve(&c80()).len(),
        2,
        "still served by the old table"
    );

    fake.fail_if = None;
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
}

#[test]
fn a_failed_repoint_keeps_the_old_table() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);

    // a moves to a table of another size, but its frontend cannot be updated.
    let a = Svc::new("a", "172.30.0.1").port("http", "TCP", 80);
    w.services
        .insert("a", a.annotate(ANNOTATION_MAGLEV_SIZE, "509").build());
    let d = w.desired();
    let key = a80();
    fake.fail_if = fail_when(move |op, _| matches!(op, Op::SetFrontend(k, _) if *k == key));
    let (_, errors) = apply(&mut r, &d, &mut fake);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    fake.assert_no_violations();
    assert_eq!(fake.resolve(&a80()).len(), 2);

    fake.fail_if = None;
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
    assert_eq!(fake.maps.frontends[&a80()].table_size, 509);
}

#[test]
fn failing_deletes_do_not_stop_the_rest() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);

    // Every delete fails while b goes and a changes.
    fake.fail_if = fail_when(|op, _| matches!(op, Op::DelBackend(_) | Op::DelFrontend(_)));
    w.services.remove("b");
    w.set_endpoints("a", &["10.0.1.1", "10.0.2.2"]);
    let d = w.desired();
    let (_, errors) = apply(&mut r, &d, &mut fake);
    assert!(!errors.is_empty());
    fake.assert_no_violations();
    assert_eq!(
        fake.resolve(&a80()),
        eps(&[("10.0.1.1", 8080), ("10.0.2.2", 8080)])
    );
    assert_eq!(fake.resolve(&c80()).len(), 2);

    fake.fail_if = None;
    apply_ok(&mut r, &d, &mut fake);
    assert_converged(&fake, &d);
    assert!(ids_of(&fake.maps, "10.0.2.3").is_empty());
}

#[test]
fn protocol_is_part_of_the_backend() {
    // b's TCP and UDP backends share addresses but are distinct entries.
    let d = World::new().desired();
    let mut fake = Fake::default();
    apply_ok(&mut Reconciler::new(SEED), &d, &mut fake);
    let ids = ids_of(&fake.maps, "10.0.1.3");
    let protos: BTreeSet<u8> = ids.iter().map(|id| fake.maps.backends[id].proto).collect();
    assert_eq!(
        protos,
        [Protocol::Tcp.number(), Protocol::Udp.number()].into()
    );
}

/// With a previous-owner window, a table change keeps each moved slot's old owner beside the
/// new one until the window ends; slots that did not move carry none.
#[test]
fn table_changes_keep_previous_owners_for_the_window() {
    let mut w = World::new();
    // A fixed size: previous owners only mean something between tables of one size.
    let a = Svc::new("a", "172.30.0.1").port("http", "TCP", 80);
    w.services
        .insert("a", a.annotate(ANNOTATION_MAGLEV_SIZE, "1021").build());
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED).with_prev_window(Duration::from_secs(60));
    let d1 = w.desired();
    apply_ok(&mut r, &d1, &mut fake);
    let before = fake.maps.tables[&fake.maps.frontends[&a80()].table_loc].clone();
    assert!(
        before.iter().all(|s| s.prev == 0),
        "a first table has no history"
    );

    w.set_endpoints("a", &["10.0.1.1", "10.0.1.2", "10.0.2.9"]);
    let d2 = w.desired();
    apply_ok(&mut r, &d2, &mut fake);
    assert_converged(&fake, &d2);
    let a_table = fake.maps.frontends[&a80()].table_loc;
    let after = fake.maps.tables[&a_table].clone();
    let mut moved = 0;
    for (now, was) in after.iter().zip(&before) {
        if now.backend == was.backend {
            assert_eq!(now.prev, 0, "an unmoved slot has no previous owner");
        } else {
            assert_eq!(now.prev, was.backend, "a moved slot names its old owner");
            moved += 1;
        }
    }
    // Two backends become three: about a third of the slots move, all to the new backend.
    let size = after.len();
    assert!(
        moved > size / 4 && moved < size / 2,
        "{moved} of {size} slots moved"
    );

    // Not yet expired: nothing is rewritten.
    assert_eq!(
        r.expire_prev(Instant::now(), &mut fake, &mut |e| panic!("{e}")),
        0
    );
    // After the window the table is rewritten without previous owners, same owners.
    let later = Instant::now() + Duration::from_secs(61);
    assert_eq!(r.expire_prev(later, &mut fake, &mut |e| panic!("{e}")), 1);
    let cleared = &fake.maps.tables[&a_table];
    assert!(cleared.iter().all(|s| s.prev == 0));
    assert!(
        cleared
            .iter()
            .zip(&after)
            .all(|(c, a)| c.backend == a.backend)
    );
    assert_eq!(r.expire_prev(later, &mut fake, &mut |e| panic!("{e}")), 0);
}

#[test]
fn without_a_window_tables_carry_no_previous_owners() {
    let mut w = World::new();
    let mut fake = Fake::default();
    let mut r = Reconciler::new(SEED);
    apply_ok(&mut r, &w.desired(), &mut fake);
    w.set_endpoints("a", &["10.0.1.1", "10.0.1.2", "10.0.2.9"]);
    apply_ok(&mut r, &w.desired(), &mut fake);
    assert!(fake.maps.tables.values().flatten().all(|s| s.prev == 0));
}

// ---- Incremental syncs -------------------------------------------------------------------------

fn obj_key(name: &str) -> ObjKey {
    ("default".to_string(), name.to_string())
}

/// The agent's incremental path over an in-memory datapath: each change tells the view only
/// about the objects it changed, and only the keys the view reports as touched are synced.
struct Incremental {
    view: ClusterView,
    r: Reconciler,
    fake: Fake,
}

impl Incremental {
    fn start(w: &World, node: &NodeConfig) -> Self {
        let mut inc = Self {
            view: ClusterView::default(),
            r: Reconciler::new(SEED),
            fake: Fake::default(),
        };
        inc.view.set_node(node);
        let mut warn = |e: String| panic!("{e}");
        for (name, svc) in &w.services {
            inc.view.set_service(&obj_key(name), Some(svc), &mut warn);
        }
        for s in w.slices.values() {
            let name = s.metadata.name.clone().unwrap();
            inc.view.set_slice(&obj_key(&name), Some(s), &mut warn);
        }
        inc.view.recompute(&mut warn);
        let (_, errors) = apply_scoped(&mut inc.r, inc.view.desired(), Scope::All, &mut inc.fake);
        assert!(errors.is_empty(), "{errors:#?}");
        inc
    }

    /// Tells the view that `services` and `slices` (keys) are now as in `w`, syncs what that
    /// touched, and checks the maps equal a full computation of `w`. Returns the operations.
    fn change(&mut self, w: &World, services: &[&str], slices: &[&str]) -> Vec<Op> {
        let mut warn = |e: String| panic!("{e}");
        for name in services {
            let svc = w.services.get(name);
            self.view.set_service(&obj_key(name), svc, &mut warn);
        }
        for name in slices {
            let s = w
                .slices
                .values()
                .find(|s| s.metadata.name.as_deref() == Some(*name));
            self.view.set_slice(&obj_key(name), s, &mut warn);
        }
        self.sync(w)
    }

    fn sync(&mut self, w: &World) -> Vec<Op> {
        let mark = self.fake.ops.len();
        let touched = self.view.recompute(&mut |e| panic!("{e}"));
        let (_, errors) = apply_scoped(
            &mut self.r,
            self.view.desired(),
            Scope::Touched(&touched),
            &mut self.fake,
        );
        assert!(errors.is_empty(), "{errors:#?}");
        self.fake.assert_no_violations();
        let full = w.desired();
        assert_eq!(
            self.view.desired(),
            &full,
            "incremental and full desired state"
        );
        assert_converged(&self.fake, &full);
        self.fake.since(mark).to_vec()
    }
}

fn external_svc(name: &str, vip: &str) -> Service {
    let mut s = Svc::new(name, vip).port("http", "TCP", 80).build();
    if let Some(spec) = s.spec.as_mut() {
        spec.external_ips = Some(vec!["192.168.99.10".to_string()]);
    }
    s
}

#[test]
fn syncing_only_what_changed_ends_where_a_full_sync_does() {
    let mut w = World::new();
    let node = node(NODE);
    let mut inc = Incremental::start(&w, &node);
    assert_converged(&inc.fake, &w.desired());

    // One endpoint more for a: only a's backend, table and frontend are written.
    w.set_endpoints("a", &["10.0.1.1", "10.0.1.2", "10.0.2.9"]);
    let ops = inc.change(&w, &[], &["a-1"]);
    let kinds: Vec<&str> = ops.iter().map(Op::kind).collect();
    assert_eq!(
        kinds,
        ["set_backend", "write_table", "set_frontend", "retire_table"]
    );

    // b goes before its slice does, then the slice; d arrives before its endpoints do.
    w.services.remove("b");
    inc.change(&w, &["b"], &[]);
    w.slices.remove("b");
    assert!(
        inc.change(&w, &[], &["b-1"]).is_empty(),
        "nothing left to do"
    );
    w.services.insert(
        "d",
        Svc::new("d", "172.30.0.4").port("http", "TCP", 80).build(),
    );
    let ops = inc.change(&w, &["d"], &[]);
    assert!(
        matches!(&ops[..], [Op::SetFrontend(_, v)] if v.backend_count == 0),
        "{ops:#?}"
    );
    w.slices.insert("d", ready_slice("d-1", "d", &["10.0.1.8"]));
    inc.change(&w, &[], &["d-1"]);

    // c scaled to zero, then annotated with another table size, then back.
    w.set_endpoints("c", &[]);
    inc.change(&w, &[], &["c-1"]);
    let c = Svc::new("c", "172.30.0.3").port("http", "TCP", 80);
    w.services
        .insert("c", c.annotate(ANNOTATION_MAGLEV_SIZE, "4093").build());
    inc.change(&w, &["c"], &[]);
    w.set_endpoints("c", &["10.0.1.5", "10.0.2.5"]);
    inc.change(&w, &[], &["c-1"]);
    assert_eq!(inc.fake.maps.frontends[&c80()].table_size, 4093);

    // Two services claim the same external IP and port: the greater name wins, and the other
    // takes over when it goes.
    let ext = SvcKey {
        scope: lb_common::SCOPE_EXTERNAL,
        ..tcp("192.168.99.10", 80)
    };
    w.services.insert("e", external_svc("e", "172.30.0.5"));
    w.slices
        .insert("e", ready_slice("e-1", "e", &["10.0.1.20"]));
    inc.change(&w, &["e"], &["e-1"]);
    w.services.insert("f", external_svc("f", "172.30.0.6"));
    w.slices
        .insert("f", ready_slice("f-1", "f", &["10.0.1.21"]));
    inc.change(&w, &["f"], &["f-1"]);
    assert_eq!(inc.fake.resolve(&ext), eps(&[("10.0.1.21", 8080)]));
    w.services.remove("f");
    inc.change(&w, &["f"], &[]);
    assert_eq!(inc.fake.resolve(&ext), eps(&[("10.0.1.20", 8080)]));

    // A node change (another zone) makes every service stale; still the same end state.
    let zoned = NodeConfig {
        zone: Some("zone-b".into()),
        ..node.clone()
    };
    inc.view.set_node(&zoned);
    let mark = inc.fake.ops.len();
    let touched = inc.view.recompute(&mut |e| panic!("{e}"));
    assert!(touched.frontends.len() >= inc.fake.maps.frontends.len());
    let (_, errors) = apply_scoped(
        &mut inc.r,
        inc.view.desired(),
        Scope::Touched(&touched),
        &mut inc.fake,
    );
    assert!(errors.is_empty());
    assert!(inc.fake.since(mark).is_empty(), "zones change nothing here");
}

#[test]
fn a_failure_in_a_scoped_sync_is_retried_by_the_next_one() {
    let mut w = World::new();
    let mut inc = Incremental::start(&w, &node(NODE));
    // a's new frontend value cannot be written this time.
    let key = a80();
    inc.fake.fail_if = fail_when(move |op, _| matches!(op, Op::SetFrontend(k, _) if *k == key));
    w.set_endpoints("a", &["10.0.1.1", "10.0.2.9"]);
    inc.view
        .set_slice(&obj_key("a-1"), w.slices.get("a"), &mut |e| panic!("{e}"));
    let touched = inc.view.recompute(&mut |e| panic!("{e}"));
    let (_, errors) = apply_scoped(
        &mut inc.r,
        inc.view.desired(),
        Scope::Touched(&touched),
        &mut inc.fake,
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    inc.fake.assert_no_violations();
    assert_eq!(
        inc.fake.resolve(&a80()),
        eps(&[("10.0.1.1", 8080), ("10.0.1.2", 8080)]),
        "still on the old table"
    );
    // The next sync is about another service only, yet finishes a's change too.
    inc.fake.fail_if = None;
    w.set_endpoints("c", &["10.0.1.5"]);
    inc.change(&w, &[], &["c-1"]);
    assert_eq!(
        inc.fake.resolve(&a80()),
        eps(&[("10.0.1.1", 8080), ("10.0.2.9", 8080)])
    );
}
