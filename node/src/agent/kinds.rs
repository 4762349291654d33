//! Service kinds: what a node can run. A spec names a kind; the [`KindRegistry`] checks the
//! spec's config and builds one service per instance.
//!
//! The stock kinds ([`KindRegistry::stock`]):
//!
//! | kind | config | what it runs |
//! | --- | --- | --- |
//! | `exec` | `{"command": "/bin/sleep", "args": ["1000"], "env": {"K": "V"}, "cwd": "/tmp", "user": "nobody", "group": "nogroup"}` | a supervised OS process, its output logged; stopped with SIGTERM, then SIGKILL after the grace period; not the node's environment, only a minimal base and `env` |
//! | `ticker` | `{"every_ms": 1000, "message": "tick"}` | logs the message every period |
//! | `counter` | `{"every_ms": 1000}` | counts and logs ticks |
//! | `crasher` | `{"after_ms": 1000, "crash_file": "/tmp/crash"}` | crashes after `after_ms`, or whenever `crash_file` appears (the file is removed, so each new file is one crash) |
//! | `webapp` | `{"port": 0}` | the tutorial's app tree: Websockets, UserCache, and a Webserver answering HTTP GET on 127.0.0.1 |
//!
//! Only `exec` requires a config (`command`); for the others `null` means the defaults shown.

mod demo;
mod exec;
mod ledger;
mod spawner;
#[cfg(test)]
mod tests;

pub(crate) use exec::program::{check_pattern as check_exec_pattern, AllowList, BASE_PATH};

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::output::OutputLog;
use crate::model::secret::Secret;
use crate::model::spec::{HealthCheck, Probe};
use crate::service::ServiceHandle;

/// What a node needs to start one instance of a service.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// The service's name.
    pub service: String,
    /// The instance number within the service (0, 1, ... up to its replicas).
    pub slot: u32,
    /// The id of the node running the instance.
    pub node: u64,
    /// The spec's free-form config, interpreted by the kind.
    pub config: Value,
    /// The spec's `secrets`, by name (`exec` puts them in the process's environment). Their
    /// `{:?}` shows no value: read one with [`Secret::expose`], and do not log it.
    pub secrets: BTreeMap<String, Secret>,
    /// How long the instance may take to stop before it is killed.
    pub grace: Duration,
    /// The placement's fencing token: it only grows from one assignment of this instance to
    /// the next, so a workload can stamp its writes with it and have stale ones refused
    /// (`exec` processes get it as `MODE_FENCING_TOKEN`).
    pub fencing_token: u64,
    /// Fired when the instance must die at once, not gracefully (a singleton whose node lost
    /// its lease): a kind that runs OS processes kills them with SIGKILL.
    pub kill: KillSwitch,
    /// For a singleton: when its node's lease ends. A kind that runs OS processes hands it to
    /// something outside the node's process (the `exec` kind: its process group's keeper),
    /// which kills them when it passes even while the node is frozen (SIGSTOP, a stalled VM).
    pub lease: Option<LeaseDeadline>,
}

/// When a node's singleton lease ends, on the system's monotonic clock (`CLOCK_MONOTONIC`, in
/// nanoseconds), shared with the processes that watch it; 0 until the node first sets it, and
/// in the past once it holds no lease.
#[derive(Clone, Default, Debug)]
pub struct LeaseDeadline(Arc<std::sync::atomic::AtomicU64>);

impl LeaseDeadline {
    /// Set the end: `until` (an instant), or `None` for "no lease" (already over).
    pub fn set(&self, until: Option<std::time::Instant>) {
        let ns = match until {
            Some(t) => {
                let left = t.saturating_duration_since(std::time::Instant::now());
                monotonic_ns().saturating_add(left.as_nanos().min(u128::from(u64::MAX)) as u64)
            }
            None => 1,
        };
        self.0.store(ns.max(1), Ordering::Release);
    }

