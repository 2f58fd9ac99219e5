//! The Kafka source's offset bookkeeping: per assigned partition, the records handed out and
//! not yet stored (stored only over the contiguous acked prefix), and those stored but not yet
//! known to be committed; the committer task that commits stored offsets as soon as they move;
//! and the lag of a partition from librdkafka's statistics.
//!
//! Invariant: every record handed out and not known committed is counted in exactly one
//! partition's `pending` or `stored` until it is committed or its partition is revoked, so
//! `uncommitted()` bounds what a crash now would replay.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;

use super::Context;
use crate::kafka::reason;

/// Pauses between failed commits: the first, and the longest.
const FIRST_COMMIT_RETRY: Duration = Duration::from_millis(100);
const MAX_COMMIT_RETRY: Duration = Duration::from_secs(5);

/// The offsets of one assigned partition.
#[derive(Default)]
pub(super) struct PartitionTracker {
    /// Changes on every assignment, so acks from before a revocation are ignored.
    generation: u64,
    /// Handed out and not yet stored: offset → acked.
    pending: BTreeMap<i64, bool>,
    /// Stored (acked prefix), not yet known committed, in offset order.
    stored: VecDeque<i64>,
}

impl PartitionTracker {
    /// Mark `offset` done; returns the offset to store (next to read) when the contiguous
    /// done prefix grew.
    fn ack(&mut self, offset: i64) -> Option<i64> {
        *self.pending.get_mut(&offset)? = true;
        let mut next = None;
        while let Some((&o, &done)) = self.pending.first_key_value() {
            if !done {
                break;
            }
            self.pending.remove(&o);
            self.stored.push_back(o);
            next = Some(o + 1);
        }
        next
    }

    /// Everything below `next` is committed.
    fn committed(&mut self, next: i64) {
        while self.stored.front().is_some_and(|&o| o < next) {
            self.stored.pop_front();
        }
    }

    fn uncommitted(&self) -> usize {
        self.pending.len() + self.stored.len()
    }
}

#[derive(Default)]
struct State {
    trackers: HashMap<(String, i32), PartitionTracker>,
    generation: u64,
    /// The pipeline stopped fetching: newly assigned partitions are paused.
    draining: bool,
    /// The last commit failed: nobody waits for commits until one succeeds (a rebalance may
    /// need the consumer served before commits go through again).
    commit_failing: bool,
}

/// Per partition, the next offset to commit and the tracker's generation when it was read.
pub(super) type Snapshot = Vec<((String, i32), u64, i64)>;

