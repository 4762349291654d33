//! Counters the control plane keeps for `/metrics`: proposals and their latency, leader changes;
//! and the latency [`Histogram`] other layers use too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the proposal latency histogram.
pub(crate) const LATENCY_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A Prometheus histogram of durations over fixed bucket bounds (seconds).
pub(crate) struct Histogram {
    bounds: &'static [f64],
    sum_us: AtomicU64,
    /// Counts per bucket (not cumulative), plus +Inf last.
    buckets: Vec<AtomicU64>,
}

impl Histogram {
    /// An empty histogram over `bounds` (increasing).
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            sum_us: AtomicU64::new(0),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Count one observation of `took`.
    pub(crate) fn observe(&self, took: Duration) {
        self.sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The sample lines (`_bucket`, `_sum`, `_count`) of family `name`, with `labels` (the
    /// text between the braces, without `le`) on each.
    pub(crate) fn render(&self, name: &str, labels: &str, out: &mut String) {
        use std::fmt::Write as _;
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {cumulative}");
    }
}

pub(crate) struct Counters {
    pub(crate) proposals: AtomicU64,
    pub(crate) leader_changes: AtomicU64,
    latency: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            proposals: AtomicU64::new(0),
            leader_changes: AtomicU64::new(0),
            latency: Histogram::new(&LATENCY_BUCKETS),
        }
    }
}

impl Counters {
    pub(crate) fn proposal_done(&self, took: Duration) {
        self.proposals.fetch_add(1, Ordering::Relaxed);
        self.latency.observe(took);
    }

    /// Prometheus histogram lines for the proposal latency.
    pub(crate) fn latency_histogram(&self, name: &str, labels: &str, out: &mut String) {
        self.latency.render(name, labels, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_every_observation() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(2));
        let mut out = String::new();
        h.render("x_seconds", "m=\"a\"", &mut out);
        assert_eq!(
            out,
            "x_seconds_bucket{m=\"a\",le=\"0.01\"} 1\nx_seconds_bucket{m=\"a\",le=\"0.1\"} 2\nx_seconds_bucket{m=\"a\",le=\"+Inf\"} 3\nx_seconds_sum{m=\"a\"} 2.055\nx_seconds_count{m=\"a\"} 3\n"
        );
    }
}
