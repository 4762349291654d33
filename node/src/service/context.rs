//! `Context`: what hooks and tasks use to reach their service — spawn work, sleep, check for
//! a stop, add runtime dependencies, crash.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::cron::{CronError, CronSchedule};
use super::task::{spawn_owned, TaskKind, TimerStats};
use super::timer::{run_cron, run_timer};
use super::{CrashReason, Result, ServiceError, ServiceHandle};

static NEXT_FUTURE: AtomicU64 = AtomicU64::new(1);

/// How a timer fires.
#[derive(Debug, Clone, Copy)]
pub struct TimerSpec {
    /// Time between fires. Fires are scheduled at a fixed rate (start + k × interval); a
    /// body that overruns makes the timer skip the ticks it missed, never bunch them up.
    pub interval: Duration,
    /// Fire once immediately, then every interval (mode's `exec_first`).
    pub exec_first: bool,
}

impl TimerSpec {
    /// Every `interval`, first fire after one interval.
    pub fn every(interval: Duration) -> Self {
        TimerSpec {
            interval,
            exec_first: false,
        }
    }

    /// Also fire once at start.
    pub fn exec_first(mut self) -> Self {
        self.exec_first = true;
        self
    }
}

/// A service's view of itself, given to every hook; clone it into tasks.
///
/// A context belongs to one run of the service: after a restart, contexts of the previous
/// run report `should_stop() == true` and spawn nothing.
#[derive(Clone)]
pub struct Context {
    handle: ServiceHandle,
    generation: u64,
}

impl Context {
    pub(crate) fn new(handle: ServiceHandle, generation: u64) -> Self {
        Context { handle, generation }
    }

    /// The service's handle.
    pub fn handle(&self) -> &ServiceHandle {
        &self.handle
    }

    /// The service's label.
    pub fn label(&self) -> &str {
        self.handle.label()
    }

    /// True once a stop was requested or the service crashed (or this run is over).
    pub fn should_stop(&self) -> bool {
        self.handle.should_stop() || self.handle.generation() != self.generation
    }

    /// Resolves when the service should stop (stop requested or crashed).
    pub async fn stopped(&self) {
        let cell = &self.handle.cell;
        if self.handle.generation() != self.generation {
            return;
        }
        cell.stop.wait().await
    }

    /// Sleep for `duration`, returning early when the service stops or crashes.
    /// Returns `true` if it slept the whole time, `false` if woken by a stop.
    pub async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.stopped() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }

    /// Run `fut` until it completes or the service stops; `None` if the service stopped first
    /// (mode's `wait`/`wait_first` against the stop).
    pub async fn wait<F: Future>(&self, fut: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.stopped() => None,
            out = fut => Some(out),
        }
    }

    /// Say whether this run of the service is healthy (see [`ServiceHandle::health`]): on a
    /// node, an instance of an in-process kind without a spec `health` check is reported
    /// `healthy` or `unhealthy` by this, and rollouts, `--wait` and dependents go by it once
    /// it said anything. A context of an earlier run changes nothing.
    pub fn set_healthy(&self, healthy: bool) {
        self.handle.set_health(self.generation, healthy);
    }

    /// Crash the service (see [`ServiceHandle::crash`]).
    pub fn crash(&self, reason: impl Into<CrashReason>) -> bool {
        self.handle.crash(reason)
    }

    /// Spawn a background task (mode's `@Service.task`). It should return when
    /// [`Context::should_stop`] turns true; at stop it gets the grace period to do so and is
    /// then aborted. An error or panic crashes the service with a reason naming the task.
    pub fn spawn<F>(&self, name: impl Into<String>, fut: F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        self.spawn_kind(name.into(), TaskKind::Task, None, Box::pin(fut));
    }

    /// Add a one-shot future (mode's `add_future`): awaited on stop within the grace period.
    pub fn add_future<F>(&self, fut: F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let n = NEXT_FUTURE.fetch_add(1, Ordering::Relaxed);
        self.spawn_kind(format!("future-{n}"), TaskKind::Future, None, Box::pin(fut));
    }

    /// Call `body` every `interval` at a fixed rate (mode's `@Service.timer`); see
    /// [`TimerSpec`]. An error from `body` crashes the service.
    pub fn timer<F, Fut>(&self, name: impl Into<String>, interval: Duration, body: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.timer_with(name, TimerSpec::every(interval), body)
    }

    /// [`Context::timer`] with options.
    pub fn timer_with<F, Fut>(&self, name: impl Into<String>, spec: TimerSpec, body: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let stats = Arc::new(TimerStats {
            interval: spec.interval,
            ..TimerStats::default()
        });
        let ctx = self.clone();
        let loop_stats = stats.clone();
        self.spawn_kind(
            name.into(),
            TaskKind::Timer,
            Some(stats),
            Box::pin(async move { run_timer(&ctx, spec, &loop_stats, body).await }),
        );
    }

    /// Call `body` at the times of a cron expression (UTC), e.g. `"*/5 * * * *"` (mode's
    /// `@Service.crontab`). Fires missed while `body` runs are skipped.
    pub fn cron<F, Fut>(
        &self,
        name: impl Into<String>,
        expression: &str,
        body: F,
    ) -> std::result::Result<(), CronError>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let schedule = CronSchedule::parse(expression)?;
        let ctx = self.clone();
        self.spawn_kind(
            name.into(),
            TaskKind::Cron,
            None,
            Box::pin(async move { run_cron(&ctx, &schedule, body).await }),
        );
        Ok(())
    }

    /// Add `child` as a dependency of this run and start it now (the service is starting or
    /// running). It is stopped with the service and not re-added by a restart (unlike mode,
    /// where each restart added one more copy).
    ///
    /// Fails with [`ServiceError::NotRunning`] once this run is stopping, crashed or over
    /// (the child is then neither added nor started), and like [`ServiceHandle::start`] when
    /// the child fails to start.
    pub async fn add_runtime_dependency(
        &self,
        child: ServiceHandle,
    ) -> std::result::Result<ServiceHandle, ServiceError> {
        if self.should_stop() {
            return Err(ServiceError::NotRunning {
                service: self.label().to_string(),
                child: child.label().to_string(),
                state: self.handle.state(),
            });
        }
        self.handle.add_runtime(&child);
        child.maybe_start().await?;
        Ok(child)
    }

    fn spawn_kind(
        &self,
        name: String,
        kind: TaskKind,
        timer: Option<Arc<TimerStats>>,
        fut: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
    ) {
        if self.should_stop() {
            tracing::debug!(
                "[{}]: not spawning '{name}': stopping",
                self.handle.log_prefix()
            );
            return;
        }
        spawn_owned(&self.handle, name, kind, timer, fut);
    }
}
