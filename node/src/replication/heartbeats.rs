//! When each node's agent last heartbeated, as the leader saw it: recorded where heartbeats
//! arrive (the peer API), read by the control loop's failure detector.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::service::lock;

/// When each node last heartbeated, as seen by this node while it leads.
#[derive(Default)]
pub(crate) struct Heartbeats {
    seen: std::sync::Mutex<HashMap<u64, Instant>>,
}

impl Heartbeats {
    pub(crate) fn record(&self, node: u64) {
        lock(&self.seen).insert(node, Instant::now());
    }

    /// Time since `node` was last heard; a node never heard of (just registered) starts its
    /// grace period now.
    pub(crate) fn age(&self, node: u64) -> Duration {
        lock(&self.seen)
            .entry(node)
            .or_insert_with(Instant::now)
            .elapsed()
    }

    /// Time since each node's last heartbeat.
    pub(crate) fn ages(&self) -> Vec<(u64, Duration)> {
        let mut v: Vec<(u64, Duration)> = lock(&self.seen)
            .iter()
            .map(|(n, t)| (*n, t.elapsed()))
            .collect();
        v.sort();
        v
    }

    /// A new leader gives every node a full grace period.
    pub(crate) fn reset(&self, nodes: impl Iterator<Item = u64>) {
        let now = Instant::now();
        let mut seen = lock(&self.seen);
        seen.clear();
        seen.extend(nodes.map(|n| (n, now)));
    }
}
