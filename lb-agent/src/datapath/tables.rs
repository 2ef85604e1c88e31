//! Maglev table storage: slabs of slots in `KPLB_MAGLEV` (an array of mmapable arrays).
//!
//! A table is a run of slots in one slab. Writing one is a memory copy into free space through a
//! shared mapping; programs only reach it once a frontend names its location, so a table is
//! complete before anything reads it. No map-in-map update happens per table (each of those
//! makes the kernel wait for an RCU grace period, ~10 ms): only adding a slab does, and slabs
//! grow geometrically.
//!
//! Space of a retired table is reused only after an RCU grace period has passed since it was
//! retired: a program that read the frontend just before it was repointed may still be reading
//! the old slots (and looking up the backends they name, so backends that left every table are
//! deleted only then too). The wait is one outer-map write (the kernel waits for a grace period on every
//! map-in-map update), done for all pending space at once: on a helper thread once it has
//! waited a second, or in place when space runs out.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{Array, ArrayOfMaps, IterableMap as _, MapData, MapError};
use lb_common::{
    MaglevSlot,
    maps::{
        self, MAGLEV_MAX_SLABS, MAGLEV_SLAB_MAX_SLOTS, MAGLEV_SLAB_MIN_SLOTS, MAGLEV_TABLE_FLAGS,
        loc_first, loc_slab, table_loc,
    },
};
use tracing::debug;

use super::{DatapathError, batch, io};
use crate::sync::TableLoc;

type Outer = ArrayOfMaps<MapData, Array<MapData, MaglevSlot>>;

/// How long retired space waits before an idle agent reclaims it (reclaiming costs a grace
/// period of the agent's time, so it is not done after every change).
const IDLE_RECLAIM_AFTER: Duration = Duration::from_secs(1);

struct Slab {
    map: Array<MapData, MaglevSlot>,
    slots: u32,
}

/// Free runs of slots, findable by position (to merge neighbours) and by size (best fit).
#[derive(Debug, Default)]
struct FreeSpace {
    /// (slab, first slot) -> length. Adjacent runs are always merged.
    by_pos: BTreeMap<(u32, u32), u32>,
    /// (length, slab, first slot).
    by_size: BTreeSet<(u32, u32, u32)>,
    /// Free slots in all.
    total: u64,
}

impl FreeSpace {
    fn insert(&mut self, slab: u32, start: u32, len: u32) {
        self.by_pos.insert((slab, start), len);
        self.by_size.insert((len, slab, start));
        self.total += u64::from(len);
    }

    fn remove(&mut self, slab: u32, start: u32) -> Option<u32> {
        let len = self.by_pos.remove(&(slab, start))?;
        self.by_size.remove(&(len, slab, start));
        self.total -= u64::from(len);
        Some(len)
    }

    /// The smallest run of at least `size` slots, cut to `size`.
    fn take(&mut self, size: u32) -> Option<(u32, u32)> {
        let &(len, slab, start) = self.by_size.range((size, 0, 0)..).next()?;
        self.remove(slab, start);
        if len > size {
            self.insert(slab, start + size, len - size);
        }
        Some((slab, start))
    }

    /// Returns `start .. start + len` of `slab`, merged with free neighbours.
    fn release(&mut self, slab: u32, mut start: u32, mut len: u32) {
        if let Some((&(s, st), &l)) = self.by_pos.range(..(slab, start)).next_back()
            && s == slab
            && st + l == start
        {
            self.remove(slab, st);
            start = st;
            len += l;
        }
        if let Some(l) = self.remove(slab, start + len) {
            len += l;
        }
        self.insert(slab, start, len);
    }

    /// Marks `start .. end` of `slab` as used, splitting the free runs it overlaps.
    fn claim(&mut self, slab: u32, start: u32, end: u32) {
        let overlapping: Vec<(u32, u32)> = self
            .by_pos
            .range((slab, 0)..(slab, end))
            .filter(|&(&(_, s), &len)| s + len > start)
            .map(|(&(_, s), &len)| (s, len))
            .collect();
        for (s, len) in overlapping {
            self.remove(slab, s);
            if s < start {
                self.insert(slab, s, start - s);
            }
            if s + len > end {
                self.insert(slab, end, s + len - end);
            }
        }
    }