/// State shared by the source, its acks, the rebalance callbacks and the committer.
#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    /// Stored offsets moved: the committer has work.
    stored: Notify,
    /// Commits landed, partitions were revoked, or commits fail: a waiting fetch may go on.
    room: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New partitions assigned; returns whether the source is draining (pause them).
    pub(super) fn assign(&self, partitions: &[(String, i32)]) -> bool {
        let mut st = self.lock();
        st.generation += 1;
        let generation = st.generation;
        for p in partitions {
            st.trackers.insert(p.clone(), PartitionTracker { generation, ..Default::default() });
        }
        st.draining
    }

    /// The partition is revoked; `forget` (dropping its lag series) runs under the same lock as
    /// [`Shared::if_assigned`], so a statistics callback cannot bring the series back after it.
    pub(super) fn revoke(&self, topic: &str, partition: i32, forget: impl FnOnce()) {
        let mut st = self.lock();
        st.trackers.remove(&(topic.to_owned(), partition));
        forget();
        drop(st);
        self.room.notify_waiters();
    }

    /// Run `f` if the partition is assigned, holding the lock (see [`Shared::revoke`]).
    pub(super) fn if_assigned(&self, topic: &str, partition: i32, f: impl FnOnce()) {
        let st = self.lock();
        if st.trackers.contains_key(&(topic.to_owned(), partition)) {
            f();
        }
    }

    pub(super) fn set_draining(&self) {
        self.lock().draining = true;
    }

    /// A record is handed to the pipeline; returns its partition's generation.
    ///
    /// A record of a partition with no tracker was read before its partition was revoked (the
    /// revocation ran between the fetch and this call): `None` unless `still_assigned` (asked
    /// of the consumer only then) says the partition is this member's after all. Such a record
    /// is its new owner's to read; handing it out would let its ack commit an offset of a
    /// partition another member now owns.
    pub(super) fn hand_out(&self, topic: &str, partition: i32, offset: i64, still_assigned: impl FnOnce() -> bool) -> Option<u64> {
        let key = (topic.to_owned(), partition);
        // The consumer is asked without the lock held: its rebalance callback takes the lock.
        let tracked = self.lock().trackers.contains_key(&key);
        if !tracked && !still_assigned() {
            return None;
        }
        let mut st = self.lock();
        let generation = st.generation;
        let t = st.trackers.entry(key).or_insert_with(|| PartitionTracker { generation, ..Default::default() });
        t.pending.insert(offset, false);
        Some(t.generation)
    }

    /// A record's output is confirmed; returns the next offset to store when the partition's
    /// acked prefix grew (and the partition was not revoked since the record was handed out).
    pub(super) fn ack(&self, topic: &str, partition: i32, generation: u64, offset: i64) -> Option<i64> {
        let mut st = self.lock();
        match st.trackers.get_mut(&(topic.to_owned(), partition)) {
            Some(t) if t.generation == generation => t.ack(offset),
            _ => None,
        }
    }

    pub(super) fn stored_moved(&self) {
        self.stored.notify_one();
    }

    /// What a commit now would cover.
    pub(super) fn to_commit(&self) -> Snapshot {
        let st = self.lock();
        st.trackers.iter().filter_map(|(k, t)| t.stored.back().map(|&o| (k.clone(), t.generation, o + 1))).collect()
    }

    /// A commit taken after `snapshot` succeeded.
    pub(super) fn committed(&self, snapshot: &Snapshot) {
        let mut st = self.lock();
        for (key, generation, next) in snapshot {
            if let Some(t) = st.trackers.get_mut(key).filter(|t| t.generation == *generation) {
                t.committed(*next);
            }
        }
        st.commit_failing = false;
        drop(st);
        self.room.notify_waiters();
    }

    fn commit_failed(&self) {
        self.lock().commit_failing = true;
        self.room.notify_waiters();
    }

    /// Wait until fewer than `max` records are consumed and not committed (or commits fail).
    pub(super) async fn wait_for_room(&self, max: usize) {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let st = self.lock();
                if st.commit_failing || st.trackers.values().map(PartitionTracker::uncommitted).sum::<usize>() < max {
                    return;
                }
            }
            self.stored.notify_one();
            room.await;
        }
    }
}

/// Commit the stored offsets whenever they move, one synchronous commit at a time; a failed
/// commit is retried with backoff. Runs until aborted.
pub(super) async fn commit_loop(consumer: Arc<StreamConsumer<Context>>, shared: Arc<Shared>) {
    let mut pause = FIRST_COMMIT_RETRY;
    loop {
        shared.stored.notified().await;
        let snapshot = shared.to_commit();
        if snapshot.is_empty() {
            continue;
        }
        let c = consumer.clone();
        let result = tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await;
        match result {
            Ok(Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {
                shared.committed(&snapshot);
                pause = FIRST_COMMIT_RETRY;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %reason(e), retry_in = ?pause, "cannot commit the stored offsets");
                shared.commit_failed();
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_COMMIT_RETRY);
                shared.stored.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %e, "the commit task failed");
                shared.commit_failed();
                shared.stored.notify_one();
            }
        }
    }
}

/// A partition's offsets from librdkafka's statistics (negative: unknown).
pub(super) struct PartitionOffsets {
    /// The consumer's position: the offset after the last record handed to the worker.
    pub position: i64,
    pub committed: i64,
    /// The partition's first offset.
    pub start: i64,
    pub high: i64,
    /// The last stable offset (`read_committed`).
    pub stable: i64,
}