    /// The end in monotonic nanoseconds (0: never set).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// The shared cell itself (for a watcher that shares this process's memory).
    pub(crate) fn cell(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.0.clone()
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// A one-shot signal that an instance must die at once (see [`InstanceSpec::kill`]).
///
/// ```
/// # tokio_test_block_on(async {
/// let kill = mode::agent::kinds::KillSwitch::default();
/// let seen = kill.clone();
/// kill.fire();
/// seen.fired().await; // returns at once: it was fired
/// assert!(seen.is_fired());
/// # });
/// # fn tokio_test_block_on(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone, Default)]
pub struct KillSwitch(Arc<KillInner>);

#[derive(Default)]
struct KillInner {
    fired: AtomicBool,
    notify: tokio::sync::Notify,
}

impl KillSwitch {
    /// Fire it (idempotent).
    pub fn fire(&self) {
        self.0.fired.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether it was fired.
    pub fn is_fired(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }

    /// Resolves once it is fired.
    pub async fn fired(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_fired() {
                return;
            }
            notified.await;
        }
    }
}

impl fmt::Debug for KillSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KillSwitch(fired: {})", self.is_fired())
    }
}

impl InstanceSpec {
    /// `service#slot`, the instance's name in logs and the beacon.
    ///
    /// ```
    /// # use mode::agent::kinds::InstanceSpec;
    /// let spec = InstanceSpec {
    ///     service: "web".into(),
    ///     slot: 2,
    ///     node: 1,
    ///     config: serde_json::Value::Null,
    ///     secrets: Default::default(),
    ///     grace: std::time::Duration::from_secs(5),
    ///     fencing_token: 7,
    ///     kill: Default::default(),
    ///     lease: None,
    /// };
    /// assert_eq!(spec.label(), "web#2");
    /// ```
    pub fn label(&self) -> String {
        format!("{}#{}", self.service, self.slot)
    }
}

/// A kind of service a node can run.
///
/// ```
/// use mode::agent::kinds::{InstanceSpec, Kind};
/// use mode::service::{Service, ServiceHandle};
///
/// struct Idle;
/// impl Service for Idle {}
///
/// struct IdleKind;
/// impl Kind for IdleKind {
///     fn validate(&self, config: &serde_json::Value) -> Result<(), String> {
///         match config {
///             serde_json::Value::Null => Ok(()),
///             _ => Err("invalid idle config: it takes none; remove `config`".into()),
///         }
///     }
///     fn create(&self, instance: &InstanceSpec) -> Result<ServiceHandle, String> {
///         self.validate(&instance.config)?;
///         Ok(ServiceHandle::builder(Idle).label(instance.label()).build())
///     }
/// }
/// ```
pub trait Kind: Send + Sync + 'static {
    /// Check a spec's config; the error names the field and what is allowed.
    fn validate(&self, config: &Value) -> Result<(), String>;

    /// Build (not start) the service for one instance; the handle's label should be
    /// `instance.label()`.
    fn create(&self, instance: &InstanceSpec) -> Result<ServiceHandle, String>;
}

/// A kind made from a closure (see [`KindRegistry::register_fn`]).
struct FnKind<F>(F);

impl<F> Kind for FnKind<F>
where
    F: Fn(&InstanceSpec) -> Result<ServiceHandle, String> + Send + Sync + 'static,
{
    fn validate(&self, _config: &Value) -> Result<(), String> {
        Ok(())
    }

    fn create(&self, instance: &InstanceSpec) -> Result<ServiceHandle, String> {
        (self.0)(instance)
    }
}

