//! The declarative service spec: what users write (YAML or JSON), what the replicated state
//! stores, and the checks that keep bad specs out of it.
//!
//! A file holds one spec, a YAML list of specs, or several YAML documents separated by `---`:
//!
//! ```yaml
//! name: web                 # required; lowercase letters, digits and '-', 1-63 chars, starts with a letter
//! kind: exec                # required; a service kind a node offers
//! config:                   # free-form, validated by the kind
//!   command: /bin/sleep
//!   args: ["1000"]
//! secrets:                  # values every instance gets (`exec`: in its environment), shown
//!   DB_PASSWORD: hunter2    #   only to operators and admins, never in events, logs or the graph
//! replicas: 3               # default 1; 0 (stopped) to 50,000; not with `singleton: true`
//! singleton: false          # exactly one instance, never two at once
//! constraints:              # all must hold on a node's labels
//!   - label: zone
//!     equals: a             # exactly one of `equals` / `in`
//!   - label: disk
//!     in: [ssd, nvme]
//! spread: zone              # spread replicas over this label's values first
//! anti_affinity: [db]       # never share a node with these services
//! cost: 1                   # capacity units per instance, default 1, >= 1
//! depends_on: [db]          # start only when these services run somewhere
//! restart:                  # the instance's local supervisor
//!   max_restarts: 3         # default 5
//!   within_s: 10            # default 30
//!   backoff_initial_ms: 100 # default 100
//!   backoff_max_ms: 10000   # default 10000
//! stop_grace_s: 10          # default 10
//! update:                   # how a change that replaces instances rolls out
//!   max_unavailable: 1      # instances replaced at once: a count or a percentage ("10%"); default 1
//!   min_healthy_ms: 1000    # a new instance must stay running (and healthy) this long; default 1000
//!   deadline_s: 300         # the rollout fails after this long; default 300
//!   auto_revert: false      # on failure, go back to the last version that rolled out; default false
//! health:                   # optional: exactly one of http / tcp / command
//!   http: {port: 8080, path: /healthz}   # GET on 127.0.0.1, 2xx/3xx is healthy
//!   # tcp: {port: 8080}                   # a TCP connect succeeds
//!   # command: [/bin/test, -f, /tmp/ok]   # exits 0
//!   port_plus_slot: false   # add the instance's slot to the port (one port per instance)
//!   interval_ms: 1000       # default 1000
//!   timeout_ms: 1000        # default 1000
//!   healthy_threshold: 1    # consecutive successes to become healthy; default 1
//!   unhealthy_threshold: 3  # consecutive failures to become unhealthy; default 3
//! ```
//!
//! [`parse_specs`] reads a file (unknown fields are errors), [`ServiceSpec::validate`] checks
//! one spec alone, [`validate_set`] checks specs against each other and the stored ones, and
//! [`dependency_order`] orders them for starting.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::model::secret::{self, Secret};
use crate::schedule::{Constraint, SpecView};

/// The longest service name.
pub const MAX_NAME_LEN: usize = 63;
/// The longest `stop_grace_s`.
pub const MAX_STOP_GRACE_S: u64 = 3600;

const NAME_RULE: &str =
    "1-63 lowercase letters, digits and '-', starting with a letter (like `web-2`)";

/// A declared service, as stored in the replicated state (serde: JSON in Raft, snake_case).
///
/// Every field but `name` and `kind` has a default, so specs stored by older versions (with
/// fewer fields) still read. `{:?}` shows the names of the `secrets`, never their values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Unique name: 1-63 lowercase letters, digits and '-', starting with a letter.
    pub name: String,
    /// The service kind a node must offer.
    pub kind: String,
    /// Kind-specific configuration, validated by the kind.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Secret values by name, given to every instance (`exec`: as environment variables;
    /// other kinds: [`InstanceSpec::secrets`](crate::agent::InstanceSpec::secrets)). Readers who
    /// may not see them get [`redacted`](ServiceSpec::redacted) specs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Secret>,
    /// Desired number of instances (0: stopped). Ignored for a singleton.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Exactly one instance, never two at once.
    #[serde(default)]
    pub singleton: bool,
    /// All must hold on a node's labels.
    #[serde(default)]
    pub constraints: Vec<ConstraintSpec>,
    /// Spread instances over this label's values first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// Never share a node with these services.
    #[serde(default)]
    pub anti_affinity: Vec<String>,
    /// Capacity units per instance (>= 1).
    #[serde(default = "default_cost")]
    pub cost: u64,
    /// Start only when these services run somewhere.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// The instance's local supervisor.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Seconds an instance gets to stop before it is aborted (1-3600).
    #[serde(default = "default_stop_grace_s")]
    pub stop_grace_s: u64,
    /// How a change that replaces instances rolls out.
    #[serde(default)]
    pub update: UpdatePolicy,
    /// The instances' health check, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Box<HealthCheck>>,
    /// Bumped by the control plane each time the spec is stored (not set by users).
    #[serde(default)]
    pub generation: u64,
}

/// How many instances a rollout may take down at once: a count, or a percentage of the
/// replicas (rounded down, at least 1). Written `1` or `"10%"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// This many.
    Count(u32),
    /// This percentage (1-100) of the instances wanted.
    Percent(u32),
}

impl Amount {
    /// How many of `total` instances (at least 1).
    pub fn of(self, total: u32) -> u32 {
        match self {
            Amount::Count(n) => n.max(1),
            Amount::Percent(p) => ((u64::from(total) * u64::from(p.min(100)) / 100) as u32).max(1),
        }
    }

    /// Parse `3` or `10%`.
    pub fn parse(text: &str) -> Result<Amount, String> {
        let text = text.trim();
        let bad = || {
            format!("'{text}' is neither a whole number (like 2) nor a percentage (like \"10%\")")
        };
        match text.strip_suffix('%') {
            Some(p) => {
                let p: u32 = p.trim().parse().map_err(|_| bad())?;
                if !(1..=100).contains(&p) {
                    return Err(format!(
                        "'{text}': a percentage must be between 1% and 100%"
                    ));
                }
                Ok(Amount::Percent(p))
            }
            None => text.parse().map(Amount::Count).map_err(|_| bad()),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Count(n) => s.serialize_u32(*n),
            Amount::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AmountVisitor;
        impl Visitor<'_> for AmountVisitor {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number (like 2) or a percentage (like \"10%\")")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Amount, E> {
                u32::try_from(v)
                    .map(Amount::Count)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Amount, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Amount, E> {
                Amount::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(AmountVisitor)
    }
}

/// How a change that replaces instances (kind, config, secrets, restart policy, stop grace,
/// health check) rolls out: a few instances at a time, each replacement waited for until it has
/// run (and been healthy) for `min_healthy_ms`. A change of the replica count alone (or of
/// placement rules) replaces nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdatePolicy {
    /// At most this many instances unavailable at once (old ones being replaced, new ones not
    /// yet settled). Default 1.
    pub max_unavailable: Amount,
    /// How long a new instance must run (and be healthy, with a check) before it counts as
    /// available. Default 1000 ms.
    pub min_healthy_ms: u64,
    /// The rollout fails if it has not finished after this long. Default 300 s.
    pub deadline_s: u64,
    /// On failure, roll back to the last version that rolled out completely.
    pub auto_revert: bool,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            max_unavailable: Amount::Count(1),
            min_healthy_ms: 1000,
            deadline_s: 300,
            auto_revert: false,
        }
    }
}

/// The longest `update.min_healthy_ms` (10 minutes).
pub const MAX_MIN_HEALTHY_MS: u64 = 600_000;
/// The longest `update.deadline_s` (a day).
pub const MAX_DEADLINE_S: u64 = 86_400;
/// The longest health check interval or timeout (10 minutes).
pub const MAX_CHECK_MS: u64 = 600_000;

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// `GET http://127.0.0.1:PORT/PATH`: healthy on a 2xx or 3xx answer.
    Http {
        /// The port.
        port: u16,
        /// The path (default `/`).
        #[serde(default = "default_path")]
        path: String,
    },
    /// A TCP connect to `127.0.0.1:PORT` succeeds.
    Tcp {
        /// The port.
        port: u16,
    },
    /// This command (program and arguments, run with the instance's `MODE_*` environment)
    /// exits 0.
    Command(Vec<String>),
}

fn default_path() -> String {
    "/".to_string()
}

/// An instance health check, run by the agent of the instance's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What it probes (stored as the user writes it: `http: {...}`, `tcp: {...}` or
    /// `command: [...]` beside the other fields).
    #[serde(flatten)]
    pub probe: Probe,
    /// Add the instance's slot to the probe's port (each instance listens on its own).
    #[serde(default)]
    pub port_plus_slot: bool,
    /// Time between checks (ms, default 1000).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// A check not answered within this long failed (ms, default 1000).
    #[serde(default = "default_interval_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes to become healthy (default 1).
    #[serde(default = "one")]
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy (default 3).
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
}

fn default_interval_ms() -> u64 {
    1000
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}

