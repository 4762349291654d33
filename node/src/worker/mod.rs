//! Running a root service as a program: logging, OS signals, blocking detection, exit codes
//! (mode's `Worker`).

mod blocking;
mod logging;

#[cfg(test)]
mod tests;

use std::process::ExitCode;
use std::time::Duration;

pub use blocking::{BlockingDetector, DEFAULT_BLOCKING_THRESHOLD};
pub use logging::{colour_wanted, init_logging, LogConfig, LogFormat, LoggingError};

use crate::service::{
    BeaconNode, Context, CrashReason, NodeKind, Result, Service, ServiceError, ServiceHandle,
};

/// How long the worker waits for the whole tree to stop after SIGINT/SIGTERM before giving
/// up (a second signal exits at once).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs services as a program.
///
/// ```no_run
/// use mode::{Service, ServiceHandle, Worker};
///
/// struct App;
/// impl Service for App {}
///
/// fn main() -> std::process::ExitCode {
///     Worker::new(ServiceHandle::new(App)).log_level("info").run()
/// }
/// ```
///
/// * `Worker` is the root of the beacon, so logs read `[^Worker]`, `[^-App]`, `[^--Child]`.
/// * SIGINT or SIGTERM stops the tree gracefully within the shutdown timeout; a second
///   signal exits at once. SIGUSR1 logs the beacon tree with every task's state.
/// * A blocking detector warns when one poll of a service's hook or task has blocked its
///   thread for longer than the threshold (default 10 s, as in mode), naming the service and
///   the hook or task, and when the whole runtime has stopped polling.
/// * Exit status (see [`WorkerExit::code`]): 0 on a clean stop, 1 when a service crashed,
///   failed to start or panicked in a hook (the reason is printed), 2 when the shutdown timed
///   out (every service still stopping is named, with what it waits for), 130 on a second
///   signal.
pub struct Worker {
    root: ServiceHandle,
    log: LogConfig,
    install_logging: bool,
    shutdown_timeout: Duration,
    blocking_threshold: Option<Duration>,
    worker_threads: Option<usize>,
}

/// How a worker run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerExit {
    /// Stopped cleanly (by a signal or by the services themselves).
    Stopped,
    /// A service crashed; the reason names it.
    Crashed(CrashReason),
    /// The services failed to start.
    StartFailed(ServiceError),
    /// Logging could not be set up.
    LoggingFailed(String),
    /// The stop did not finish within the shutdown timeout.
    ShutdownTimedOut(Duration),
    /// A second signal arrived while stopping.
    Forced,
}

impl WorkerExit {
    /// The process exit status for this outcome.
    pub fn code(&self) -> u8 {
        match self {
            WorkerExit::Stopped => 0,
            WorkerExit::Crashed(_) | WorkerExit::StartFailed(_) | WorkerExit::LoggingFailed(_) => 1,
            WorkerExit::ShutdownTimedOut(_) => 2,
            WorkerExit::Forced => 130,
        }
    }
}

/// The root service of a worker: its services are its dependencies.
struct WorkerService {
    services: Vec<ServiceHandle>,
}

impl Service for WorkerService {
    fn label(&self) -> String {
        "Worker".to_string()
    }

    fn dependencies(&mut self) -> Vec<ServiceHandle> {
        std::mem::take(&mut self.services)
    }

    async fn on_started(&mut self, _ctx: &Context) -> Result<()> {
        Ok(())
    }
}

impl Worker {
    /// A worker running `service`.
    pub fn new(service: ServiceHandle) -> Worker {
        Worker::with_services(vec![service])
    }

    /// A worker running several services, started in order.
    pub fn with_services(services: Vec<ServiceHandle>) -> Worker {
        let root = ServiceHandle::builder(WorkerService { services })
            .kind(NodeKind::Worker)
            .build();
        Worker {
            root,
            log: LogConfig::default(),
            install_logging: true,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            blocking_threshold: Some(DEFAULT_BLOCKING_THRESHOLD),
            worker_threads: None,
        }
    }

    /// Log filter: a level (`info`) or a tracing filter (`info,mode=debug`). Default `info`,
    /// or `MODE_LOG` when set.
    pub fn log_level(mut self, level: impl Into<String>) -> Self {
        self.log.level = Some(level.into());
        self
    }

    /// Text (default) or JSON lines.
    pub fn log_format(mut self, format: LogFormat) -> Self {
        self.log.format = format;
        self
    }

