//! Applies a [`Desired`] state to the datapath as a minimal diff.
//!
//! Order matters because programs read the maps while we write them: backends are written
//! before the tables that name them, tables before the frontends that point at them, and removal
//! goes the other way round. A table is replaced whole by one outer-map update, so a packet sees
//! either the old or the new table, never a mix; all of a sync's tables go in one batch, as each
//! outer-map syscall waits for an RCU grace period. Only what changed is written.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use lb_common::{BACKEND_F_LOCAL, Backend, MaglevSlot, SvcKey, SvcVal, addr, maglev};

use crate::model::{BackendSpec, Desired, GroupKey};

/// The map operations the reconciler needs; implemented over the pinned BPF maps and, for
/// tests, in memory.
pub trait Datapath {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), Self::Error>;
    fn del_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    /// Replaces group `id`'s table atomically with `table` (backend ids).
    fn set_table(&mut self, id: u32, table: &[MaglevSlot]) -> Result<(), Self::Error>;
    fn del_table(&mut self, id: u32) -> Result<(), Self::Error>;
    /// [`Datapath::set_table`] for several tables, one result each, in order. The BPF
    /// datapath swaps them in with one syscall (one RCU grace period instead of one per table).
    fn set_tables(&mut self, tables: &[(u32, Vec<MaglevSlot>)]) -> Vec<Result<(), Self::Error>> {
        tables
            .iter()
            .map(|(id, t)| self.set_table(*id, t))
            .collect()
    }
    /// [`Datapath::del_table`] for several tables, one result each, in order.
    fn del_tables(&mut self, ids: &[u32]) -> Vec<Result<(), Self::Error>> {
        ids.iter().map(|id| self.del_table(*id)).collect()
    }
    fn set_frontend(&mut self, key: &SvcKey, val: &SvcVal) -> Result<(), Self::Error>;
    fn del_frontend(&mut self, key: &SvcKey) -> Result<(), Self::Error>;
    /// Adds (`present`) or removes a loadBalancerSourceRanges entry of table `group`. The
    /// default (test doubles without a source-range map) accepts and ignores it.
    fn set_src_range(
        &mut self,
        _group: u32,
        _net: std::net::IpAddr,
        _prefix: u8,
        _present: bool,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Forgets the sessionAffinity pins of group `group` to backends other than `keep` (ids),
    /// so clients of a backend that left the group (but may still serve another one) get a fresh
    /// pick. Called after the group's new table is in place. The default (test doubles without
    /// an affinity map) does nothing.
    fn purge_affinity(&mut self, _group: u32, _keep: &[u32]) -> Result<(), Self::Error> {
        Ok(())
    }
    /// [`Datapath::purge_affinity`] for several `(group, keep)` at once (the BPF datapath
    /// scans its map once for all of them).
    fn purge_affinity_groups(&mut self, purges: &[(u32, Vec<u32>)]) -> Result<(), Self::Error> {
        purges
            .iter()
            .try_for_each(|(group, keep)| self.purge_affinity(*group, keep))
    }
}

/// What a previous agent left in pinned maps, read back at start.
#[derive(Clone, Debug, Default)]
pub struct Existing {
    pub backends: Vec<(u32, Backend)>,
    pub frontends: Vec<(SvcKey, SvcVal)>,
    pub groups: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends: usize,
    pub groups: usize,
    pub backends: usize,
    /// Map writes and deletes this sync performed.
    pub writes: usize,
    pub errors: usize,
}

#[derive(Debug)]
struct AppliedGroup {
    id: u32,
    /// `None` until a table (possibly empty) has been written for it.
    backends: Option<Vec<BackendSpec>>,
    /// Until when the written table carries previous owners (see [`Reconciler::expire_prev`]).
    prev_until: Option<Instant>,
    /// A frontend of the group has sessionAffinity (its clients may be pinned to backends).
    affinity: bool,
}

/// Small id allocator: ids are never 0 and never reused while live.
#[derive(Debug, Default)]
struct Ids {
    used: BTreeSet<u32>,
    next: u32,
}