    fn total(&self) -> u64 {
        self.total
    }
}

/// Something no frontend can reach any more, but a program that started before may still be
/// using: released only after an RCU grace period.
#[derive(Clone, Copy, Debug)]
enum Retired {
    /// Table space: back to the free lists.
    Table(TableLoc),
    /// A backend id no table in the maps names: deleted from `KPLB_BACKENDS` then (a program
    /// that read the old table may still look it up).
    Backend(u32),
}

/// Retired items whose grace period a helper thread is waiting for.
struct Waiting {
    items: Vec<Retired>,
    done: std::thread::JoinHandle<std::io::Result<()>>,
}

/// The slabs and their free space.
pub struct Slabs {
    outer: Outer,
    /// `outer`'s fd, for the batch syscall aya does not wrap.
    outer_fd: std::os::fd::OwnedFd,
    slabs: Vec<Option<Slab>>,
    free: FreeSpace,
    /// Retired items waiting for a grace period, and when the oldest was retired.
    pending: Vec<Retired>,
    pending_since: Option<Instant>,
    /// A grace period being waited for on a helper thread.
    waiting: Option<Waiting>,
    /// Backends whose grace period is over, for the datapath to delete.
    released_backends: Vec<u32>,
}

fn map_err(source: MapError) -> DatapathError {
    DatapathError::Map {
        name: maps::MAGLEV,
        source,
    }
}

