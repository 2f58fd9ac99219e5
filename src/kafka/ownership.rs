//! Exactly-once across rebalances: which input partitions the worker's consumer owns, and the
//! order between a transaction's offset commit and a revocation.
//!
//! KIP-447 fences a consumer that left its group: its offset commit carries a stale member id or
//! generation, and the group coordinator refuses it. It does not fence a member that stays in the
//! group but gave one partition up in a rebalance: a commit of that partition's in-flight inputs,
//! sent with the group's current generation, would be taken, and its outputs would double those
//! of the partition's new owner, which reads on from the last committed offset. So:
//! - each assignment of a partition gets a new epoch, and each record carries the epoch of its
//!   partition when it was read ([`crate::record::Origin::Kafka`]'s `epoch`);
//! - a transaction commits only inputs whose partition is still assigned under that epoch,
//!   checked and committed under this lock ([`Ownership::lock`]);
//! - a revocation takes the same lock (waiting for a commit in progress to end) before it ends
//!   the epoch. It runs in the consumer's rebalance callback, before the member rejoins the
//!   group, so before any other member can be given the partition.
//!
//! Either a commit ends before the revocation, and the new owner reads on from its offsets, or it
//! starts after it and leaves the revoked partition's inputs out: their new owner reads them again.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// The partitions assigned to this consumer and the epoch of each assignment.
#[derive(Default)]
pub struct Ownership {
    state: Mutex<Owned>,
}

/// The assignment under the lock.
#[derive(Default)]
pub struct Owned {
    epochs: HashMap<(String, i32), u64>,
    /// The last epoch handed out (epochs start at 1; 0 means "not assigned").
    last: u64,
}

impl Owned {
    /// Whether `partition` of `topic` is still assigned under `epoch`.
    pub fn owns(&self, topic: &str, partition: i32, epoch: u64) -> bool {
        epoch != 0 && self.epochs.get(&(topic.to_owned(), partition)) == Some(&epoch)
    }
}

impl Ownership {
    /// The assignment, locked: a revocation waits until the guard is dropped. Held by a
    /// transaction from its ownership check to the end of its commit.
    pub fn lock(&self) -> MutexGuard<'_, Owned> {
        // A panic while holding the lock leaves plain bookkeeping behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Newly assigned partitions: each gets a new epoch.
    pub fn assign(&self, partitions: &[(String, i32)]) {
        let mut owned = self.lock();
        for p in partitions {
            owned.last += 1;
            let epoch = owned.last;
            owned.epochs.insert(p.clone(), epoch);
        }
    }

    /// Partitions revoked (or lost): their epochs end. Blocks while a commit is in progress.
    pub fn revoke(&self, partitions: &[(String, i32)]) {
        let mut owned = self.lock();
        for p in partitions {
            owned.epochs.remove(p);
        }
    }

    /// The epoch of the partition's current assignment; 0 when it is not assigned.
    pub fn epoch(&self, topic: &str, partition: i32) -> u64 {
        self.lock().epochs.get(&(topic.to_owned(), partition)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_is_owned_only_under_the_assignment_it_was_read_in() {
        let o = Ownership::default();
        let p = |n| ("in".to_owned(), n);
        assert_eq!(o.epoch("in", 0), 0);
        o.assign(&[p(0), p(1)]);
        let (e0, e1) = (o.epoch("in", 0), o.epoch("in", 1));
        let owns = |t: &str, p, e| o.lock().owns(t, p, e);
        assert!(owns("in", 0, e0) && owns("in", 1, e1));
        o.revoke(&[p(0)]);
        assert!(!owns("in", 0, e0), "revoked");
        assert!(owns("in", 1, e1), "kept");
        o.assign(&[p(0)]);
        assert!(!owns("in", 0, e0), "read before the revocation: not owned under the new assignment");
        let e0_again = o.epoch("in", 0);
        assert!(owns("in", 0, e0_again));
        assert!(!owns("in", 2, 0), "never assigned");
    }

    #[test]
    fn a_revocation_waits_for_a_commit_in_progress() {
        let o = std::sync::Arc::new(Ownership::default());
        o.assign(&[("in".to_owned(), 0)]);
        let epoch = o.epoch("in", 0);
        let guard = o.lock();
        let revoker = std::thread::spawn({
            let o = o.clone();
            move || o.revoke(&[("in".to_owned(), 0)])
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!revoker.is_finished(), "the revocation waits for the commit");
        assert!(guard.owns("in", 0, epoch), "still owned while the commit runs");
        drop(guard);
        revoker.join().unwrap();
        assert!(!o.lock().owns("in", 0, epoch));
    }
}