impl HealthCheck {
    fn validate(&self, spec: &str) -> Result<(), SpecError> {
        for (field, v) in [
            ("health.interval_ms", self.interval_ms),
            ("health.timeout_ms", self.timeout_ms),
        ] {
            if !(1..=MAX_CHECK_MS).contains(&v) {
                return Err(field_error(
                    spec,
                    field,
                    format!("is {v} but must be between 1 and {MAX_CHECK_MS} (ms)"),
                ));
            }
        }
        for (field, v) in [
            ("health.healthy_threshold", self.healthy_threshold),
            ("health.unhealthy_threshold", self.unhealthy_threshold),
        ] {
            if !(1..=100).contains(&v) {
                return Err(field_error(
                    spec,
                    field,
                    format!("is {v} but must be between 1 and 100 (consecutive checks)"),
                ));
            }
        }
        match &self.probe {
            Probe::Http { port, path } => {
                if *port == 0 {
                    return Err(field_error(spec, "health.http.port", "must be 1-65535"));
                }
                if !path.starts_with('/') || path.len() > 1024 || path.contains(char::is_whitespace)
                {
                    return Err(field_error(
                        spec,
                        "health.http.path",
                        format!("'{path}' must start with '/', hold no spaces and be at most 1024 bytes"),
                    ));
                }
            }
            Probe::Tcp { port } => {
                if *port == 0 {
                    return Err(field_error(spec, "health.tcp.port", "must be 1-65535"));
                }
            }
            Probe::Command(argv) => {
                if argv.first().is_none_or(|p| p.trim().is_empty()) {
                    return Err(field_error(
                        spec,
                        "health.command",
                        "needs a program, like [/bin/test, -f, /tmp/ready]",
                    ));
                }
                if argv.len() > 64 || argv.iter().any(|a| a.len() > 4096) {
                    return Err(field_error(
                        spec,
                        "health.command",
                        "takes at most 64 arguments of at most 4096 bytes each",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The probe's port for instance `slot` (None for a command).
    pub fn port(&self, slot: u32) -> Option<u16> {
        let base = match &self.probe {
            Probe::Http { port, .. } | Probe::Tcp { port } => *port,
            Probe::Command(_) => return None,
        };
        if self.port_plus_slot {
            u16::try_from(u32::from(base) + slot).ok()
        } else {
            Some(base)
        }
    }
}

fn default_replicas() -> u32 {
    1
}

fn default_cost() -> u64 {
    1
}

fn default_stop_grace_s() -> u64 {
    10
}

/// A placement constraint on a node label: exactly one of `equals` and `in` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConstraintSpec {
    /// The label key.
    pub label: String,
    /// The label must have this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    /// The label must have one of these values.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub in_: Option<Vec<String>>,
}

/// How an instance's local supervisor restarts it: at most `max_restarts` within `within_s`
/// seconds, waiting from `backoff_initial_ms` (doubling) up to `backoff_max_ms` in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestartPolicy {
    /// Restarts allowed within the window (>= 1); default 5.
    pub max_restarts: u32,
    /// The window in seconds (>= 1); default 30.
    pub within_s: u64,
    /// The first backoff in ms; default 100.
    pub backoff_initial_ms: u64,
    /// The longest backoff in ms (>= `backoff_initial_ms`); default 10000.
    pub backoff_max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            within_s: 30,
            backoff_initial_ms: 100,
            backoff_max_ms: 10_000,
        }
    }
}

impl RestartPolicy {
    /// The restart window (at most [`MAX_RESTART_WINDOW_S`](crate::model::limits::MAX_RESTART_WINDOW_S)
    /// whatever is stored, like the other accessors).
    pub fn within(&self) -> Duration {
        Duration::from_secs(
            self.within_s
                .min(crate::model::limits::MAX_RESTART_WINDOW_S),
        )
    }

    /// The first backoff.
    pub fn backoff_initial(&self) -> Duration {
        Duration::from_millis(
            self.backoff_initial_ms
                .min(crate::model::limits::MAX_BACKOFF_MS),
        )
    }

    /// The longest backoff.
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(
            self.backoff_max_ms
                .min(crate::model::limits::MAX_BACKOFF_MS),
        )
    }
}

/// A spec problem. Display reads like
/// `web.yaml: spec 'web': field 'replicas': ...` (file, spec and field when known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The file the spec came from, if known.
    pub file: Option<String>,
    /// The spec's name, if known.
    pub spec: Option<String>,
    /// The field at fault, like `replicas`, `constraints[1]` or `restart.within_s`.
    pub field: Option<String>,
    /// What is wrong and what is allowed.
    pub problem: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if let Some(spec) = &self.spec {
            write!(f, "spec '{spec}': ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field '{field}': ")?;
        }
        f.write_str(&self.problem)
    }
}

impl SpecError {
    /// A problem with no file, spec or field attached yet.
    pub fn new(problem: impl Into<String>) -> Self {
        SpecError {
            file: None,
            spec: None,
            field: None,
            problem: problem.into(),
        }
    }

    /// Attach the file name (e.g. when the CLI reports a server-side check).
    pub fn with_file(mut self, file: impl Into<String>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// Attach the spec name.
    pub fn with_spec(mut self, spec: impl Into<String>) -> Self {
        self.spec = Some(spec.into());
        self
    }

    /// Attach the field name.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

/// An error about `field` of `spec`.
fn field_error(spec: &str, field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    let err = SpecError::new(problem).with_field(field);
    if spec.is_empty() {
        err
    } else {
        err.with_spec(spec)
    }
}

/// Whether `name` is a valid service name.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= MAX_NAME_LEN
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-'))
}

impl ServiceSpec {
    /// A spec with the given name and kind and every other field at its default.
    pub fn new(name: impl Into<String>, kind: impl Into<String>) -> Self {
        ServiceSpec {
            name: name.into(),
            kind: kind.into(),
            config: serde_json::Value::Null,
            secrets: BTreeMap::new(),
            replicas: default_replicas(),
            singleton: false,
            constraints: Vec::new(),
            spread: None,
            anti_affinity: Vec::new(),
            cost: default_cost(),
            depends_on: Vec::new(),
            restart: RestartPolicy::default(),
            stop_grace_s: default_stop_grace_s(),
            update: UpdatePolicy::default(),
            health: None,
            generation: 0,
        }
    }

    /// What an instance is built from: a change of any of these replaces instances (under
    /// the update policy); other changes (replicas, placement rules, the policy) do not.
    /// It holds the secret values: compare it, never show it.
    pub fn runtime(&self) -> serde_json::Value {
        serde_json::json!([
            self.kind,
            self.config,
            self.restart,
            self.stop_grace_s,
            self.health,
            self.secrets
        ])
    }

    /// The spec as readers who may not see secret values get it: every value replaced by
    /// [`secret::PLACEHOLDER`], the names kept. The one place that decides what hides a
    /// secret (the API calls it for such readers).
    ///
    /// ```
    /// use mode::model::{secret::Secret, spec::ServiceSpec};
    /// let mut spec = ServiceSpec::new("db", "exec");
    /// spec.secrets.insert("DB_PASSWORD".into(), Secret::new("hunter2"));
    /// assert_eq!(spec.redacted().secrets["DB_PASSWORD"].expose(), "(secret)");
    /// ```
    pub fn redacted(&self) -> ServiceSpec {
        let mut spec = self.clone();
        for value in spec.secrets.values_mut() {
            *value = Secret::placeholder();
        }
        spec
    }

    /// Instances wanted (1 for a singleton), never more than
    /// [`MAX_REPLICAS`](crate::model::limits::MAX_REPLICAS) (a spec stored before the limit existed
    /// must not make a node allocate billions of slots).
    pub fn instances(&self) -> u32 {
        if self.singleton {
            1
        } else {
            self.replicas.min(crate::model::limits::MAX_REPLICAS)
        }
    }