impl Slabs {
    /// Takes over the slabs already in `outer` (a restarted agent's); all their space is free
    /// until [`Slabs::claim`] marks what frontends still use.
    pub fn open(outer: Outer, outer_fd: std::os::fd::OwnedFd) -> Result<Self, DatapathError> {
        let mut slabs = Vec::new();
        let mut free = FreeSpace::default();
        for i in 0..outer.len().min(MAGLEV_MAX_SLABS) {
            match outer.get(&i, 0) {
                Ok(map) => {
                    let slots = map.len();
                    slabs.resize_with(i as usize + 1, || None);
                    slabs[i as usize] = Some(Slab { map, slots });
                    free.insert(i, 0, slots);
                }
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err(e)),
            }
        }
        Ok(Self {
            outer,
            outer_fd,
            slabs,
            free,
            pending: Vec::new(),
            pending_since: None,
            waiting: None,
            released_backends: Vec::new(),
        })
    }

    /// Marks `t` as used (a table a previous agent's frontend points at). Claiming a run twice
    /// is harmless; a location outside every slab is ignored (the frontend reads nothing there).
    pub fn claim(&mut self, t: TableLoc) {
        let first = loc_first(t.loc);
        self.free
            .claim(loc_slab(t.loc), first, first.saturating_add(t.size));
    }

    /// Space for a table of `size` slots: the best-fitting free run, else (after reclaiming
    /// retired space, else in a new slab).
    pub fn alloc(&mut self, size: u32) -> Result<TableLoc, DatapathError> {
        if size == 0 || size > MAGLEV_SLAB_MAX_SLOTS {
            return Err(DatapathError::Io {
                what: format!("a Maglev table of {size} slots"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        self.collect_waited(false);
        if let Some(t) = self.take_free(size) {
            self.reclaim_when_low()?;
            return Ok(t);
        }
        if !self.pending.is_empty() || self.waiting.is_some() {
            self.reclaim()?;
            if let Some(t) = self.take_free(size) {
                return Ok(t);
            }
        }
        self.add_slab(size)?;
        self.take_free(size).ok_or_else(|| DatapathError::Io {
            what: "a new Maglev slab has no room".into(),
            source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
        })
    }

    /// Once more space waits for reuse than is free, starts reclaiming it in the background,
    /// so that a busy agent (changes back to back, never idle) does not run out and have to
    /// wait for a grace period in the middle of a change.
    fn reclaim_when_low(&mut self) -> Result<(), DatapathError> {
        let pending: u64 = self
            .pending
            .iter()
            .map(|r| match r {
                Retired::Table(t) => u64::from(t.size),
                Retired::Backend(_) => 0,
            })
            .sum();
        if pending > 0 && pending >= self.free.total() {
            self.reclaim_in_background()?;
        }
        Ok(())
    }

    fn take_free(&mut self, size: u32) -> Option<TableLoc> {
        // Best fit keeps large runs for large tables.
        let (slab, start) = self.free.take(size)?;
        Some(TableLoc {
            loc: table_loc(slab, start),
            size,
        })
    }

    /// A new slab, twice the size of the previous one (at most 2^20 slots), and never smaller
    /// than the table that needs it.
    fn add_slab(&mut self, at_least: u32) -> Result<(), DatapathError> {
        self.add_slabs(u64::from(at_least), at_least)
    }

    /// Makes room for tables of `sizes` before they are written, so that a full sync adds the
    /// slabs it needs with one outer-map write (one grace period) instead of one per slab.
    /// (Space is counted in total; a fragmented remainder is found or added table by table.)
    pub fn reserve(&mut self, sizes: &[u32]) -> Result<(), DatapathError> {
        let need: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
        if need <= self.free.total() {
            return Ok(());
        }
        // Retired space first: reusing it costs the same one grace period as a new slab.
        self.reclaim()?;
        let free = self.free.total();
        if need <= free {
            return Ok(());
        }
        let largest = sizes.iter().copied().max().unwrap_or(0);
        self.add_slabs(need - free, largest)
    }

    /// Adds slabs holding at least `slots` slots in all, the first of them at least
    /// `largest` slots, with one outer-map write.
    fn add_slabs(&mut self, slots: u64, largest: u32) -> Result<(), DatapathError> {
        let mut count = self.slabs.iter().flatten().count() as u32;
        let mut added: Vec<(u32, Slab)> = Vec::new();
        let mut total = 0u64;
        while total < slots {
            let index = (self.slabs.len() + added.len()) as u32;
            if index >= MAGLEV_MAX_SLABS {
                break;
            }
            let at_least = if added.is_empty() { largest } else { 0 };
            let size = MAGLEV_SLAB_MIN_SLOTS
                .checked_shl(count)
                .unwrap_or(MAGLEV_SLAB_MAX_SLOTS)
                .min(MAGLEV_SLAB_MAX_SLOTS)
                .max(at_least);
            added.push((
                index,
                Slab {
                    map: create_slab(index, size)?,
                    slots: size,
                },
            ));
            total += u64::from(size);
            count += 1;
        }
        if added.is_empty() {
            return Err(DatapathError::Io {
                what: format!("all {MAGLEV_MAX_SLABS} Maglev slabs are in use"),
                source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
            });
        }
        let keys: Vec<u32> = added.iter().map(|(i, _)| *i).collect();
        let fds: Vec<u32> = added
            .iter()
            .map(|(_, s)| s.map.map().fd().as_fd().as_raw_fd() as u32)
            .collect();
        for ((index, slab), r) in added
            .into_iter()
            .zip(batch::update(self.outer_fd(), &keys, &fds))
        {
            match r {
                Ok(()) => {}
                Err(batch::Failed::Unsupported) => {
                    self.outer.set(index, &slab.map, 0).map_err(map_err)?;
                }
                Err(batch::Failed::Os(e)) => return Err(io("adding a Maglev slab")(e)),
            }
            debug!(slab = index, slots = slab.slots, "Maglev slab added");
            self.slabs.resize_with(index as usize + 1, || None);
            self.free.insert(index, 0, slab.slots);
            self.slabs[index as usize] = Some(slab);
        }
        Ok(())
    }

    fn outer_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.outer_fd.as_fd()
    }

    /// Writes `table` at `t` (which must have been allocated for it) through a shared mapping,
    /// one aligned 8-byte store per slot, so a reader of a live table sees each slot either
    /// before or after the write, never torn.
    pub fn write(&mut self, t: TableLoc, table: &[MaglevSlot]) -> Result<(), DatapathError> {
        self.write_many(&[(t, table)]).remove(0)
    }

    /// [`Slabs::write`] for many tables: each slab's part is mapped once.
    pub fn write_many(
        &mut self,
        items: &[(TableLoc, &[MaglevSlot])],
    ) -> Vec<Result<(), DatapathError>> {
        let mut out: Vec<Result<(), DatapathError>> = items
            .iter()
            .map(|(t, table)| self.check(*t, table.len()))
            .collect();
        let mut by_slab: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, (t, _)) in items.iter().enumerate() {
            if out[i].is_ok() {
                by_slab.entry(loc_slab(t.loc)).or_default().push(i);
            }
        }
        for (slab, idx) in by_slab {
            let start = idx
                .iter()
                .map(|&i| loc_first(items[i].0.loc))
                .min()
                .unwrap_or(0);
            let end = idx
                .iter()
                .map(|&i| loc_first(items[i].0.loc) + items[i].0.size)
                .max()
                .unwrap_or(0);
            let r = self.with_window(slab, start, end - start, |slots| {
                for &i in &idx {
                    let (t, table) = items[i];
                    let at = (loc_first(t.loc) - start) as usize;
                    for (dst, s) in slots[at..at + table.len()].iter().zip(table) {
                        dst.store(pack(*s), Ordering::Relaxed);
                    }
                }
            });
            if let Err(e) = r {
                let what = e.to_string();
                for &i in &idx {
                    out[i] = Err(DatapathError::Io {
                        what: what.clone(),
                        source: std::io::Error::other("mapping the Maglev slab"),
                    });
                }
            }
        }
        out
    }

    /// The slots of the table at `t`.
    pub fn read(&mut self, t: TableLoc) -> Result<Vec<MaglevSlot>, DatapathError> {
        self.check(t, t.size as usize)?;
        let mut out = Vec::with_capacity(t.size as usize);
        self.with_window(loc_slab(t.loc), loc_first(t.loc), t.size, |slots| {
            out.extend(slots.iter().map(|s| unpack(s.load(Ordering::Relaxed))));
        })?;
        Ok(out)
    }

    /// `t` lies inside its slab and holds `len` slots.
    fn check(&self, t: TableLoc, len: usize) -> Result<(), DatapathError> {
        let bad = |what: String| DatapathError::Io {
            what,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        };
        if len != t.size as usize {
            return Err(bad(format!(
                "table of {len} slots for a {}-slot run",
                t.size
            )));
        }
        let (slab, first) = (loc_slab(t.loc), loc_first(t.loc));
        let slots = self
            .slabs
            .get(slab as usize)
            .and_then(Option::as_ref)
            .map(|s| s.slots)
            .ok_or_else(|| bad(format!("Maglev slab {slab} does not exist")))?;
        if u64::from(first) + u64::from(t.size) > u64::from(slots) {
            return Err(bad(format!(
                "slots {first}+{} beyond slab {slab} ({slots} slots)",
                t.size
            )));
        }
        Ok(())
    }

    /// Maps the pages holding slots `first .. first + len` of `slab` (checked to exist) and
    /// hands those slots to `f`.
    fn with_window(
        &self,
        slab: u32,
        first: u32,
        len: u32,
        f: impl FnOnce(&[AtomicU64]),
    ) -> Result<(), DatapathError> {
        let Some(slab) = self.slabs.get(slab as usize).and_then(Option::as_ref) else {
            return Err(DatapathError::Io {
                what: format!("Maglev slab {slab} does not exist"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        };
        let page = page_size();
        let slot = size_of::<MaglevSlot>();
        let start = first as usize * slot;
        let map_start = start / page * page;
        let map_end = (start + len as usize * slot).div_ceil(page) * page;
        let map_len = map_end - map_start;
        let fd = slab.map.map().fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of whole pages inside the mmapable array's data (callers
        // checked the range: the array's mapping covers its slots rounded up to a page).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                map_start as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io("mmap of a Maglev slab")(std::io::Error::last_os_error()));
        }
        // SAFETY: the window holds `len` slots from `start`, 8-byte aligned (page-aligned
        // mapping, 8-byte slots); AtomicU64 has u64's layout.
        let slots = unsafe {
            std::slice::from_raw_parts(
                p.cast::<u8>().add(start - map_start).cast::<AtomicU64>(),
                len as usize,
            )
        };
        f(slots);
        // SAFETY: unmapping exactly what was mapped; `slots` is not used past this point.
        unsafe { libc::munmap(p, map_len) };
        Ok(())
    }

    /// `t` is no longer referenced by any frontend; its space is reused after a grace period.
    pub fn retire(&mut self, t: TableLoc) {
        self.pending.push(Retired::Table(t));
        self.pending_since.get_or_insert_with(Instant::now);
    }

    /// No table in the maps names backend `id` any more; it is handed back by
    /// [`Slabs::take_released_backends`] for deletion after a grace period.
    pub fn retire_backend(&mut self, id: u32) {
        self.pending.push(Retired::Backend(id));
        self.pending_since.get_or_insert_with(Instant::now);
    }

    /// Backends whose grace period has passed since they were retired.
    pub fn take_released_backends(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.released_backends)
    }

    /// Waits for a grace period now and releases everything retired (tests, shutdown).
    pub fn settle(&mut self) -> Result<(), DatapathError> {
        self.reclaim()
    }

    /// Reclaims retired space that has waited long enough, waiting for the grace period on a
    /// helper thread so a change arriving meanwhile is not held up (called when the agent is
    /// idle; collects the result of an earlier call).
    pub fn reclaim_idle(&mut self, now: Instant) -> Result<(), DatapathError> {
        self.collect_waited(false);
        let due = self
            .pending_since
            .is_some_and(|t| now.duration_since(t) >= IDLE_RECLAIM_AFTER);
        if due {
            self.reclaim_in_background()?;
        }
        Ok(())
    }

    /// Starts waiting for a grace period on a helper thread for the space retired so far
    /// (unless a wait is already running).
    fn reclaim_in_background(&mut self) -> Result<(), DatapathError> {
        if self.waiting.is_some() || self.pending.is_empty() {
            return Ok(());
        }
        let (outer, (index, slab)) = match (self.outer_fd.try_clone(), self.first_slab_fd()) {
            (Ok(o), Some(Ok(s))) => (o, s),
            _ => return self.reclaim(), // no fds to hand over: wait here
        };
        let items = std::mem::take(&mut self.pending);
        self.pending_since = None;
        let done = std::thread::Builder::new()
            .name("grace-period".into())
            .spawn(move || grace_period(outer.as_fd(), index, slab.as_fd()))
            .map_err(io("starting the grace-period thread"))?;
        self.waiting = Some(Waiting { items, done });
        Ok(())
    }

    /// Returns the space of a finished background wait to the free lists (with `block`,
    /// waits for it to finish); a failed wait puts its tables back in line.
    fn collect_waited(&mut self, block: bool) {
        if !self
            .waiting
            .as_ref()
            .is_some_and(|w| block || w.done.is_finished())
        {
            return;
        }
        let Some(w) = self.waiting.take() else { return };
        match w.done.join() {
            Ok(Ok(())) => self.release_all(w.items),
            _ => {
                self.pending.extend(w.items);
                self.pending_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Waits for an RCU grace period, then returns all retired space to the free lists.
    fn reclaim(&mut self) -> Result<(), DatapathError> {
        self.collect_waited(true);
        let pending = std::mem::take(&mut self.pending);
        self.pending_since = None;
        if pending.is_empty() {
            return Ok(());
        }
        let waited = match self.first_slab_fd() {
            Some(Ok((index, slab))) => grace_period(self.outer_fd.as_fd(), index, slab.as_fd()),
            Some(Err(e)) => Err(e),
            None => Ok(()),
        };
        if let Err(e) = waited {
            self.pending = pending;
            self.pending_since = Some(Instant::now());
            return Err(io("waiting for an RCU grace period")(e));
        }
        self.release_all(pending);
        Ok(())
    }

    /// The first slab's index and a copy of its fd (for a grace-period write).
    fn first_slab_fd(&self) -> Option<std::io::Result<(u32, std::os::fd::OwnedFd)>> {
        let (i, slab) = self
            .slabs
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.as_ref().map(|s| (i, s)))?;
        Some(
            slab.map
                .map()
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map(|fd| (i as u32, fd)),
        )
    }

    /// After a grace period: table space back to the free lists, backends out for deletion.
    fn release_all(&mut self, items: Vec<Retired>) {
        debug!(items = items.len(), "retired tables and backends released");
        for r in items {
            match r {
                Retired::Table(t) => self.release(t),
                Retired::Backend(id) => self.released_backends.push(id),
            }
        }
    }

    fn release(&mut self, t: TableLoc) {
        let (slab, start) = (loc_slab(t.loc), loc_first(t.loc));
        let Some(slots) = self
            .slabs
            .get(slab as usize)
            .and_then(Option::as_ref)
            .map(|s| s.slots)
        else {
            return;
        };
        let len = t.size.min(slots.saturating_sub(start));
        if len > 0 {
            self.free.release(slab, start, len);
        }
    }

    /// (slabs, slots in all slabs, slots in use or waiting for reuse).
    pub fn usage(&self) -> (usize, u64, u64) {
        let slabs = self.slabs.iter().flatten();
        let total: u64 = slabs.clone().map(|s| u64::from(s.slots)).sum();
        (slabs.count(), total, total - self.free.total())
    }
}

/// Rewrites outer-map entry `index` with the slab it already holds: the kernel returns only
/// after every program that could have read the maps before has finished.
fn grace_period(
    outer: std::os::fd::BorrowedFd<'_>,
    index: u32,
    slab: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    batch::update_one(outer, &index, &(slab.as_raw_fd() as u32))
}

fn create_slab(index: u32, slots: u32) -> Result<Array<MapData, MaglevSlot>, DatapathError> {
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        size_of::<u32>() as u32,
        size_of::<MaglevSlot>() as u32,
        slots,
        MAGLEV_TABLE_FLAGS,
    );
    let data = MapData::create(obj, &format!("KPLB_SLAB_{index}"), None).map_err(map_err)?;
    Array::try_from(aya::maps::Map::Array(data)).map_err(map_err)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(1)
}

/// A slot as the 8 bytes the kernel stores (`#[repr(C)]`: backend, then prev).
fn pack(s: MaglevSlot) -> u64 {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&s.backend.to_ne_bytes());
    b[4..].copy_from_slice(&s.prev.to_ne_bytes());
    u64::from_ne_bytes(b)
}

fn unpack(v: u64) -> MaglevSlot {
    let b = v.to_ne_bytes();
    MaglevSlot {
        backend: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        prev: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_best_fit_and_merge() {
        let mut f = FreeSpace::default();
        f.insert(0, 0, 100);
        f.insert(1, 0, 30);
        assert_eq!(f.take(20), Some((1, 0)), "the smaller run fits best");
        assert_eq!(f.take(20), Some((0, 0)));
        assert_eq!(f.take(90), None);
        f.release(0, 0, 20);
        assert_eq!(
            f.by_pos.get(&(0, 0)),
            Some(&100),
            "merged with the run after it"
        );
        f.release(1, 0, 20);
        assert_eq!(
            f.by_pos.get(&(1, 0)),
            Some(&30),
            "merged with the run after it"
        );
        f.claim(0, 10, 20);
        assert_eq!(
            f.by_pos.iter().map(|(&k, &l)| (k, l)).collect::<Vec<_>>(),
            vec![((0, 0), 10), ((0, 20), 80), ((1, 0), 30)]
        );
        f.claim(0, 10, 20);
        assert_eq!(f.total(), 120, "claiming twice changes nothing");
        f.release(0, 10, 10);
        assert_eq!(f.by_pos.get(&(0, 0)), Some(&100), "merged on both sides");
        assert_eq!(f.by_size.len(), f.by_pos.len());
    }

    #[test]
    fn slots_pack_in_repr_c_order() {
        let s = MaglevSlot {
            backend: 0x0102_0304,
            prev: 0x0a0b_0c0d,
        };
        // SAFETY: MaglevSlot is 8 bytes of plain integers.
        let raw: [u8; 8] = unsafe { std::mem::transmute(s) };
        assert_eq!(pack(s).to_ne_bytes(), raw);
        assert_eq!(unpack(pack(s)), s);
    }
}
