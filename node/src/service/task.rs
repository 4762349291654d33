//! Background work owned by a service: tasks, futures, timers and cron jobs, tracked so that a
//! stop can wait for them, abort the ones that overrun, and show them in the beacon.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::guarded::Guarded;
use super::handle::lock;
use super::{Result, ServiceHandle};

/// What kind of background work a beacon leaf is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// A long-running loop (mode's `@Service.task`).
    Task,
    /// A one-shot future (mode's `add_future`).
    Future,
    /// A fixed-rate timer (mode's `@Service.timer`).
    Timer,
    /// A cron-scheduled job (mode's `@Service.crontab`).
    Cron,
}

impl TaskKind {
    /// The word used in crash reasons and logs (`task`, `timer`, ...).
    pub(crate) fn noun(self) -> &'static str {
        match self {
            TaskKind::Task => "task",
            TaskKind::Future => "future",
            TaskKind::Timer => "timer",
            TaskKind::Cron => "cron job",
        }
    }
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Still running.
    Running,
    /// Returned `Ok`.
    Done,
    /// Returned an error or panicked (and crashed its service).
    Failed,
}

/// Shared, live facts about one task (read by the beacon while the task runs).
pub(crate) struct TaskInfo {
    pub(crate) name: Box<str>,
    pub(crate) kind: TaskKind,
    state: AtomicU8,
    pub(crate) started: Instant,
    pub(crate) timer: Option<Arc<TimerStats>>,
}

/// Drift accounting of a timer: how late each fire was against its fixed-rate schedule.
#[derive(Default)]
pub(crate) struct TimerStats {
    pub(crate) interval: Duration,
    pub(crate) fires: AtomicU64,
    pub(crate) late_last_us: AtomicU64,
    pub(crate) late_max_us: AtomicU64,
    pub(crate) skipped: AtomicU64,
}

impl TimerStats {
    pub(crate) fn record_fire(&self, lateness: Duration) {
        let us = lateness.as_micros().min(u64::MAX as u128) as u64;
        self.fires.fetch_add(1, Ordering::Relaxed);
        self.late_last_us.store(us, Ordering::Relaxed);
        self.late_max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "every {:?}, fires={} late_last={:.3}ms late_max={:.3}ms skipped={}",
            self.interval,
            self.fires.load(Ordering::Relaxed),
            self.late_last_us.load(Ordering::Relaxed) as f64 / 1000.0,
            self.late_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
            self.skipped.load(Ordering::Relaxed),
        )
    }
}

impl TaskInfo {
    pub(crate) fn state(&self) -> TaskState {
        match self.state.load(Ordering::Acquire) {
            0 => TaskState::Running,
            1 => TaskState::Done,
            _ => TaskState::Failed,
        }
    }

    fn set_state(&self, s: TaskState) {
        self.state.store(s as u8, Ordering::Release);
    }
}

pub(crate) struct TaskEntry {
    pub(crate) info: Arc<TaskInfo>,
    abort: AbortHandle,
}

impl TaskEntry {
    pub(crate) fn is_running(&self) -> bool {
        self.info.state() == TaskState::Running
    }

    pub(crate) fn name(&self) -> &str {
        &self.info.name
    }

    pub(crate) fn abort(&self) {
        self.abort.abort();
    }
}

/// Decrements the service's live-task count however the task ends (return, panic, abort).
struct LiveGuard(ServiceHandle);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let cell = &self.0.cell;
        if cell.live_tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            cell.tasks_done.notify_waiters();
        }
    }
}

/// Spawn `fut` as background work of `owner`: an error or panic crashes the owner with a
/// reason naming the task.
pub(crate) fn spawn_owned(
    owner: &ServiceHandle,
    name: String,
    kind: TaskKind,
    timer: Option<Arc<TimerStats>>,
    fut: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
) {
    let info = Arc::new(TaskInfo {
        name: name.into_boxed_str(),
        kind,
        state: AtomicU8::new(TaskState::Running as u8),
        started: Instant::now(),
        timer,
    });
    owner.cell.live_tasks.fetch_add(1, Ordering::AcqRel);
    let guard = LiveGuard(owner.clone());
    let task_info = info.clone();
    let body = owner.scope(async move {
        let outcome = Guarded::task(&guard.0, &task_info, fut).await;
        let me = &guard.0;
        let what = kind.noun();
        match outcome {
            Ok(Ok(())) => task_info.set_state(TaskState::Done),
            Ok(Err(e)) => {
                task_info.set_state(TaskState::Failed);
                me.crash(format!("{what} '{}' failed: {e}", task_info.name));
            }
            Err(panic) => {
                task_info.set_state(TaskState::Failed);
                me.crash(format!("{what} '{}' panicked: {panic}", task_info.name));
            }
        }
        drop(guard);
    });
    let join = tokio::spawn(body);
    lock(&owner.cell.tasks).push(TaskEntry {
        info,
        abort: join.abort_handle(),
    });
}
