//! The loops behind timers (fixed rate, drift-tracked) and cron jobs.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{sleep_until, Instant};

use super::cron::CronSchedule;
use super::task::TimerStats;
use super::{Context, Result, TimerSpec};

/// Shortest interval a timer accepts; a zero interval would spin.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// mode logs a late wake-up when the drift exceeds 30% of the interval, capped at 1.2 s.
fn drift_threshold(interval: Duration) -> Duration {
    interval.mul_f64(0.30).min(Duration::from_millis(1200))
}

pub(crate) async fn run_timer<F, Fut>(
    ctx: &Context,
    spec: TimerSpec,
    stats: &TimerStats,
    mut body: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let interval = spec.interval.max(MIN_INTERVAL);
    let mut next = Instant::now()
        + if spec.exec_first {
            Duration::ZERO
        } else {
            interval
        };
    let stop = ctx.stopped();
    tokio::pin!(stop);
    // One timer entry for the timer's whole life, re-armed each tick.
    let sleep = sleep_until(next);
    tokio::pin!(sleep);
    loop {
        sleep.as_mut().reset(next);
        tokio::select! {
            biased;
            _ = &mut stop => return Ok(()),
            _ = sleep.as_mut() => {}
        }
        let lateness = Instant::now().saturating_duration_since(next);
        stats.record_fire(lateness);
        if interval >= Duration::from_secs(1) && lateness >= drift_threshold(interval) {
            tracing::info!(
                "[{}]: timer woke up too late, with a drift of +{lateness:?}",
                ctx.handle().log_prefix()
            );
        }
        body().await?;
        next += interval;
        let now = Instant::now();
        if next <= now {
            // The body overran: skip the ticks it missed instead of firing them back to back.
            let behind = now - next;
            let missed = (behind.as_nanos() / interval.as_nanos()) as u32 + 1;
            next += interval * missed;
            let before = stats.skipped.fetch_add(missed as u64, Ordering::Relaxed);
            if before == 0 || (before + missed as u64) / 100 != before / 100 {
                tracing::warn!(
                    "[{}]: timer is overlapping (interval={interval:?}); skipped {} ticks so far",
                    ctx.handle().log_prefix(),
                    before + missed as u64
                );
            }
        }
    }
}

pub(crate) async fn run_cron<F, Fut>(
    ctx: &Context,
    schedule: &CronSchedule,
    mut body: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    // Wall time advanced by the tokio clock, so that paused-time tests drive cron jobs too.
    let wall_at_start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let started = Instant::now();
    loop {
        let now = wall_at_start + started.elapsed();
        let Some(next) = schedule.next_after(now.as_secs() as i64) else {
            tracing::warn!(
                "[{}]: cron expression '{schedule}' never fires again; job ends",
                ctx.handle().log_prefix()
            );
            return Ok(());
        };
        let wait = Duration::from_secs(next as u64).saturating_sub(now);
        if !ctx.sleep(wait).await {
            return Ok(());
        }
        body().await?;
    }
}
