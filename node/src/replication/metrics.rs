//! Counters the control plane keeps for `/metrics`: proposals and their latency, leader changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the proposal latency histogram.
pub(crate) const LATENCY_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) proposals: AtomicU64,
    pub(crate) leader_changes: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Cumulative counts per bucket, plus +Inf last.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
}

impl Counters {
    pub(crate) fn proposal_done(&self, took: Duration) {
        self.proposals.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus histogram lines for the proposal latency.
    pub(crate) fn latency_histogram(&self, name: &str, labels: &str, out: &mut String) {
        use std::fmt::Write as _;
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}
