//! `ServiceHandle`: the cheap, cloneable handle to a running (or not yet running) service, and
//! the lifecycle state machine behind it (start, stop, restart, crash and their ordering).

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::beacon::NodeKind;
use super::events::{EventSenders, LifecycleEventKind};
use super::guarded::{panic_message, Guarded};
use super::state::{wait_until, Flag};
use super::task::TaskEntry;
use super::traits::{BoxFuture, DynService, Hook};
use super::{Context, CrashReason, Service, ServiceError, ServiceState};

/// How long a service may take to stop before its tasks are aborted, unless configured with
/// [`ServiceBuilder::grace_period`]. Python mode waits up to 60 s; a shorter default keeps
/// `kubectl delete` and Ctrl-C snappy while leaving room for a clean shutdown.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

tokio::task_local! {
    /// The service whose hook or task is running on this tokio task, so that a service asking
    /// to stop itself (or an ancestor) does not wait for its own task to finish.
    static CURRENT: ServiceHandle;
}

/// A handle to a service: start, stop, restart, crash, observe. Cloning is one atomic
/// increment; all clones control the same service.
///
/// Dropping handles never stops a service: a running service whose handles are all gone
/// runs on, detached, like a spawned tokio task (its own tasks and timers keep it alive; a
/// service without any is simply never stopped, and its `on_stop` never runs). To stop it
/// when a handle goes away, hold a [`StopOnDrop`] guard instead ([`ServiceHandle::stop_on_drop`]).
#[derive(Clone)]
pub struct ServiceHandle {
    pub(crate) cell: Arc<Cell>,
}

pub(crate) struct Cell {
    id: u64,
    label: Box<str>,
    pub(crate) kind: NodeKind,
    grace: Duration,
    quiet: bool,
    state: AtomicU8,
    generation: AtomicU64,
    restart_count: AtomicU32,
    /// The health the service reports of its current run ([`Context::set_healthy`]):
    /// 0 none, 1 healthy, 2 unhealthy.
    health: AtomicU8,
    forced: AtomicBool,
    /// The next stop is an abort: no grace period (see [`ServiceHandle::abort`]).
    aborting: AtomicBool,
    /// Set once the service started and not yet cleaned up by a stop.
    active: AtomicBool,
    /// What its start or stop is doing now (an [`Activity`]), for a stuck shutdown's report.
    activity: AtomicU8,
    pub(crate) events: OnceLock<Box<EventSenders>>,
    pub(crate) stop: Flag,
    state_changed: Notify,
    info: Mutex<Info>,
    family: Mutex<Family>,
    pub(crate) tasks: Mutex<Vec<TaskEntry>>,
    pub(crate) live_tasks: AtomicUsize,
    pub(crate) tasks_done: Notify,
    service: tokio::sync::Mutex<Box<dyn DynService>>,
}

#[derive(Default)]
struct Info {
    crash_reason: Option<CrashReason>,
    last_crash: Option<CrashReason>,
    started_at: Option<Instant>,
    /// When its supervisor restarts it (ms since the epoch), and its restart count then.
    next_restart: Option<(u32, u64)>,
}

#[derive(Default)]
struct Family {
    parent: Option<Weak<Cell>>,
    /// Position among the parent's declared dependencies (used by supervisors).
    index: usize,
    declared_initialized: bool,
    first_start_done: bool,
    declared: Vec<ServiceHandle>,
    /// Added while running; they belong to the run that added them and go away on stop.
    runtime: Vec<ServiceHandle>,
    /// Shown in the beacon, but started and stopped by someone else (a dedicated thread).
    mirrored: Vec<ServiceHandle>,
    /// Set while the service supervises its children: crashes are sent here instead of
    /// crashing this service too.
    inbox: Option<mpsc::UnboundedSender<ServiceHandle>>,
}

/// Options for a service handle: label, grace period, log level of lifecycle lines.
pub struct ServiceBuilder<S> {
    service: S,
    label: Option<String>,
    grace: Duration,
    quiet: bool,
    kind: NodeKind,
}

impl<S: Service> ServiceBuilder<S> {
    /// Name it in logs and the beacon (default: [`Service::label`]).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// How long `on_stop`, the service's tasks and `on_shutdown` may each take when stopping
    /// before they are cut off (default [`DEFAULT_GRACE_PERIOD`]).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Log "Starting..."/"Stopping..." at debug instead of info (mode's `mundane_level`).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    pub(crate) fn kind(mut self, kind: NodeKind) -> Self {
        self.kind = kind;
        self
    }

    /// Create the handle. Nothing runs until [`ServiceHandle::start`].
    pub fn build(self) -> ServiceHandle {
        let label = self.label.unwrap_or_else(|| self.service.label());
        ServiceHandle {
            cell: Arc::new(Cell {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                label: label.into_boxed_str(),
                kind: self.kind,
                grace: self.grace,
                quiet: self.quiet,
                state: AtomicU8::new(ServiceState::Init.as_u8()),
                generation: AtomicU64::new(0),
                restart_count: AtomicU32::new(0),
                health: AtomicU8::new(0),
                forced: AtomicBool::new(false),
                aborting: AtomicBool::new(false),
                active: AtomicBool::new(false),
                activity: AtomicU8::new(Activity::Idle.as_u8()),
                events: OnceLock::new(),
                stop: Flag::default(),
                state_changed: Notify::new(),
                info: Mutex::default(),
                family: Mutex::default(),
                tasks: Mutex::default(),
                live_tasks: AtomicUsize::new(0),
                tasks_done: Notify::new(),
                service: tokio::sync::Mutex::new(Box::new(self.service)),
            }),
        }
    }
}

