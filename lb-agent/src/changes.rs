//! The queue between "an object changed" and "the maps reflect it".
//!
//! Sources mark changes as they arrive (the Kubernetes watchers from their own tasks); the sync
//! loop takes them in batches, coalescing changes that arrive close together, and reports when a
//! batch is in the maps. The queue remembers how old the oldest change not yet in the maps is
//! (for `/healthz`, like kube-proxy's queued-update tracking) and the EndpointSlice trigger times
//! of a batch (for the network programming latency histogram).

use std::{
    collections::BTreeSet,
    sync::{Condvar, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use crate::objects::ObjKey;

/// What a batch of changes touched, so a sync re-reads only those objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Anything may have changed (the first sync, a relist): re-read everything.
    pub all: bool,
    /// Node objects changed (zone, deletion, addresses).
    pub nodes: bool,
    pub services: BTreeSet<ObjKey>,
    pub slices: BTreeSet<ObjKey>,
}

impl Changed {
    pub fn is_empty(&self) -> bool {
        !self.all && !self.nodes && self.services.is_empty() && self.slices.is_empty()
    }

    fn merge(&mut self, other: Changed) {
        self.all |= other.all;
        self.nodes |= other.nodes;
        self.services.extend(other.services);
        self.slices.extend(other.slices);
    }
}

#[derive(Debug, Default)]
struct State {
    /// Arrival of the oldest change not yet taken by a sync.
    pending_since: Option<Instant>,
    /// Trigger times of changes not yet taken.
    pending_triggers: Vec<SystemTime>,
    /// What the changes not yet taken touched.
    pending_changed: Changed,
    /// Arrival of the oldest change taken by a sync that has not finished yet.
    in_flight_since: Option<Instant>,
    /// Wall-clock time of the most recent change (a metric).
    last_queued: Option<SystemTime>,
}

/// Changes taken by one sync; hand it back to [`ChangeQueue::applied`] once the maps hold them.
#[derive(Debug, Default)]
#[must_use = "report the batch as applied once it is in the maps"]
pub struct Batch {
    /// `endpoints.kubernetes.io/last-change-trigger-time` of the EndpointSlice changes taken.
    pub triggers: Vec<SystemTime>,
    /// What they touched.
    pub changed: Changed,
}

/// Shared between the sources, the sync loop and the health server.
#[derive(Debug, Default)]
pub struct ChangeQueue {
    state: Mutex<State>,
    arrived: Condvar,
}

impl ChangeQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent data: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that anything may have changed (everything is re-read).
    pub fn queued(&self) {
        self.queued_at(
            Instant::now(),
            None,
            Changed {
                all: true,
                ..Changed::default()
            },
        );
    }

    /// Records a change whose cause happened at `trigger` (an EndpointSlice's
    /// last-change-trigger-time): the sync that applies it observes the latency.
    pub fn queued_with_trigger(&self, trigger: SystemTime) {
        self.queued_at(
            Instant::now(),
            Some(trigger),
            Changed {
                all: true,
                ..Changed::default()
            },
        );
    }

    /// Records that the objects in `changed` changed; `trigger` as in
    /// [`ChangeQueue::queued_with_trigger`].
    pub fn queued_objects(&self, changed: Changed, trigger: Option<SystemTime>) {
        self.queued_at(Instant::now(), trigger, changed);
    }

    fn queued_at(&self, now: Instant, trigger: Option<SystemTime>, changed: Changed) {
        let mut st = self.lock();
        st.pending_since.get_or_insert(now);
        st.pending_triggers.extend(trigger);
        st.pending_changed.merge(changed);
        st.last_queued = Some(SystemTime::now());
        drop(st);
        self.arrived.notify_all();
    }

    /// Takes the pending changes once the oldest is at least `coalesce` old, so a burst of
    /// events (a rollout touching many slices) becomes one sync.
    pub fn take(&self, coalesce: Duration) -> Option<Batch> {
        self.take_at(Instant::now(), coalesce)
    }

    fn take_at(&self, now: Instant, coalesce: Duration) -> Option<Batch> {
        let mut st = self.lock();
        let since = st.pending_since?;
        if now.saturating_duration_since(since) < coalesce {
            return None;
        }
        st.pending_since = None;
        st.in_flight_since = Some(st.in_flight_since.map_or(since, |t| t.min(since)));
        Some(Batch {
            triggers: std::mem::take(&mut st.pending_triggers),
            changed: std::mem::take(&mut st.pending_changed),
        })
    }

    /// The sync that took `batch` has written it to the maps. Returns the trigger times to
    /// observe.
    pub fn applied(&self, batch: Batch) -> Vec<SystemTime> {
        self.lock().in_flight_since = None;
        batch.triggers
    }

    /// Arrival of the oldest change not yet in the maps, taken or not.
    pub fn oldest_unapplied(&self) -> Option<Instant> {
        let st = self.lock();
        match (st.pending_since, st.in_flight_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Wall-clock time of the most recent change.
    pub fn last_queued(&self) -> Option<SystemTime> {
        self.lock().last_queued
    }

    /// Blocks until a change is pending or `deadline` passes; returns whether one is pending.
    /// Lets a loop (or a test) wait for work without sleeping blindly.
    pub fn wait_pending(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        while st.pending_since.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .arrived
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_queued_nothing_taken() {
        let q = ChangeQueue::default();
        assert!(q.take(Duration::ZERO).is_none());
        assert_eq!(q.oldest_unapplied(), None);
        assert_eq!(q.last_queued(), None);
    }

    #[test]
    fn a_burst_is_taken_once_its_first_change_is_coalesce_old() {
        let q = ChangeQueue::default();
        let t0 = Instant::now();
        q.queued_at(t0, None, Changed::default());
        q.queued_at(t0 + 5 * MS, None, Changed::default());
        assert!(
            q.take_at(t0 + 9 * MS, 10 * MS).is_none(),
            "window still open"
        );
        let batch = q.take_at(t0 + 10 * MS, 10 * MS).expect("window over");
        assert!(
            q.take_at(t0 + 20 * MS, 10 * MS).is_none(),
            "one batch for the burst"
        );
        assert_eq!(q.oldest_unapplied(), Some(t0), "in flight until applied");
        assert!(q.applied(batch).is_empty());
        assert_eq!(q.oldest_unapplied(), None);
    }

    #[test]
    fn a_change_during_a_sync_stays_pending_after_it() {
        let q = ChangeQueue::default();
        let t0 = Instant::now();
        q.queued_at(t0, None, Changed::default());
        let batch = q.take_at(t0, Duration::ZERO).unwrap();
        q.queued_at(t0 + 3 * MS, None, Changed::default());
        assert_eq!(q.oldest_unapplied(), Some(t0));
        let _ = q.applied(batch);
        assert_eq!(q.oldest_unapplied(), Some(t0 + 3 * MS));
        assert!(q.take_at(t0 + 3 * MS, Duration::ZERO).is_some());
    }

    #[test]
    fn trigger_times_travel_with_their_batch() {
        let q = ChangeQueue::default();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        q.queued_with_trigger(t);
        q.queued();
        let batch = q.take(Duration::ZERO).unwrap();
        q.queued_with_trigger(t + Duration::from_secs(1));
        assert_eq!(q.applied(batch), vec![t]);
        let next = q.take(Duration::ZERO).unwrap();
        assert_eq!(q.applied(next), vec![t + Duration::from_secs(1)]);
        assert!(q.last_queued().is_some());
    }

    #[test]
    fn a_batch_carries_what_its_changes_touched() {
        let q = ChangeQueue::default();
        let key = |n: &str| ("default".to_string(), n.to_string());
        q.queued_objects(
            Changed {
                services: [key("a")].into(),
                ..Changed::default()
            },
            None,
        );
        q.queued_objects(
            Changed {
                slices: [key("a-1")].into(),
                nodes: true,
                ..Changed::default()
            },
            None,
        );
        let batch = q.take(Duration::ZERO).unwrap();
        assert_eq!(
            batch.changed,
            Changed {
                all: false,
                nodes: true,
                services: [key("a")].into(),
                slices: [key("a-1")].into(),
            }
        );
        let _ = q.applied(batch);
        q.queued();
        assert!(q.take(Duration::ZERO).unwrap().changed.all);
    }

    #[test]
    fn wait_pending_returns_at_once_when_something_is_pending() {
        let q = ChangeQueue::default();
        assert!(!q.wait_pending(Instant::now()), "deadline already passed");
        q.queued();
        assert!(q.wait_pending(Instant::now() + Duration::from_secs(60)));
    }

    #[test]
    fn wait_pending_wakes_on_a_change_from_another_thread() {
        let q = std::sync::Arc::new(ChangeQueue::default());
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.queued());
        assert!(q.wait_pending(Instant::now() + Duration::from_secs(60)));
        t.join().unwrap();
    }
}