impl PartitionOffsets {
    /// End offset minus where this member reads from: its position, else the committed
    /// offset, else the partition's start; `None` while the end is unknown.
    pub(super) fn lag(&self, read_committed: bool) -> Option<i64> {
        let end = if read_committed && self.stable >= 0 { self.stable } else { self.high };
        let from = [self.position, self.committed, self.start].into_iter().find(|o| *o >= 0)?;
        (end >= 0).then(|| (end - from).max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_advance_only_over_the_acked_prefix() {
        let mut t = PartitionTracker::default();
        for o in 10..15 {
            t.pending.insert(o, false);
        }
        assert_eq!(t.ack(12), None, "11 and 10 are still in flight");
        assert_eq!(t.ack(10), Some(11));
        assert_eq!(t.ack(11), Some(13), "10..=12 done: next to read is 13");
        assert_eq!(t.ack(14), None);
        assert_eq!(t.ack(13), Some(15));
        assert_eq!(t.ack(99), None, "unknown offsets store nothing");
    }

    #[test]
    fn a_record_counts_as_uncommitted_until_its_commit_lands() {
        let shared = Shared::default();
        shared.assign(&[("t".into(), 0), ("t".into(), 1)]);
        let g = (0..4).map(|o| shared.hand_out("t", 0, o, || false)).last().unwrap().unwrap();
        shared.hand_out("t", 1, 7, || false).unwrap();
        let uncommitted = |s: &Shared| s.lock().trackers.values().map(PartitionTracker::uncommitted).sum::<usize>();
        assert_eq!(uncommitted(&shared), 5);
        assert_eq!(shared.ack("t", 0, g, 0), Some(1));
        assert_eq!(shared.ack("t", 0, g, 1), Some(2));
        assert_eq!(uncommitted(&shared), 5, "acked is not committed");
        let snapshot = shared.to_commit();
        assert_eq!(snapshot, vec![(("t".to_owned(), 0), g, 2)]);
        shared.ack("t", 0, g, 2);
        shared.committed(&snapshot);
        assert_eq!(uncommitted(&shared), 3, "offset 2 was stored after the snapshot: not yet committed");
        shared.revoke("t", 1, || {});
        assert_eq!(uncommitted(&shared), 2, "a revoked partition's records are its new owner's");
        assert_eq!(shared.ack("t", 1, g, 7), None);
    }

    #[test]
    fn a_record_read_before_its_partition_was_revoked_is_not_handed_out() {
        let shared = Shared::default();
        shared.assign(&[("t".into(), 0)]);
        let g = shared.hand_out("t", 0, 0, || panic!("assigned: the consumer is not asked")).unwrap();
        shared.revoke("t", 0, || {});
        assert_eq!(shared.hand_out("t", 0, 1, || false), None, "revoked: the new owner's record");
        assert_eq!(shared.ack("t", 0, g, 0), None);
        assert!(shared.to_commit().is_empty(), "nothing of the revoked partition is committed");
        // The consumer says the partition is ours (an assignment this side never saw): tracked.
        let g = shared.hand_out("t", 0, 5, || true).unwrap();
        assert_eq!(shared.ack("t", 0, g, 5), Some(6));
    }

    #[tokio::test]
    async fn a_fetch_waits_for_room_until_a_commit_lands_or_commits_fail() {
        let shared = Arc::new(Shared::default());
        shared.assign(&[("t".into(), 0)]);
        let g = (0..3).map(|o| shared.hand_out("t", 0, o, || false)).last().unwrap().unwrap();
        shared.ack("t", 0, g, 0);
        let waiter = tokio::spawn({
            let shared = shared.clone();
            async move { shared.wait_for_room(3).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "3 consumed, none committed");
        shared.committed(&shared.to_commit());
        waiter.await.unwrap();
        let g = shared.hand_out("t", 0, 3, || false);
        assert_eq!(g, Some(1));
        let waiter = tokio::spawn({
            let shared = shared.clone();
            async move { shared.wait_for_room(3).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        shared.commit_failed();
        waiter.await.unwrap();
    }

    #[test]
    fn lag_is_measured_from_the_position_else_the_committed_offset_else_the_start() {
        let offsets = |position, committed| PartitionOffsets { position, committed, start: 100, high: 30_100, stable: 30_000 };
        assert_eq!(offsets(-1001, -1001).lag(true), Some(29_900), "a new group: from the start offset");
        assert_eq!(offsets(-1001, 5_000).lag(true), Some(25_000), "nothing read yet: from the committed offset");
        assert_eq!(offsets(20_000, 5_000).lag(true), Some(10_000), "from the position, not the last commit");
        assert_eq!(offsets(20_000, 5_000).lag(false), Some(10_100), "read_uncommitted: to the high watermark");
        let unknown = PartitionOffsets { position: -1001, committed: -1001, start: -1, high: -1, stable: -1 };
        assert_eq!(unknown.lag(true), None);
    }
}