/// Poison-tolerant lock: a panic elsewhere must not make the lifecycle unusable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ServiceHandle {
    /// A handle for `service` with default options.
    pub fn new<S: Service>(service: S) -> ServiceHandle {
        ServiceHandle::builder(service).build()
    }

    /// A handle for `service` with options (label, grace period, quiet logging).
    pub fn builder<S: Service>(service: S) -> ServiceBuilder<S> {
        ServiceBuilder {
            service,
            label: None,
            grace: DEFAULT_GRACE_PERIOD,
            quiet: false,
            kind: NodeKind::Service,
        }
    }

    // ---- observation -------------------------------------------------------------------

    /// A process-unique id.
    pub fn id(&self) -> u64 {
        self.cell.id
    }

    /// The label shown in logs and the beacon.
    pub fn label(&self) -> &str {
        &self.cell.label
    }

    /// The current lifecycle state.
    pub fn state(&self) -> ServiceState {
        ServiceState::from_u8(self.cell.state.load(Ordering::Acquire))
    }

    /// How many times the service was restarted (by `restart` or a supervisor).
    pub fn restart_count(&self) -> u32 {
        self.cell.restart_count.load(Ordering::Relaxed)
    }

    /// Why the service is crashed, while it is.
    pub fn crash_reason(&self) -> Option<CrashReason> {
        lock(&self.cell.info).crash_reason.clone()
    }

    /// While it is crashed and its supervisor waits out a backoff: when it restarts it (ms
    /// since the epoch).
    pub fn next_restart_ms(&self) -> Option<u64> {
        if self.state() != ServiceState::Crashed {
            return None;
        }
        let count = self.restart_count();
        lock(&self.cell.info)
            .next_restart
            .filter(|(c, _)| *c == count)
            .map(|(_, at)| at)
    }

    /// Its supervisor restarts this crash at `at_ms` (ms since the epoch).
    pub(crate) fn set_next_restart_ms(&self, at_ms: u64) {
        let count = self.restart_count();
        lock(&self.cell.info).next_restart = Some((count, at_ms));
    }

    /// The reason of the most recent crash, kept across restarts.
    pub fn last_crash_reason(&self) -> Option<CrashReason> {
        lock(&self.cell.info).last_crash.clone()
    }

    /// The health the service reported for its current run with [`Context::set_healthy`]:
    /// `None` before it said anything, and whenever it is not running.
    ///
    /// ```
    /// use mode::service::{Context, Result, Service, ServiceHandle};
    ///
    /// struct Web;
    /// impl Service for Web {
    ///     async fn on_started(&mut self, ctx: &Context) -> Result<()> {
    ///         ctx.set_healthy(true); // e.g. once its listener is bound
    ///         Ok(())
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let web = ServiceHandle::new(Web);
    /// assert_eq!(web.health(), None);
    /// web.start().await.unwrap();
    /// assert_eq!(web.health(), Some(true));
    /// web.stop().await;
    /// assert_eq!(web.health(), None);
    /// # }
    /// ```
    pub fn health(&self) -> Option<bool> {
        if self.state() != ServiceState::Running {
            return None;
        }
        match self.cell.health.load(Ordering::Acquire) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    pub(crate) fn set_health(&self, generation: u64, healthy: bool) {
        if self.generation() == generation {
            self.cell
                .health
                .store(if healthy { 1 } else { 2 }, Ordering::Release);
        }
    }

    /// Time since the current run started, if it is running or starting.
    pub fn uptime(&self) -> Option<Duration> {
        if !matches!(self.state(), ServiceState::Starting | ServiceState::Running) {
            return None;
        }
        lock(&self.cell.info).started_at.map(|t| t.elapsed())
    }

    /// Whether the last stop had to abort tasks, cut a stop hook off at the grace period, or
    /// go on past a stop hook that panicked.
    pub fn was_forced(&self) -> bool {
        self.cell.forced.load(Ordering::Relaxed)
    }

    /// The grace period this service was built with.
    pub fn grace_period(&self) -> Duration {
        self.cell.grace
    }

    /// True once a stop was requested or the service crashed (mode's `should_stop`).
    pub fn should_stop(&self) -> bool {
        self.cell.stop.is_set()
    }

    /// The dependencies: declared ones in order, then runtime ones.
    pub fn dependencies(&self) -> Vec<ServiceHandle> {
        let f = lock(&self.cell.family);
        f.declared.iter().chain(f.runtime.iter()).cloned().collect()
    }

    /// The parent that depends on this service, if any.
    pub fn parent(&self) -> Option<ServiceHandle> {
        let f = lock(&self.cell.family);
        f.parent
            .as_ref()
            .and_then(Weak::upgrade)
            .map(|cell| ServiceHandle { cell })
    }

    /// `^--Label`, mode's log prefix: one dash per ancestor.
    pub fn log_prefix(&self) -> String {
        let mut depth = 0;
        let mut cur = self.parent();
        while let Some(p) = cur {
            depth += 1;
            cur = p.parent();
        }
        format!("^{}{}", "-".repeat(depth), self.label())
    }

    /// Wait until the service is `shutdown` or `crashed`.
    pub async fn wait_until_stopped(&self) {
        self.wait_for(ServiceState::is_terminal).await
    }

    /// Wait until the state satisfies `ready` (checked at every state change).
    pub async fn wait_for(&self, mut ready: impl FnMut(ServiceState) -> bool) {
        wait_until(&self.cell.state_changed, || ready(self.state())).await
    }

    /// Wait until the service reaches `state`.
    pub async fn wait_for_state(&self, state: ServiceState) {
        self.wait_for(|s| s == state).await
    }

    // ---- dependencies ------------------------------------------------------------------

    /// Declare `child` as a dependency: it starts (in declaration order) before this service
    /// reaches `on_started`, and stops after it. On a service that is already running, the
    /// child starts with the next start; use [`Context::add_runtime_dependency`] to start it now.
    pub fn add_dependency(&self, child: ServiceHandle) -> ServiceHandle {
        // Never hold a parent's lock while taking a child's (escalation goes child → parent).
        let index = {
            let mut f = lock(&self.cell.family);
            f.declared.push(child.clone());
            f.declared.len() - 1
        };
        child.attach(&self.cell, index);
        child
    }

    /// Stop `child` and forget it.
    pub async fn remove_dependency(&self, child: &ServiceHandle) {
        child.stop().await;
        let mut f = lock(&self.cell.family);
        f.declared.retain(|c| !c.same(child));
        f.runtime.retain(|c| !c.same(child));
        drop(f);
        lock(&child.cell.family).parent = None;
    }

    pub(crate) fn add_runtime(&self, child: &ServiceHandle) {
        lock(&self.cell.family).runtime.push(child.clone());
        child.attach(&self.cell, usize::MAX);
    }

    pub(crate) fn add_mirrored(&self, child: &ServiceHandle) {
        lock(&self.cell.family).mirrored = vec![child.clone()];
    }

    pub(crate) fn mirrored(&self) -> Vec<ServiceHandle> {
        lock(&self.cell.family).mirrored.clone()
    }

    pub(crate) fn attach_to(&self, parent: &ServiceHandle) {
        self.attach(&parent.cell, usize::MAX);
    }

    pub(crate) fn reset_for_thread(&self) {
        self.reset();
    }

    fn attach(&self, parent: &Arc<Cell>, index: usize) {
        let mut f = lock(&self.cell.family);
        f.parent = Some(Arc::downgrade(parent));
        f.index = index;
    }

    pub(crate) fn index_in_parent(&self) -> usize {
        lock(&self.cell.family).index
    }

    pub(crate) fn set_inbox(&self, inbox: Option<mpsc::UnboundedSender<ServiceHandle>>) {
        lock(&self.cell.family).inbox = inbox;
    }

    /// Whether both handles control the same service.
    pub fn same(&self, other: &ServiceHandle) -> bool {
        Arc::ptr_eq(&self.cell, &other.cell)
    }

    // ---- lifecycle ---------------------------------------------------------------------

    /// Start the service: hooks, tasks and dependencies, as described on [`Service`].
    ///
    /// * [`ServiceError::StartFailed`] if a hook returns an error or panics, a task crashes
    ///   during the start, or a dependency fails to start (the reason names it); the service
    ///   is then `crashed` and whatever it had started is stopped again.
    /// * [`ServiceError::StartCancelled`] if a stop cut the start short; that stop takes the
    ///   service to `shutdown`.
    /// * [`ServiceError::NotStartable`] if it is not in the `init` state.
    pub fn start(&self) -> BoxFuture<'_, Result<(), ServiceError>> {
        let span = lifecycle_span("service.start", self.label());
        // Unlike stop, a start does not wait for tasks: it stays on the caller's thread (run
        // as a task of its own, starting 10,000 services with a timer each took 50 % longer).
        Box::pin(self.start_now().instrument(span))
    }

    async fn start_now(&self) -> Result<(), ServiceError> {
        let mut svc = self.cell.service.lock().await;
        let state = self.state();
        if state != ServiceState::Init {
            return Err(ServiceError::NotStartable {
                service: self.label().to_string(),
                state,
            });
        }
        let result = self.start_locked(&mut svc).await;
        if let Err(e) = &result {
            tracing::Span::current().record("reason", tracing::field::display(e));
        }
        result
    }

    /// Start if never started; `Ok(false)` if it was already started.
    pub async fn maybe_start(&self) -> Result<bool, ServiceError> {
        match self.start().await {
            Ok(()) => Ok(true),
            Err(ServiceError::NotStartable { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Stop the service and everything it started; idempotent, never hangs longer than the
    /// grace periods involved.
    ///
    /// Called from one of the service's own tasks or hooks (or a descendant's), it cannot wait
    /// for itself: it then starts the stop and returns at once. Called from outside the
    /// runtime's tasks (a `block_on`), the stop runs as a task of the runtime and goes on to
    /// its end even if the caller stops waiting.
    pub fn stop(&self) -> BoxFuture<'_, ()> {
        self.cell.stop.set();
        if self.called_from_within() {
            let me = self.clone();
            tokio::spawn(async move { me.stop_now().await });
            return Box::pin(async {});
        }
        let span = lifecycle_span("service.stop", self.label());
        if let Some(runtime) = outside_any_task() {
            let me = self.clone();
            return Box::pin(run_as_task(
                runtime,
                async move { me.stop_now().await }.instrument(span),
                || (),
            ));
        }
        Box::pin(self.stop_now().instrument(span))
    }

    /// Stop at once, without a grace period: stop hooks are cut off and tasks aborted right
    /// away, in this service and every service below it (the stop is reported as forced).
    /// For what must not run a moment longer, e.g. a singleton whose node lost its lease.
    ///
    /// ```
    /// # use mode::service::{Context, Result, Service, ServiceHandle, ServiceState};
    /// # use std::time::Duration;
    /// struct Stubborn;
    /// impl Service for Stubborn {
    ///     async fn on_start(&mut self, ctx: &Context) -> Result<()> {
    ///         ctx.spawn("ignores-stop", async {
    ///             loop {
    ///                 tokio::time::sleep(Duration::from_secs(3600)).await;
    ///             }
    ///         });
    ///         Ok(())
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let s = ServiceHandle::new(Stubborn);
    /// s.start().await.unwrap();
    /// let t0 = tokio::time::Instant::now();
    /// s.abort().await; // not the 10 s grace period
    /// assert!(t0.elapsed() < Duration::from_secs(1));
    /// assert_eq!(s.state(), ServiceState::Shutdown);
    /// assert!(s.was_forced());
    /// # }
    /// ```
    pub fn abort(&self) -> BoxFuture<'_, ()> {
        fn mark(h: &ServiceHandle) {
            h.cell.aborting.store(true, Ordering::Release);
            for child in h.dependencies() {
                mark(&child);
            }
        }
        mark(self);
        self.stop()
    }

    async fn stop_now(&self) {
        let mut svc = self.cell.service.lock().await;
        self.stop_locked(&mut svc).await;
    }

    /// Stop, reset (restart count + 1, crash cleared), `on_restart`, start again; fails like
    /// [`ServiceHandle::start`]. From within the service's own tasks it runs in the background
    /// and returns at once.
    pub fn restart(&self) -> BoxFuture<'_, Result<(), ServiceError>> {
        if self.called_from_within() {
            self.cell.stop.set();
            let me = self.clone();
            tokio::spawn(async move {
                let _ = me.restart_now().await;
            });
            return Box::pin(async { Ok(()) });
        }
        let span = lifecycle_span("service.restart", self.label());
        if let Some(runtime) = outside_any_task() {
            let (me, if_dropped) = (self.clone(), self.clone());
            return Box::pin(run_as_task(
                runtime,
                async move { me.restart_now().await }.instrument(span),
                move || Err(if_dropped.start_cancelled()),
            ));
        }
        Box::pin(self.restart_now().instrument(span))
    }

    async fn restart_now(&self) -> Result<(), ServiceError> {
        self.cell.stop.set();
        let mut svc = self.cell.service.lock().await;
        self.stop_locked(&mut svc).await;
        self.reset();
        // The stop above set the flag; on_restart belongs to the coming run.
        self.cell.stop.reset();
        let ctx = self.context();
        if let Err(e) = self.run_hook(&mut svc, Hook::Restart, &ctx, None).await {
            let reason = CrashReason::new(e.reason(Hook::Restart));
            return Err(self.fail_start(&mut svc, reason).await);
        }
        self.start_locked(&mut svc).await
    }

    /// Hand the handle to a guard that stops the service when it is dropped.
    ///
    /// Dropping a plain handle leaves the service running (see [`ServiceHandle`]); the guard is
    /// for services whose life should end with a scope or an owner. The stop runs as a task of
    /// the current tokio runtime; its tasks see `should_stop()` at once.
    ///
    /// ```
    /// use mode::service::{Service, ServiceHandle, ServiceState};
    ///
    /// struct Session;
    /// impl Service for Session {}
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let session = ServiceHandle::new(Session);
    /// let observer = session.clone();
    /// let guard = session.stop_on_drop();
    /// guard.start().await.unwrap();
    /// drop(guard);
    /// observer.wait_until_stopped().await;
    /// assert_eq!(observer.state(), ServiceState::Shutdown);
    /// # }
    /// ```
    pub fn stop_on_drop(self) -> StopOnDrop {
        StopOnDrop(Some(self))
    }

    /// Mark the service crashed with `reason`: its tasks see `should_stop`, its sleeps wake, and
    /// the crash goes to its supervisor, or to its parent (which then crashes too) when the
    /// parent does not supervise. Returns false if the service was not starting or running.
    pub fn crash(&self, reason: impl Into<CrashReason>) -> bool {
        let reason = reason.into();
        let mut current = self.cell.state.load(Ordering::Acquire);
        loop {
            let state = ServiceState::from_u8(current);
            if !matches!(state, ServiceState::Starting | ServiceState::Running) {
                tracing::debug!(
                    "[{}]: ignoring crash while {state}: {reason}",
                    self.log_prefix()
                );
                return false;
            }
            match self.cell.state.compare_exchange(
                current,
                ServiceState::Crashed.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    {
                        let mut info = lock(&self.cell.info);
                        info.crash_reason = Some(reason.clone());
                        info.last_crash = Some(reason.clone());
                    }
                    self.cell.stop.set();
                    self.cell.state_changed.notify_waiters();
                    let _crash = tracing::info_span!(
                        target: crate::telemetry::TARGET,
                        "service.crash",
                        otel.name = "service.crash",
                        service = %self.label(),
                        reason = %reason,
                        restarts = self.restart_count(),
                    )
                    .entered();
                    tracing::error!(
                        "[{}]: Crashed (restarts so far: {}): {reason}",
                        self.log_prefix(),
                        self.restart_count()
                    );
                    self.emit(|| LifecycleEventKind::Crashed {
                        reason: reason.clone(),
                    });
                    // A crash during start is reported by `start`'s result, not escalated.
                    if state == ServiceState::Running {
                        self.escalate(&reason);
                    }
                    return true;
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn escalate(&self, reason: &CrashReason) {
        let parent = lock(&self.cell.family)
            .parent
            .as_ref()
            .and_then(Weak::upgrade);
        let inbox = parent.as_ref().and_then(|p| lock(&p.family).inbox.clone());
        let Some(parent) = parent else { return };
        let parent = ServiceHandle { cell: parent };
        if let Some(inbox) = inbox {
            if inbox.send(self.clone()).is_ok() {
                return;
            }
        }
        parent.crash(format!("dependency '{}' crashed: {reason}", self.label()));
    }

    // ---- internals ---------------------------------------------------------------------

    pub(crate) fn generation(&self) -> u64 {
        self.cell.generation.load(Ordering::Acquire)
    }

    fn context(&self) -> Context {
        Context::new(self.clone(), self.generation())
    }

    fn set_state(&self, state: ServiceState) {
        self.cell.state.store(state.as_u8(), Ordering::Release);
        self.cell.state_changed.notify_waiters();
    }

    fn set_activity(&self, activity: Activity) {
        self.cell
            .activity
            .store(activity.as_u8(), Ordering::Relaxed);
    }

    /// What the service's start or stop is doing now.
    pub(crate) fn activity(&self) -> Activity {
        Activity::from_u8(self.cell.activity.load(Ordering::Relaxed))
    }

    /// What a `starting` or `stopping` service waits for, e.g. `in on_stop` or
    /// `waiting for its tasks 'poll', 'flush'`; `None` when it is not busy starting or
    /// stopping.
    pub(crate) fn waiting_for(&self) -> Option<String> {
        if !matches!(
            self.state(),
            ServiceState::Starting | ServiceState::Stopping
        ) {
            return None;
        }
        Some(match self.activity() {
            Activity::Idle => return None,
            Activity::Hook(hook) => format!("in {}", hook.name()),
            Activity::StartingDependencies => "starting its dependencies".to_string(),
            Activity::StoppingDependencies => "stopping its dependencies".to_string(),
            Activity::JoiningTasks => {
                let tasks: Vec<String> = lock(&self.cell.tasks)
                    .iter()
                    .filter(|t| t.is_running())
                    .map(|t| format!("'{}'", t.name()))
                    .collect();
                format!("waiting for its tasks {}", tasks.join(", "))
            }
        })
    }

    fn start_cancelled(&self) -> ServiceError {
        ServiceError::StartCancelled {
            service: self.label().to_string(),
        }
    }

    /// Whether the current tokio task is running a hook or task of this service or of one of
    /// its descendants.
    fn called_from_within(&self) -> bool {
        CURRENT
            .try_with(|current| current.is_within(self))
            .unwrap_or(false)
    }

    /// Whether this service is `ancestor` or below it.
    pub(crate) fn is_within(&self, ancestor: &ServiceHandle) -> bool {
        let mut cur = Some(self.clone());
        while let Some(c) = cur {
            if c.same(ancestor) {
                return true;
            }
            cur = c.parent();
        }
        false
    }

    /// Run `fut` as code of this service (see `called_from_within`).
    pub(crate) fn scope<F: std::future::Future>(
        &self,
        fut: F,
    ) -> impl std::future::Future<Output = F::Output> {
        CURRENT.scope(self.clone(), fut)
    }

    fn log_lifecycle(&self, what: &str) {
        if self.cell.quiet {
            tracing::debug!("[{}]: {what}", self.log_prefix());
        } else {
            tracing::info!("[{}]: {what}", self.log_prefix());
        }
    }

    /// Run a hook, catching a panic. With `deadline`, cut it off then (stop hooks); without,
    /// abandon it when a stop is requested (start hooks), reported as `Ok`.
    async fn run_hook(
        &self,
        svc: &mut Box<dyn DynService>,
        hook: Hook,
        ctx: &Context,
        deadline: Option<Duration>,
    ) -> Result<(), HookFailure> {
        self.set_activity(Activity::Hook(hook));
        let fut = self.scope(Guarded::hook(self, hook, svc.call(hook, ctx)));
        let outcome = match deadline {
            Some(limit) => match tokio::time::timeout(limit, fut).await {
                Ok(r) => HookFailure::check(r),
                Err(_) => Err(HookFailure::TimedOut(limit)),
            },
            None => {
                tokio::select! {
                    biased;
                    r = fut => HookFailure::check(r),
                    _ = self.cell.stop.wait() => Ok(()),
                }
            }
        };
        self.set_activity(Activity::Idle);
        outcome
    }

    async fn start_locked(&self, svc: &mut Box<dyn DynService>) -> Result<(), ServiceError> {
        let cell = &self.cell;
        cell.generation.fetch_add(1, Ordering::AcqRel);
        // A new run says nothing about its health until it does.
        cell.health.store(0, Ordering::Release);
        cell.stop.reset();
        cell.forced.store(false, Ordering::Relaxed);
        cell.active.store(true, Ordering::Release);
        {
            let mut info = lock(&cell.info);
            info.crash_reason = None;
            info.started_at = Some(Instant::now());
        }
        self.set_state(ServiceState::Starting);
        self.emit(|| LifecycleEventKind::Starting);
        self.log_lifecycle("Starting...");
        let ctx = self.context();

        let first_start = {
            let mut f = lock(&cell.family);
            let first = !f.first_start_done;
            f.first_start_done = true;
            first
        };
        if !lock(&cell.family).declared_initialized {
            let declared = match catch_unwind(AssertUnwindSafe(|| svc.dependencies())) {
                Ok(declared) => declared,
                Err(panic) => {
                    let reason = format!("dependencies panicked: {}", panic_message(panic));
                    return Err(self.fail_start(svc, CrashReason::new(reason)).await);
                }
            };
            lock(&cell.family).declared_initialized = true;
            for child in declared {
                self.add_dependency(child);
            }
        }

        let hooks: &[Hook] = if first_start {
            &[Hook::FirstStart, Hook::Start]
        } else {
            &[Hook::Start]
        };
        for &hook in hooks {
            if let Err(e) = self.run_hook(svc, hook, &ctx, None).await {
                let reason = CrashReason::new(e.reason(hook));
                return Err(self.fail_start(svc, reason).await);
            }
            if let Some(r) = self.interrupted() {
                return self.finish_interrupted(svc, r).await;
            }
        }

        self.set_activity(Activity::StartingDependencies);
        let declared = lock(&cell.family).declared.clone();
        for child in declared {
            let started = tokio::select! {
                r = child.maybe_start() => Some(r),
                _ = cell.stop.wait() => None,
            };
            match started {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let why = e
                        .reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| e.to_string());
                    let reason = CrashReason::new(format!(
                        "dependency '{}' failed to start: {why}",
                        child.label()
                    ));
                    return Err(self.fail_start(svc, reason).await);
                }
                None => break,
            }
        }
        self.set_activity(Activity::Idle);
        if let Some(r) = self.interrupted() {
            return self.finish_interrupted(svc, r).await;
        }

        if let Err(e) = self.run_hook(svc, Hook::Started, &ctx, None).await {
            let reason = CrashReason::new(e.reason(Hook::Started));
            return Err(self.fail_start(svc, reason).await);
        }
        if let Some(r) = self.interrupted() {
            return self.finish_interrupted(svc, r).await;
        }
        let promoted = cell
            .state
            .compare_exchange(
                ServiceState::Starting.as_u8(),
                ServiceState::Running.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if promoted {
            cell.state_changed.notify_waiters();
            self.emit(|| LifecycleEventKind::Started);
            Ok(())
        } else {
            let r = self.interrupted().unwrap_or(Ok(()));
            self.finish_interrupted(svc, r).await
        }
    }

    /// After a start step: `Some(Err)` if the service crashed meanwhile, `Some(Ok)` if a stop
    /// was requested, `None` to go on.
    fn interrupted(&self) -> Option<Result<(), CrashReason>> {
        if let Some(reason) = self.crash_reason() {
            return Some(Err(reason));
        }
        self.cell.stop.is_set().then_some(Ok(()))
    }

    /// End a start that a crash or a stop cut short. After a stop, the stopper (waiting for
    /// the lock this start holds) takes the service to `shutdown`.
    async fn finish_interrupted(
        &self,
        svc: &mut Box<dyn DynService>,
        r: Result<(), CrashReason>,
    ) -> Result<(), ServiceError> {
        self.set_activity(Activity::Idle);
        match r {
            Ok(()) => {
                tracing::debug!("[{}]: start cut short by a stop", self.log_prefix());
                Err(self.start_cancelled())
            }
            Err(reason) => Err(self.fail_start(svc, reason).await),
        }
    }

    /// Mark a failed start as a crash (without escalating: the caller of `start` gets the
    /// error) and stop whatever the start had already started.
    ///
    /// Boxed: the start awaits it in several places, and debug builds give each await its own
    /// stack space, which deep trees multiply.
    fn fail_start<'a>(
        &'a self,
        svc: &'a mut Box<dyn DynService>,
        reason: CrashReason,
    ) -> BoxFuture<'a, ServiceError> {
        Box::pin(async move {
            self.set_activity(Activity::Idle);
            let (reason, already_crashed) = {
                let mut info = lock(&self.cell.info);
                let already = info.crash_reason.is_some();
                let reason = info.crash_reason.clone().unwrap_or(reason);
                info.crash_reason = Some(reason.clone());
                info.last_crash = Some(reason.clone());
                (reason, already)
            };
            self.set_state(ServiceState::Crashed);
            self.cell.stop.set();
            tracing::error!("[{}]: Failed to start: {reason}", self.log_prefix());
            if !already_crashed {
                self.emit(|| LifecycleEventKind::Crashed {
                    reason: reason.clone(),
                });
            }
            self.stop_locked(svc).await;
            ServiceError::StartFailed {
                service: self.label().to_string(),
                reason,
            }
        })
    }

    async fn stop_locked(&self, svc: &mut Box<dyn DynService>) {
        let cell = &self.cell;
        cell.stop.set();
        if !cell.active.load(Ordering::Acquire) {
            if self.state() == ServiceState::Init {
                self.set_state(ServiceState::Shutdown);
                self.emit(|| LifecycleEventKind::Stopped);
            }
            return;
        }
        self.set_state(ServiceState::Stopping);
        self.emit(|| LifecycleEventKind::Stopping);
        self.log_lifecycle("Stopping...");
        let grace = if cell.aborting.swap(false, Ordering::AcqRel) {
            cell.forced.store(true, Ordering::Relaxed);
            Duration::ZERO
        } else {
            cell.grace
        };
        let deadline = Instant::now() + grace;
        let ctx = self.context();

        if let Err(e) = self.run_hook(svc, Hook::Stop, &ctx, Some(grace)).await {
            self.note_stop_problem(Hook::Stop, e);
        }
        self.set_activity(Activity::JoiningTasks);
        self.join_tasks(deadline).await;

        self.set_activity(Activity::StoppingDependencies);
        let (runtime, declared) = {
            let mut f = lock(&cell.family);
            (std::mem::take(&mut f.runtime), f.declared.clone())
        };
        for child in runtime.iter().rev().chain(declared.iter().rev()) {
            child.stop().await;
        }
        for child in &runtime {
            lock(&child.cell.family).parent = None;
        }

        if let Err(e) = self.run_hook(svc, Hook::Shutdown, &ctx, Some(grace)).await {
            self.note_stop_problem(Hook::Shutdown, e);
        }
        cell.active.store(false, Ordering::Release);
        let final_state = if self.crash_reason().is_some() {
            ServiceState::Crashed
        } else {
            ServiceState::Shutdown
        };
        self.set_state(final_state);
        self.emit(|| LifecycleEventKind::Stopped);
        if self.was_forced() {
            self.log_lifecycle(&format!(
                "-Stopped! (forced after the {grace:?} grace period)"
            ));
        } else {
            self.log_lifecycle("-Stopped!");
        }
    }

    /// A stop hook failed: an error is logged and the stop goes on; a hook cut off or a panic
    /// makes the stop forced.
    fn note_stop_problem(&self, hook: Hook, failure: HookFailure) {
        let what = failure.reason(hook);
        match failure {
            HookFailure::Error(_) => tracing::warn!("[{}]: {what}", self.log_prefix()),
            HookFailure::Panicked(_) | HookFailure::TimedOut(_) => {
                self.cell.forced.store(true, Ordering::Relaxed);
                tracing::error!("[{}]: {what}; the stop goes on", self.log_prefix());
                self.emit(|| LifecycleEventKind::ForcedStop { reason: what });
            }
        }
    }

    /// Wait for the service's tasks until `deadline`, then abort the rest and wait for the
    /// aborts to land, so nothing the service spawned outlives its stop.
    async fn join_tasks(&self, deadline: Instant) {
        let cell = &self.cell;
        let done = || cell.live_tasks.load(Ordering::Acquire) == 0;
        let finished = tokio::time::timeout_at(deadline, wait_until(&cell.tasks_done, done))
            .await
            .is_ok();
        if !finished {
            let what = {
                let entries = lock(&cell.tasks);
                let hung: Vec<&str> = entries
                    .iter()
                    .filter(|t| t.is_running())
                    .map(|t| t.name())
                    .collect();
                let what = format!(
                    "aborted tasks still running after the {:?} grace period: {}",
                    cell.grace,
                    hung.join(", ")
                );
                for t in entries.iter() {
                    t.abort();
                }
                what
            };
            tracing::warn!("[{}]: {what}", self.log_prefix());
            cell.forced.store(true, Ordering::Relaxed);
            self.emit(|| LifecycleEventKind::ForcedStop { reason: what });
            let aborted =
                tokio::time::timeout(Duration::from_secs(1), wait_until(&cell.tasks_done, done))
                    .await;
            if aborted.is_err() {
                tracing::error!(
                    "[{}]: tasks still running after abort (blocking the thread?)",
                    self.log_prefix()
                );
            }
        }
        lock(&cell.tasks).clear();
    }

    /// Back to `init` for the next start; dependencies are reset too.
    fn reset(&self) {
        self.cell.restart_count.fetch_add(1, Ordering::Relaxed);
        lock(&self.cell.info).crash_reason = None;
        self.set_state(ServiceState::Init);
        let declared = lock(&self.cell.family).declared.clone();
        for child in declared {
            if child.state().is_terminal() {
                child.reset();
            }
        }
    }
}