impl Ids {
    fn alloc(&mut self) -> u32 {
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            if self.used.insert(self.next) {
                return self.next;
            }
        }
    }
    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// The reconciler: remembers what it wrote so each sync writes only the difference.
#[derive(Debug)]
pub struct Reconciler {
    seed: u64,
    backend_ids: Ids,
    backends: HashMap<Backend, u32>,
    /// How many groups' tables in the maps name each backend (`AppliedGroup::backends`): a
    /// sync only looks at the backends whose count may have dropped, not at all of them.
    named: HashMap<Backend, u32>,
    /// Backends to check for removal at the next sync: written for a table that is not in the
    /// maps yet (its build or write failed), or adopted from a previous agent.
    loose: BTreeSet<Backend>,
    group_ids: Ids,
    groups: BTreeMap<GroupKey, AppliedGroup>,
    frontends: BTreeMap<SvcKey, SvcVal>,
    /// Tables adopted from a previous agent whose group identity is unknown: deleted once the
    /// first sync has repointed every frontend at a fresh table.
    orphan_groups: Vec<u32>,
    /// Source-range entries written: (group id, network, prefix).
    ranges: BTreeSet<(u32, std::net::IpAddr, u8)>,
    /// How long a changed table keeps each moved slot's previous owner (0: never).
    prev_window: Duration,
}

/// The `KPLB_BACKENDS` value for a desired backend.
pub fn backend_value(b: &BackendSpec) -> Backend {
    Backend {
        addr: addr::from_ip(b.addr),
        port: b.port.to_be(),
        proto: b.protocol.number(),
        flags: if b.local { BACKEND_F_LOCAL } else { 0 },
        node: b.node_ip.map(addr::from_ip).unwrap_or_default(),
    }
}