/// The kinds a node can run, by name.
///
/// ```
/// use mode::agent::kinds::{InstanceSpec, KindRegistry};
/// use mode::service::{Service, ServiceHandle};
///
/// struct Hello;
/// impl Service for Hello {}
///
/// let mut kinds = KindRegistry::stock();
/// kinds.register_fn("hello", |instance: &InstanceSpec| {
///     Ok(ServiceHandle::builder(Hello).label(instance.label()).build())
/// });
/// assert_eq!(kinds.names(), ["counter", "crasher", "exec", "hello", "ticker", "webapp"]);
/// assert!(kinds.validate("exec", &serde_json::json!({"command": "/bin/sleep"})).is_ok());
/// assert!(kinds.validate("exec", &serde_json::json!({})).unwrap_err().contains("`command`"));
/// ```
#[derive(Clone, Default)]
pub struct KindRegistry {
    kinds: BTreeMap<String, Arc<dyn Kind>>,
    /// Kinds this node knows but does not offer, and why (`--no-exec`): their configs are
    /// still checked, nothing of theirs runs here.
    disabled: BTreeMap<String, &'static str>,
    /// Where the stock `exec` kind records its process groups (shared by the clones).
    processes: ledger::ProcessLedger,
    /// What the stock `exec` kind may run (shared by the clones).
    exec_policy: exec::ExecPolicy,
    /// Where the stock `exec` kind keeps its processes' output (shared by the clones).
    output: OutputLog,
}

impl KindRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stock kinds: `exec`, `ticker`, `counter`, `crasher` and `webapp` (see the
    /// [module docs](self)).
    pub fn stock() -> Self {
        let mut kinds = Self::new();
        let ledger = kinds.processes.clone();
        let policy = kinds.exec_policy.clone();
        let output = kinds.output.clone();
        kinds
            .register(
                "exec",
                exec::ExecKind {
                    ledger,
                    policy,
                    output,
                },
            )
            .register("ticker", demo::TickerKind)
            .register("counter", demo::CounterKind)
            .register("crasher", demo::CrasherKind)
            .register("webapp", demo::WebappKind);
        kinds
    }

    /// Before the node runs anything: kill the processes the previous run of the node with data
    /// directory `data_dir` left behind (if it was killed), and record the processes the
    /// stock `exec` kind starts from now on in that directory (see `ledger`). Never fails: what
    /// it cannot check or record, it logs as a warning.
    pub(crate) fn open_process_ledger(&self, data_dir: &Path) {
        self.processes.open(data_dir);
    }

    /// Stop offering `kind` (`why`: the flag that says so): it is left out of
    /// [`KindRegistry::names`] (what the node registers, so the scheduler places none of it
    /// here) and `create` refuses it; its configs are still checked, for the specs this server
    /// receives.
    pub(crate) fn disable(&mut self, kind: &str, why: &'static str) -> &mut Self {
        self.disabled.insert(kind.to_string(), why);
        self
    }

    /// What this node's instances wrote (the stock `exec` kind's processes).
    pub(crate) fn output(&self) -> &OutputLog {
        &self.output
    }

    /// Whether instances of `kind` keep their output here: the stock `exec` kind's. An
    /// unknown kind (a custom kind of other nodes) may.
    pub(crate) fn keeps_output(&self, kind: &str) -> bool {
        kind == "exec" || !self.kinds.contains_key(kind)
    }

    /// Let the stock `exec` kind run only the programs `allow` permits (`--exec-allow`).
    pub(crate) fn restrict_exec(&self, allow: AllowList) {
        self.exec_policy.restrict(allow);
    }

    /// A health check as this node runs it: a `command` probe is a program the node runs,
    /// under the rules its `exec` instances follow (none with `--no-exec`, only the allowed
    /// ones with `--exec-allow`); its program is resolved here, in [`BASE_PATH`].
    pub(crate) fn health_check(&self, check: &HealthCheck) -> Result<HealthCheck, String> {
        let mut check = check.clone();
        let Probe::Command(argv) = &mut check.probe else {
            return Ok(check);
        };
        let Some(command) = argv.first_mut() else {
            return Ok(check);
        };
        if let Some(why) = self.disabled.get("exec") {
            return Err(format!(
                "its health check runs a command (`{command}`), and this node runs none ({why})"
            ));
        }
        let program = self
            .exec_policy
            .program(command, BASE_PATH)
            .map_err(|e| format!("its health check: {e}"))?;
        *command = program.to_string_lossy().into_owned();
        Ok(check)
    }

    /// Add `kind` as `name`, replacing a kind of that name.
    pub fn register(&mut self, name: impl Into<String>, kind: impl Kind) -> &mut Self {
        self.kinds.insert(name.into(), Arc::new(kind));
        self
    }

    /// Add a kind built from a closure; its config validation accepts anything (the closure
    /// reads `instance.config` and returns an error for a config it cannot use).
    pub fn register_fn<F>(&mut self, name: impl Into<String>, create: F) -> &mut Self
    where
        F: Fn(&InstanceSpec) -> Result<ServiceHandle, String> + Send + Sync + 'static,
    {
        self.register(name, FnKind(create))
    }

    /// The names of the kinds this node offers, sorted.
    pub fn names(&self) -> Vec<String> {
        self.kinds
            .keys()
            .filter(|k| !self.disabled.contains_key(*k))
            .cloned()
            .collect()
    }

    /// Whether a kind of that name is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// Check a config for `kind`; an unknown kind is an error listing the known ones.
    pub fn validate(&self, kind: &str, config: &Value) -> Result<(), String> {
        self.get(kind)?.validate(config)
    }

    /// Build (not start) the service of one instance of `kind`.
    pub fn create(&self, kind: &str, instance: &InstanceSpec) -> Result<ServiceHandle, String> {
        if let Some(why) = self.disabled.get(kind) {
            return Err(format!(
                "this node does not run kind `{kind}` ({why}): the instance must run on another node"
            ));
        }
        self.get(kind)?.create(instance)
    }

    fn get(&self, kind: &str) -> Result<&Arc<dyn Kind>, String> {
        self.kinds.get(kind).ok_or_else(|| {
            if self.kinds.is_empty() {
                format!("unknown service kind `{kind}`: this node has no kinds registered")
            } else {
                format!(
                    "unknown service kind `{kind}`; this node runs: {}",
                    self.names().join(", ")
                )
            }
        })
    }
}

