//! Errors and crash reasons of the service framework.

use std::fmt;
use std::sync::Arc;

/// The error type hooks, tasks and timers return: any error converts into it with `?`
/// (including `anyhow::Error` and `std::io::Error`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a hook, task or timer body returns.
pub type Result<T = (), E = BoxError> = std::result::Result<T, E>;

/// Why a service crashed: one line that names the service, the task or hook, and the cause.
///
/// Cheap to clone; shown by `state`, logs and the beacon.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CrashReason(Arc<str>);

impl CrashReason {
    /// A reason from any message.
    pub fn new(message: impl Into<String>) -> Self {
        CrashReason(Arc::from(message.into()))
    }

    /// The reason as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CrashReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CrashReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for CrashReason {
    fn from(s: &str) -> Self {
        CrashReason::new(s)
    }
}

impl From<String> for CrashReason {
    fn from(s: String) -> Self {
        CrashReason::new(s)
    }
}

/// Errors returned by lifecycle operations on a [`ServiceHandle`](super::ServiceHandle).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    /// `start` was called on a service that is not in the `init` state.
    #[error(
        "service '{service}' cannot start from state {state}: use restart() to start it again"
    )]
    NotStartable {
        /// The service's label.
        service: String,
        /// The state it was in.
        state: super::ServiceState,
    },
    /// The service (or one of its dependencies) failed to start.
    #[error("service '{service}' failed to start: {reason}")]
    StartFailed {
        /// The service's label.
        service: String,
        /// Why, including the dependency that failed if it was one.
        reason: CrashReason,
    },
    /// A stop cut the start short (nothing failed); that stop takes the service to `shutdown`.
    #[error(
        "service '{service}' was stopped before its start finished; restart() starts it again"
    )]
    StartCancelled {
        /// The service's label.
        service: String,
    },
    /// A runtime dependency was offered to a service whose run is over or ending.
    #[error(
        "cannot add runtime dependency '{child}' to service '{service}' ({state}): its run has \
         ended or is ending; add runtime dependencies from its hooks or tasks while it runs, \
         or use add_dependency to start one with its next start"
    )]
    NotRunning {
        /// The service that would have been the parent.
        service: String,
        /// The dependency's label.
        child: String,
        /// The state the service was in.
        state: super::ServiceState,
    },
}

impl ServiceError {
    /// The crash reason behind a failed start, if it was one.
    pub fn reason(&self) -> Option<&CrashReason> {
        match self {
            ServiceError::StartFailed { reason, .. } => Some(reason),
            ServiceError::NotStartable { .. }
            | ServiceError::StartCancelled { .. }
            | ServiceError::NotRunning { .. } => None,
        }
    }
}