/// The runtime, when called on it but outside any of its tasks (in a `block_on`).
///
/// A stop or restart called there runs as a task of the runtime instead ([`run_as_task`]):
/// otherwise every service task it waits for has to wake the `block_on` thread and be woken
/// back, two thread switches per service (a stop of 10,000 services with a timer each took
/// 270 ms instead of about 15 ms).
fn outside_any_task() -> Option<tokio::runtime::Handle> {
    if tokio::task::try_id().is_some() {
        return None;
    }
    tokio::runtime::Handle::try_current().ok()
}

async fn run_as_task<T: Send + 'static>(
    runtime: tokio::runtime::Handle,
    step: impl Future<Output = T> + Send + 'static,
    if_cancelled: impl FnOnce() -> T,
) -> T {
    // Without a coop budget: a stop of many services that need no waiting would otherwise be
    // made to yield every 128 services, and another worker woken to steal it (a thread switch
    // each time); whenever the stop waits for a task, it yields anyway.
    let step = tokio::task::unconstrained(step);
    match runtime.spawn(step).await {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down and dropped the step.
        Err(_) => if_cancelled(),
    }
}

/// A [`ServiceHandle`] that stops its service when dropped; see
/// [`ServiceHandle::stop_on_drop`]. Derefs to the handle.
pub struct StopOnDrop(Option<ServiceHandle>);

