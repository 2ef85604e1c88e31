//! Applies a [`Desired`] state to the datapath as a minimal diff.
//!
//! Order matters because programs read the maps while we write them: backends are written
//! before the tables that name them, tables before the frontends that point at them, and removal
//! goes the other way round. A table is written whole into free space before any frontend names
//! it, and a frontend's value (table location, size, backend count) changes in one map update,
//! so a packet sees either the old or the new table, never a mix. A replaced table's space is
//! retired once no frontend points at it any more.
//!
//! A sync looks at everything ([`Scope::All`]: the first sync, a relist) or only at the keys a
//! change touched plus the ones an earlier sync could not finish ([`Scope::Touched`]), so one
//! EndpointSlice change costs the same with ten services as with ten thousand.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{BACKEND_F_LOCAL, Backend, MaglevSlot, SvcKey, SvcVal, addr, maglev};

use crate::model::{BackendSpec, Desired, Frontend, Group, GroupKey, Touched};

/// Where a Maglev table lives: `loc` as in [`SvcVal::table_loc`], `size` slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableLoc {
    pub loc: u32,
    pub size: u32,
}

/// The map operations the reconciler needs; implemented over the pinned BPF maps and, for
/// tests, in memory.
pub trait Datapath {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), Self::Error>;
    /// [`Datapath::set_backend`] for many, one result each, in order.
    fn set_backends(&mut self, backends: &[(u32, Backend)]) -> Vec<Result<(), Self::Error>> {
        backends
            .iter()
            .map(|(id, b)| self.set_backend(*id, b))
            .collect()
    }
    fn del_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    /// Writes `table` into free table space that no frontend names yet; returns where.
    fn write_table(&mut self, table: &[MaglevSlot]) -> Result<TableLoc, Self::Error>;
    /// [`Datapath::write_table`] for many, one result each, in order.
    fn write_tables(&mut self, tables: &[&[MaglevSlot]]) -> Vec<Result<TableLoc, Self::Error>> {
        tables.iter().map(|t| self.write_table(t)).collect()
    }
    /// Overwrites the table at `loc` in place, slot by slot. Only for changes every reader may
    /// see half done (dropping previous owners: each slot keeps its backend).
    fn rewrite_table(&mut self, loc: TableLoc, table: &[MaglevSlot]) -> Result<(), Self::Error>;
    /// No frontend names the table at `loc` any more; its space may be reused once no program
    /// can still be reading it.
    fn retire_table(&mut self, loc: TableLoc);
    fn set_frontend(&mut self, key: &SvcKey, val: &SvcVal) -> Result<(), Self::Error>;
    fn del_frontend(&mut self, key: &SvcKey) -> Result<(), Self::Error>;
    /// Adds (`present`) or removes a loadBalancerSourceRanges entry of group `group`. The
    /// default (test doubles without a source-range map) accepts and ignores it.
    fn set_src_range(
        &mut self,
        _group: u32,
        _net: IpAddr,
        _prefix: u8,
        _present: bool,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Forgets the sessionAffinity pins of each `(group, keep)` to backends other than `keep`
    /// (ids), so clients of a backend that left the group (but may still serve another one)
    /// get a fresh pick. Called after the groups' new tables are in place. The default (test
    /// doubles without an affinity map) does nothing.
    fn purge_affinity_groups(&mut self, _purges: &[(u32, Vec<u32>)]) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// What a previous agent left in pinned maps, read back at start.
#[derive(Clone, Debug, Default)]
pub struct Existing {
    pub backends: Vec<(u32, Backend)>,
    pub frontends: Vec<(SvcKey, SvcVal)>,
}

/// Which keys a sync examines.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Everything desired or programmed.
    All,
    /// The keys a change touched (plus those an earlier sync left unfinished).
    Touched(&'a Touched),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends: usize,
    pub groups: usize,
    pub backends: usize,
    /// Map writes and deletes this sync performed.
    pub writes: usize,
    pub errors: usize,
    /// Groups were added or removed (their ids changed).
    pub groups_changed: bool,
}

#[derive(Debug)]
struct AppliedGroup {
    id: u32,
    /// The backends its table holds; `None` until a table (possibly empty) has been written.
    backends: Option<Arc<[BackendSpec]>>,
    /// Its table; `None` without backends.
    table: Option<TableLoc>,
    /// Until when the table carries previous owners (see [`Reconciler::expire_prev`]).
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

/// A backend in the maps.
#[derive(Clone, Copy, Debug)]
struct Written {
    id: u32,
    /// Tables in the maps that name it.
    named: u32,
}

/// How many programmed frontends point at each table location and group id.
#[derive(Debug, Default)]
struct Refs {
    /// Frontends that read the table at a location (backend_count > 0).
    locs: HashMap<u32, u32>,
    /// Frontends of each group id.
    groups: HashMap<u32, u32>,
}

impl Refs {
    fn add(&mut self, v: &SvcVal) {
        *self.groups.entry(v.group_id).or_default() += 1;
        if reads_table(v) {
            *self.locs.entry(v.table_loc).or_default() += 1;
        }
    }

    fn remove(&mut self, v: &SvcVal) {
        dec(&mut self.groups, v.group_id);
        if reads_table(v) {
            dec(&mut self.locs, v.table_loc);
        }
    }

    fn reads(&self, loc: u32) -> bool {
        self.locs.contains_key(&loc)
    }

    fn group_used(&self, id: u32) -> bool {
        self.groups.contains_key(&id)
    }
}

fn reads_table(v: &SvcVal) -> bool {
    v.backend_count > 0 && v.table_size > 0
}

fn dec(m: &mut HashMap<u32, u32>, k: u32) {
    if let Some(n) = m.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            m.remove(&k);
        }
    }
}

