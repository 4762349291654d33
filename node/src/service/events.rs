//! Lifecycle events: a typed, timestamped stream of what happens to a service, or to a whole
//! subtree of services. Nothing is built or sent while nobody subscribes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{CrashReason, ServiceHandle};

/// Events a [`ServiceHandle::subscribe`] receiver buffers before it lags.
pub const EVENTS_CAPACITY: usize = 256;
/// Events a [`ServiceHandle::subscribe_tree`] receiver buffers before it lags.
pub const TREE_EVENTS_CAPACITY: usize = 4096;

/// Set once anything subscribed anywhere: until then emitting is one relaxed load.
static ANY_SUBSCRIBER: AtomicBool = AtomicBool::new(false);
/// Set once a subtree was subscribed: until then events do not walk up the tree.
static ANY_TREE_SUBSCRIBER: AtomicBool = AtomicBool::new(false);

/// Something that happened to a service.
#[derive(Debug, Clone)]
pub struct LifecycleEvent {
    /// The service it happened to.
    pub service: ServiceHandle,
    /// Its labels from the root of its tree, e.g. `Worker/App/Db`.
    pub path: String,
    /// What happened.
    pub kind: LifecycleEventKind,
    /// When, on tokio's clock (paused and advanced in tests).
    pub at: Instant,
    /// When, on the wall clock.
    pub time: SystemTime,
}

/// What happened to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LifecycleEventKind {
    /// A start began (`starting`).
    Starting,
    /// The start finished: hooks ran and dependencies run (`running`).
    Started,
    /// A stop began (`stopping`).
    Stopping,
    /// The stop finished; the service is `shutdown`, or `crashed` if it had crashed.
    Stopped,
    /// A hook or task failed or panicked, a dependency crashed, or the start failed.
    Crashed {
        /// Why, naming the hook, task or dependency.
        reason: CrashReason,
    },
    /// Its supervisor is restarting it after a crash.
    Restarting {
        /// Consecutive restarts of this service, this one included (1 after a healthy run).
        attempt: u32,
        /// How long the supervisor waits before the restart.
        backoff: Duration,
    },
    /// A supervisor's restart intensity was exceeded: it gives up and crashes, escalating to
    /// its parent (the `Crashed` event follows).
    Escalated {
        /// Which child crashed how often, and its last reason.
        reason: CrashReason,
    },
    /// A stop had to cut something off: a stop hook that timed out or panicked, or tasks
    /// still running at the end of the grace period (aborted).
    ForcedStop {
        /// What was cut off.
        reason: String,
    },
}

/// The senders of one service, created by its first subscriber.
pub(crate) struct EventSenders {
    own: broadcast::Sender<LifecycleEvent>,
    tree: broadcast::Sender<LifecycleEvent>,
}

impl ServiceHandle {
    /// Receive this service's lifecycle events from now on.
    ///
    /// A receiver that falls more than [`EVENTS_CAPACITY`] events behind gets
    /// `RecvError::Lagged` once and then the newest events.
    ///
    /// ```
    /// use mode::service::{LifecycleEventKind, Service, ServiceHandle};
    ///
    /// struct Db;
    /// impl Service for Db {}
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let db = ServiceHandle::new(Db);
    /// let mut events = db.subscribe();
    /// db.start().await.unwrap();
    /// assert_eq!(events.recv().await.unwrap().kind, LifecycleEventKind::Starting);
    /// assert_eq!(events.recv().await.unwrap().kind, LifecycleEventKind::Started);
    /// db.crash("disk full");
    /// let crashed = events.recv().await.unwrap();
    /// assert_eq!(crashed.path, "Db");
    /// assert!(matches!(crashed.kind, LifecycleEventKind::Crashed { .. }));
    /// # }
    /// ```
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        let rx = self.senders().own.subscribe();
        ANY_SUBSCRIBER.store(true, Ordering::Release);
        rx
    }

    /// Receive the lifecycle events of this service and of every service below it
    /// (dependencies, runtime dependencies, services on their own thread), including ones
    /// added later.
    ///
    /// A receiver that falls more than [`TREE_EVENTS_CAPACITY`] events behind gets
    /// `RecvError::Lagged` once and then the newest events.
    ///
    /// ```
    /// use std::time::Duration;
    /// use mode::service::{
    ///     Backoff, LifecycleEventKind, Service, ServiceHandle, Strategy, Supervisor,
    /// };
    ///
    /// struct Db;
    /// impl Service for Db {}
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let db = ServiceHandle::new(Db);
    /// let app = Supervisor::new(Strategy::OneForOne)
    ///     .label("App")
    ///     .backoff(Backoff::none())
    ///     .child(db.clone())
    ///     .build();
    /// let mut events = app.subscribe_tree();
    /// app.start().await.unwrap();
    /// db.crash("disk full");
    /// loop {
    ///     let e = events.recv().await.unwrap();
    ///     if let LifecycleEventKind::Restarting { attempt, backoff } = e.kind {
    ///         assert_eq!(e.path, "App/Db");
    ///         assert_eq!((attempt, backoff), (1, Duration::ZERO));
    ///         break;
    ///     }
    /// }
    /// # }
    /// ```
    pub fn subscribe_tree(&self) -> broadcast::Receiver<LifecycleEvent> {
        let rx = self.senders().tree.subscribe();
        ANY_TREE_SUBSCRIBER.store(true, Ordering::Release);
        ANY_SUBSCRIBER.store(true, Ordering::Release);
        rx
    }

    fn senders(&self) -> &EventSenders {
        self.cell.events.get_or_init(|| {
            Box::new(EventSenders {
                own: broadcast::channel(EVENTS_CAPACITY).0,
                tree: broadcast::channel(TREE_EVENTS_CAPACITY).0,
            })
        })
    }

    /// Send the event `kind()` to this service's subscribers and to the subtree subscribers of
    /// it and its ancestors; while nothing subscribed, one relaxed load and nothing built.
    #[inline]
    pub(crate) fn emit(&self, kind: impl FnOnce() -> LifecycleEventKind) {
        if ANY_SUBSCRIBER.load(Ordering::Relaxed) {
            self.send_event(kind());
        }
    }

    fn send_event(&self, kind: LifecycleEventKind) {
        let mut event: Option<LifecycleEvent> = None;
        let mut make = |kind: &LifecycleEventKind| {
            event
                .get_or_insert_with(|| LifecycleEvent {
                    service: self.clone(),
                    path: self.path(),
                    kind: kind.clone(),
                    at: Instant::now(),
                    time: SystemTime::now(),
                })
                .clone()
        };
        if let Some(s) = self.cell.events.get() {
            if s.own.receiver_count() > 0 {
                let _ = s.own.send(make(&kind));
            }
        }
        if !ANY_TREE_SUBSCRIBER.load(Ordering::Relaxed) {
            return;
        }
        let mut cur = Some(self.clone());
        while let Some(h) = cur {
            if let Some(s) = h.cell.events.get() {
                if s.tree.receiver_count() > 0 {
                    let _ = s.tree.send(make(&kind));
                }
            }
            cur = h.parent();
        }
    }

    /// The labels from the root of this service's tree down to it, joined by `/`.
    pub fn path(&self) -> String {
        let mut labels = vec![self.label().to_string()];
        let mut cur = self.parent();
        while let Some(p) = cur {
            labels.push(p.label().to_string());
            cur = p.parent();
        }
        labels.reverse();
        labels.join("/")
    }
}