    /// Check the spec alone (names, fields, ranges); the message names the field and what is
    /// allowed. References to other services are checked by [`validate_set`].
    pub fn validate(&self) -> Result<(), SpecError> {
        let name = self.name.as_str();
        if !is_valid_name(name) {
            let problem = if name.is_empty() {
                format!("a service name is required: {NAME_RULE}")
            } else {
                format!("'{name}' is not a valid service name: use {NAME_RULE}")
            };
            // An invalid name is not repeated as the spec's name.
            return Err(SpecError::new(problem).with_field("name"));
        }
        if self.kind.trim().is_empty() {
            return Err(field_error(
                name,
                "kind",
                "a service kind is required (one a node offers, like `exec`)",
            ));
        }
        if self.singleton && self.replicas != 1 {
            return Err(field_error(
                name,
                "replicas",
                format!(
                    "is {} but singleton services have exactly one instance; drop `replicas` or set it to 1",
                    self.replicas
                ),
            ));
        }
        for (i, c) in self.constraints.iter().enumerate() {
            let field = format!("constraints[{i}]");
            if c.label.trim().is_empty() {
                return Err(field_error(
                    name,
                    format!("{field}.label"),
                    "a label key is required",
                ));
            }
            match (&c.equals, &c.in_) {
                (Some(_), Some(_)) => {
                    return Err(field_error(
                        name,
                        field,
                        format!(
                            "label '{}' has both `equals` and `in`; use exactly one",
                            c.label
                        ),
                    ))
                }
                (None, None) => {
                    return Err(field_error(
                        name,
                        field,
                        format!(
                            "label '{}' needs exactly one of `equals: VALUE` or `in: [VALUES]`",
                            c.label
                        ),
                    ))
                }
                (None, Some(values)) if values.is_empty() => {
                    return Err(field_error(
                        name,
                        format!("{field}.in"),
                        format!(
                            "label '{}' has an empty `in` list, which no node matches; list at least one value",
                            c.label
                        ),
                    ))
                }
                _ => {}
            }
        }
        if let Some(spread) = &self.spread {
            if spread.trim().is_empty() {
                return Err(field_error(
                    name,
                    "spread",
                    "must be a label key (like `zone`); drop it to spread over nodes only",
                ));
            }
        }
        check_names(
            name,
            "anti_affinity",
            &self.anti_affinity,
            "be anti-affine to",
        )?;
        check_names(name, "depends_on", &self.depends_on, "depend on")?;
        if self.cost < 1 {
            return Err(field_error(
                name,
                "cost",
                "must be at least 1 (capacity units per instance)",
            ));
        }
        let r = &self.restart;
        if r.max_restarts < 1 {
            return Err(field_error(
                name,
                "restart.max_restarts",
                "must be at least 1",
            ));
        }
        if r.within_s < 1 {
            return Err(field_error(
                name,
                "restart.within_s",
                "must be at least 1 (seconds)",
            ));
        }
        if r.backoff_initial_ms > r.backoff_max_ms {
            return Err(field_error(
                name,
                "restart.backoff_initial_ms",
                format!(
                    "is {} ms but must not exceed restart.backoff_max_ms ({} ms)",
                    r.backoff_initial_ms, r.backoff_max_ms
                ),
            ));
        }
        if !(1..=MAX_STOP_GRACE_S).contains(&self.stop_grace_s) {
            return Err(field_error(
                name,
                "stop_grace_s",
                format!(
                    "is {} but must be between 1 and {MAX_STOP_GRACE_S} (seconds)",
                    self.stop_grace_s
                ),
            ));
        }
        let u = &self.update;
        if let Amount::Count(0) = u.max_unavailable {
            return Err(field_error(
                name,
                "update.max_unavailable",
                "must be at least 1 (or a percentage like \"10%\"): with 0 no instance could ever be replaced",
            ));
        }
        if let Amount::Percent(p) = u.max_unavailable {
            if !(1..=100).contains(&p) {
                return Err(field_error(
                    name,
                    "update.max_unavailable",
                    format!("is {p}% but a percentage must be between 1% and 100%"),
                ));
            }
        }
        if u.min_healthy_ms > MAX_MIN_HEALTHY_MS {
            return Err(field_error(
                name,
                "update.min_healthy_ms",
                format!(
                    "is {} but must be at most {MAX_MIN_HEALTHY_MS} (ms)",
                    u.min_healthy_ms
                ),
            ));
        }
        if !(1..=MAX_DEADLINE_S).contains(&u.deadline_s) {
            return Err(field_error(
                name,
                "update.deadline_s",
                format!(
                    "is {} but must be between 1 and {MAX_DEADLINE_S} (seconds)",
                    u.deadline_s
                ),
            ));
        }
        if let Some(h) = &self.health {
            h.validate(name)?;
        }
        // Sizes, counts and durations (the state machine checks the same on apply).
        crate::model::limits::check_spec(self).map_err(|e| {
            let field = match e.what.as_str() {
                "spec" => None,
                f => Some(f.to_string()),
            };
            let err = SpecError::new(e.to_string()).with_spec(name);
            match field {
                Some(f) => err.with_field(f),
                None => err,
            }
        })?;
        self.check_secrets()
    }