/// The reconciler: remembers what it wrote so each sync writes only the difference.
#[derive(Debug)]
pub struct Reconciler {
    seed: u64,
    backend_ids: Ids,
    /// Every backend in the maps: its id, and how many tables in the maps name it (a sync only
    /// looks at the backends whose count may have dropped, not at all of them).
    backends: HashMap<Backend, Written>,
    /// Backends to check for removal at the next sync: written for a table that is not in the
    /// maps yet (its build or write failed), or adopted from a previous agent.
    loose: BTreeSet<Backend>,
    group_ids: Ids,
    groups: HashMap<GroupKey, AppliedGroup>,
    frontends: HashMap<SvcKey, SvcVal>,
    refs: Refs,
    /// Tables no group owns any more, retired once no frontend reads them. The backends they
    /// name stay until then (`None`: unknown, a previous agent's table).
    retired: Vec<(TableLoc, Option<Arc<[BackendSpec]>>)>,
    /// Group ids of a previous agent's frontends: freed once no frontend uses them.
    orphan_groups: BTreeSet<u32>,
    /// Source-range entries written, per group id.
    ranges: HashMap<u32, BTreeSet<(IpAddr, u8)>>,
    /// Keys an earlier sync could not finish: examined again by every sync until done.
    retry: Touched,
    /// How long a changed table keeps each moved slot's previous owner (0: never).
    prev_window: Duration,
    /// The earliest `prev_until` of any group.
    next_prev_expiry: Option<Instant>,
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

/// Tables built and written together: bounds the memory a full sync holds at once.
const TABLE_CHUNK: usize = 512;

/// A table to build and write in [`Reconciler::apply`].
struct TableJob<'a> {
    key: &'a GroupKey,
    group: &'a Group,
    /// The backends of the table being replaced, when moved slots keep their previous owner.
    previous: Option<Arc<[BackendSpec]>>,
}

impl Reconciler {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            backend_ids: Ids::default(),
            backends: HashMap::new(),
            loose: BTreeSet::new(),
            group_ids: Ids::default(),
            groups: HashMap::new(),
            frontends: HashMap::new(),
            refs: Refs::default(),
            retired: Vec::new(),
            orphan_groups: BTreeSet::new(),
            ranges: HashMap::new(),
            retry: Touched::default(),
            prev_window: Duration::ZERO,
            next_prev_expiry: None,
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
    /// frontends are taken over as they are; groups get fresh ids and tables (their identity
    /// is not stored), and the old tables are retired once no frontend points at them.
    pub fn adopt(seed: u64, existing: Existing) -> Self {
        let mut r = Self::new(seed);
        for (id, b) in existing.backends {
            r.backend_ids.used.insert(id);
            r.backends.insert(b, Written { id, named: 0 });
            r.loose.insert(b);
        }
        let mut tables = BTreeSet::new();
        for (k, v) in existing.frontends {
            r.group_ids.used.insert(v.group_id);
            r.orphan_groups.insert(v.group_id);
            if reads_table(&v) {
                tables.insert(TableLoc {
                    loc: v.table_loc,
                    size: v.table_size,
                });
            }
            r.refs.add(&v);
            r.frontends.insert(k, v);
        }
        r.retired.extend(tables.into_iter().map(|t| (t, None)));
        r
    }