impl StopOnDrop {
    /// Give the handle back; the service is no longer stopped on drop.
    pub fn disarm(mut self) -> ServiceHandle {
        match self.0.take() {
            Some(handle) => handle,
            None => unreachable!("a StopOnDrop holds its handle until dropped or disarmed"),
        }
    }
}

impl std::ops::Deref for StopOnDrop {
    type Target = ServiceHandle;

    fn deref(&self) -> &ServiceHandle {
        match &self.0 {
            Some(handle) => handle,
            None => unreachable!("a StopOnDrop holds its handle until dropped or disarmed"),
        }
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let Some(handle) = self.0.take() else { return };
        if handle.state().is_terminal() {
            return;
        }
        // Its tasks see should_stop() now, whatever happens to the spawned stop.
        handle.cell.stop.set();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { handle.stop().await });
            }
            Err(_) => tracing::warn!(
                "[{}]: dropped outside a tokio runtime: its tasks were told to stop, but its stop \
                 hooks cannot run here (drop the guard inside the runtime)",
                handle.log_prefix()
            ),
        }
    }
}

/// What a service's start or stop is busy with (shown while `starting` or `stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    Idle,
    Hook(Hook),
    StartingDependencies,
    JoiningTasks,
    StoppingDependencies,
}

impl Activity {
    /// In `Hook`'s declaration order, so that `hook as u8` indexes it.
    const HOOKS: [Hook; 6] = [
        Hook::FirstStart,
        Hook::Start,
        Hook::Started,
        Hook::Stop,
        Hook::Shutdown,
        Hook::Restart,
    ];