impl Reconciler {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            backend_ids: Ids::default(),
            backends: HashMap::new(),
            named: HashMap::new(),
            loose: BTreeSet::new(),
            group_ids: Ids::default(),
            groups: BTreeMap::new(),
            frontends: BTreeMap::new(),
            orphan_groups: Vec::new(),
            ranges: BTreeSet::new(),
            prev_window: Duration::ZERO,
        }
    }

    /// Every programmed group's identity and id (per-service metrics label counters by id).
    pub fn group_ids(&self) -> impl Iterator<Item = (&GroupKey, u32)> + '_ {
        self.groups.iter().map(|(k, g)| (k, g.id))
    }

    /// Keep previous slot owners for `window` after each table change, so established flows
    /// that lose their conntrack entry still reach their backend (the XDP path consults them).
    pub fn with_prev_window(mut self, window: Duration) -> Self {
        self.prev_window = window;
        self
    }

    /// Starts from a previous agent's pinned state so traffic keeps flowing: backend ids and
    /// frontends are taken over as they are; tables get fresh ids (their group identity is not
    /// stored) and the old ones go once nothing points at them.
    pub fn adopt(seed: u64, existing: Existing) -> Self {
        let mut r = Self::new(seed);
        for (id, b) in existing.backends {
            r.backend_ids.used.insert(id);
            r.backends.insert(b, id);
            r.loose.insert(b);
        }
        for g in existing.groups {
            r.group_ids.used.insert(g);
            r.orphan_groups.push(g);
        }
        for (k, v) in existing.frontends {
            r.group_ids.used.insert(v.group_id);
            if !r.orphan_groups.contains(&v.group_id) {
                r.orphan_groups.push(v.group_id);
            }
            r.frontends.insert(k, v);
        }
        r
    }

    pub fn apply<D: Datapath>(
        &mut self,
        desired: &Desired,
        dp: &mut D,
        on_error: &mut dyn FnMut(String),
    ) -> SyncStats {
        let mut st = SyncStats::default();
        let mut fail = |st: &mut SyncStats, what: String| {
            st.errors += 1;
            on_error(what);
        };

        // 1. Backends the changed tables need. A table whose backends did not change names
        // only backends that are written already.
        let changed: Vec<&[BackendSpec]> = desired
            .groups
            .iter()
            .filter(|(k, g)| {
                self.groups.get(*k).and_then(|a| a.backends.as_ref()) != Some(&g.backends)
            })
            .map(|(_, g)| g.backends.as_slice())
            .collect();
        let wanted: BTreeSet<Backend> = changed
            .iter()
            .flat_map(|b| b.iter().map(backend_value))
            .collect();
        for b in &wanted {
            if self.backends.contains_key(b) {
                continue;
            }
            let id = self.backend_ids.alloc();
            match dp.set_backend(id, b) {
                Ok(()) => {
                    st.writes += 1;
                    self.backends.insert(*b, id);
                    self.loose.insert(*b);
                }
                Err(e) => {
                    self.backend_ids.free(id);
                    fail(&mut st, format!("backend {}: {e}", addr::to_ip(&b.addr)));
                }
            }
        }

        // 2. Tables whose backend set changed (or are new): built in parallel, swapped in
        // with one batch.
        let mut emptied = Vec::new();
        // (group id, its backends now) of affinity groups that lost backends.
        let mut purge: Vec<(u32, Vec<BackendSpec>)> = Vec::new();
        let affinity_groups: BTreeSet<&GroupKey> = desired
            .frontends
            .values()
            .filter(|fe| fe.affinity_timeout_s != 0)
            .map(|fe| &fe.group)
            .collect();
        let mut jobs: Vec<TableJob<'_>> = Vec::new();
        for (key, group) in &desired.groups {
            let applied = self
                .groups
                .entry(key.clone())
                .or_insert_with(|| AppliedGroup {
                    id: self.group_ids.alloc(),
                    backends: None,
                    prev_until: None,
                    affinity: false,
                });
            applied.affinity = affinity_groups.contains(key);
            if applied.backends.as_ref() == Some(&group.backends) {
                continue;
            }
            // Affinity pins to backends that leave the group are dropped once the new table
            // (or none) is in place.
            if applied.affinity
                && let Some(old) = &applied.backends
                && old.iter().any(|b| !group.backends.contains(b))
            {
                purge.push((applied.id, group.backends.clone()));
            }
            if group.backends.is_empty() {
                // No table: the frontend's backend_count of 0 makes the programs reject. The
                // old table goes only after the frontends stop pointing at it (step 5); deleting
                // it first would let a connect find a frontend without its table. Until then
                // `backends` keeps describing the table that is still there.
                if applied.backends.as_ref().is_some_and(|b| !b.is_empty()) {
                    emptied.push(key.clone());
                } else {
                    let old = applied.backends.replace(Vec::new());
                    rename(&mut self.named, &mut self.loose, old.as_deref(), &[]);
                }
                continue;
            }
            jobs.push(TableJob {
                key,
                id: applied.id,
                backends: &group.backends,
                previous: applied
                    .backends
                    .clone()
                    .filter(|b| !b.is_empty() && !self.prev_window.is_zero()),
            });
        }
        let (seed, ids) = (self.seed, &self.backends);
        let built = par_map(&jobs, |j| {
            let mut t = build_table(j.backends, j.key.table_size, seed, ids)?;
            let moved = j
                .previous
                .as_deref()
                .is_some_and(|old| mark_previous_owners(&mut t, old, j.key.table_size, seed, ids));
            Ok::<_, String>((t, moved))
        });
        let mut staged = Vec::new();
        let mut staged_jobs = Vec::new();
        for (job, b) in jobs.iter().zip(built) {
            match b {
                Ok((table, moved)) => {
                    staged.push((job.id, table));
                    staged_jobs.push((job, moved));
                }
                Err(e) => fail(&mut st, format!("service {} table: {e}", job.key.service)),
            }
        }
        let written = if staged.is_empty() {
            Vec::new()
        } else {
            dp.set_tables(&staged)
        };
        for ((job, moved), r) in staged_jobs.into_iter().zip(written) {
            match r {
                Ok(()) => {
                    st.writes += 1;
                    if let Some(applied) = self.groups.get_mut(job.key) {
                        let old = applied.backends.replace(job.backends.to_vec());
                        rename(
                            &mut self.named,
                            &mut self.loose,
                            old.as_deref(),
                            job.backends,
                        );
                        applied.prev_until = moved.then(|| Instant::now() + self.prev_window);
                    }
                }
                Err(e) => fail(&mut st, format!("service {} table: {e}", job.key.service)),
            }
        }

        // 3. Source ranges before the frontends that check them, stale ones after.
        let want_ranges: BTreeSet<(u32, std::net::IpAddr, u8)> = desired
            .src_ranges
            .iter()
            .filter_map(|(g, r)| self.groups.get(g).map(|a| (a.id, r)))
            .flat_map(|(id, r)| r.iter().map(move |(net, p)| (id, *net, *p)))
            .collect();
        for &(id, net, p) in want_ranges.difference(&self.ranges.clone()) {
            match dp.set_src_range(id, net, p, true) {
                Ok(()) => {
                    st.writes += 1;
                    self.ranges.insert((id, net, p));
                }
                Err(e) => fail(&mut st, format!("source range {net}/{p}: {e}")),
            }
        }
        let stale_ranges: Vec<_> = self.ranges.difference(&want_ranges).copied().collect();
        for (id, net, p) in stale_ranges {
            st.writes += 1;
            if let Err(e) = dp.set_src_range(id, net, p, false) {
                fail(&mut st, format!("remove source range {net}/{p}: {e}"));
            }
            self.ranges.remove(&(id, net, p));
        }

        // 4. Frontends pointing at those tables.
        for (key, fe) in &desired.frontends {
            let Some(g) = self.groups.get(&fe.group) else {
                continue;
            };
            let count = match (&g.backends, desired.groups.get(&fe.group)) {
                (_, Some(d)) if d.backends.is_empty() => 0,
                (Some(backends), _) => backends.len(),
                (None, _) => continue, // its table failed to build; keep whatever is there
            };
            let val = SvcVal {
                group_id: g.id,
                table_size: fe.group.table_size,
                backend_count: u32::try_from(count).unwrap_or(u32::MAX),
                flags: fe.flags,
                affinity_timeout: fe.affinity_timeout_s,
            };
            if self.frontends.get(key) == Some(&val) {
                continue;
            }
            match dp.set_frontend(key, &val) {
                Ok(()) => {
                    st.writes += 1;
                    self.frontends.insert(*key, val);
                }
                Err(e) => fail(&mut st, format!("frontend of {}: {e}", fe.group.service)),
            }
        }

        // 5. Removals, in reverse dependency order.
        let stale: Vec<SvcKey> = self
            .frontends
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            match dp.del_frontend(&key) {
                Ok(()) => {
                    st.writes += 1;
                    self.frontends.remove(&key);
                }
                Err(e) => fail(&mut st, format!("remove frontend: {e}")),
            }
        }
        // A frontend whose update or removal failed may still point at a table: keep such
        // tables (and their backends) for a later sync. A failed table removal is retried too.
        let in_use: BTreeSet<u32> = self
            .frontends
            .values()
            .filter(|v| v.backend_count > 0)
            .map(|v| v.group_id)
            .collect();
        // Tables to delete, all in one batch: emptied ones nothing points at any more, those of
        // groups no longer desired, and adopted ones no frontend uses now.
        let live: BTreeSet<u32> = self.frontends.values().map(|v| v.group_id).collect();
        let mut doomed: Vec<(u32, Doomed)> = Vec::new();
        for key in emptied {
            if let Some(g) = self.groups.get(&key)
                && !in_use.contains(&g.id)
            {
                doomed.push((g.id, Doomed::Emptied(key)));
            }
        }
        let stale: Vec<GroupKey> = self
            .groups
            .iter()
            .filter(|(k, g)| !desired.groups.contains_key(*k) && !in_use.contains(&g.id))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            let has_table = self
                .groups
                .get(&key)
                .is_some_and(|g| g.backends.as_ref().is_some_and(|b| !b.is_empty()));
            match self.groups.get(&key) {
                Some(g) if has_table => doomed.push((g.id, Doomed::Stale(key))),
                _ => self.forget_group(&key, &mut purge),
            }
        }
        let orphans = std::mem::take(&mut self.orphan_groups);
        for id in orphans {
            if live.contains(&id) {
                self.orphan_groups.push(id);
            } else {
                doomed.push((id, Doomed::Orphan));
            }
        }
        let ids: Vec<u32> = doomed.iter().map(|(id, _)| *id).collect();
        let deleted = if ids.is_empty() {
            Vec::new()
        } else {
            dp.del_tables(&ids)
        };
        for ((id, what), r) in doomed.into_iter().zip(deleted) {
            match (what, r) {
                (Doomed::Emptied(key), Ok(())) => {
                    st.writes += 1;
                    if let Some(g) = self.groups.get_mut(&key) {
                        let old = g.backends.replace(Vec::new());
                        rename(&mut self.named, &mut self.loose, old.as_deref(), &[]);
                    }
                }
                (Doomed::Emptied(key), Err(e)) => fail(
                    &mut st,
                    format!("remove emptied table of {}: {e}", key.service),
                ),
                (Doomed::Stale(key), Ok(())) => {
                    st.writes += 1;
                    self.forget_group(&key, &mut purge);
                }
                (Doomed::Stale(key), Err(e)) => {
                    fail(&mut st, format!("remove table of {}: {e}", key.service));
                }
                // Adopted tables may or may not exist; a missing one is fine.
                (Doomed::Orphan, _) => {
                    st.writes += 1;
                    // The id may be reused: drop the previous agent's pins of that group.
                    purge.push((id, Vec::new()));
                    self.group_ids.free(id);
                }
            }
        }
        // Now that no table names them, forget the pins to backends that left their group
        // (before the backends' ids can be freed and reused below).
        let purges: Vec<(u32, Vec<u32>)> = purge
            .iter()
            .map(|(id, backends)| {
                let keep = backends
                    .iter()
                    .filter_map(|b| self.backends.get(&backend_value(b)).copied())
                    .collect();
                (*id, keep)
            })
            .collect();
        if !purges.is_empty()
            && let Err(e) = dp.purge_affinity_groups(&purges)
        {
            fail(&mut st, format!("purge affinity pins: {e}"));
        }
        // Backends no table in the maps names any more, unless a changed table still wants
        // them (its rebuild failed: they stay loose and are checked again next time).
        let loose = std::mem::take(&mut self.loose);
        for b in loose {
            if self.named.contains_key(&b) {
                continue;
            }
            let Some(&id) = self.backends.get(&b) else {
                continue;
            };
            if wanted.contains(&b) {
                self.loose.insert(b);
                continue;
            }
            match dp.del_backend(id) {
                Ok(()) => {
                    st.writes += 1;
                    self.backends.remove(&b);
                    self.backend_ids.free(id);
                }
                Err(e) => {
                    self.loose.insert(b);
                    fail(&mut st, format!("remove backend: {e}"));
                }
            }
        }

        st.frontends = self.frontends.len();
        st.groups = self.groups.len();
        st.backends = self.backends.len();
        st
    }
}