    /// The secrets' names, and what their values may hold. No message repeats a value.
    fn check_secrets(&self) -> Result<(), SpecError> {
        let name = self.name.as_str();
        let env = self
            .config
            .get("env")
            .and_then(serde_json::Value::as_object);
        for (key, value) in &self.secrets {
            let field = format!("secrets.{key}");
            secret::check_name(key).map_err(|e| field_error(name, &field, e))?;
            if value.expose().contains('\0') {
                return Err(field_error(
                    name,
                    field,
                    "the value holds a NUL byte, which an environment variable cannot hold",
                ));
            }
            if value.expose() == secret::PLACEHOLDER {
                return Err(field_error(
                    name,
                    field,
                    format!(
                        "the value is `{}`, what reads show to those who may not see secrets: give the real value",
                        secret::PLACEHOLDER
                    ),
                ));
            }
            if env.is_some_and(|env| env.contains_key(key)) {
                return Err(field_error(
                    name,
                    field,
                    format!(
                        "`{key}` is also in config.env: give it once, under `secrets` if it is secret (config.env is shown to every reader)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The scheduler's view of it.
    ///
    /// A constraint with `equals` becomes [`Constraint::Equals`], one with `in` becomes
    /// [`Constraint::In`]; an invalid one with both yields both, one with neither yields an
    /// `In` with no values (which no node matches), so an unvalidated spec never widens
    /// placement.
    pub fn to_view(&self) -> SpecView {
        let mut constraints = Vec::with_capacity(self.constraints.len());
        for c in &self.constraints {
            if let Some(value) = &c.equals {
                constraints.push(Constraint::Equals {
                    label: c.label.clone(),
                    value: value.clone(),
                });
            }
            if let Some(values) = &c.in_ {
                constraints.push(Constraint::In {
                    label: c.label.clone(),
                    values: values.iter().cloned().collect(),
                });
            }
            if c.equals.is_none() && c.in_.is_none() {
                constraints.push(Constraint::In {
                    label: c.label.clone(),
                    values: BTreeSet::new(),
                });
            }
        }
        SpecView {
            name: self.name.clone(),
            kind: self.kind.clone(),
            replicas: self.instances(),
            constraints,
            spread: self.spread.clone(),
            anti_affinity: self.anti_affinity.iter().cloned().collect(),
            cost: self.cost,
        }
    }

    /// How long an instance gets to stop before it is aborted.
    /// Clamped to 1..=[`MAX_STOP_GRACE_S`] whatever is stored (a deadline past the end of time
    /// panics).
    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.stop_grace_s.clamp(1, MAX_STOP_GRACE_S))
    }
}

/// Check a list of service names: valid, not the spec itself.
fn check_names(spec: &str, field: &str, names: &[String], verb: &str) -> Result<(), SpecError> {
    for (i, other) in names.iter().enumerate() {
        let field = format!("{field}[{i}]");
        if other == spec {
            return Err(field_error(
                spec,
                field,
                format!("a service cannot {verb} itself"),
            ));
        }
        if !is_valid_name(other) {
            return Err(field_error(
                spec,
                field,
                format!("'{other}' is not a valid service name: use {NAME_RULE}"),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// The spec as users write it: unknown fields are errors, and an explicit `null` means
/// "the default". `generation` is accepted (so a spec read back from the cluster can be
/// applied again) and ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    kind: String,
    #[serde(default)]
    config: serde_json::Value,
    #[serde(default)]
    secrets: Option<BTreeMap<String, Secret>>,
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    singleton: Option<bool>,
    #[serde(default)]
    constraints: Option<Vec<RawConstraint>>,
    #[serde(default)]
    spread: Option<String>,
    #[serde(default)]
    anti_affinity: Option<Vec<String>>,
    #[serde(default)]
    cost: Option<u64>,
    #[serde(default)]
    depends_on: Option<Vec<String>>,
    #[serde(default)]
    restart: Option<RawRestart>,
    #[serde(default)]
    stop_grace_s: Option<u64>,
    #[serde(default)]
    update: Option<RawUpdate>,
    #[serde(default)]
    health: Option<RawHealth>,
    #[serde(default)]
    #[allow(dead_code)]
    generation: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    #[serde(default)]
    max_unavailable: Option<Amount>,
    #[serde(default)]
    min_healthy_ms: Option<u64>,
    #[serde(default)]
    deadline_s: Option<u64>,
    #[serde(default)]
    auto_revert: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    port: u16,
    #[serde(default)]
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    http: Option<RawHttp>,
    #[serde(default)]
    tcp: Option<RawTcp>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    port_plus_slot: Option<bool>,
    #[serde(default)]
    interval_ms: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    healthy_threshold: Option<u32>,
    #[serde(default)]
    unhealthy_threshold: Option<u32>,
}

impl RawHealth {
    fn into_check(self, spec: &str) -> Result<HealthCheck, SpecError> {
        let mut probes = Vec::new();
        if let Some(h) = self.http {
            probes.push(Probe::Http {
                port: h.port,
                path: h.path.unwrap_or_else(default_path),
            });
        }
        if let Some(t) = self.tcp {
            probes.push(Probe::Tcp { port: t.port });
        }
        if let Some(c) = self.command {
            probes.push(Probe::Command(c));
        }
        if probes.len() != 1 {
            return Err(field_error(
                spec,
                "health",
                format!(
                    "needs exactly one of `http: {{port, path}}`, `tcp: {{port}}` or `command: [PROGRAM, ARGS...]`; {} given",
                    probes.len()
                ),
            ));
        }
        Ok(HealthCheck {
            probe: probes.remove(0),
            port_plus_slot: self.port_plus_slot.unwrap_or(false),
            interval_ms: self.interval_ms.unwrap_or_else(default_interval_ms),
            timeout_ms: self.timeout_ms.unwrap_or_else(default_interval_ms),
            healthy_threshold: self.healthy_threshold.unwrap_or_else(one),
            unhealthy_threshold: self.unhealthy_threshold.unwrap_or_else(three),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstraint {
    label: String,
    #[serde(default)]
    equals: Option<String>,
    #[serde(default, rename = "in")]
    in_: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    #[serde(default)]
    max_restarts: Option<u32>,
    #[serde(default)]
    within_s: Option<u64>,
    #[serde(default)]
    backoff_initial_ms: Option<u64>,
    #[serde(default)]
    backoff_max_ms: Option<u64>,
}

impl TryFrom<RawSpec> for ServiceSpec {
    type Error = SpecError;

    fn try_from(raw: RawSpec) -> Result<Self, SpecError> {
        let health = match raw.health {
            None => None,
            Some(h) => Some(Box::new(h.into_check(&raw.name)?)),
        };
        let update = match raw.update {
            None => UpdatePolicy::default(),
            Some(u) => {
                let d = UpdatePolicy::default();
                UpdatePolicy {
                    max_unavailable: u.max_unavailable.unwrap_or(d.max_unavailable),
                    min_healthy_ms: u.min_healthy_ms.unwrap_or(d.min_healthy_ms),
                    deadline_s: u.deadline_s.unwrap_or(d.deadline_s),
                    auto_revert: u.auto_revert.unwrap_or(d.auto_revert),
                }
            }
        };
        let defaults = RestartPolicy::default();
        let restart = match raw.restart {
            None => defaults,
            Some(r) => RestartPolicy {
                max_restarts: r.max_restarts.unwrap_or(defaults.max_restarts),
                within_s: r.within_s.unwrap_or(defaults.within_s),
                backoff_initial_ms: r.backoff_initial_ms.unwrap_or(defaults.backoff_initial_ms),
                backoff_max_ms: r.backoff_max_ms.unwrap_or(defaults.backoff_max_ms),
            },
        };
        Ok(ServiceSpec {
            name: raw.name,
            kind: raw.kind,
            config: raw.config,
            secrets: raw.secrets.unwrap_or_default(),
            replicas: raw.replicas.unwrap_or_else(default_replicas),
            singleton: raw.singleton.unwrap_or(false),
            constraints: raw
                .constraints
                .unwrap_or_default()
                .into_iter()
                .map(|c| ConstraintSpec {
                    label: c.label,
                    equals: c.equals,
                    in_: c.in_,
                })
                .collect(),
            spread: raw.spread,
            anti_affinity: raw.anti_affinity.unwrap_or_default(),
            cost: raw.cost.unwrap_or_else(default_cost),
            depends_on: raw.depends_on.unwrap_or_default(),
            restart,
            stop_grace_s: raw.stop_grace_s.unwrap_or_else(default_stop_grace_s),
            update,
            health,
            generation: 0,
        })
    }
}

/// The specs of one YAML document: a mapping (one spec), a sequence (a list of specs), or
/// nothing (an empty document).
struct DocSpecs(Vec<RawSpec>);

impl<'de> Deserialize<'de> for DocSpecs {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocVisitor)
    }
}

struct DocVisitor;

impl<'de> Visitor<'de> for DocVisitor {
    type Value = DocSpecs;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a service spec (a mapping with `name` and `kind`) or a list of them")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DocSpecs, A::Error> {
        let spec = RawSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(DocSpecs(vec![spec]))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DocSpecs, A::Error> {
        let mut specs = Vec::new();
        while let Some(spec) = seq.next_element::<RawSpec>()? {
            specs.push(spec);
        }
        Ok(DocSpecs(specs))
    }

    fn visit_unit<E: de::Error>(self) -> Result<DocSpecs, E> {
        Ok(DocSpecs(Vec::new()))
    }

    fn visit_none<E: de::Error>(self) -> Result<DocSpecs, E> {
        Ok(DocSpecs(Vec::new()))
    }
}

/// Parse a file's text (YAML or JSON; one spec, a list, or `---`-separated documents).
/// `file` is used in messages.
///
/// Unknown fields are errors naming the field and listing the allowed ones; parse errors carry
/// the line and column. Each spec is also checked with [`ServiceSpec::validate`], and a name
/// defined twice in the file is an error; checks against other services are
/// [`validate_set`]'s. A file with no spec at all is an error. `generation` is ignored (0).
pub fn parse_specs(file: &str, text: &str) -> Result<Vec<ServiceSpec>, SpecError> {
    // First pass: the untyped documents, to report syntax errors and to find a spec's name
    // when the typed pass fails.
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value =
            serde_norway::Value::deserialize(doc).map_err(|e| yaml_error(file, &e, None))?;
        docs.push(value);
    }
    let mut specs: Vec<ServiceSpec> = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let parsed = DocSpecs::deserialize(doc).map_err(|e| yaml_error(file, &e, docs.get(i)))?;
        for raw in parsed.0 {
            let spec = ServiceSpec::try_from(raw).map_err(|e| e.with_file(file))?;
            spec.validate().map_err(|e| e.with_file(file))?;
            if specs.iter().any(|s| s.name == spec.name) {
                return Err(SpecError::new(
                    "is defined twice in this file; service names must be unique",
                )
                .with_file(file)
                .with_spec(spec.name));
            }
            specs.push(spec);
        }
    }
    if specs.is_empty() {
        return Err(SpecError::new(
            "no service spec found: expected a mapping with `name` and `kind`, a list of them, \
             or several `---`-separated documents",
        )
        .with_file(file));
    }
    Ok(specs)
}

/// Turn a serde_norway error into a [`SpecError`]: split off the path serde_norway puts in
/// front (`[1].restart.within_s: ...`) into the spec (found by list index in `doc`) and field,
/// keep the line and column, and suggest the closest field for an unknown one.
fn yaml_error(
    file: &str,
    err: &serde_norway::Error,
    doc: Option<&serde_norway::Value>,
) -> SpecError {
    let text = err.to_string();
    let location = err
        .location()
        .map(|l| format!(" at line {} column {}", l.line(), l.column()));
    let (mut message, location) = match &location {
        Some(loc) => match text.strip_suffix(loc.as_str()) {
            Some(message) => (message.to_string(), loc.clone()),
            // Errors with more context (from the YAML parser) already say where.
            None if text.contains(" at line ") => (text.clone(), String::new()),
            None => (text.clone(), loc.clone()),
        },
        None => (text.clone(), String::new()),
    };
    // serde_norway prefixes a path when the error is below the document's root.
    let mut index = None;
    let mut field = None;
    if let Some((path, rest)) = message.split_once(": ") {
        if !path.is_empty() && !path.contains(char::is_whitespace) && !path.contains('`') {
            // A list element's path reads `.[1].field`.
            let mut path = path.strip_prefix('.').unwrap_or(path);
            if let Some(after) = path.strip_prefix('[') {
                if let Some((n, tail)) = after.split_once(']') {
                    if let Ok(n) = n.parse::<usize>() {
                        index = Some(n);
                        path = tail.strip_prefix('.').unwrap_or(tail);
                    }
                }
            }
            if !path.is_empty() {
                field = Some(path.to_string());
            }
            message = rest.to_string();
        }
    }
    if let Some(hint) = suggest_field(&message) {
        message.push_str(&format!("; did you mean `{hint}`?"));
    }
    let spec = doc.and_then(|doc| {
        let spec = match (doc, index) {
            (serde_norway::Value::Sequence(items), Some(i)) => items.get(i)?,
            (serde_norway::Value::Mapping(_), None) => doc,
            _ => return None,
        };
        spec.get("name")?.as_str().map(str::to_string)
    });
    SpecError {
        file: Some(file.to_string()),
        spec,
        field,
        problem: format!("{message}{location}"),
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" message, the allowed field
/// closest to `x`, if it is close enough to be a typo.
fn suggest_field(message: &str) -> Option<String> {
    if !message.starts_with("unknown field `") {
        return None;
    }
    let mut quoted = message.split('`').skip(1).step_by(2);
    let unknown = quoted.next()?;
    quoted
        .map(|candidate| (edit_distance(unknown, candidate), candidate))
        .filter(|(d, candidate)| *d <= 2 && *d < candidate.len())
        .min()
        .map(|(_, candidate)| candidate.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Checks across specs

/// Check a set of specs together with the specs already stored: every new spec is valid
/// alone, no name appears twice in the set, every `depends_on` and `anti_affinity` entry names
/// a service in the set or already stored (and not the spec itself), and there is no
/// dependency cycle (the error lists it, e.g. `a -> b -> a`).
///
/// A new spec replaces a stored one of the same name. Only the new specs' references are
/// checked, but a cycle is found through stored specs too.
pub fn validate_set(new: &[ServiceSpec], existing: &[ServiceSpec]) -> Result<(), SpecError> {
    let mut seen = BTreeSet::new();
    for spec in new {
        spec.validate()?;
        if !seen.insert(spec.name.as_str()) {
            return Err(SpecError::new(
                "is defined twice in this set; service names must be unique",
            )
            .with_spec(spec.name.clone()));
        }
    }
    // The graph after the change: stored specs, replaced by new ones of the same name.
    let mut graph: BTreeMap<&str, &ServiceSpec> =
        existing.iter().map(|s| (s.name.as_str(), s)).collect();
    graph.extend(new.iter().map(|s| (s.name.as_str(), s)));

    // (Self-references were rejected by `validate`.)
    for spec in new {
        for (field, names) in [
            ("depends_on", &spec.depends_on),
            ("anti_affinity", &spec.anti_affinity),
        ] {
            for (i, other) in names.iter().enumerate() {
                if !graph.contains_key(other.as_str()) {
                    let what = if field == "depends_on" {
                        "depends on"
                    } else {
                        "is anti-affine to"
                    };
                    return Err(field_error(
                        &spec.name,
                        format!("{field}[{i}]"),
                        format!(
                            "{what} unknown service '{other}'; declare '{other}' in the same apply or first"
                        ),
                    ));
                }
            }
        }
    }

    let mut roots: Vec<&str> = new.iter().map(|s| s.name.as_str()).collect();
    roots.sort_unstable();
    if let Some(cycle) = find_cycle(&graph, &roots) {
        let first = cycle.first().map(|s| s.to_string()).unwrap_or_default();
        return Err(field_error(
            &first,
            "depends_on",
            format!("dependency cycle: {}", cycle.join(" -> ")),
        ));
    }
    Ok(())
}

/// A dependency cycle reachable from `roots`, as the path `a, b, ..., a`. Iterative, so a long
/// chain cannot overflow the stack. Dependencies on unknown services are skipped.
fn find_cycle<'a>(
    graph: &BTreeMap<&'a str, &'a ServiceSpec>,
    roots: &[&'a str],
) -> Option<Vec<&'a str>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    let deps = |name: &str| -> Vec<&'a str> {
        let mut deps: Vec<&'a str> = graph
            .get(name)
            .map(|s| s.depends_on.iter().map(String::as_str).collect())
            .unwrap_or_default();
        deps.sort_unstable();
        deps.dedup();
        deps.retain(|d| graph.contains_key(d));
        deps
    };
    let mut marks: BTreeMap<&'a str, Mark> = BTreeMap::new();
    for &root in roots {
        if marks.contains_key(root) {
            continue;
        }
        // (node, its dependencies, next one to visit)
        let mut stack: Vec<(&'a str, Vec<&'a str>, usize)> = vec![(root, deps(root), 0)];
        marks.insert(root, Mark::Active);
        while let Some((node, node_deps, next)) = stack.last_mut() {
            let Some(&dep) = node_deps.get(*next) else {
                marks.insert(node, Mark::Done);
                stack.pop();
                continue;
            };
            *next += 1;
            match marks.get(dep) {
                Some(Mark::Done) => {}
                Some(Mark::Active) => {
                    let start = stack.iter().position(|(n, _, _)| *n == dep).unwrap_or(0);
                    let mut cycle: Vec<&'a str> =
                        stack[start..].iter().map(|(n, _, _)| *n).collect();
                    cycle.push(dep);
                    return Some(cycle);
                }
                None => {
                    marks.insert(dep, Mark::Active);
                    let dep_deps = deps(dep);
                    stack.push((dep, dep_deps, 0));
                }
            }
        }
    }
    None
}

/// Order names so that dependencies come first (for starting); ties by name. Dependencies
/// outside `specs` are ignored; services in a cycle (which [`validate_set`] rejects) come
/// last, by name. A name given twice appears once.
pub fn dependency_order(specs: &[ServiceSpec]) -> Vec<String> {
    let names: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    // For each service, the dependencies in the set it still waits for, and who waits on it.
    let mut waiting: BTreeMap<&str, BTreeSet<&str>> =
        names.iter().map(|&n| (n, BTreeSet::new())).collect();
    let mut dependents: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for spec in specs {
        for dep in &spec.depends_on {
            let dep = dep.as_str();
            if names.contains(dep) && dep != spec.name {
                if let Some(w) = waiting.get_mut(spec.name.as_str()) {
                    w.insert(dep);
                }
                dependents
                    .entry(dep)
                    .or_default()
                    .insert(spec.name.as_str());
            }
        }
    }
    let mut ready: BTreeSet<&str> = waiting
        .iter()
        .filter(|(_, deps)| deps.is_empty())
        .map(|(&n, _)| n)
        .collect();
    let mut order: Vec<String> = Vec::with_capacity(names.len());
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    while let Some(name) = ready.pop_first() {
        order.push(name.to_string());
        placed.insert(name);
        for &dependent in dependents.get(name).into_iter().flatten() {
            if let Some(w) = waiting.get_mut(dependent) {
                w.remove(name);
                if w.is_empty() && !placed.contains(dependent) {
                    ready.insert(dependent);
                }
            }
        }
    }
    order.extend(
        names
            .iter()
            .filter(|n| !placed.contains(*n))
            .map(|n| n.to_string()),
    );
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FULL: &str = r#"
name: web                 # required
kind: exec
config:
  command: /bin/sleep
  args: ["1000"]
secrets:
  DB_PASSWORD: hunter2
replicas: 3
singleton: false
constraints:
  - label: zone
    equals: a
  - label: disk
    in: [ssd, nvme]
spread: zone
anti_affinity: [db]
cost: 2
depends_on: [db]
restart:
  max_restarts: 3
  within_s: 10
  backoff_initial_ms: 200
  backoff_max_ms: 5000
stop_grace_s: 20
update:
  max_unavailable: "25%"
  min_healthy_ms: 500
  deadline_s: 60
  auto_revert: true
health:
  http: {port: 8080, path: /healthz}
  port_plus_slot: true
  interval_ms: 200
  unhealthy_threshold: 2
"#;

    fn spec(name: &str) -> ServiceSpec {
        ServiceSpec::new(name, "exec")
    }

    fn with_deps(name: &str, deps: &[&str]) -> ServiceSpec {
        let mut s = spec(name);
        s.depends_on = deps.iter().map(|d| d.to_string()).collect();
        s
    }

    fn parse_one(text: &str) -> Result<ServiceSpec, SpecError> {
        let mut specs = parse_specs("t.yaml", text)?;
        assert_eq!(specs.len(), 1);
        Ok(specs.remove(0))
    }

    fn parse_err(text: &str) -> SpecError {
        match parse_specs("t.yaml", text) {
            Ok(specs) => panic!("expected an error, got {specs:?}"),
            Err(e) => e,
        }
    }

    fn invalid(f: impl FnOnce(&mut ServiceSpec)) -> SpecError {
        let mut s = spec("web");
        f(&mut s);
        match s.validate() {
            Ok(()) => panic!("expected an error for {s:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn bad_update_policies_and_health_checks_are_refused_naming_the_field() {
        let bad = |extra: &str| {
            parse_one(&format!("name: web\nkind: exec\n{extra}"))
                .unwrap_err()
                .to_string()
        };
        let e = bad("update: {max_unavailable: 0}");
        assert!(e.contains("update.max_unavailable"), "{e}");
        let e = bad("update: {max_unavailable: \"150%\"}");
        assert!(e.contains("between 1% and 100%"), "{e}");
        let e = bad("update: {deadline_s: 0}");
        assert!(e.contains("update.deadline_s"), "{e}");
        let e = bad("health: {interval_ms: 10}");
        assert!(e.contains("exactly one of"), "{e}");
        let e = bad("health: {tcp: {port: 1}, command: [/bin/true]}");
        assert!(e.contains("2 given"), "{e}");
        let e = bad("health: {command: []}");
        assert!(e.contains("health.command"), "{e}");
        let e = bad("health: {http: {port: 80, path: nope}}");
        assert!(e.contains("health.http.path"), "{e}");
        let e = bad("health: {tcp: {port: 80}, healthy_threshold: 0}");
        assert!(e.contains("health.healthy_threshold"), "{e}");
        let ok = parse_one(
            "name: web\nkind: exec\nupdate: {max_unavailable: 2}\nhealth: {command: [/bin/true]}",
        )
        .unwrap();
        assert_eq!(ok.update.max_unavailable, Amount::Count(2));
        assert_eq!(
            ok.health.unwrap().probe,
            Probe::Command(vec!["/bin/true".into()])
        );
    }

    #[test]
    fn full_yaml_parses_to_the_expected_spec() {
        let got = parse_one(FULL).unwrap();
        let want = ServiceSpec {
            name: "web".into(),
            kind: "exec".into(),
            config: json!({"command": "/bin/sleep", "args": ["1000"]}),
            secrets: BTreeMap::from([("DB_PASSWORD".into(), Secret::new("hunter2"))]),
            replicas: 3,
            singleton: false,
            constraints: vec![
                ConstraintSpec {
                    label: "zone".into(),
                    equals: Some("a".into()),
                    in_: None,
                },
                ConstraintSpec {
                    label: "disk".into(),
                    equals: None,
                    in_: Some(vec!["ssd".into(), "nvme".into()]),
                },
            ],
            spread: Some("zone".into()),
            anti_affinity: vec!["db".into()],
            cost: 2,
            depends_on: vec!["db".into()],
            restart: RestartPolicy {
                max_restarts: 3,
                within_s: 10,
                backoff_initial_ms: 200,
                backoff_max_ms: 5000,
            },
            stop_grace_s: 20,
            update: UpdatePolicy {
                max_unavailable: Amount::Percent(25),
                min_healthy_ms: 500,
                deadline_s: 60,
                auto_revert: true,
            },
            health: Some(Box::new(HealthCheck {
                probe: Probe::Http {
                    port: 8080,
                    path: "/healthz".into(),
                },
                port_plus_slot: true,
                interval_ms: 200,
                timeout_ms: 1000,
                healthy_threshold: 1,
                unhealthy_threshold: 2,
            })),
            generation: 0,
        };
        assert_eq!(got, want);
        assert_eq!(got.health.as_ref().and_then(|h| h.port(3)), Some(8083));
        assert_eq!(got.stop_grace(), Duration::from_secs(20));
        assert_eq!(got.restart.within(), Duration::from_secs(10));
        assert_eq!(got.restart.backoff_initial(), Duration::from_millis(200));
        assert_eq!(got.restart.backoff_max(), Duration::from_millis(5000));
    }

    #[test]
    fn defaults() {
        let got = parse_one("name: web\nkind: exec\n").unwrap();
        assert_eq!(got, spec("web"));
        assert_eq!(got.replicas, 1);
        assert!(!got.singleton);
        assert_eq!(got.cost, 1);
        assert_eq!(got.stop_grace_s, 10);
        assert_eq!(got.config, serde_json::Value::Null);
        assert_eq!(
            got.restart,
            RestartPolicy {
                max_restarts: 5,
                within_s: 30,
                backoff_initial_ms: 100,
                backoff_max_ms: 10_000
            }
        );
        assert!(got.constraints.is_empty() && got.depends_on.is_empty());
        assert!(got.anti_affinity.is_empty() && got.spread.is_none());
        assert_eq!(got.instances(), 1);
    }

    #[test]
    fn partial_restart_keeps_other_defaults() {
        let got = parse_one("name: web\nkind: exec\nrestart:\n  max_restarts: 2\n").unwrap();
        assert_eq!(
            got.restart,
            RestartPolicy {
                max_restarts: 2,
                ..RestartPolicy::default()
            }
        );
    }

    #[test]
    fn explicit_null_means_default() {
        let got =
            parse_one("name: web\nkind: exec\nreplicas:\ndepends_on:\nrestart:\nconstraints: ~\n")
                .unwrap();
        assert_eq!(got, spec("web"));
    }

    #[test]
    fn generation_is_accepted_and_ignored() {
        let got = parse_one("name: web\nkind: exec\ngeneration: 7\n").unwrap();
        assert_eq!(got.generation, 0);
    }

    #[test]
    fn json_single_object() {
        let got = parse_one(r#"{"name": "web", "kind": "exec", "replicas": 2, "config": {"x": [1, 2.5, true, null]}}"#)
            .unwrap();
        assert_eq!(got.replicas, 2);
        assert_eq!(got.config, json!({"x": [1, 2.5, true, null]}));
    }

    #[test]
    fn json_list_pretty_printed_with_tabs() {
        let text = "[\n\t{\n\t\t\"name\": \"a\",\n\t\t\"kind\": \"exec\"\n\t},\n\t{\"name\": \"b\", \"kind\": \"exec\", \"depends_on\": [\"a\"]}\n]\n";
        let got = parse_specs("s.json", text).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "a");
        assert_eq!(got[1].depends_on, vec!["a".to_string()]);
    }

    #[test]
    fn yaml_list() {
        let got = parse_specs(
            "t.yaml",
            "- name: a\n  kind: exec\n- name: b\n  kind: exec\n",
        )
        .unwrap();
        let names: Vec<_> = got.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn multi_document_yaml() {
        let text = "---\nname: a\nkind: exec\n---\n# only a comment\n---\n- name: b\n  kind: exec\n- name: c\n  kind: exec\n---\nname: d\nkind: exec\n";
        let got = parse_specs("t.yaml", text).unwrap();
        let names: Vec<_> = got.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
    }

    #[test]
    fn round_trip_through_json() {
        let s = parse_one(FULL).unwrap();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""in":["ssd","nvme"]"#), "{text}");
        let back: ServiceSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        // What the cluster hands back can be applied again.
        assert_eq!(parse_one(&text).unwrap(), s);
    }

    #[test]
    fn old_stored_spec_reads_with_defaults() {
        // The replicated state's JSON before the spec grew.
        let old = r#"{"name":"web","kind":"exec","config":null,"replicas":2,"generation":4}"#;
        let got: ServiceSpec = serde_json::from_str(old).unwrap();
        assert_eq!(got.replicas, 2);
        assert_eq!(got.generation, 4);
        assert_eq!(got.cost, 1);
        assert_eq!(got.restart, RestartPolicy::default());
        assert_eq!(got.stop_grace_s, 10);
    }

    #[test]
    fn empty_file_is_an_error() {
        for text in ["", "# nothing\n", "---\n---\n", "[]"] {
            let e = parse_err(text);
            assert_eq!(e.file.as_deref(), Some("t.yaml"));
            assert!(e.problem.contains("no service spec"), "{e}");
        }
    }

    #[test]
    fn unknown_top_level_field_names_it_and_lists_allowed() {
        let e = parse_err("name: web\nkind: exec\nreplica: 3\n");
        let msg = e.to_string();
        assert!(msg.starts_with("t.yaml: spec 'web': "), "{msg}");
        assert!(msg.contains("`replica`"), "{msg}");
        for allowed in [
            "name",
            "kind",
            "replicas",
            "singleton",
            "depends_on",
            "stop_grace_s",
        ] {
            assert!(
                msg.contains(&format!("`{allowed}`")),
                "{allowed} missing in {msg}"
            );
        }
        assert!(msg.contains("did you mean `replicas`?"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn unknown_nested_fields_name_their_parent() {
        let e = parse_err("name: web\nkind: exec\nrestart:\n  max_restart: 3\n");
        assert_eq!(e.field.as_deref(), Some("restart"), "{e}");
        assert!(e.problem.contains("`max_restart`"), "{e}");
        assert!(e.problem.contains("`within_s`"), "{e}");
        assert!(e.problem.contains("did you mean `max_restarts`?"), "{e}");

        let e = parse_err("name: web\nkind: exec\nconstraints:\n  - label: zone\n    eq: a\n");
        assert_eq!(e.field.as_deref(), Some("constraints[0]"), "{e}");
        assert!(
            e.problem.contains("`eq`") && e.problem.contains("`equals`"),
            "{e}"
        );
        assert!(e.problem.contains("`in`"), "{e}");
    }

    #[test]
    fn wrong_type_has_line_and_field() {
        let e = parse_err("name: web\nkind: exec\nreplicas: three\n");
        assert_eq!(e.spec.as_deref(), Some("web"));
        assert_eq!(e.field.as_deref(), Some("replicas"));
        let msg = e.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(
            msg.starts_with("t.yaml: spec 'web': field 'replicas': invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_in_a_list_finds_the_spec_name() {
        let text = "- name: a\n  kind: exec\n- name: b\n  kind: exec\n  cost: -1\n";
        let e = parse_err(text);
        assert_eq!(e.spec.as_deref(), Some("b"), "{e}");
        assert_eq!(e.field.as_deref(), Some("cost"), "{e}");
        assert!(e.problem.contains("line 5"), "{e}");

        let text = "name: a\nkind: exec\n---\nname: b\nkind: exec\nrestart:\n  within_s: soon\n";
        let e = parse_err(text);
        assert_eq!(e.spec.as_deref(), Some("b"), "{e}");
        assert_eq!(e.field.as_deref(), Some("restart.within_s"), "{e}");
        assert!(e.problem.contains("line 7"), "{e}");
    }

    #[test]
    fn missing_required_field() {
        let e = parse_err("name: web\nreplicas: 2\n");
        assert!(e.problem.contains("missing field `kind`"), "{e}");
        assert_eq!(e.spec.as_deref(), Some("web"));
    }

    #[test]
    fn not_a_spec() {
        let e = parse_err("just a string\n");
        assert!(e.problem.contains("a service spec"), "{e}");
        let e = parse_err("- 1\n- 2\n");
        assert!(e.problem.contains("invalid type"), "{e}");
    }

    #[test]
    fn yaml_syntax_error_has_line() {
        let e = parse_err("name: web\nkind: exec\nconstraints: [zone\n");
        assert_eq!(e.file.as_deref(), Some("t.yaml"));
        assert!(e.problem.contains("line "), "{e}");
    }

    #[test]
    fn parse_validates_each_spec() {
        let e = parse_err("name: web\nkind: exec\ncost: 0\n");
        assert_eq!(
            e.to_string(),
            "t.yaml: spec 'web': field 'cost': must be at least 1 (capacity units per instance)"
        );
    }

    #[test]
    fn duplicate_in_a_file() {
        let e = parse_err("- name: a\n  kind: exec\n- name: a\n  kind: exec\n");
        assert_eq!(e.spec.as_deref(), Some("a"));
        assert!(e.problem.contains("twice"), "{e}");
    }

    #[test]
    fn names() {
        for good in ["a", "web", "web-2", "a1", &"a".repeat(63)] {
            assert!(is_valid_name(good), "{good}");
            assert_eq!(spec(good).validate(), Ok(()));
        }
        for bad in [
            "",
            "Web",
            "2web",
            "-web",
            "web_1",
            "web.1",
            "wéb",
            &"a".repeat(64),
        ] {
            let e = invalid(|s| s.name = bad.to_string());
            assert_eq!(e.field.as_deref(), Some("name"), "{bad}");
            assert_eq!(e.spec, None);
            assert!(e.problem.contains("lowercase letters"), "{e}");
        }
    }

    #[test]
    fn kind_required() {
        let e = invalid(|s| s.kind = " ".into());
        assert_eq!(e.field.as_deref(), Some("kind"));
        assert_eq!(e.spec.as_deref(), Some("web"));
    }

    #[test]
    fn singleton_with_replicas() {
        let e = invalid(|s| {
            s.singleton = true;
            s.replicas = 3;
        });
        assert_eq!(e.field.as_deref(), Some("replicas"));
        assert!(e.problem.contains(
            "singleton services have exactly one instance; drop `replicas` or set it to 1"
        ));
        let e = invalid(|s| {
            s.singleton = true;
            s.replicas = 0;
        });
        assert_eq!(e.field.as_deref(), Some("replicas"));

        let mut s = spec("web");
        s.singleton = true;
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.instances(), 1);
        // From YAML: `singleton: true` alone is fine.
        let got = parse_one("name: web\nkind: exec\nsingleton: true\n").unwrap();
        assert_eq!(got.instances(), 1);
    }

    #[test]
    fn zero_replicas_allowed() {
        let mut s = spec("web");
        s.replicas = 0;
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.instances(), 0);
    }

    fn constraint(label: &str, equals: Option<&str>, in_: Option<&[&str]>) -> ConstraintSpec {
        ConstraintSpec {
            label: label.into(),
            equals: equals.map(str::to_string),
            in_: in_.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn constraint_needs_exactly_one_of_equals_and_in() {
        let ok = constraint("zone", Some("a"), None);
        let e = invalid(|s| {
            s.constraints = vec![ok.clone(), constraint("disk", Some("ssd"), Some(&["ssd"]))]
        });
        assert_eq!(e.field.as_deref(), Some("constraints[1]"));
        assert!(e.problem.contains("both"), "{e}");

        let e = invalid(|s| s.constraints = vec![ok.clone(), constraint("disk", None, None)]);
        assert_eq!(e.field.as_deref(), Some("constraints[1]"));
        assert!(e.problem.contains("exactly one of `equals"), "{e}");
    }

    #[test]
    fn constraint_in_not_empty() {
        let e = invalid(|s| s.constraints = vec![constraint("disk", None, Some(&[]))]);
        assert_eq!(e.field.as_deref(), Some("constraints[0].in"));
    }

    #[test]
    fn constraint_label_required() {
        let e = invalid(|s| s.constraints = vec![constraint("", Some("a"), None)]);
        assert_eq!(e.field.as_deref(), Some("constraints[0].label"));
    }

    #[test]
    fn constraint_from_yaml() {
        let e = parse_err("name: web\nkind: exec\nconstraints:\n  - label: zone\n");
        assert_eq!(
            e.to_string().split(": ").take(3).collect::<Vec<_>>(),
            ["t.yaml", "spec 'web'", "field 'constraints[0]'"]
        );
    }

    #[test]
    fn cost_at_least_one() {
        let e = invalid(|s| s.cost = 0);
        assert_eq!(e.field.as_deref(), Some("cost"));
    }

    #[test]
    fn restart_ranges() {
        let e = invalid(|s| s.restart.max_restarts = 0);
        assert_eq!(e.field.as_deref(), Some("restart.max_restarts"));
        let e = invalid(|s| s.restart.within_s = 0);
        assert_eq!(e.field.as_deref(), Some("restart.within_s"));
        let e = invalid(|s| {
            s.restart.backoff_initial_ms = 2000;
            s.restart.backoff_max_ms = 1000;
        });
        assert_eq!(e.field.as_deref(), Some("restart.backoff_initial_ms"));
        assert!(e.problem.contains("restart.backoff_max_ms"), "{e}");
        let mut s = spec("web");
        s.restart.backoff_initial_ms = 500;
        s.restart.backoff_max_ms = 500;
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn stop_grace_range() {
        for bad in [0, 3601] {
            let e = invalid(|s| s.stop_grace_s = bad);
            assert_eq!(e.field.as_deref(), Some("stop_grace_s"));
            assert!(e.problem.contains("between 1 and 3600"), "{e}");
        }
        for good in [1, 3600] {
            let mut s = spec("web");
            s.stop_grace_s = good;
            assert_eq!(s.validate(), Ok(()));
        }
    }

    #[test]
    fn spread_not_empty() {
        let e = invalid(|s| s.spread = Some(String::new()));
        assert_eq!(e.field.as_deref(), Some("spread"));
    }

    #[test]
    fn references_must_be_names_and_not_self() {
        let e = invalid(|s| s.depends_on = vec!["db".into(), "web".into()]);
        assert_eq!(e.field.as_deref(), Some("depends_on[1]"));
        assert!(e.problem.contains("cannot depend on itself"), "{e}");
        let e = invalid(|s| s.anti_affinity = vec!["web".into()]);
        assert_eq!(e.field.as_deref(), Some("anti_affinity[0]"));
        assert!(e.problem.contains("cannot be anti-affine to itself"), "{e}");
        let e = invalid(|s| s.depends_on = vec!["Bad Name".into()]);
        assert_eq!(e.field.as_deref(), Some("depends_on[0]"));
    }

    #[test]
    fn display_formats() {
        let e = SpecError::new("boom");
        assert_eq!(e.to_string(), "boom");
        let e = e
            .with_field("replicas")
            .with_spec("web")
            .with_file("web.yaml");
        assert_eq!(
            e.to_string(),
            "web.yaml: spec 'web': field 'replicas': boom"
        );
    }

    #[test]
    fn set_ok_with_existing() {
        let existing = [spec("db")];
        let mut web = with_deps("web", &["db", "cache"]);
        web.anti_affinity = vec!["db".into()];
        assert_eq!(validate_set(&[web, spec("cache")], &existing), Ok(()));
    }

    #[test]
    fn set_validates_each_spec() {
        let mut bad = spec("web");
        bad.cost = 0;
        let e = validate_set(&[bad], &[]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cost"));
    }

    #[test]
    fn set_duplicate_names() {
        let e = validate_set(&[spec("a"), spec("b"), spec("a")], &[]).unwrap_err();
        assert_eq!(e.spec.as_deref(), Some("a"));
        assert!(e.problem.contains("twice"), "{e}");
        // Replacing a stored spec is not a duplicate.
        assert_eq!(validate_set(&[spec("a")], &[spec("a")]), Ok(()));
    }

    #[test]
    fn set_unknown_dependency() {
        let e = validate_set(&[with_deps("web", &["db"])], &[spec("cache")]).unwrap_err();
        assert_eq!(e.spec.as_deref(), Some("web"));
        assert_eq!(e.field.as_deref(), Some("depends_on[0]"));
        assert!(e.problem.contains("unknown service 'db'"), "{e}");
    }

    #[test]
    fn set_unknown_anti_affinity() {
        let mut web = spec("web");
        web.anti_affinity = vec!["db".into()];
        let e = validate_set(&[web], &[]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("anti_affinity[0]"));
        assert!(e.problem.contains("unknown service 'db'"), "{e}");
    }

    #[test]
    fn set_self_dependency() {
        let e = validate_set(&[with_deps("a", &["a"])], &[]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("depends_on[0]"));
        assert!(e.problem.contains("itself"), "{e}");
    }

    #[test]
    fn set_cycle_lists_the_path() {
        let new = [
            with_deps("a", &["b"]),
            with_deps("b", &["c"]),
            with_deps("c", &["a"]),
        ];
        let e = validate_set(&new, &[]).unwrap_err();
        assert!(e.problem.contains("a -> b -> c -> a"), "{e}");
        assert_eq!(e.spec.as_deref(), Some("a"));
        assert_eq!(e.field.as_deref(), Some("depends_on"));
    }

    #[test]
    fn set_cycle_through_existing() {
        let existing = [with_deps("b", &["c"]), with_deps("c", &["a"]), spec("a")];
        // Storing the new `a` closes the cycle.
        let e = validate_set(&[with_deps("a", &["b"])], &existing).unwrap_err();
        assert!(e.problem.contains("a -> b -> c -> a"), "{e}");
        // Replacing a stored spec can break one too.
        let existing = [with_deps("a", &["b"]), with_deps("b", &["a"])];
        assert_eq!(validate_set(&[spec("b")], &existing), Ok(()));
    }

    #[test]
    fn set_cycle_not_through_the_root() {
        let new = [
            with_deps("x", &["a"]),
            with_deps("a", &["b"]),
            with_deps("b", &["a"]),
        ];
        let e = validate_set(&new, &[]).unwrap_err();
        assert!(e.problem.contains("dependency cycle: a -> b -> a"), "{e}");
    }

    #[test]
    fn set_diamond_is_not_a_cycle() {
        let new = [
            with_deps("app", &["left", "right"]),
            with_deps("left", &["db"]),
            with_deps("right", &["db"]),
            spec("db"),
        ];
        assert_eq!(validate_set(&new, &[]), Ok(()));
    }

    #[test]
    fn set_long_chain_does_not_overflow() {
        let n = 20_000;
        let mut specs: Vec<ServiceSpec> = (0..n)
            .map(|i| with_deps(&format!("s{i}"), &[&format!("s{}", i + 1)]))
            .collect();
        specs.push(spec(&format!("s{n}")));
        assert_eq!(validate_set(&specs, &[]), Ok(()));
        let order = dependency_order(&specs);
        assert_eq!(order.first().map(String::as_str), Some("s20000"));
        assert_eq!(order.last().map(String::as_str), Some("s0"));
    }

    #[test]
    fn dependency_order_dependencies_first_ties_by_name() {
        let specs = [
            with_deps("web", &["db", "cache"]),
            with_deps("cache", &["db"]),
            spec("db"),
            spec("zeta"),
            spec("alpha"),
            with_deps("worker", &["queue", "external"]),
            spec("queue"),
        ];
        assert_eq!(
            dependency_order(&specs),
            ["alpha", "db", "cache", "queue", "web", "worker", "zeta"]
        );
    }

    #[test]
    fn dependency_order_with_a_cycle_still_lists_everyone() {
        let specs = [
            with_deps("a", &["b"]),
            with_deps("b", &["a"]),
            spec("c"),
            spec("c"),
        ];
        assert_eq!(dependency_order(&specs), ["c", "a", "b"]);
    }

    #[test]
    fn to_view_maps_every_field() {
        let mut s = parse_one(FULL).unwrap();
        s.anti_affinity = vec!["db".into(), "cache".into(), "db".into()];
        let view = s.to_view();
        assert_eq!(
            view,
            SpecView {
                name: "web".into(),
                kind: "exec".into(),
                replicas: 3,
                constraints: vec![
                    Constraint::Equals {
                        label: "zone".into(),
                        value: "a".into()
                    },
                    Constraint::In {
                        label: "disk".into(),
                        values: ["nvme".to_string(), "ssd".to_string()].into(),
                    },
                ],
                spread: Some("zone".into()),
                anti_affinity: ["cache".to_string(), "db".to_string()].into(),
                cost: 2,
            }
        );
        s.singleton = true;
        s.replicas = 1;
        assert_eq!(s.to_view().replicas, 1);
    }

    #[test]
    fn to_view_of_an_invalid_constraint_matches_nothing() {
        let mut s = spec("web");
        s.constraints = vec![constraint("zone", None, None)];
        assert_eq!(
            s.to_view().constraints,
            vec![Constraint::In {
                label: "zone".into(),
                values: BTreeSet::new()
            }]
        );
    }

    fn with_secret(name: &str, value: &str) -> ServiceSpec {
        let mut s = spec("web");
        s.secrets.insert(name.into(), Secret::new(value));
        s
    }

    #[test]
    fn debug_of_a_spec_names_its_secrets_but_never_shows_a_value() {
        let s = parse_one(FULL).unwrap();
        for text in [format!("{s:?}"), format!("{s:#?}")] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("DB_PASSWORD"), "{text}");
        }
    }

    #[test]
    fn redacted_replaces_every_value_and_keeps_the_names() {
        let mut s = with_secret("DB_PASSWORD", "hunter2");
        s.secrets.insert("API_KEY".into(), Secret::new("k-123"));
        let r = s.redacted();
        assert_eq!(
            r.secrets.keys().collect::<Vec<_>>(),
            ["API_KEY", "DB_PASSWORD"]
        );
        assert!(r
            .secrets
            .values()
            .all(|v| v.expose() == secret::PLACEHOLDER));
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            !json.contains("hunter2") && !json.contains("k-123"),
            "{json}"
        );
        // Everything else is as it was; the original keeps its values.
        assert_eq!(
            ServiceSpec {
                secrets: s.secrets.clone(),
                ..r
            },
            s
        );
        assert_eq!(s.secrets["DB_PASSWORD"].expose(), "hunter2");
    }

    #[test]
    fn a_changed_secret_replaces_instances() {
        let a = with_secret("DB_PASSWORD", "hunter2");
        let b = with_secret("DB_PASSWORD", "hunter3");
        assert_ne!(a.runtime(), b.runtime());
        assert_eq!(a.runtime(), a.clone().runtime());
    }

    #[test]
    fn secrets_are_checked_without_repeating_a_value() {
        let e = invalid(|s| {
            s.secrets
                .insert("DB-PASSWORD".into(), Secret::new("hunter2"));
        });
        assert_eq!(e.field.as_deref(), Some("secrets.DB-PASSWORD"));
        let e = invalid(|s| {
            s.secrets.insert("MODE_SLOT".into(), Secret::new("hunter2"));
        });
        assert!(e.problem.contains("MODE_"), "{e}");
        let e = invalid(|s| {
            s.secrets.insert("A".into(), Secret::new("hun\0ter2"));
        });
        assert!(e.problem.contains("NUL"), "{e}");
        let e = invalid(|s| {
            s.secrets.insert("A".into(), Secret::placeholder());
        });
        assert!(e.problem.contains("real value"), "{e}");
        // Not a string: refused by the parser, without the value.
        let e = parse_err("name: web\nkind: exec\nsecrets: {PIN: 4711}\n").to_string();
        assert!(e.contains("must be a string") && !e.contains("4711"), "{e}");
        let e = parse_err("name: web\nkind: exec\nsecrets: [hunter2]\n").to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(
            parse_one("name: web\nkind: exec\nsecrets: {PIN: \"0123\", EMPTY: \"\"}\n")
                .unwrap()
                .secrets["PIN"]
                .expose(),
            "0123"
        );
    }

    #[test]
    fn a_name_in_both_secrets_and_config_env_is_refused() {
        let e = invalid(|s| {
            s.config = json!({"command": "/bin/env", "env": {"DB_PASSWORD": "visible"}});
            s.secrets
                .insert("DB_PASSWORD".into(), Secret::new("hunter2"));
        });
        assert_eq!(e.field.as_deref(), Some("secrets.DB_PASSWORD"));
        assert!(e.problem.contains("config.env"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let mut ok = with_secret("DB_PASSWORD", "hunter2");
        ok.config = json!({"command": "/bin/env", "env": {"DB_USER": "app"}});
        ok.validate().unwrap();
    }

    #[test]
    fn secrets_have_limits() {
        let e = invalid(|s| {
            for i in 0..=crate::model::limits::MAX_LIST_LEN {
                s.secrets.insert(format!("S{i}"), Secret::new("x"));
            }
        });
        assert_eq!(e.field.as_deref(), Some("secrets"));
        assert!(e.problem.contains("entries"), "{e}");
        let big = "x".repeat(crate::model::limits::MAX_SECRETS_BYTES);
        let e = invalid(|s| {
            s.secrets.insert("BIG".into(), Secret::new(big));
        });
        assert_eq!(e.field.as_deref(), Some("secrets"));
        assert!(
            e.problem.contains("bytes") && !e.problem.contains("xxx"),
            "{e}"
        );
    }
}