    fn as_u8(self) -> u8 {
        match self {
            Activity::Idle => 0,
            Activity::Hook(h) => 1 + h as u8,
            Activity::StartingDependencies => 7,
            Activity::JoiningTasks => 8,
            Activity::StoppingDependencies => 9,
        }
    }

    fn from_u8(v: u8) -> Activity {
        match v {
            1..=6 => Activity::Hook(Self::HOOKS[v as usize - 1]),
            7 => Activity::StartingDependencies,
            8 => Activity::JoiningTasks,
            9 => Activity::StoppingDependencies,
            _ => Activity::Idle,
        }
    }
}

enum HookFailure {
    Error(String),
    Panicked(String),
    TimedOut(Duration),
}

impl HookFailure {
    fn check(outcome: Result<super::Result<()>, String>) -> Result<(), HookFailure> {
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(HookFailure::Error(e.to_string())),
            Err(panic) => Err(HookFailure::Panicked(panic)),
        }
    }

    /// `on_start failed: ...`, `on_stop panicked: ...`, naming the hook.
    fn reason(&self, hook: Hook) -> String {
        let hook = hook.name();
        match self {
            HookFailure::Error(e) => format!("{hook} failed: {e}"),
            HookFailure::Panicked(p) => format!("{hook} panicked: {p}"),
            HookFailure::TimedOut(d) => {
                format!("{hook} did not finish within the {d:?} grace period; cut off")
            }
        }
    }
}

impl fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}: {}>", self.label(), self.state())
    }
}

/// The span of one lifecycle step (a trace span; see [`crate::telemetry`]).
fn lifecycle_span(step: &'static str, service: &str) -> tracing::Span {
    tracing::info_span!(
        target: crate::telemetry::TARGET,
        "service",
        otel.name = step,
        service = %service,
        reason = tracing::field::Empty,
    )
}