impl fmt::Debug for KindRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.kinds.keys()).finish()
    }
}

/// Deserialize a kind's config (`null` counts as `{}`, so defaults apply), with errors that
/// name the kind and the offending field: `invalid exec config: field `args`: invalid type:
/// string "x", expected a sequence`.
pub(crate) fn parse_config<T: DeserializeOwned>(kind: &str, config: &Value) -> Result<T, String> {
    let object = match config {
        Value::Null => Map::new(),
        Value::Object(map) => map.clone(),
        other => {
            return Err(format!(
                "invalid {kind} config: expected a JSON object, got {}",
                json_type(other)
            ))
        }
    };
    serde_json::from_value::<T>(Value::Object(object.clone())).map_err(|e| {
        let message = e.to_string();
        match culprit::<T>(&object, &message) {
            Some(field) => format!("invalid {kind} config: field `{field}`: {message}"),
            None => format!("invalid {kind} config: {message}"),
        }
    })
}

/// The field behind a deserialization error that does not name one (a wrong type or value):
/// the first field whose removal changes the error. serde_json's messages carry no path, and
/// this avoids a dependency for the rare error case.
fn culprit<T: DeserializeOwned>(object: &Map<String, Value>, message: &str) -> Option<String> {
    const NAMED: [&str; 3] = ["unknown field", "missing field", "duplicate field"];
    if NAMED.iter().any(|prefix| message.starts_with(prefix)) {
        return None;
    }
    object.keys().find_map(|key| {
        let mut without = object.clone();
        without.remove(key);
        match serde_json::from_value::<T>(Value::Object(without)) {
            Ok(_) => Some(key.clone()),
            Err(e) if e.to_string() != message => Some(key.clone()),
            Err(_) => None,
        }
    })
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