    /// Append logs to a file instead of stderr.
    pub fn log_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.log.file = Some(path.into());
        self
    }

    /// Leave logging alone (the program set up its own subscriber).
    pub fn without_logging(mut self) -> Self {
        self.install_logging = false;
        self
    }

    /// How long a signal-triggered stop may take in total.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Warn when the runtime is blocked for longer than this; `None` disables the detector.
    pub fn blocking_threshold(mut self, threshold: Option<Duration>) -> Self {
        self.blocking_threshold = threshold;
        self
    }

    /// Runtime worker threads for [`Worker::run`] (default: one per core).
    ///
    /// The blocking detector notices one blocked thread among healthy ones when the blocking
    /// code runs in a service's hook, task or timer; other code is noticed when it blocks
    /// every worker thread.
    pub fn worker_threads(mut self, threads: usize) -> Self {
        self.worker_threads = Some(threads.max(1));
        self
    }

    /// The worker's root service (its services are the dependencies).
    pub fn handle(&self) -> &ServiceHandle {
        &self.root
    }

    /// The beacon of everything the worker runs.
    pub fn beacon(&self) -> BeaconNode {
        self.root.beacon()
    }

    /// Run on a new multi-threaded tokio runtime until stopped; returns the exit status.
    pub fn run(self) -> ExitCode {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.worker_threads {
            builder.worker_threads(n);
        }
        let rt = match builder.enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: could not start the tokio runtime: {e}");
                return ExitCode::from(1);
            }
        };
        let exit = rt.block_on(self.run_async());
        // Whatever a forced exit left behind must not delay the process exit.
        rt.shutdown_timeout(Duration::from_millis(100));
        ExitCode::from(exit.code())
    }

    /// Run inside an existing runtime until stopped.
    pub async fn run_async(self) -> WorkerExit {
        if self.install_logging {
            if let Err(e) = init_logging(&self.log) {
                eprintln!("error: {e}");
                return WorkerExit::LoggingFailed(e.to_string());
            }
        }
        let _detector = self.blocking_threshold.map(BlockingDetector::start);
        let (mut signals, mut dump) = Signals::install();
        let root = self.root.clone();
        let prefix = root.log_prefix();

        let started = tokio::select! {
            r = root.start() => Some(r),
            sig = signals.stop_requested() => {
                tracing::info!("[{prefix}]: Stopping on signal received ({sig}) while starting...");
                None
            }
        };
        let started = match started {
            // Something stopped the worker while it started: a stop like any other.
            Some(Err(ServiceError::StartCancelled { .. })) => {
                tracing::info!("[{prefix}]: Stopped while starting...");
                None
            }
            Some(Err(e)) => {
                eprintln!("error: {e}");
                root.stop().await;
                return WorkerExit::StartFailed(e);
            }
            started => started,
        };
        if started.is_some() {
            loop {
                tokio::select! {
                    _ = root.wait_until_stopped() => break,
                    sig = signals.stop_requested() => {
                        tracing::info!("[{prefix}]: Stopping on signal received ({sig})...");
                        break;
                    }
                    _ = dump.requested() => {
                        tracing::info!("[{prefix}]: beacon (SIGUSR1):\n{}", root.beacon().render_tree());
                    }
                }
            }
        }

        let stopped = tokio::select! {
            // The stop runs as a task of its own: when the timeout fires, it is still going,
            // and whatever it waits for can be named.
            r = tokio::time::timeout(self.shutdown_timeout, root.stop()) => r.is_ok(),
            sig = signals.stop_requested() => {
                eprintln!("{sig} received again while stopping: exiting now");
                return WorkerExit::Forced;
            }
        };
        if self.install_logging {
            crate::telemetry::shutdown(Duration::from_secs(3)).await;
        }
        if let Some(reason) = root.crash_reason() {
            eprintln!("error: crashed: {reason}");
            return WorkerExit::Crashed(reason);
        }
        if !stopped {
            eprintln!("{}", timeout_report(&root, self.shutdown_timeout));
            return WorkerExit::ShutdownTimedOut(self.shutdown_timeout);
        }
        WorkerExit::Stopped
    }
}

/// Most services a timed-out shutdown names one by one.
const MAX_NAMED: usize = 20;

/// What a shutdown that timed out still waits for: every service still stopping with the hook
/// or tasks it waits for, e.g. `Worker/Db: in on_stop (grace period 1m)`.
fn timeout_report(root: &ServiceHandle, timeout: Duration) -> String {
    let stuck = root.stuck_stopping();
    let mut out = format!("error: services did not stop within the {timeout:?} shutdown timeout");
    if stuck.is_empty() {
        out.push_str(" (none is in a stop hook or waiting for its tasks any more)");
        return out;
    }
    out.push_str("; still stopping:");
    for line in stuck.iter().take(MAX_NAMED) {
        out.push_str("\n  ");
        out.push_str(line);
    }
    if stuck.len() > MAX_NAMED {
        out.push_str(&format!("\n  ... and {} more", stuck.len() - MAX_NAMED));
    }
    out.push_str(
        "\nraise the shutdown timeout, or shorten the grace periods of the services named",
    );
    out
}

/// SIGINT and SIGTERM; each is optional so that a failure to install one does not prevent
/// running.
struct Signals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

/// SIGUSR1: log the beacon.
struct DumpSignal {
    #[cfg(unix)]
    usr1: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

impl Signals {
    #[cfg(unix)]
    fn install() -> (Signals, DumpSignal) {
        use tokio::signal::unix::{signal, SignalKind};
        let get = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot handle {name}: {e}");
                None
            }
        };
        (
            Signals {
                int: get(SignalKind::interrupt(), "SIGINT"),
                term: get(SignalKind::terminate(), "SIGTERM"),
            },
            DumpSignal {
                usr1: get(SignalKind::user_defined1(), "SIGUSR1"),
            },
        )
    }

    #[cfg(unix)]
    async fn stop_requested(&mut self) -> &'static str {
        tokio::select! {
            _ = recv(&mut self.int) => {
                eprintln!("-INT- -INT- -INT- -INT- -INT- -INT-");
                "SIGINT"
            }
            _ = recv(&mut self.term) => "SIGTERM",
        }
    }

    #[cfg(not(unix))]
    fn install() -> (Signals, DumpSignal) {
        (Signals {}, DumpSignal {})
    }

    #[cfg(not(unix))]
    async fn stop_requested(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

impl DumpSignal {
    async fn requested(&mut self) {
        #[cfg(unix)]
        recv(&mut self.usr1).await;
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }
}
