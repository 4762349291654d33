//! The service framework: mode's services, supervisors, timers, signals and beacon on tokio.
//!
//! Usable alone in any tokio program; it knows nothing of gRPC or Raft.
//!
//! * [`Service`]: implement the hooks you need; [`ServiceHandle`] starts, stops, restarts and
//!   observes it.
//! * [`Context`]: given to hooks; spawns tasks, futures, fixed-rate timers and cron jobs that
//!   the service owns, sleeps that wake on stop, runtime dependencies.
//! * [`Supervisor`]: one-for-one, one-for-all, rest-for-one and the forfeit variants, with a
//!   restart intensity and exponential backoff; escalates like OTP.
//! * [`Signal`]: typed observers.
//! * [`BeaconNode`]: the tree of everything running, as text, JSON or Graphviz dot.
//! * [`LifecycleEvent`]: what happens to a service or a subtree, as a typed, timestamped
//!   stream ([`ServiceHandle::subscribe`], [`ServiceHandle::subscribe_tree`]).
//!
//! A panic in a hook is caught like a panic in a task: a start hook's fails the start and
//! leaves the service `crashed` (the reason names the hook); a stop hook's is a forced stop
//! that still ends in `shutdown`. Dropping every handle leaves a service running, detached;
//! [`ServiceHandle::stop_on_drop`] stops it with its guard.
//!
//! # Where this differs from Python mode, and why
//!
//! * A failing `on_start` leaves the service `crashed` and stops what it had started; mode
//!   left it "running".
//! * A stopped service is `shutdown`, not "stopping".
//! * Stopping never hangs: every hook and the service's tasks get a grace period
//!   ([`DEFAULT_GRACE_PERIOD`]), then tasks are aborted and the stop is reported as forced.
//! * [`Context::sleep`] wakes on a crash as well as on a stop.
//! * Timers are fixed-rate (mode's were fixed-delay: interval + run time) and skip missed
//!   ticks instead of accumulating lag.
//! * Supervisors react to a crash at once (mode polled every 5 s and could lose wake-ups), use
//!   OTP's restart intensity (mode used a token bucket), and back off exponentially.
//! * A runtime dependency belongs to the run that added it: a restart does not add another
//!   copy (mode leaked one per restart).
//! * A crash escalates to the nearest supervising ancestor only; mode crashed the whole tree,
//!   siblings included, when no supervisor was set.
//! * Signal receivers run in connection order and disconnect when their guard is dropped.

mod beacon;
mod context;
mod cron;
mod error;
mod events;
mod guarded;
mod handle;
mod signal;
mod state;
mod supervisor;
mod task;
mod thread;
mod timer;
mod traits;

#[cfg(test)]
pub(crate) mod tests;

pub(crate) use beacon::dot_escape;
pub use beacon::{state_color, BeaconNode, NodeKind};
pub use context::{Context, TimerSpec};
pub use cron::format_utc_ms;
pub use cron::{CronError, CronSchedule};
pub use error::{BoxError, CrashReason, Result, ServiceError};
pub use events::{LifecycleEvent, LifecycleEventKind, EVENTS_CAPACITY, TREE_EVENTS_CAPACITY};
pub(crate) use guarded::{polling_threads, watch_polls, WatchGuard};
pub(crate) use handle::lock;
pub use handle::{ServiceBuilder, ServiceHandle, StopOnDrop, DEFAULT_GRACE_PERIOD};
pub use signal::{BoundSignal, Connection, Signal};
pub use state::ServiceState;
pub use supervisor::{Backoff, RestartIntensity, Strategy, Supervisor};
pub use task::{TaskKind, TaskState};
pub use traits::Service;