/// Moves a group's table from naming `old` to naming `new` in the per-backend counts; a
/// backend that may have lost its last name becomes loose.
fn rename(
    named: &mut HashMap<Backend, u32>,
    loose: &mut BTreeSet<Backend>,
    old: Option<&[BackendSpec]>,
    new: &[BackendSpec],
) {
    for b in new {
        *named.entry(backend_value(b)).or_default() += 1;
    }
    for b in old.unwrap_or_default() {
        let v = backend_value(b);
        if let Some(n) = named.get_mut(&v) {
            *n -= 1;
            if *n == 0 {
                named.remove(&v);
                loose.insert(v);
            }
        }
    }
}

/// A table to build and write in step 2 of [`Reconciler::apply`].
struct TableJob<'a> {
    key: &'a GroupKey,
    id: u32,
    backends: &'a [BackendSpec],
    /// The backends of the table being replaced, when moved slots keep their previous owner.
    previous: Option<Vec<BackendSpec>>,
}

/// Why a table is deleted in step 5 of [`Reconciler::apply`].
enum Doomed {
    Emptied(GroupKey),
    Stale(GroupKey),
    Orphan,
}

/// `f` over `items` on all CPUs (table builds are independent and CPU-bound), in order.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Below a few tables a thread costs more than it saves.
    let chunk = items.len().div_ceil(threads).max(4);
    if items.len() <= chunk {
        return items.iter().map(&f).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| s.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

impl Reconciler {
    /// Drops a group that is gone from the desired state and has no table in the maps.
    fn forget_group(&mut self, key: &GroupKey, purge: &mut Vec<(u32, Vec<BackendSpec>)>) {
        if let Some(g) = self.groups.remove(key) {
            rename(&mut self.named, &mut self.loose, g.backends.as_deref(), &[]);
            if g.affinity {
                // The id may be reused by another service: none of its pins may survive.
                purge.push((g.id, Vec::new()));
            }
            self.group_ids.free(g.id);
        }
    }
}

impl Reconciler {
    /// Rewrites, without previous owners, every table whose window ended by `now`. Returns how
    /// many tables were rewritten.
    pub fn expire_prev<D: Datapath>(
        &mut self,
        now: Instant,
        dp: &mut D,
        on_error: &mut dyn FnMut(String),
    ) -> usize {
        let mut staged = Vec::new();
        let mut keys = Vec::new();
        for (key, g) in &mut self.groups {
            if g.prev_until.is_none_or(|t| t > now) {
                continue;
            }
            let Some(backends) = g.backends.as_deref().filter(|b| !b.is_empty()) else {
                g.prev_until = None;
                continue;
            };
            match build_table(backends, key.table_size, self.seed, &self.backends) {
                Ok(t) => {
                    staged.push((g.id, t));
                    keys.push(key.clone());
                }
                Err(e) => on_error(format!("service {} table: {e}", key.service)),
            }
        }
        if staged.is_empty() {
            return 0;
        }
        let mut rewritten = 0;
        for (key, r) in keys.iter().zip(dp.set_tables(&staged)) {
            match r {
                Ok(()) => {
                    if let Some(g) = self.groups.get_mut(key) {
                        g.prev_until = None;
                    }
                    rewritten += 1;
                }
                Err(e) => on_error(format!("service {} table: {e}", key.service)),
            }
        }
        rewritten
    }
}

/// Sets `prev` on every slot of `table` whose owner differs from the table built from `old`
/// (the one being replaced). Returns whether any slot moved.
fn mark_previous_owners(
    table: &mut [MaglevSlot],
    old: &[BackendSpec],
    size: u32,
    seed: u64,
    ids: &HashMap<Backend, u32>,
) -> bool {
    // Old backends are still in `ids`: removals happen after tables are written.
    let Ok(before) = build_table(old, size, seed, ids) else {
        return false;
    };
    let mut moved = false;
    for (slot, was) in table.iter_mut().zip(before) {
        if slot.backend != was.backend {
            slot.prev = was.backend;
            moved = true;
        }
    }
    moved
}

fn build_table(
    backends: &[BackendSpec],
    size: u32,
    seed: u64,
    ids: &HashMap<Backend, u32>,
) -> Result<Vec<MaglevSlot>, String> {
    let idents: Vec<maglev::Identity> = backends.iter().map(BackendSpec::identity).collect();
    let slots = maglev::build(&idents, size, seed).map_err(|e| e.to_string())?;
    let by_index: Vec<u32> = backends
        .iter()
        .map(|b| {
            ids.get(&backend_value(b))
                .copied()
                .ok_or("backend not written")
        })
        .collect::<Result<_, _>>()?;
    Ok(slots
        .iter()
        .map(|&i| MaglevSlot {
            backend: by_index[i as usize],
            prev: 0,
        })
        .collect())
}
