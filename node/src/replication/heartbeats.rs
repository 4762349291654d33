//! When each node's agent last heartbeated, as the leader saw it: recorded where heartbeats
//! arrive (the peer API), read by the control loop's failure detector. Also which nodes said
//! they were leaving (a clean shutdown), so that they are marked down as having left rather
//! than as having failed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::service::lock;

/// A heartbeat arriving this soon after a node said it was leaving is one that was on its way
/// (relayed in a batch) before the notice, not the node back: it does not undo the notice.
const LEAVE_SETTLES: Duration = Duration::from_secs(2);

/// When each node last heartbeated, as seen by this node while it leads.
#[derive(Default)]
pub(crate) struct Heartbeats {
    inner: std::sync::Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Since when each node's silence counts, and whether that was a heartbeat this leader
    /// heard (not only the start of a grace period).
    seen: HashMap<u64, (Instant, bool)>,
    /// Nodes that said they are leaving: when, and whether the leave is being committed
    /// right now by the call that took the notice.
    left: HashMap<u64, Left>,
}

/// A node that said it is leaving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Left {
    at: Instant,
    /// The notice's own call is committing the node's status: the failure detector waits.
    pub(crate) committing: bool,
}

impl Heartbeats {
    pub(crate) fn record(&self, node: u64) {
        self.record_all([node]);
    }

    /// Record a heartbeat of each of `nodes` (a relayed batch: one lock for all).
    pub(crate) fn record_all(&self, nodes: impl IntoIterator<Item = u64>) {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        for node in nodes {
            inner.seen.insert(node, (now, true));
            if inner
                .left
                .get(&node)
                .is_some_and(|l| now.duration_since(l.at) >= LEAVE_SETTLES)
            {
                // Back after a clean shutdown.
                inner.left.remove(&node);
            }
        }
    }

    /// Take `node`'s notice that it is leaving; the caller commits its status and then calls
    /// [`Heartbeats::leave_committed`].
    pub(crate) fn leave(&self, node: u64) {
        lock(&self.inner).left.insert(
            node,
            Left {
                at: Instant::now(),
                committing: true,
            },
        );
    }

    /// The notice's call is done committing (or failed to): from now on the failure detector
    /// finishes the job if the node is still up.
    pub(crate) fn leave_committed(&self, node: u64) {
        if let Some(l) = lock(&self.inner).left.get_mut(&node) {
            l.committing = false;
        }
    }

    /// Whether `node` said it is leaving (and has not been heard since).
    pub(crate) fn left(&self, node: u64) -> Option<Left> {
        lock(&self.inner).left.get(&node).copied()
    }

    /// Time since `node` was last heard; a node never heard of (just registered) starts its
    /// grace period now.
    pub(crate) fn age(&self, node: u64) -> Duration {
        lock(&self.inner)
            .seen
            .entry(node)
            .or_insert_with(|| (Instant::now(), false))
            .0
            .elapsed()
    }

    /// Time since this leader last heard a heartbeat of `node`; `None` if it has not heard one
    /// (a grace period alone does not bring a node that is down back up).
    pub(crate) fn heard(&self, node: u64) -> Option<Duration> {
        lock(&self.inner)
            .seen
            .get(&node)
            .filter(|(_, heard)| *heard)
            .map(|(t, _)| t.elapsed())
    }

    /// Time since each node's last heartbeat.
    pub(crate) fn ages(&self) -> Vec<(u64, Duration)> {
        let mut v: Vec<(u64, Duration)> = lock(&self.inner)
            .seen
            .iter()
            .map(|(n, (t, _))| (*n, t.elapsed()))
            .collect();
        v.sort();
        v
    }

    /// A new leader gives every node a full grace period (without counting it as heard: a
    /// node that is down stays down until it heartbeats), and forgets earlier notices.
    pub(crate) fn reset(&self, nodes: impl Iterator<Item = u64>) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        inner.seen.clear();
        inner.left.clear();
        inner.seen.extend(nodes.map(|n| (n, (now, false))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_period_is_not_a_heartbeat() {
        let h = Heartbeats::default();
        h.reset([1, 2].into_iter());
        assert!(h.age(1) < Duration::from_secs(1));
        assert_eq!(h.heard(1), None);
        assert_eq!(h.heard(3), None);
        h.record(2);
        assert!(h.heard(2).is_some());
    }

    #[test]
    fn a_heartbeat_right_after_leaving_does_not_undo_it() {
        let h = Heartbeats::default();
        h.record(1);
        h.leave(1);
        assert!(h.left(1).unwrap().committing);
        h.leave_committed(1);
        h.record(1);
        assert_eq!(h.left(1).map(|l| l.committing), Some(false));
        // Later, the node is back.
        lock(&h.inner).left.get_mut(&1).unwrap().at -= LEAVE_SETTLES;
        h.record(1);
        assert_eq!(h.left(1), None);
        h.leave(2);
        h.reset([1, 2].into_iter());
        assert_eq!(h.left(2), None);
    }
}
