//! Service states and the small synchronisation primitives the lifecycle is built on.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Where a service is in its lifecycle.
///
/// ```text
/// init ─start─▶ starting ─▶ running ─stop─▶ stopping ─▶ shutdown
///                  │            │                 
///                  └──crash─────┴──▶ crashed ─restart─▶ starting
/// ```
///
/// Unlike Python mode, a service whose `on_start` fails is `crashed` (not `running`), and a
/// stopped service ends in `shutdown` (not `stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Created, never started (or reset for a restart).
    Init,
    /// Running its start hooks and starting its dependencies.
    Starting,
    /// Started and healthy.
    Running,
    /// Running its stop hooks, waiting for its tasks and stopping its dependencies.
    Stopping,
    /// Stopped cleanly.
    Shutdown,
    /// Failed: a hook or task returned an error or panicked, or a dependency crashed.
    Crashed,
}

impl ServiceState {
    pub(crate) fn from_u8(v: u8) -> ServiceState {
        match v {
            0 => ServiceState::Init,
            1 => ServiceState::Starting,
            2 => ServiceState::Running,
            3 => ServiceState::Stopping,
            4 => ServiceState::Shutdown,
            _ => ServiceState::Crashed,
        }
    }

    pub(crate) fn as_u8(self) -> u8 {
        self as u8
    }

    /// `shutdown` or `crashed`: nothing runs until the service is restarted.
    pub fn is_terminal(self) -> bool {
        matches!(self, ServiceState::Shutdown | ServiceState::Crashed)
    }

    /// The lowercase name used in logs, JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Init => "init",
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Stopping => "stopping",
            ServiceState::Shutdown => "shutdown",
            ServiceState::Crashed => "crashed",
        }
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A level-triggered flag that async code can wait on; setting it wakes every waiter.
#[derive(Default)]
pub(crate) struct Flag {
    set: AtomicBool,
    notify: Notify,
}

impl Flag {
    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    pub(crate) fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub(crate) fn reset(&self) {
        self.set.store(false, Ordering::Release);
    }

    /// Wait until the flag is set (returns at once if it already is).
    pub(crate) async fn wait(&self) {
        wait_until(&self.notify, || self.is_set()).await
    }
}

/// Wait on `notify` until `ready()` holds, without missing a wake-up between the check and the
/// wait (the waiter is registered before the condition is checked).
pub(crate) async fn wait_until(notify: &Notify, mut ready: impl FnMut() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if ready() {
            return;
        }
        notified.await;
    }
}
