//! Blocking detection: a watchdog thread that names any hook or task of a service stuck in
//! one poll for longer than a threshold (one blocked worker thread among healthy ones is
//! enough), and a probe task that catches a runtime whose every thread is blocked, whatever
//! blocks it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::service::{lock, polling_threads, watch_polls, ServiceHandle, WatchGuard};

/// mode's default `blocking_timeout`.
pub const DEFAULT_BLOCKING_THRESHOLD: Duration = Duration::from_secs(10);

/// Warns (tracing `warn`) when a thread has been stuck in one poll of a service's hook or
/// task for longer than the threshold, naming the thread, the service and the hook or task;
/// and when the runtime it was started on has not polled its probe for that long (every
/// worker thread blocked, possibly by code outside the services). Stops when dropped.
///
/// Threads record what they poll only while a detector runs (otherwise a hook's or task's
/// poll costs one relaxed load more than a plain one), so a poll already running when the
/// detector starts is not named. A poll that blocks on purpose
/// (`tokio::task::block_in_place`) is reported too.
pub struct BlockingDetector {
    shared: Arc<Shared>,
    probe: tokio::task::JoinHandle<()>,
    _watching: WatchGuard,
}

struct Shared {
    base: Instant,
    last_beat_ms: AtomicU64,
    detections: AtomicU64,
    stop: AtomicBool,
    /// Only sites in this subtree count (tests); `None` watches the whole process.
    scope: Option<ServiceHandle>,
    reports: Mutex<Vec<String>>,
}

impl BlockingDetector {
    /// Start watching every service of this process and probing the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(threshold: Duration) -> BlockingDetector {
        BlockingDetector::start_scoped(threshold, None)
    }

    /// [`BlockingDetector::start`], counting only the hooks and tasks of `scope`'s subtree.
    pub(crate) fn start_scoped(
        threshold: Duration,
        scope: Option<ServiceHandle>,
    ) -> BlockingDetector {
        let watching = watch_polls();
        let shared = Arc::new(Shared {
            base: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            detections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            scope,
            reports: Mutex::new(Vec::new()),
        });
        let period = (threshold / 4).max(Duration::from_millis(5));
        let beat = shared.clone();
        let probe = tokio::spawn(async move {
            loop {
                beat.last_beat_ms
                    .store(beat.base.elapsed().as_millis() as u64, Ordering::Relaxed);
                // std time, not tokio's: a paused test clock must not look like a blocked runtime.
                let until = std::time::Instant::now() + period;
                tokio::time::sleep(until - std::time::Instant::now()).await;
            }
        });
        let watch = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("mode-blocking-detector".into())
            .spawn(move || Watchdog::new(watch, threshold, period).run());
        if let Err(e) = spawned {
            tracing::warn!("blocking detector disabled: cannot start its thread: {e}");
        }
        BlockingDetector {
            shared,
            probe,
            _watching: watching,
        }
    }

    /// How many blocked episodes were reported so far.
    pub fn detections(&self) -> u64 {
        self.shared.detections.load(Ordering::Relaxed)
    }

    /// The reports so far (the warnings' text).
    #[cfg(test)]
    pub(crate) fn reports(&self) -> Vec<String> {
        lock(&self.shared.reports).clone()
    }
}

impl Drop for BlockingDetector {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.probe.abort();
    }
}

/// A poll seen in progress: the thread's poll counter then, and when it was first seen.
struct Seen {
    polls: u64,
    since: Instant,
    reported: bool,
}

struct Watchdog {
    shared: Arc<Shared>,
    threshold: Duration,
    period: Duration,
    /// By thread slot address.
    seen: HashMap<usize, Seen>,
    /// The current stale-probe episode was reported (or explained by a stuck poll).
    probe_reported: bool,
}

impl Watchdog {
    fn new(shared: Arc<Shared>, threshold: Duration, period: Duration) -> Self {
        Watchdog {
            shared,
            threshold,
            period,
            seen: HashMap::new(),
            probe_reported: false,
        }
    }

    fn run(mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(self.period);
            self.tick();
        }
    }

    fn report(&self, message: String) {
        self.shared.detections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("{message}");
        lock(&self.shared.reports).push(message);
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let threshold = self.threshold;
        let mut stuck_now = false;
        let mut live = Vec::new();
        for slot in polling_threads() {
            let key = Arc::as_ptr(&slot) as usize;
            let (polls, site) = slot.sample();
            let Some(site) = site else { continue };
            if let Some(scope) = &self.shared.scope {
                if !site.service().is_within(scope) {
                    continue;
                }
            }
            live.push(key);
            let seen = self.seen.entry(key).or_insert(Seen {
                polls,
                since: now,
                reported: false,
            });
            if seen.polls != polls {
                *seen = Seen {
                    polls,
                    since: now,
                    reported: false,
                };
            }
            let age = now - seen.since;
            if age < threshold {
                continue;
            }
            stuck_now = true;
            if !seen.reported {
                seen.reported = true;
                let message = format!(
                    "Blocking detected: thread '{}' has been stuck for at least {age:?} \
                     (threshold {threshold:?}) in one poll of {}; move blocking work to \
                     tokio::task::spawn_blocking or ServiceHandle::on_own_thread",
                    slot.thread,
                    site.describe()
                );
                self.report(message);
            }
        }
        self.seen.retain(|k, _| live.contains(k));

        let beat_ms = self.shared.last_beat_ms.load(Ordering::Relaxed);
        let now_ms = self.shared.base.elapsed().as_millis() as u64;
        let probe_age = Duration::from_millis(now_ms.saturating_sub(beat_ms));
        if probe_age <= threshold {
            self.probe_reported = false;
        } else if stuck_now {
            // A stuck hook or task explains it and was named.
            self.probe_reported = true;
        } else if !self.probe_reported && probe_age > threshold + 2 * self.period {
            // Two more periods give a stuck poll the chance to be seen and named first.
            self.probe_reported = true;
            self.report(format!(
                "Blocking detected: the runtime has not polled its probe for {probe_age:?} \
                 (threshold {threshold:?}): every worker thread is blocked, by code outside \
                 the services' hooks and tasks; move blocking work to \
                 tokio::task::spawn_blocking or ServiceHandle::on_own_thread"
            ));
        }
    }
}