    pub fn apply<D: Datapath>(
        &mut self,
        desired: &Desired,
        scope: Scope<'_>,
        dp: &mut D,
        on_error: &mut dyn FnMut(String),
    ) -> SyncStats {
        let mut st = SyncStats::default();
        let mut fail = |st: &mut SyncStats, what: String| {
            st.errors += 1;
            on_error(what);
        };
        let (group_keys, frontend_keys) = self.scope_keys(desired, scope);
        let mut retry = Touched::default();

        // 1. Backends the new tables need. A table whose backends did not change names only
        // backends that are written already.
        let jobs: Vec<TableJob<'_>> = group_keys
            .iter()
            .filter_map(|k| desired.groups.get_key_value(k))
            .filter(|(k, g)| self.needs_table(k, g))
            .map(|(key, group)| TableJob {
                key,
                group,
                // Previous owners only mean something in a table of the same size.
                previous: self
                    .groups
                    .get(key)
                    .filter(|a| a.table.is_some_and(|t| t.size == group.table_size))
                    .and_then(|a| a.backends.clone())
                    .filter(|b| !b.is_empty() && !self.prev_window.is_zero()),
            })
            .collect();
        let mut wanted: Vec<Backend> = jobs
            .iter()
            .flat_map(|j| j.group.backends.iter().map(backend_value))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let new: Vec<(u32, Backend)> = wanted
            .iter()
            .filter(|b| !self.backends.contains_key(b))
            .map(|b| (self.backend_ids.alloc(), *b))
            .collect();
        let written = if new.is_empty() {
            Vec::new()
        } else {
            dp.set_backends(&new)
        };
        for ((id, b), r) in new.iter().zip(written) {
            match r {
                Ok(()) => {
                    st.writes += 1;
                    self.backends.insert(*b, Written { id: *id, named: 0 });
                }
                Err(e) => {
                    self.backend_ids.free(*id);
                    fail(&mut st, format!("backend {}: {e}", addr::to_ip(&b.addr)));
                }
            }
        }

        // 2. Tables: built in parallel and written in chunks (bounded memory), each into free
        // space. The table a group had before is retired below, once no frontend reads it.
        let mut purge: Vec<(u32, Vec<BackendSpec>)> = Vec::new();
        for key in &group_keys {
            let Some(group) = desired.groups.get(key) else {
                continue;
            };
            let applied = self.groups.entry(key.clone()).or_insert_with(|| {
                st.groups_changed = true;
                AppliedGroup {
                    id: self.group_ids.alloc(),
                    backends: None,
                    table: None,
                    prev_until: None,
                    affinity: false,
                }
            });
            applied.affinity = group.affinity;
        }
        for chunk in jobs.chunks(TABLE_CHUNK) {
            let (seed, ids) = (self.seed, &self.backends);
            let built = par_map(chunk, |j| {
                if j.group.backends.is_empty() {
                    return Ok((Vec::new(), false));
                }
                let mut t = build_table(&j.group.backends, j.group.table_size, seed, ids)?;
                let moved = j.previous.as_deref().is_some_and(|old| {
                    mark_previous_owners(&mut t, old, j.group.table_size, seed, ids)
                });
                Ok::<_, String>((t, moved))
            });
            let tables: Vec<&[MaglevSlot]> = built
                .iter()
                .filter_map(|b| b.as_ref().ok())
                .filter(|(t, _)| !t.is_empty())
                .map(|(t, _)| t.as_slice())
                .collect();
            let mut locs = if tables.is_empty() {
                Vec::new()
            } else {
                dp.write_tables(&tables)
            }
            .into_iter();
            for (job, b) in chunk.iter().zip(&built) {
                let written = match b {
                    Err(e) => Err(e.clone()),
                    Ok((t, _)) if t.is_empty() => Ok(None),
                    Ok(_) => match locs.next() {
                        Some(Ok(loc)) => Ok(Some(loc)),
                        Some(Err(e)) => Err(e.to_string()),
                        None => Err("not written".to_string()),
                    },
                };
                let loc = match written {
                    Ok(loc) => loc,
                    Err(e) => {
                        fail(&mut st, format!("service {} table: {e}", job.key.service));
                        retry.groups.insert(job.key.clone());
                        // Backends written for it go again unless a table names them.
                        self.loose
                            .extend(job.group.backends.iter().map(backend_value));
                        continue;
                    }
                };
                let moved = b.as_ref().is_ok_and(|(_, moved)| *moved);
                self.table_written(job, loc, moved, &mut purge);
                st.writes += usize::from(loc.is_some());
            }
        }

        // 3. Source ranges before the frontends that check them, stale ones after.
        for key in &group_keys {
            let Some(id) = self.groups.get(key).map(|g| g.id) else {
                continue;
            };
            let want = desired.src_ranges.get(key).cloned().unwrap_or_default();
            let have = self.ranges.remove(&id).unwrap_or_default();
            let mut now = BTreeSet::new();
            for &(net, p) in want.difference(&have) {
                match dp.set_src_range(id, net, p, true) {
                    Ok(()) => {
                        st.writes += 1;
                        now.insert((net, p));
                    }
                    Err(e) => {
                        fail(&mut st, format!("source range {net}/{p}: {e}"));
                        retry.groups.insert(key.clone());
                    }
                }
            }
            for &(net, p) in have.difference(&want) {
                st.writes += 1;
                if let Err(e) = dp.set_src_range(id, net, p, false) {
                    fail(&mut st, format!("remove source range {net}/{p}: {e}"));
                }
            }
            now.extend(have.intersection(&want).copied());
            if !now.is_empty() {
                self.ranges.insert(id, now);
            }
        }

        // 4. Frontends pointing at those tables.
        for key in &frontend_keys {
            let Some(fe) = desired.frontends.get(key) else {
                continue;
            };
            let Some(val) = self.frontend_value(fe, desired) else {
                // Its table failed to build: keep whatever is there until it does.
                retry.frontends.insert(*key);
                continue;
            };
            if self.frontends.get(key) == Some(&val) {
                continue;
            }
            match dp.set_frontend(key, &val) {
                Ok(()) => {
                    st.writes += 1;
                    if let Some(old) = self.frontends.insert(*key, val) {
                        self.refs.remove(&old);
                    }
                    self.refs.add(&val);
                }
                Err(e) => {
                    fail(&mut st, format!("frontend of {}: {e}", fe.group.service));
                    retry.frontends.insert(*key);
                }
            }
        }

        // 5. Removals, in reverse dependency order: frontends, then groups no frontend uses,
        // then tables no frontend reads, then backends no table names.
        for key in &frontend_keys {
            if desired.frontends.contains_key(key) {
                continue;
            }
            let Some(old) = self.frontends.get(key).copied() else {
                continue;
            };
            match dp.del_frontend(key) {
                Ok(()) => {
                    st.writes += 1;
                    self.frontends.remove(key);
                    self.refs.remove(&old);
                }
                Err(e) => {
                    fail(&mut st, format!("remove frontend: {e}"));
                    retry.frontends.insert(*key);
                }
            }
        }
        for key in &group_keys {
            if desired.groups.contains_key(key) {
                continue;
            }
            let Some(g) = self.groups.get(key) else {
                continue;
            };
            if self.refs.group_used(g.id) {
                retry.groups.insert(key.clone()); // a frontend removal failed
                continue;
            }
            if let Some(g) = self.groups.remove(key) {
                st.groups_changed = true;
                if let Some(t) = g.table {
                    self.retired.push((t, g.backends));
                }
                if g.affinity {
                    // The id may be reused by another service: none of its pins may survive.
                    purge.push((g.id, Vec::new()));
                }
                if let Some(ranges) = self.ranges.remove(&g.id) {
                    for (net, p) in ranges {
                        st.writes += 1;
                        if let Err(e) = dp.set_src_range(g.id, net, p, false) {
                            fail(&mut st, format!("remove source range {net}/{p}: {e}"));
                        }
                    }
                }
                self.group_ids.free(g.id);
            }
        }
        let orphans: Vec<u32> = self
            .orphan_groups
            .iter()
            .copied()
            .filter(|id| !self.refs.group_used(*id))
            .collect();
        for id in orphans {
            self.orphan_groups.remove(&id);
            // The id may be reused: drop the previous agent's pins of that group.
            purge.push((id, Vec::new()));
            self.group_ids.free(id);
        }
        let retired = std::mem::take(&mut self.retired);
        for (t, backends) in retired {
            if self.refs.reads(t.loc) {
                self.retired.push((t, backends));
            } else {
                dp.retire_table(t);
                rename(
                    &mut self.backends,
                    &mut self.loose,
                    backends.as_deref(),
                    &[],
                );
            }
        }
        // Now that no table names them, forget the pins to backends that left their group
        // (before the backends' ids can be freed and reused below).
        let purges: Vec<(u32, Vec<u32>)> = purge
            .iter()
            .map(|(id, backends)| {
                let keep = backends
                    .iter()
                    .filter_map(|b| self.backends.get(&backend_value(b)).map(|w| w.id))
                    .collect();
                (*id, keep)
            })
            .collect();
        if !purges.is_empty()
            && let Err(e) = dp.purge_affinity_groups(&purges)
        {
            fail(&mut st, format!("purge affinity pins: {e}"));
        }
        // Backends no table in the maps names any more, unless a new table still wants them
        // (its write failed: they stay loose and are checked again next time). While a previous
        // agent's table is still read, any backend may be one it names.
        let adopted_tables_read = self.retired.iter().any(|(_, b)| b.is_none());
        let loose = if adopted_tables_read {
            BTreeSet::new()
        } else {
            std::mem::take(&mut self.loose)
        };
        for b in loose {
            let Some(&Written { id, named }) = self.backends.get(&b) else {
                continue;
            };
            if named > 0 {
                continue;
            }
            if wanted.binary_search(&b).is_ok() {
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

        self.retry = retry;
        st.frontends = self.frontends.len();
        st.groups = self.groups.len();
        st.backends = self.backends.len();
        st
    }

    /// Bookkeeping once a job's table (or none, without backends) is in the maps.
    fn table_written(
        &mut self,
        job: &TableJob<'_>,
        loc: Option<TableLoc>,
        moved: bool,
        purge: &mut Vec<(u32, Vec<BackendSpec>)>,
    ) {
        let Some(applied) = self.groups.get_mut(job.key) else {
            return;
        };
        // Affinity pins to backends that leave the group are dropped once the frontends point
        // at the new table.
        if applied.affinity
            && let Some(old) = &applied.backends
            && old.iter().any(|b| !job.group.backends.contains(b))
        {
            purge.push((applied.id, job.group.backends.to_vec()));
        }
        // The new table names its backends now; the old one keeps naming its own until no
        // frontend reads it.
        let old = applied.backends.replace(job.group.backends.clone());
        if loc.is_some() {
            rename(
                &mut self.backends,
                &mut self.loose,
                None,
                &job.group.backends,
            );
        }
        if let Some(t) = std::mem::replace(&mut applied.table, loc) {
            self.retired.push((t, old));
        }
        applied.prev_until = moved.then(|| Instant::now() + self.prev_window);
        if let Some(t) = applied.prev_until {
            self.next_prev_expiry = Some(self.next_prev_expiry.map_or(t, |n| n.min(t)));
        }
    }

    /// The group and frontend keys a sync examines, each once, in order.
    fn scope_keys(&self, desired: &Desired, scope: Scope<'_>) -> (Vec<GroupKey>, Vec<SvcKey>) {
        let mut groups: BTreeSet<GroupKey> = self.retry.groups.clone();
        let mut frontends: BTreeSet<SvcKey> = self.retry.frontends.clone();
        match scope {
            Scope::All => {
                groups.extend(desired.groups.keys().cloned());
                groups.extend(self.groups.keys().cloned());
                frontends.extend(desired.frontends.keys().copied());
                frontends.extend(self.frontends.keys().copied());
            }
            Scope::Touched(t) => {
                groups.extend(t.groups.iter().cloned());
                frontends.extend(t.frontends.iter().copied());
            }
        }
        (
            groups.into_iter().collect(),
            frontends.into_iter().collect(),
        )
    }

    /// Whether the group's table in the maps differs from what `group` wants.
    fn needs_table(&self, key: &GroupKey, group: &Group) -> bool {
        let Some(a) = self.groups.get(key) else {
            return true;
        };
        a.backends.as_ref() != Some(&group.backends)
            || (!group.backends.is_empty() && a.table.map(|t| t.size) != Some(group.table_size))
    }

    /// The map value of `fe`, from its group's table in the maps; `None` while the group has
    /// no table for what is desired (its write failed).
    fn frontend_value(&self, fe: &Frontend, desired: &Desired) -> Option<SvcVal> {
        let g = self.groups.get(&fe.group)?;
        let want = desired.groups.get(&fe.group)?;
        if g.backends.as_ref() != Some(&want.backends) {
            return None;
        }
        let table = g.table.unwrap_or(TableLoc { loc: 0, size: 0 });
        Some(SvcVal {
            group_id: g.id,
            table_loc: table.loc,
            table_size: table.size,
            backend_count: u32::try_from(want.backends.len()).unwrap_or(u32::MAX),
            flags: fe.flags,
            affinity_timeout: fe.affinity_timeout_s,
        })
    }

    /// Rewrites in place, without previous owners, every table whose window ended by `now`.
    /// Returns how many tables were rewritten.
    pub fn expire_prev<D: Datapath>(
        &mut self,
        now: Instant,
        dp: &mut D,
        on_error: &mut dyn FnMut(String),
    ) -> usize {
        if self.next_prev_expiry.is_none_or(|t| t > now) {
            return 0;
        }
        self.next_prev_expiry = None;
        let mut rewritten = 0;
        for (key, g) in &mut self.groups {
            let Some(until) = g.prev_until else {
                continue;
            };
            if until > now {
                self.next_prev_expiry = Some(self.next_prev_expiry.map_or(until, |n| n.min(until)));
                continue;
            }
            g.prev_until = None;
            let (Some(backends), Some(loc)) = (g.backends.as_deref(), g.table) else {
                continue;
            };
            let result = build_table(backends, loc.size, self.seed, &self.backends)
                .and_then(|t| dp.rewrite_table(loc, &t).map_err(|e| e.to_string()));
            match result {
                Ok(()) => rewritten += 1,
                Err(e) => on_error(format!("service {} table: {e}", key.service)),
            }
        }
        rewritten
    }
}

/// Moves a group's table from naming `old` to naming `new` in the per-backend counts; a
/// backend that may have lost its last name becomes loose.
fn rename(
    backends: &mut HashMap<Backend, Written>,
    loose: &mut BTreeSet<Backend>,
    old: Option<&[BackendSpec]>,
    new: &[BackendSpec],
) {
    for b in new {
        if let Some(w) = backends.get_mut(&backend_value(b)) {
            w.named += 1;
        }
    }
    for b in old.unwrap_or_default() {
        let v = backend_value(b);
        if let Some(w) = backends.get_mut(&v)
            && w.named > 0
        {
            w.named -= 1;
            if w.named == 0 {
                loose.insert(v);
            }
        }
    }
}

/// `f` over `items` on all CPUs (table builds are independent and CPU-bound), in order.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Below a few tables a thread costs more than it saves.
    let chunk = items.len().div_ceil(threads).max(16);
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

/// Sets `prev` on every slot of `table` whose owner differs from the table built from `old`
/// (the one being replaced, same size). Returns whether any slot moved.
fn mark_previous_owners(
    table: &mut [MaglevSlot],
    old: &[BackendSpec],
    size: u32,
    seed: u64,
    ids: &HashMap<Backend, Written>,
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
    ids: &HashMap<Backend, Written>,
) -> Result<Vec<MaglevSlot>, String> {
    let idents: Vec<maglev::Identity> = backends.iter().map(BackendSpec::identity).collect();
    let slots = maglev::build(&idents, size, seed).map_err(|e| e.to_string())?;
    let by_index: Vec<u32> = backends
        .iter()
        .map(|b| {
            ids.get(&backend_value(b))
                .map(|w| w.id)
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
