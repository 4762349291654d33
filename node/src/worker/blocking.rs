//! Blocking detection: a probe task on the runtime and a watchdog thread that warns when the
//! probe has not run for longer than a threshold (a task is hogging a worker thread).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// mode's default `blocking_timeout`.
pub const DEFAULT_BLOCKING_THRESHOLD: Duration = Duration::from_secs(10);

/// Warns (tracing `warn`) when the runtime it was started on stops polling for longer than
/// the threshold. Stops when dropped.
pub struct BlockingDetector {
    shared: Arc<Shared>,
    probe: tokio::task::JoinHandle<()>,
}

struct Shared {
    base: Instant,
    last_beat_ms: AtomicU64,
    detections: AtomicU64,
    stop: AtomicBool,
}

impl BlockingDetector {
    /// Start probing the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(threshold: Duration) -> BlockingDetector {
        let shared = Arc::new(Shared {
            base: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            detections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
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
        let spawned = std::thread::Builder::new().name("mode-blocking-detector".into()).spawn(move || {
            let mut reported = false;
            while !watch.stop.load(Ordering::Relaxed) {
                std::thread::sleep(period);
                let now = watch.base.elapsed().as_millis() as u64;
                let age = Duration::from_millis(now.saturating_sub(watch.last_beat_ms.load(Ordering::Relaxed)));
                if age > threshold {
                    if !reported {
                        watch.detections.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "Blocking detected: the runtime has not polled its probe for {age:?} (threshold {threshold:?}); a task is blocking a worker thread (use spawn_blocking or ServiceHandle::on_own_thread for blocking work)"
                        );
                    }
                    reported = true;
                } else {
                    reported = false;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("blocking detector disabled: cannot start its thread: {e}");
        }
        BlockingDetector { shared, probe }
    }

    /// How many blocked episodes were reported so far.
    pub fn detections(&self) -> u64 {
        self.shared.detections.load(Ordering::Relaxed)
    }
}

impl Drop for BlockingDetector {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.probe.abort();
    }
}
