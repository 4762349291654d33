//! The replicated domain state — nodes, service specs, placements and a bounded event log —
//! and the typed commands that change it. Applying a command is pure and deterministic: every
//! node applies the same committed commands in the same order and reaches the same state.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// How many events the state keeps; older ones are dropped.
pub const MAX_EVENTS: usize = 10_000;

/// A node's status as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Healthy and eligible for placements.
    #[default]
    Up,
    /// Missed its heartbeats.
    Down,
    /// Being emptied; no new placements.
    Draining,
}

impl NodeStatus {
    /// `up`, `down` or `draining`, as in its JSON form.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Up => "up",
            NodeStatus::Down => "down",
            NodeStatus::Draining => "draining",
        }
    }
}

/// What a node is: a server (a Raft member that also runs an agent) or an agent-only node
/// (runs instances, fed by a server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Raft member, public API, and an agent.
    #[default]
    Server,
    /// Only an agent (`mode-node --role agent --servers ...`).
    Agent,
}

impl NodeRole {
    /// `server` or `agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Server => "server",
            NodeRole::Agent => "agent",
        }
    }
}

/// A cluster member as recorded in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node id (`--id`).
    pub id: u64,
    /// Its peer address (`--advertise-peer`): Raft, forwarding, beacons.
    pub address: String,
    /// Its public API address (`--advertise`; empty for an agent-only node).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_address: String,
    /// Server or agent-only.
    #[serde(default)]
    pub role: NodeRole,
    /// Labels for placement constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Capacity units available for placements.
    #[serde(default)]
    pub capacity: u64,
    /// Status.
    #[serde(default)]
    pub status: NodeStatus,
    /// Service kinds it can run.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Drained by an operator: stays so across being down and back (until undrained).
    #[serde(default)]
    pub draining: bool,
    /// When it registered (leader's clock, ms since the epoch).
    #[serde(default)]
    pub registered_at_ms: u64,
    /// The incarnation of its data directory (random, made when the directory was created; 0
    /// when unknown). A node whose directory was wiped comes back with another one and is
    /// refused: it must never vote or acknowledge as the member it was.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub use crate::model::spec::ServiceSpec;

/// Where an instance runs and how it is doing, as last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The node it is assigned to.
    pub node: u64,
    /// Reported state: `pending` until its node reports.
    #[serde(default = "pending")]
    pub state: String,
    /// Restarts reported by its node for the current run (0 again after each move,
    /// reschedule or requested restart: the node starts a fresh copy).
    #[serde(default)]
    pub restart_count: u32,
    /// Restarts of this instance in total, carried across moves and reschedules: every
    /// increase of `restart_count` a node reported, plus one per reschedule after an escalated
    /// crash. Starts again at 0 only when a rollout replaces it with a new version.
    #[serde(default)]
    pub restarts_total: u32,
    /// The last crash reason reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crash: Option<String>,
    /// While draining: the node it is moving away from, which keeps running it until the new
    /// instance runs (make before break).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_from: Option<u64>,
    /// Nodes where this instance exceeded its restart intensity; placed elsewhere if possible.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<u64>,
    /// Times the control plane moved it after an escalated crash.
    #[serde(default)]
    pub reschedules: u32,
    /// Bumped to ask its node to restart it (rolling restarts).
    #[serde(default)]
    pub restart_seq: u64,
    /// The trace context of the decision that placed it, when traced (its node's agent
    /// continues the trace when it starts the instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Fencing token: the log index of the command that (re)assigned or restarted it. Only
    /// increases; the instance gets it (`MODE_FENCING_TOKEN`) and its reports carry it, so
    /// reports about an older assignment are discarded.
    #[serde(default)]
    pub epoch: u64,
    /// When it was reported failed (proposer's clock, ms since the epoch): the reschedule
    /// backoff counts from here, on whichever node leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at_ms: Option<u64>,
    /// The generation of the spec version it runs (or is set to run): a rollout replaces the
    /// instances of older ones (0: placed before versions were tracked).
    #[serde(default)]
    pub generation: u64,
    /// Since when it has been running without a restart (proposer's clock, ms since the
    /// epoch): a rollout waits `update.min_healthy_ms` from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_since_ms: Option<u64>,
    /// Its health check's verdict as last reported (`None`: no check, or none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// When its last crash was reported (proposer's clock, ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crash_at_ms: Option<u64>,
    /// The generation it ran when it last crashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crash_generation: Option<u64>,
    /// While `crashed`: when its node restarts it (the node's clock, ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
}

impl Placement {
    /// A new placement on `node`.
    pub fn on(node: u64) -> Placement {
        Placement {
            node,
            state: pending(),
            restart_count: 0,
            restarts_total: 0,
            last_crash: None,
            moving_from: None,
            avoid: Vec::new(),
            reschedules: 0,
            restart_seq: 0,
            trace: None,
            epoch: 0,
            failed_at_ms: None,
            generation: 0,
            running_since_ms: None,
            healthy: None,
            last_crash_at_ms: None,
            last_crash_generation: None,
            retry_at_ms: None,
        }
    }
}

/// The first few of `items`, comma-separated, with how many more there are.
fn shown(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut out = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        out.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    out
}

impl Placement {
    /// Its restarts in total ([`Placement::restarts_total`]; for a placement stored before
    /// that was counted, at least the restarts of its current run).
    pub fn total_restarts(&self) -> u32 {
        self.restarts_total.max(self.restart_count)
    }

    /// Count `n` more restarts of this instance of `service`, in its total and in the
    /// service's (`service_restarts`).
    fn count_restarts(
        &mut self,
        n: u32,
        service: &str,
        service_restarts: &mut BTreeMap<String, u64>,
    ) {
        if n == 0 {
            return;
        }
        self.restarts_total = self.total_restarts().saturating_add(n);
        let total = service_restarts.entry(service.to_string()).or_default();
        *total = total.saturating_add(u64::from(n));
    }
}

fn pending() -> String {
    "pending".to_string()
}

/// Instance `slot` of `service` on `node`, in a placement command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAssignment {
    /// Service name.
    pub service: String,
    /// Instance number.
    pub slot: u32,
    /// Node id.
    pub node: u64,
    /// For a make-before-break move (drain): the node that keeps it until it runs here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_from: Option<u64>,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing sequence number.
    pub seq: u64,
    /// Leader's clock, ms since the epoch.
    pub time_ms: u64,
    /// Short kind, e.g. `node-registered`, `spec-applied`.
    pub kind: String,
    /// What happened, for people.
    pub message: String,
    /// The service concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The node concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// Who made the change, when a client did (`alice (operator, certificate)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A bearer token's record: only its hash is kept (see [`crate::security::tokens`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its id (the part of the token before the secret; shown and used to revoke it).
    pub id: String,
    /// What it is for (shown in events as who made a change).
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
    /// When it stops working (ms since the epoch; 0: never).
    #[serde(default)]
    pub expires_ms: u64,
    /// Who made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

/// A change to the replicated state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Add or update a node.
    RegisterNode {
        /// Node id.
        id: u64,
        /// gRPC address.
        address: String,
        /// Labels.
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// Capacity units.
        #[serde(default)]
        capacity: u64,
        /// Service kinds it can run.
        #[serde(default)]
        kinds: Vec<String>,
        /// Its data directory's incarnation (0: unknown).
        #[serde(default)]
        incarnation: u64,
        /// Its `--heartbeat-grace` in ms (0: unknown): every node must use the cluster's.
        #[serde(default)]
        heartbeat_grace_ms: u64,
        /// Its public API address ("" for an agent-only node).
        #[serde(default)]
        api_address: String,
        /// Server or agent-only.
        #[serde(default)]
        role: NodeRole,
    },
    /// Change a node's status.
    SetNodeStatus {
        /// Node id.
        id: u64,
        /// New status.
        status: NodeStatus,
    },
    /// Forget a node.
    RemoveNode {
        /// Node id.
        id: u64,
    },
    /// Store (create or replace) a service spec.
    PutSpec {
        /// The spec.
        spec: ServiceSpec,
    },
    /// Store several specs atomically, validated against the committed state when applied:
    /// names, references and dependency cycles among the stored and new specs, limits, kinds
    /// some node offers, and compare-and-set on generations. All are stored, or none.
    ApplySpecs {
        /// The specs (their `generation` is ignored: the state machine sets it).
        specs: Vec<ServiceSpec>,
        /// Compare-and-set: service name -> the generation it must have (0: must not exist).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        expected: BTreeMap<String, u64>,
    },
    /// Change a stored spec's replica count.
    ScaleSpec {
        /// The service.
        name: String,
        /// The new replica count.
        replicas: u32,
        /// Compare-and-set: refuse unless the stored generation is this (0: any).
        #[serde(default)]
        expected_generation: u64,
    },
    /// Delete a service spec.
    DeleteSpec {
        /// Its name.
        name: String,
        /// Delete it even though other services depend on it (they stop first).
        #[serde(default)]
        force: bool,
    },
    /// Apply a scheduler decision: assign instances to nodes and remove others.
    Place {
        /// New or moved instances.
        #[serde(default)]
        assign: Vec<SlotAssignment>,
        /// Instances to remove.
        #[serde(default)]
        unassign: Vec<SlotAssignment>,
    },
    /// A node reports the state of one of its instances.
    ReportInstance {
        /// Service name.
        service: String,
        /// Instance number.
        slot: u32,
        /// Reporting node.
        node: u64,
        /// `starting`, `running`, `crashed` (restarting locally), `failed` (restart intensity
        /// exceeded), `waiting` (for a dependency) or `stopped`.
        state: String,
        /// Restarts by the node's supervisor.
        #[serde(default)]
        restart_count: u32,
        /// The last crash reason.
        #[serde(default)]
        last_crash: Option<String>,
        /// The fencing token of the placement the instance was started for (0: unknown).
        #[serde(default)]
        epoch: u64,
        /// Its health check's verdict (`None`: no check, or none yet).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        healthy: Option<bool>,
        /// While `crashed`: when its node restarts it (ms since the epoch).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at_ms: Option<u64>,
    },
    /// A moved instance runs on its new node: release the old one.
    FinishMove {
        /// Service name.
        service: String,
        /// Instance number.
        slot: u32,
    },
    /// The node a singleton is moving away from has stopped it: the new node may start it.
    ReleaseMove {
        /// Service name.
        service: String,
        /// Instance number.
        slot: u32,
        /// The node that stopped it.
        node: u64,
    },
    /// Several reports of one node's agent, committed as one command (an agent-only node sends
    /// its reports in batches). Refused as a whole when `incarnation` is not the node's.
    ReportInstances {
        /// The reporting node.
        node: u64,
        /// Its data directory's incarnation (0: unknown).
        #[serde(default)]
        incarnation: u64,
        /// The reports, applied in order.
        reports: Vec<InstanceReport>,
    },
    /// Ask an instance's node to restart it.
    RestartInstance {
        /// Service name.
        service: String,
        /// Instance number.
        slot: u32,
    },
    /// A rollout step: these instances of `service` are replaced by its current version
    /// (refused unless `generation` is still the current one).
    RollInstances {
        /// Service name.
        service: String,
        /// The version they move to (the current generation).
        generation: u64,
        /// The instances.
        slots: Vec<u32>,
    },
    /// A rollout ended: generation `generation` of `service` rolled out (`failed` is None)
    /// or failed (`failed` says why). Refused unless that version is rolling.
    FinishRollout {
        /// Service name.
        service: String,
        /// The version.
        generation: u64,
        /// Why it failed; None when it succeeded.
        #[serde(default)]
        failed: Option<String>,
    },
    /// Why some instances of a rolling version cannot be placed (None: they can now).
    NoteUnplaced {
        /// Service name.
        service: String,
        /// The rolling version.
        generation: u64,
        /// The reason.
        #[serde(default)]
        unplaced: Option<String>,
    },
    /// Store a kept version of a service's spec again, as a new generation. With
    /// `revert_of`, it is the automatic revert of that failed generation (which is then
    /// marked reverted, with `reason`).
    RollbackSpec {
        /// Service name.
        name: String,
        /// The kept version to restore.
        to_generation: u64,
        /// Compare-and-set: refuse unless the stored generation is this (0: any).
        #[serde(default)]
        expected_generation: u64,
        /// The failed generation this automatically reverts.
        #[serde(default)]
        revert_of: Option<u64>,
        /// Why (for an automatic revert: why the rollout failed).
        #[serde(default)]
        reason: Option<String>,
    },
    /// Forget a deleted service once its instances are gone.
    PurgeSpec {
        /// Its name.
        name: String,
    },
    /// Store a bearer token's record (its hash, never the token).
    CreateToken {
        /// The token's id.
        id: String,
        /// What it is for.
        name: String,
        /// `viewer`, `operator` or `admin`.
        role: String,
        /// SHA-256 of the token, hex.
        hash: String,
        /// When it stops working (ms since the epoch; 0: never).
        #[serde(default)]
        expires_ms: u64,
    },
    /// Forget a token: it no longer works anywhere once applied.
    RevokeToken {
        /// The token's id.
        id: String,
    },
    /// Append an event.
    RecordEvent {
        /// Kind.
        kind: String,
        /// Message.
        message: String,
        /// Service concerned.
        #[serde(default)]
        service: Option<String>,
        /// Node concerned.
        #[serde(default)]
        node: Option<u64>,
    },
}

/// What a planned apply would do to one instance ([`ClusterState::plan_placements`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedInstance {
    /// Service name.
    pub service: String,
    /// Instance number.
    pub slot: u32,
    /// `place`, `move`, `remove`, `replace` or `unplaced`.
    pub action: String,
    /// Where it would run (for `remove`: where it runs now; 0 when unplaced).
    pub node: u64,
    /// For `move`: the node it leaves.
    pub from_node: Option<u64>,
    /// Why (unplaced), or how (replace).
    pub reason: Option<String>,
}

/// One report in [`Command::ReportInstances`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// Service name.
    pub service: String,
    /// Instance number.
    pub slot: u32,
    /// As in [`Command::ReportInstance`].
    pub state: String,
    /// Restarts by the node's supervisor.
    #[serde(default)]
    pub restart_count: u32,
    /// The last crash reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crash: Option<String>,
    /// The fencing token of the placement the instance was started for (0: unknown).
    #[serde(default)]
    pub epoch: u64,
    /// Its health check's verdict (`None`: no check, or none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// While `crashed`: when its node restarts it (ms since the epoch, the node's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
    /// `release` (a singleton moving away was stopped: [`Command::ReleaseMove`]), `finish`
    /// (a moved instance runs on its new node: [`Command::FinishMove`]) or "" (a plain report).
    #[serde(default, rename = "move", skip_serializing_if = "String::is_empty")]
    pub move_: String,
}

impl InstanceReport {
    /// The single command this report stands for, from `node`.
    pub fn to_command(&self, node: u64) -> Result<Command, String> {
        let (service, slot) = (self.service.clone(), self.slot);
        match self.move_.as_str() {
            "" => Ok(Command::ReportInstance {
                service,
                slot,
                node,
                state: self.state.clone(),
                restart_count: self.restart_count,
                last_crash: self.last_crash.clone(),
                epoch: self.epoch,
                healthy: self.healthy,
                retry_at_ms: self.retry_at_ms,
            }),
            "release" => Ok(Command::ReleaseMove {
                service,
                slot,
                node,
            }),
            "finish" => Ok(Command::FinishMove { service, slot }),
            other => Err(format!(
                "report of {service}#{slot}: unknown move '{other}' (use \"release\", \"finish\" or \"\")"
            )),
        }
    }
}

/// A command stamped by the node that proposed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The proposer's wall clock, ms since the epoch (applied as-is, so every replica agrees).
    pub at_ms: u64,
    /// The change.
    pub command: Command,
    /// The W3C trace context of the request that proposed it, when traced: what it causes
    /// later (placements, instance starts) joins the same trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// The request it carries out, when it came from a client: a retried or re-forwarded
    /// write with the same id is applied once (the state machine remembers recent ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Who asked for it, when a client did: events it writes name them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// Proposals committed together as one Raft entry (the leader batches concurrent writes so
/// that one fsync on each node covers many of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Batch {
    /// In apply order. Shared: the log hands out clones of entries for every replication.
    pub proposals: std::sync::Arc<[Proposal]>,
}

/// The outcome of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CommandResult {
    /// Whether it changed the state as asked.
    pub ok: bool,
    /// What happened, or why not.
    pub message: String,
    /// The spec generation stored, for `PutSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The request had been applied already (a retry): this is the first outcome, and
    /// nothing changed now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Why it was refused, for callers that answer with an error code (`None` when it was
    /// not refused, or refused by an older version that did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    /// What an `apply_specs` did to each spec, in the order given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<SpecChange>,
}

/// Why a command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Malformed or invalid (the message names the spec and field).
    Invalid,
    /// The service, node or instance does not exist.
    NotFound,
    /// A compare-and-set lost: the stored generation is not the expected one.
    Conflict,
    /// Refused as asked in the current state (e.g. other services depend on it).
    Precondition,
    /// Over a limit.
    OverLimit,
}

/// What applying a spec does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeAction {
    /// A new service.
    Created,
    /// A stored service changed.
    Updated,
    /// Identical to the stored spec: nothing stored, the generation kept.
    Unchanged,
}

impl ChangeAction {
    /// `created`, `updated` or `unchanged`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeAction::Created => "created",
            ChangeAction::Updated => "updated",
            ChangeAction::Unchanged => "unchanged",
        }
    }
}

/// What an apply did (or, planned, would do) to one spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecChange {
    /// The service.
    pub name: String,
    /// Created, updated or unchanged.
    pub action: ChangeAction,
    /// The generation stored (or that it would get).
    pub generation: u64,
    /// The top-level fields that differ from the stored spec (for `updated`); each secret
    /// added, removed or changed as `secrets.NAME` (never its value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_fields: Vec<String>,
}

impl SpecChange {
    /// For people: `service 'web' updated (generation 3: replicas, config)`.
    pub fn describe(&self) -> String {
        match self.action {
            ChangeAction::Created => format!(
                "service '{}' created (generation {})",
                self.name, self.generation
            ),
            ChangeAction::Updated => format!(
                "service '{}' updated (generation {}: {})",
                self.name,
                self.generation,
                self.changed_fields.join(", ")
            ),
            ChangeAction::Unchanged => format!(
                "service '{}' unchanged (generation {})",
                self.name, self.generation
            ),
        }
    }
}

/// The fields of `new` that differ from `old`, ignoring the generation (top-level names, in
/// the spec's field order), secrets by name (`secrets.DB_PASSWORD`): these names go into
/// events and plans, which every reader sees, so they never carry a value.
fn changed_fields(old: &ServiceSpec, new: &ServiceSpec) -> Vec<String> {
    let as_map = |s: &ServiceSpec| match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (old_map, new_map) = (as_map(old), as_map(new));
    let mut names: Vec<String> = Vec::new();
    for key in new_map.keys().chain(old_map.keys()) {
        if key == "generation" || old_map.get(key) == new_map.get(key) {
            continue;
        }
        let changed = if key == "secrets" {
            let keys: std::collections::BTreeSet<&String> =
                old.secrets.keys().chain(new.secrets.keys()).collect();
            keys.into_iter()
                .filter(|k| old.secrets.get(*k) != new.secrets.get(*k))
                .map(|k| format!("secrets.{k}"))
                .collect()
        } else {
            vec![key.clone()]
        };
        for name in changed {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

impl CommandResult {
    fn ok(message: impl Into<String>) -> Self {
        CommandResult {
            ok: true,
            message: message.into(),
            ..Default::default()
        }
    }

    fn refused(message: impl Into<String>) -> Self {
        CommandResult {
            ok: false,
            message: message.into(),
            ..Default::default()
        }
    }

    fn refused_as(refusal: Refusal, message: impl Into<String>) -> Self {
        CommandResult {
            ok: false,
            message: message.into(),
            refusal: Some(refusal),
            ..Default::default()
        }
    }
}

/// Everything the control plane agrees on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    /// Members by id.
    pub nodes: BTreeMap<u64, NodeInfo>,
    /// Service specs by name.
    pub specs: BTreeMap<String, ServiceSpec>,
    /// Instances by service and slot.
    #[serde(default)]
    pub placements: BTreeMap<String, BTreeMap<u32, Placement>>,
    /// Services being removed: their dependents stop first, then their instances.
    #[serde(default)]
    pub deleting: std::collections::BTreeSet<String>,
    /// The most recent events, oldest first.
    pub events: VecDeque<Event>,
    /// Sequence number of the next event.
    pub next_event_seq: u64,
    /// The trace context of each service's latest traced change (placing its instances
    /// soon after continues that trace).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub traces: BTreeMap<String, TraceMark>,
    /// Outcomes of the most recent client requests, by request id (deduplication).
    #[serde(default, skip_serializing_if = "RequestLog::is_empty")]
    pub requests: RequestLog,
    /// Nodes removed from the cluster, with their data directory's incarnation: the same
    /// directory may not register again (a new one, joining afresh, may).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub removed: BTreeMap<u64, u64>,
    /// The heartbeat grace every node uses (ms; set by the first node that registers): the
    /// singleton lease arithmetic holds only if all nodes agree on it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub heartbeat_grace_ms: u64,
    /// The kept versions of each service, oldest first, the current one last (at most
    /// [`MAX_VERSIONS`](crate::model::rollout::MAX_VERSIONS)), with how each rolled out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, VecDeque<SpecVersion>>,
    /// Bearer tokens by id (hashes only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Restarts of each service's instances in total (see [`Placement::restarts_total`]):
    /// only increases, whatever moves, scales or rolls; forgotten when the service is purged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub restarts: BTreeMap<String, u64>,
}

use crate::model::rollout::{RolloutStatus, SpecVersion};

/// How many request ids the state remembers (a retry older than that many writes applies
/// again; clients retry within seconds).
pub const MAX_REMEMBERED_REQUESTS: usize = 10_000;

/// The most per-service changes an apply's remembered outcome keeps (a retry of a larger apply
/// answers with its summary only).
pub const MAX_REMEMBERED_CHANGES: usize = 100;

/// The outcomes of recent requests, oldest first, bounded by [`MAX_REMEMBERED_REQUESTS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RequestLog {
    order: VecDeque<String>,
    outcomes: BTreeMap<String, CommandResult>,
}

impl RequestLog {
    /// Whether it remembers nothing.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn get(&self, id: &str) -> Option<&CommandResult> {
        self.outcomes.get(id)
    }

    fn remember(&mut self, id: &str, outcome: &CommandResult) {
        let mut outcome = outcome.clone();
        if outcome.changes.len() > MAX_REMEMBERED_CHANGES {
            // Ten thousand remembered applies of a thousand specs each would weigh gigabytes.
            outcome.changes.clear();
            outcome.message.push_str(
                " (the per-service changes of a large apply are not kept for its retries)",
            );
        }
        if self.outcomes.insert(id.to_string(), outcome).is_none() {
            self.order.push_back(id.to_string());
        }
        while self.order.len() > MAX_REMEMBERED_REQUESTS {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
    }
}

/// A trace context and when the change that carried it was proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceMark {
    /// W3C `traceparent`.
    pub context: String,
    /// The proposer's clock, ms since the epoch.
    pub at_ms: u64,
}

impl Command {
    /// What the leader commits when node `id` leaves cleanly (its agent stopped its instances
    /// and said so): down at once, with an event that says it left rather than failed.
    pub fn node_left(id: u64) -> [Command; 2] {
        [
            Command::SetNodeStatus {
                id,
                status: NodeStatus::Down,
            },
            Command::RecordEvent {
                kind: "node-left".to_string(),
                message: format!(
                    "node {id} shut down cleanly after stopping its instances; marked down, its instances move"
                ),
                service: None,
                node: Some(id),
            },
        ]
    }

    /// Its name (`put_spec`, `place`, ...), as in its JSON form.
    pub fn op(&self) -> &'static str {
        match self {
            Command::RegisterNode { .. } => "register_node",
            Command::SetNodeStatus { .. } => "set_node_status",
            Command::RemoveNode { .. } => "remove_node",
            Command::PutSpec { .. } => "put_spec",
            Command::ApplySpecs { .. } => "apply_specs",
            Command::ScaleSpec { .. } => "scale_spec",
            Command::DeleteSpec { .. } => "delete_spec",
            Command::Place { .. } => "place",
            Command::ReportInstance { .. } => "report_instance",
            Command::FinishMove { .. } => "finish_move",
            Command::ReleaseMove { .. } => "release_move",
            Command::ReportInstances { .. } => "report_instances",
            Command::RestartInstance { .. } => "restart_instance",
            Command::RollInstances { .. } => "roll_instances",
            Command::FinishRollout { .. } => "finish_rollout",
            Command::NoteUnplaced { .. } => "note_unplaced",
            Command::RollbackSpec { .. } => "rollback_spec",
            Command::PurgeSpec { .. } => "purge_spec",
            Command::CreateToken { .. } => "create_token",
            Command::RevokeToken { .. } => "revoke_token",
            Command::RecordEvent { .. } => "record_event",
        }
    }
}

impl ClusterState {
    /// A copy without the event log (what the agent and the control loop work from; the
    /// events of a busy cluster are most of its size).
    pub fn without_events(&self) -> ClusterState {
        ClusterState {
            nodes: self.nodes.clone(),
            specs: self.specs.clone(),
            placements: self.placements.clone(),
            deleting: self.deleting.clone(),
            events: VecDeque::new(),
            next_event_seq: self.next_event_seq,
            traces: self.traces.clone(),
            requests: RequestLog::default(),
            removed: self.removed.clone(),
            heartbeat_grace_ms: self.heartbeat_grace_ms,
            versions: self.versions.clone(),
            tokens: self.tokens.clone(),
            restarts: self.restarts.clone(),
        }
    }

    /// Apply one committed proposal outside a log (tests, tools): as at log index 0.
    pub fn apply(&mut self, proposal: &Proposal) -> CommandResult {
        self.apply_at(proposal, 0)
    }

    /// Apply one committed proposal of the entry at log `index`. A request applied before
    /// (same request id) changes nothing and answers its first outcome.
    pub fn apply_at(&mut self, proposal: &Proposal, index: u64) -> CommandResult {
        if let Some(id) = &proposal.request_id {
            if let Some(first) = self.requests.get(id) {
                return CommandResult {
                    duplicate: true,
                    ..first.clone()
                };
            }
        }
        let first_event = self.next_event_seq;
        let outcome = self.apply_command(proposal, index);
        if let Some(by) = &proposal.by {
            // The events this change wrote name who asked for it.
            for e in self.events.iter_mut().rev() {
                if e.seq < first_event {
                    break;
                }
                e.by = Some(by.clone());
            }
        }
        if let Some(id) = &proposal.request_id {
            self.requests.remember(id, &outcome);
        }
        outcome
    }

    fn apply_command(&mut self, proposal: &Proposal, index: u64) -> CommandResult {
        let at = proposal.at_ms;
        // Here, not only at the edge: a command already in a log or snapshot must never crash
        // a replica.
        if let Err(e) = crate::model::limits::check_command(&proposal.command) {
            return self.refuse_over_limit(at, proposal.command.op(), e);
        }
        match &proposal.command {
            Command::RegisterNode {
                id,
                address,
                labels,
                capacity,
                kinds,
                incarnation,
                heartbeat_grace_ms,
                api_address,
                role,
            } => {
                if *heartbeat_grace_ms != 0
                    && self.heartbeat_grace_ms != 0
                    && *heartbeat_grace_ms != self.heartbeat_grace_ms
                {
                    return CommandResult::refused(format!(
                        "node {id} runs with --heartbeat-grace {heartbeat_grace_ms}ms, but this cluster uses {}ms: singleton leases are safe only if every node uses the same; start it with --heartbeat-grace {}ms",
                        self.heartbeat_grace_ms, self.heartbeat_grace_ms
                    ));
                }
                if self.heartbeat_grace_ms == 0 {
                    self.heartbeat_grace_ms = *heartbeat_grace_ms;
                }
                if self.removed.get(id).is_some_and(|r| *r == *incarnation) {
                    return CommandResult::refused(format!(
                        "node {id} was removed from the cluster: it must not come back with the same data. Move its data directory away and start it with --join"
                    ));
                }
                self.removed.remove(id);
                let existing = self.nodes.get(id).cloned();
                let known = existing.as_ref().map_or(0, |n| n.incarnation);
                if known != 0 && *incarnation != 0 && known != *incarnation {
                    return CommandResult::refused(format!(
                        "node {id} is a member whose data directory has incarnation {known:016x}, but this one has {incarnation:016x}: its data was lost or replaced, so it must not act as the member it was. Remove it (`modectl node rm {id}`) and start it again with --join, or start it with --rejoin to come back as a new learner"
                    ));
                }
                let info = NodeInfo {
                    id: *id,
                    address: address.clone(),
                    api_address: api_address.clone(),
                    role: *role,
                    labels: labels.clone(),
                    capacity: *capacity,
                    kinds: kinds.clone(),
                    draining: existing.as_ref().is_some_and(|n| n.draining),
                    status: existing.as_ref().map(|n| n.status).unwrap_or_default(),
                    registered_at_ms: existing.as_ref().map(|n| n.registered_at_ms).unwrap_or(at),
                    incarnation: if *incarnation != 0 {
                        *incarnation
                    } else {
                        known
                    },
                };
                if existing.as_ref() == Some(&info) {
                    return CommandResult::ok(format!("node {id} unchanged"));
                }
                self.nodes.insert(*id, info);
                let msg = match existing {
                    Some(_) => format!("node {id} updated at {address}"),
                    None => format!("node {id} registered at {address}"),
                };
                self.event(at, "node-registered", &msg, None, Some(*id));
                CommandResult::ok(msg)
            }
            Command::SetNodeStatus { id, status } => match self.nodes.get_mut(id) {
                Some(node) if node.status == *status => CommandResult::ok("unchanged"),
                Some(node) => {
                    // Draining is an operator's decision: down-and-back keeps it; `up` ends it.
                    match status {
                        NodeStatus::Draining => node.draining = true,
                        NodeStatus::Up => node.draining = false,
                        NodeStatus::Down => {}
                    }
                    node.status = *status;
                    let msg = format!("node {id} is now {status:?}").to_lowercase();
                    self.event(at, "node-status", &msg, None, Some(*id));
                    CommandResult::ok(msg)
                }
                None => CommandResult::refused_as(Refusal::NotFound, format!("no node {id}")),
            },
            Command::RemoveNode { id } => match self.nodes.remove(id) {
                Some(n) => {
                    if n.incarnation != 0 {
                        self.removed.insert(*id, n.incarnation);
                    }
                    let msg = format!("node {id} removed");
                    self.event(at, "node-removed", &msg, None, Some(*id));
                    CommandResult::ok(msg)
                }
                None => CommandResult::refused_as(Refusal::NotFound, format!("no node {id}")),
            },
            Command::ApplySpecs { specs, expected } => {
                let changes = match self.plan_apply(specs, expected) {
                    Ok(changes) => changes,
                    Err(refused) => return refused,
                };
                for (spec, change) in specs.iter().zip(&changes) {
                    if change.action == ChangeAction::Unchanged {
                        continue;
                    }
                    let mut stored = spec.clone();
                    stored.generation = change.generation;
                    self.store_spec(stored, proposal, &change.describe());
                }
                let count = |a: ChangeAction| changes.iter().filter(|c| c.action == a).count();
                CommandResult {
                    ok: true,
                    message: format!(
                        "{} created, {} updated, {} unchanged",
                        count(ChangeAction::Created),
                        count(ChangeAction::Updated),
                        count(ChangeAction::Unchanged)
                    ),
                    changes,
                    ..Default::default()
                }
            }
            Command::ScaleSpec {
                name,
                replicas,
                expected_generation,
            } => {
                let Some(current) = self.specs.get(name) else {
                    return CommandResult::refused_as(
                        Refusal::NotFound,
                        format!("no service '{name}'"),
                    );
                };
                if *expected_generation != 0 && current.generation != *expected_generation {
                    return CommandResult::refused_as(
                        Refusal::Conflict,
                        format!(
                            "service '{name}' is at generation {}, not the expected {expected_generation}: it changed meanwhile; read it again and retry",
                            current.generation
                        ),
                    );
                }
                if self.deleting.contains(name) {
                    return CommandResult::refused_as(
                        Refusal::Precondition,
                        format!(
                            "service '{name}' is being removed; apply its spec again to keep it"
                        ),
                    );
                }
                if current.singleton {
                    return CommandResult::refused_as(
                        Refusal::Precondition,
                        format!("'{name}' is a singleton: it always has exactly one instance"),
                    );
                }
                if current.replicas == *replicas {
                    return CommandResult {
                        ok: true,
                        message: format!("service '{name}' has {replicas} replicas already"),
                        generation: Some(current.generation),
                        ..Default::default()
                    };
                }
                let mut stored = current.clone();
                stored.replicas = *replicas;
                stored.generation += 1;
                if let Err(e) =
                    crate::model::limits::check_total_instances(&stored, self.specs.values())
                {
                    return self.refuse_over_limit(at, "scale_spec", e);
                }
                let generation = stored.generation;
                let msg = format!(
                    "service '{name}' scaled to {replicas} replicas (generation {generation})"
                );
                self.store_spec(stored, proposal, &msg);
                CommandResult {
                    ok: true,
                    message: msg,
                    generation: Some(generation),
                    ..Default::default()
                }
            }
            Command::PutSpec { spec } => {
                if let Err(e) =
                    crate::model::limits::check_total_instances(spec, self.specs.values())
                {
                    return self.refuse_over_limit(at, "put_spec", e);
                }
                // The checks of an apply, against the committed state: no path (a raw peer
                // proposal included) stores a spec that would not validate.
                if let Err(refused) = self.check_set(std::slice::from_ref(spec)) {
                    return refused;
                }
                let generation = self
                    .specs
                    .get(&spec.name)
                    .map(|s| s.generation + 1)
                    .unwrap_or(1);
                let mut stored = spec.clone();
                stored.generation = generation;
                let msg = format!("service '{}' stored (generation {generation})", spec.name);
                self.store_spec(stored, proposal, &msg);
                CommandResult {
                    ok: true,
                    message: msg,
                    generation: Some(generation),
                    ..Default::default()
                }
            }
            Command::DeleteSpec { name, force } => {
                if !self.specs.contains_key(name) {
                    return CommandResult::refused_as(
                        Refusal::NotFound,
                        format!("no service '{name}'"),
                    );
                }
                let dependents: Vec<&str> = self
                    .specs
                    .values()
                    .filter(|s| !self.deleting.contains(&s.name))
                    .filter(|s| s.depends_on.iter().any(|d| d == name))
                    .map(|s| s.name.as_str())
                    .collect();
                if !dependents.is_empty() && !force {
                    return CommandResult::refused_as(Refusal::Precondition, format!(
                        "service '{name}' is needed by {}: remove them first, or remove it with --force (they stop first, then '{name}')",
                        dependents.join(", ")
                    ));
                }
                if !self.deleting.insert(name.clone()) {
                    return CommandResult::ok(format!("service '{name}' is already being removed"));
                }
                let msg = format!("service '{name}' is being removed");
                self.event(at, "spec-deleting", &msg, Some(name.clone()), None);
                CommandResult::ok(msg)
            }
            Command::PurgeSpec { name } => {
                // Only what is still being removed: a spec applied again after the control
                // loop decided to purge it stays.
                if !self.deleting.contains(name) {
                    return CommandResult::refused_as(
                        Refusal::Precondition,
                        format!("service '{name}' is not being removed (applied again meanwhile?); not purged"),
                    );
                }
                self.deleting.remove(name);
                self.traces.remove(name);
                self.placements.remove(name);
                self.versions.remove(name);
                self.restarts.remove(name);
                match self.specs.remove(name) {
                    Some(_) => {
                        let msg = format!("service '{name}' removed");
                        self.event(at, "spec-deleted", &msg, Some(name.clone()), None);
                        CommandResult::ok(msg)
                    }
                    None => CommandResult::refused(format!("no service '{name}'")),
                }
            }
            Command::ReportInstance {
                service,
                slot,
                node,
                state,
                restart_count,
                last_crash,
                epoch,
                healthy,
                retry_at_ms,
            } => {
                let Some(p) = self
                    .placements
                    .get_mut(service)
                    .and_then(|s| s.get_mut(slot))
                else {
                    return CommandResult::refused(format!("no instance {service}#{slot}"));
                };
                if p.node != *node {
                    return CommandResult::refused(format!(
                        "{service}#{slot} is not placed on node {node}"
                    ));
                }
                if *epoch != 0 && *epoch != p.epoch {
                    return CommandResult::refused(format!(
                        "stale report of {service}#{slot}: it was started for fencing token {epoch}, the placement is at {}",
                        p.epoch
                    ));
                }
                let changed = p.state != *state || p.restart_count != *restart_count;
                // A local restart shows as a higher count, whatever state the report caught.
                let restarted = *restart_count > p.restart_count;
                p.count_restarts(
                    restart_count.saturating_sub(p.restart_count),
                    service,
                    &mut self.restarts,
                );
                if state != "running" {
                    p.running_since_ms = None;
                } else if p.state != "running" || restarted || p.running_since_ms.is_none() {
                    p.running_since_ms = Some(at);
                }
                let health_changed = p.healthy != *healthy && state == "running";
                let was_healthy = p.healthy;
                p.healthy = if state == "running" { *healthy } else { None };
                p.state = state.clone();
                p.restart_count = *restart_count;
                p.retry_at_ms = retry_at_ms.filter(|_| state == "crashed");
                if state == "running" {
                    // The request that placed it is done; later restarts are not part of it.
                    p.trace = None;
                }
                if let Some(why) = last_crash {
                    let why = crate::model::limits::bounded_message(why).into_owned();
                    // A new crash (or the first reason heard): when, and of which version.
                    if restarted
                        || (changed && state == "failed")
                        || p.last_crash.as_ref() != Some(&why)
                    {
                        p.last_crash_at_ms = Some(at);
                        p.last_crash_generation = Some(p.generation);
                    }
                    p.last_crash = Some(why);
                }
                if state == "failed" && !p.avoid.contains(node) {
                    p.avoid.push(*node);
                }
                if state == "failed" {
                    p.failed_at_ms.get_or_insert(at);
                } else {
                    p.failed_at_ms = None;
                }
                if health_changed && (was_healthy.is_some() || *healthy == Some(false)) {
                    let verdict = match healthy {
                        Some(true) => "healthy",
                        Some(false) => "unhealthy",
                        None => "without a health verdict",
                    };
                    let msg = format!("{service}#{slot} on node {node} is {verdict}");
                    self.event(
                        at,
                        "instance-health",
                        &msg,
                        Some(service.clone()),
                        Some(*node),
                    );
                }
                if changed && state == "waiting" {
                    let msg = format!(
                        "{service}#{slot} on node {node} is stopped, waiting for its dependencies"
                    );
                    self.event(
                        at,
                        "instance-waiting",
                        &msg,
                        Some(service.clone()),
                        Some(*node),
                    );
                }
                if (changed && state == "failed") || (restarted && state != "failed") {
                    let why = last_crash.as_deref().unwrap_or("unknown reason");
                    let msg = match state.as_str() {
                        "failed" => format!(
                            "{service}#{slot} on node {node} exceeded its restart intensity after {restart_count} restarts ({why}); rescheduling"
                        ),
                        _ => format!(
                            "{service}#{slot} on node {node} crashed ({why}); restarted locally ({restart_count} so far)"
                        ),
                    };
                    let kind = if state == "failed" {
                        "instance-failed"
                    } else {
                        "instance-restarted"
                    };
                    self.event(at, kind, &msg, Some(service.clone()), Some(*node));
                }
                CommandResult::ok("reported")
            }
            Command::FinishMove { service, slot } => {
                match self
                    .placements
                    .get_mut(service)
                    .and_then(|s| s.get_mut(slot))
                {
                    Some(p) => {
                        p.moving_from = None;
                        CommandResult::ok("moved")
                    }
                    None => CommandResult::refused(format!("no instance {service}#{slot}")),
                }
            }
            Command::ReleaseMove {
                service,
                slot,
                node,
            } => {
                match self
                    .placements
                    .get_mut(service)
                    .and_then(|s| s.get_mut(slot))
                {
                    Some(p) if p.moving_from == Some(*node) => {
                        p.moving_from = None;
                        CommandResult::ok("released")
                    }
                    Some(_) => CommandResult::ok("nothing to release"),
                    None => CommandResult::refused(format!("no instance {service}#{slot}")),
                }
            }
            Command::ReportInstances {
                node,
                incarnation,
                reports,
            } => {
                let known = self.nodes.get(node).map(|n| n.incarnation);
                match known {
                    None => {
                        return CommandResult::refused(format!(
                            "node {node} is not registered: register it before reporting its instances"
                        ))
                    }
                    Some(k) if k != 0 && *incarnation != 0 && k != *incarnation => {
                        return CommandResult::refused(format!(
                            "reports for node {node} from incarnation {incarnation:016x}, but the node table has {k:016x}: another node uses this id, or its data directory was wiped"
                        ))
                    }
                    Some(_) => {}
                }
                let mut applied = 0;
                for report in reports.iter() {
                    let Ok(command) = report.to_command(*node) else {
                        continue;
                    };
                    let one = Proposal {
                        at_ms: at,
                        command,
                        trace: None,
                        request_id: None,
                        by: None,
                    };
                    if self.apply_command(&one, index).ok {
                        applied += 1;
                    }
                }
                CommandResult::ok(format!("{applied} of {} reports applied", reports.len()))
            }
            Command::RestartInstance { service, slot } => {
                match self
                    .placements
                    .get_mut(service)
                    .and_then(|s| s.get_mut(slot))
                {
                    Some(p) => {
                        p.restart_seq += 1;
                        p.epoch = index.max(p.epoch + 1);
                        // A fresh copy: its reports count restarts from 0 again.
                        p.restarts_total = p.total_restarts();
                        p.restart_count = 0;
                        p.state = pending();
                        p.running_since_ms = None;
                        p.healthy = None;
                        CommandResult::ok(format!("{service}#{slot} restart requested"))
                    }
                    None => CommandResult::refused_as(
                        Refusal::NotFound,
                        format!("no instance {service}#{slot}"),
                    ),
                }
            }
            Command::Place { assign, unassign } => {
                for a in unassign {
                    let removed = self
                        .placements
                        .get_mut(&a.service)
                        .and_then(|slots| slots.remove(&a.slot));
                    if removed.is_some()
                        && self
                            .placements
                            .get(&a.service)
                            .is_some_and(|s| s.is_empty())
                    {
                        self.placements.remove(&a.service);
                    }
                }
                for a in assign {
                    let slots = self.placements.entry(a.service.clone()).or_default();
                    // A move keeps the instance's history; its reports start over.
                    let mut p = slots
                        .remove(&a.slot)
                        .unwrap_or_else(|| Placement::on(a.node));
                    if p.state == "failed" {
                        p.reschedules += 1;
                        // Even when placed on the same node again, it must start afresh.
                        p.restart_seq += 1;
                        p.count_restarts(1, &a.service, &mut self.restarts);
                    }
                    // Its node starts a fresh copy (new epoch), whose reports count from 0;
                    // `restarts_total` keeps the restarts so far.
                    p.restarts_total = p.total_restarts();
                    p.restart_count = 0;
                    p.node = a.node;
                    p.state = pending();
                    p.running_since_ms = None;
                    p.healthy = None;
                    // A (re)started instance runs the current version.
                    p.generation = self.specs.get(&a.service).map_or(0, |s| s.generation);
                    p.moving_from = a.moving_from;
                    p.trace = proposal.trace.clone();
                    p.epoch = index.max(p.epoch + 1);
                    p.failed_at_ms = None;
                    slots.insert(a.slot, p);
                }
                CommandResult::ok(format!(
                    "{} assigned, {} unassigned",
                    assign.len(),
                    unassign.len()
                ))
            }
            Command::RollInstances {
                service,
                generation,
                slots,
            } => {
                let current = self.specs.get(service).map(|s| s.generation);
                if current != Some(*generation) {
                    return CommandResult::refused_as(
                        Refusal::Conflict,
                        format!(
                            "service '{service}' is not at generation {generation} (now {}): a stale rollout step",
                            current.map_or("removed".to_string(), |g| g.to_string())
                        ),
                    );
                }
                let mut rolled = Vec::new();
                if let Some(placed) = self.placements.get_mut(service) {
                    for slot in slots {
                        if let Some(p) = placed.get_mut(slot) {
                            if p.generation == *generation {
                                continue;
                            }
                            p.generation = *generation;
                            p.epoch = index.max(p.epoch + 1);
                            p.state = pending();
                            p.running_since_ms = None;
                            p.healthy = None;
                            p.failed_at_ms = None;
                            // A new instance: the old one's crashes are not its own.
                            p.last_crash = None;
                            p.restart_count = 0;
                            p.restarts_total = 0;
                            p.trace = proposal.trace.clone();
                            rolled.push(format!("{service}#{slot}"));
                        }
                    }
                }
                if rolled.is_empty() {
                    return CommandResult::ok("nothing to replace");
                }
                let shown: Vec<&str> = rolled.iter().take(20).map(String::as_str).collect();
                let more = if rolled.len() > shown.len() {
                    format!(" and {} more", rolled.len() - shown.len())
                } else {
                    String::new()
                };
                let msg = format!(
                    "rollout of generation {generation}: replacing {}{more}",
                    shown.join(", ")
                );
                self.event(at, "rollout-step", &msg, Some(service.clone()), None);
                CommandResult::ok(msg)
            }
            Command::FinishRollout {
                service,
                generation,
                failed,
            } => {
                let Some(v) = self.rolling_version_mut(service, *generation) else {
                    return CommandResult::refused_as(
                        Refusal::Conflict,
                        format!("generation {generation} of '{service}' is not rolling out"),
                    );
                };
                v.finished_at_ms = Some(at);
                v.unplaced = None;
                let (kind, msg) = match failed {
                    None => {
                        v.status = RolloutStatus::Succeeded;
                        (
                            "rollout-succeeded",
                            format!("generation {generation} of '{service}' rolled out"),
                        )
                    }
                    Some(why) => {
                        let why = crate::model::limits::bounded_message(why).into_owned();
                        v.status = RolloutStatus::Failed;
                        v.reason = Some(why.clone());
                        (
                            "rollout-failed",
                            format!(
                                "rollout of generation {generation} of '{service}' failed: {why}"
                            ),
                        )
                    }
                };
                self.event(at, kind, &msg, Some(service.clone()), None);
                CommandResult::ok(msg)
            }
            Command::NoteUnplaced {
                service,
                generation,
                unplaced,
            } => match self.rolling_version_mut(service, *generation) {
                Some(v) => {
                    v.unplaced = unplaced
                        .as_deref()
                        .map(|u| crate::model::limits::bounded_message(u).into_owned());
                    CommandResult::ok("noted")
                }
                None => CommandResult::refused_as(
                    Refusal::Conflict,
                    format!("generation {generation} of '{service}' is not rolling out"),
                ),
            },
            Command::RollbackSpec {
                name,
                to_generation,
                expected_generation,
                revert_of,
                reason,
            } => self.rollback(
                proposal,
                name,
                *to_generation,
                *expected_generation,
                *revert_of,
                reason.as_deref(),
            ),
            Command::CreateToken {
                id,
                name,
                role,
                hash,
                expires_ms,
            } => self.create_token(at, id, name, role, hash, *expires_ms, proposal.by.clone()),
            Command::RevokeToken { id } => match self.tokens.remove(id) {
                Some(t) => {
                    let message = format!("token {id} ('{}', {}) revoked", t.name, t.role);
                    self.event(at, "token-revoked", &message, None, None);
                    CommandResult::ok(message)
                }
                None => CommandResult::refused_as(
                    Refusal::NotFound,
                    format!("no token {id}: `modectl token ls` lists them"),
                ),
            },
            Command::RecordEvent {
                kind,
                message,
                service,
                node,
            } => {
                self.event(at, kind, message, service.clone(), *node);
                CommandResult::ok("recorded")
            }
        }
    }

    /// Refuse a command over a limit, with an event saying so.
    fn refuse_over_limit(
        &mut self,
        at: u64,
        op: &str,
        e: crate::model::limits::LimitError,
    ) -> CommandResult {
        let msg = format!("refused {op}: {e}");
        self.event(at, "command-refused", &msg, None, None);
        CommandResult::refused_as(Refusal::OverLimit, msg)
    }

    /// Store `spec` (its generation set), cancelling a pending removal, with its trace mark
    /// and a `spec-applied` event saying `message`. It becomes the service's newest kept
    /// version (rolling out; one still rolling is superseded), and the instances whose version
    /// has the same runtime part adopt it as they are: only the others are replaced, by the
    /// rollout.
    fn store_spec(&mut self, spec: ServiceSpec, proposal: &Proposal, message: &str) {
        self.store_version(spec, proposal, message, None);
    }

    fn store_version(
        &mut self,
        spec: ServiceSpec,
        proposal: &Proposal,
        message: &str,
        revert_of: Option<u64>,
    ) {
        let at = proposal.at_ms;
        self.deleting.remove(&spec.name);
        match &proposal.trace {
            Some(t) => self.traces.insert(
                spec.name.clone(),
                TraceMark {
                    context: t.clone(),
                    at_ms: at,
                },
            ),
            None => self.traces.remove(&spec.name),
        };
        let name = spec.name.clone();
        let versions = self.versions.entry(name.clone()).or_default();
        if let Some(old) = self.specs.get(&name) {
            // A state from before versions were kept: the running spec is the first kept one.
            if versions
                .back()
                .is_none_or(|v| v.spec.generation != old.generation)
            {
                versions.push_back(SpecVersion {
                    spec: old.clone(),
                    applied_at_ms: at,
                    change: "stored before versions were kept".into(),
                    status: RolloutStatus::Succeeded,
                    reason: None,
                    finished_at_ms: Some(at),
                    unplaced: None,
                    revert_of: None,
                });
            }
        }
        if let Some(last) = versions.back_mut() {
            if last.status == RolloutStatus::Rolling {
                last.status = RolloutStatus::Superseded;
                last.finished_at_ms = Some(at);
                last.unplaced = None;
            }
        }
        let runtime = spec.runtime();
        let previous = self.specs.get(&name).map_or(0, |s| s.generation);
        if let Some(placed) = self.placements.get_mut(&name) {
            for p in placed.values_mut() {
                // Placed before versions were kept: it runs the spec stored until now.
                let runs = if p.generation == 0 {
                    previous
                } else {
                    p.generation
                };
                let same = versions
                    .iter()
                    .find(|v| v.spec.generation == runs)
                    .is_some_and(|v| v.spec.runtime() == runtime);
                p.generation = if same { spec.generation } else { runs };
            }
        }
        versions.push_back(SpecVersion {
            spec: spec.clone(),
            applied_at_ms: at,
            change: message.to_string(),
            status: RolloutStatus::Rolling,
            reason: None,
            finished_at_ms: None,
            unplaced: None,
            revert_of,
        });
        // Bounded, but a version an instance still runs stays (its node needs the spec).
        let in_use: std::collections::BTreeSet<u64> = self
            .placements
            .get(&name)
            .map(|placed| placed.values().map(|p| p.generation).collect())
            .unwrap_or_default();
        while versions.len() > crate::model::rollout::MAX_VERSIONS {
            let current = spec.generation;
            let Some(i) = versions
                .iter()
                .position(|v| v.spec.generation != current && !in_use.contains(&v.spec.generation))
            else {
                break;
            };
            versions.remove(i);
        }
        self.specs.insert(name.clone(), spec);
        self.event(at, "spec-applied", message, Some(name), None);
    }

    /// The kept version `generation` of `service`, when it is rolling out.
    fn rolling_version_mut(&mut self, service: &str, generation: u64) -> Option<&mut SpecVersion> {
        self.versions
            .get_mut(service)?
            .iter_mut()
            .rev()
            .find(|v| v.spec.generation == generation && v.status == RolloutStatus::Rolling)
    }

    /// [`Command::RollbackSpec`].
    fn rollback(
        &mut self,
        proposal: &Proposal,
        name: &str,
        to: u64,
        expected: u64,
        revert_of: Option<u64>,
        reason: Option<&str>,
    ) -> CommandResult {
        let at = proposal.at_ms;
        let Some(current) = self.specs.get(name) else {
            return CommandResult::refused_as(Refusal::NotFound, format!("no service '{name}'"));
        };
        let current_generation = current.generation;
        if expected != 0 && current_generation != expected {
            return CommandResult::refused_as(
                Refusal::Conflict,
                format!(
                    "service '{name}' is at generation {current_generation}, not the expected {expected}: it changed meanwhile; look at its history again"
                ),
            );
        }
        let kept = self.versions.get(name);
        let Some(version) = kept.and_then(|vs| vs.iter().find(|v| v.spec.generation == to)) else {
            let list: Vec<String> = kept
                .map(|vs| vs.iter().map(|v| v.spec.generation.to_string()).collect())
                .unwrap_or_default();
            return CommandResult::refused_as(
                Refusal::NotFound,
                format!(
                    "generation {to} of '{name}' is not kept (kept: {}); `modectl svc history {name}` lists them",
                    if list.is_empty() { "none".to_string() } else { list.join(", ") }
                ),
            );
        };
        let mut spec = version.spec.clone();
        if to == current_generation {
            return CommandResult {
                ok: true,
                message: format!("service '{name}' is at generation {to} already"),
                generation: Some(to),
                ..Default::default()
            };
        }
        // The old version must still fit the cluster as it is now.
        spec.generation = 0;
        if let Err(refused) = self.plan_apply(std::slice::from_ref(&spec), &BTreeMap::new()) {
            return refused;
        }
        let generation = current_generation + 1;
        spec.generation = generation;
        let msg = match (revert_of, reason) {
            (Some(failed), Some(why)) => {
                if let Some(v) = self.rolling_or_failed_mut(name, failed) {
                    v.status = RolloutStatus::Reverted;
                    v.reason = Some(crate::model::limits::bounded_message(why).into_owned());
                    v.finished_at_ms = Some(at);
                    v.unplaced = None;
                }
                format!(
                    "service '{name}': generation {failed} failed ({why}); reverted to generation {to}'s spec as generation {generation}"
                )
            }
            _ => format!(
                "service '{name}' rolled back to generation {to}'s spec (generation {generation})"
            ),
        };
        self.store_version(spec, proposal, &msg, revert_of);
        CommandResult {
            ok: true,
            message: msg,
            generation: Some(generation),
            ..Default::default()
        }
    }

    fn rolling_or_failed_mut(
        &mut self,
        service: &str,
        generation: u64,
    ) -> Option<&mut SpecVersion> {
        self.versions
            .get_mut(service)?
            .iter_mut()
            .rev()
            .find(|v| v.spec.generation == generation)
    }

    /// What applying `specs` (checked with [`ClusterState::plan_apply`]) would do to their
    /// instances: placed, moved, removed, replaced in place by a rollout, or left unplaced.
    /// Instances that stay as they are are not listed.
    pub fn plan_placements(&self, specs: &[ServiceSpec]) -> Vec<PlannedInstance> {
        let mut after = self.clone_for_planning();
        for spec in specs {
            let mut s = spec.clone();
            s.generation = self.specs.get(&spec.name).map_or(1, |o| o.generation + 1);
            after.deleting.remove(&s.name);
            after.specs.insert(s.name.clone(), s);
        }
        let names: std::collections::BTreeSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        let current = self.assignments_except(&after.deleting);
        let plan = crate::schedule::plan(&after.node_views(), &after.spec_views(), &current);
        let from: BTreeMap<(&str, u32), u64> = plan
            .unassign
            .iter()
            .map(|a| ((a.service.as_str(), a.slot), a.node))
            .collect();
        let mut out = Vec::new();
        let mut touched = std::collections::BTreeSet::new();
        for a in plan
            .assign
            .iter()
            .filter(|a| names.contains(a.service.as_str()))
        {
            let old = from.get(&(a.service.as_str(), a.slot)).copied();
            touched.insert((a.service.clone(), a.slot));
            out.push(PlannedInstance {
                service: a.service.clone(),
                slot: a.slot,
                action: if old.is_some() { "move" } else { "place" }.to_string(),
                node: a.node,
                from_node: old,
                reason: None,
            });
        }
        for a in plan
            .unassign
            .iter()
            .filter(|a| names.contains(a.service.as_str()))
        {
            if touched.insert((a.service.clone(), a.slot)) {
                out.push(PlannedInstance {
                    service: a.service.clone(),
                    slot: a.slot,
                    action: "remove".to_string(),
                    node: a.node,
                    from_node: None,
                    reason: None,
                });
            }
        }
        for u in plan
            .unplaced
            .iter()
            .filter(|u| names.contains(u.service.as_str()))
        {
            touched.insert((u.service.clone(), u.slot));
            out.push(PlannedInstance {
                service: u.service.clone(),
                slot: u.slot,
                action: "unplaced".to_string(),
                node: 0,
                from_node: None,
                reason: Some(u.reason.clone()),
            });
        }
        for spec in specs {
            let runtime = spec.runtime();
            for (slot, p) in self.placements.get(&spec.name).into_iter().flatten() {
                if touched.contains(&(spec.name.clone(), *slot)) {
                    continue;
                }
                let runs = self.spec_of(&spec.name, p).map(ServiceSpec::runtime);
                if runs.is_some_and(|r| r != runtime) {
                    out.push(PlannedInstance {
                        service: spec.name.clone(),
                        slot: *slot,
                        action: "replace".to_string(),
                        node: p.node,
                        from_node: None,
                        reason: Some(format!(
                            "rolling, at most {} at a time",
                            spec.update.max_unavailable
                        )),
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.service, a.slot).cmp(&(&b.service, b.slot)));
        out
    }

    fn clone_for_planning(&self) -> ClusterState {
        ClusterState {
            nodes: self.nodes.clone(),
            specs: self.specs.clone(),
            deleting: self.deleting.clone(),
            ..ClusterState::default()
        }
    }

    /// The current version of `service` as kept (its rollout), if any.
    pub fn current_version(&self, service: &str) -> Option<&SpecVersion> {
        let generation = self.specs.get(service)?.generation;
        self.versions
            .get(service)?
            .iter()
            .rev()
            .find(|v| v.spec.generation == generation)
    }

    /// The spec instance `p` of `service` runs: its kept version, or the current spec when
    /// that version is no longer kept.
    pub fn spec_of(&self, service: &str, p: &Placement) -> Option<&ServiceSpec> {
        let current = self.specs.get(service)?;
        if p.generation == current.generation || p.generation == 0 {
            return Some(current);
        }
        Some(
            self.versions
                .get(service)
                .and_then(|vs| vs.iter().find(|v| v.spec.generation == p.generation))
                .map_or(current, |v| &v.spec),
        )
    }

    /// The specs' own rules and their references against the committed specs: names,
    /// dependencies that exist and are not being removed, no cycle.
    fn check_set(&self, specs: &[ServiceSpec]) -> Result<(), CommandResult> {
        let stored: Vec<ServiceSpec> = self.specs.values().cloned().collect();
        crate::model::spec::validate_set(specs, &stored)
            .map_err(|e| CommandResult::refused_as(Refusal::Invalid, e.to_string()))?;
        // A dependency being removed would be purged under its new dependent, which would
        // then wait for it forever: keep it by applying it in the same apply, or drop it.
        for spec in specs {
            for dep in &spec.depends_on {
                if self.deleting.contains(dep) && !specs.iter().any(|s| &s.name == dep) {
                    return Err(CommandResult::refused_as(
                        Refusal::Precondition,
                        format!(
                            "spec '{}': depends_on '{dep}', which is being removed: apply '{dep}' again in the same apply to keep it, or drop the dependency",
                            spec.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What applying `specs` atomically would do, checked against this (committed) state:
    /// each spec alone, references and cycles among the stored and new specs, limits, kinds
    /// some node offers, and the compare-and-set `expected` generations (0: must not exist).
    /// The state machine applies exactly this plan; a dry run only reports it.
    pub fn plan_apply(
        &self,
        specs: &[ServiceSpec],
        expected: &BTreeMap<String, u64>,
    ) -> Result<Vec<SpecChange>, CommandResult> {
        use crate::model::limits;
        if specs.is_empty() {
            return Err(CommandResult::refused_as(
                Refusal::Invalid,
                "an apply needs at least one spec",
            ));
        }
        for spec in specs {
            limits::check_spec(spec).map_err(|e| {
                CommandResult::refused_as(Refusal::OverLimit, format!("spec '{}': {e}", spec.name))
            })?;
        }
        self.check_set(specs)?;
        for (name, want) in expected {
            if !specs.iter().any(|s| &s.name == name) {
                return Err(CommandResult::refused_as(
                    Refusal::Invalid,
                    format!("expected generation given for '{name}', which is not in this apply: name only services the apply stores"),
                ));
            }
            let have = self.specs.get(name).map_or(0, |s| s.generation);
            if have != *want {
                let msg = match (have, *want) {
                    (_, 0) => format!(
                        "service '{name}' exists already (generation {have}), but the apply expected it not to: read it and retry"
                    ),
                    (0, _) => format!(
                        "service '{name}' does not exist, but the apply expected generation {want}: it was removed meanwhile"
                    ),
                    _ => format!(
                        "service '{name}' is at generation {have}, not the expected {want}: it changed meanwhile; read it again and retry"
                    ),
                };
                return Err(CommandResult::refused_as(Refusal::Conflict, msg));
            }
        }
        let offered: std::collections::BTreeSet<&str> = self
            .nodes
            .values()
            .flat_map(|n| n.kinds.iter().map(String::as_str))
            .collect();
        for spec in specs {
            if !offered.contains(spec.kind.as_str()) {
                let known: Vec<&str> = offered.iter().copied().collect();
                let err = crate::model::spec::SpecError::new(format!(
                    "no node offers kind '{}' (offered: {})",
                    spec.kind,
                    if known.is_empty() {
                        "none yet".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
                .with_spec(spec.name.clone())
                .with_field("kind");
                return Err(CommandResult::refused_as(Refusal::Invalid, err.to_string()));
            }
        }
        limits::check_total_instances_after(specs, self.specs.values())
            .map_err(|e| CommandResult::refused_as(Refusal::OverLimit, e.to_string()))?;
        Ok(specs
            .iter()
            .map(|spec| match self.specs.get(&spec.name) {
                None => SpecChange {
                    name: spec.name.clone(),
                    action: ChangeAction::Created,
                    generation: 1,
                    changed_fields: Vec::new(),
                },
                Some(old) => {
                    let mut fields = changed_fields(old, spec);
                    if self.deleting.contains(&spec.name) {
                        // Applying it again cancels its removal.
                        fields.push("deleting".to_string());
                    }
                    SpecChange {
                        name: spec.name.clone(),
                        action: if fields.is_empty() {
                            ChangeAction::Unchanged
                        } else {
                            ChangeAction::Updated
                        },
                        generation: if fields.is_empty() {
                            old.generation
                        } else {
                            old.generation + 1
                        },
                        changed_fields: fields,
                    }
                }
            })
            .collect())
    }

    #[allow(clippy::too_many_arguments)]
    fn create_token(
        &mut self,
        at: u64,
        id: &str,
        name: &str,
        role: &str,
        hash: &str,
        expires_ms: u64,
        by: Option<String>,
    ) -> CommandResult {
        if let Err(e) = crate::security::pki::check_client_name(name) {
            return CommandResult::refused(e.replace("client name", "token name"));
        }
        if let Err(e) = crate::security::Role::parse(role) {
            return CommandResult::refused(e);
        }
        if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return CommandResult::refused(format!("token id '{id}' is not 1-32 hex digits"));
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return CommandResult::refused("a token's hash is 64 hex digits (SHA-256)");
        }
        if self.tokens.contains_key(id) {
            return CommandResult::refused(format!("token {id} exists already"));
        }
        if self.tokens.len() >= crate::model::limits::MAX_TOKENS {
            return CommandResult::refused(format!(
                "the cluster holds {} tokens, the most it keeps: revoke unused ones first (`modectl token ls`, `modectl token revoke ID`)",
                self.tokens.len()
            ));
        }
        self.tokens.insert(
            id.to_string(),
            TokenRecord {
                id: id.to_string(),
                name: name.to_string(),
                role: role.to_string(),
                hash: hash.to_string(),
                created_ms: at,
                expires_ms,
                created_by: by,
            },
        );
        let message = format!("token {id} ('{name}', {role}) created");
        self.event(at, "token-created", &message, None, None);
        CommandResult::ok(message)
    }

    fn event(
        &mut self,
        at: u64,
        kind: &str,
        message: &str,
        service: Option<String>,
        node: Option<u64>,
    ) {
        self.events.push_back(Event {
            seq: self.next_event_seq,
            time_ms: at,
            kind: kind.to_string(),
            message: crate::model::limits::bounded_message(message).into_owned(),
            service,
            node,
            by: None,
        });
        self.next_event_seq += 1;
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Where every instance is, for the scheduler, leaving out the services in `deleting`.
    fn assignments_except(
        &self,
        deleting: &std::collections::BTreeSet<String>,
    ) -> Vec<crate::schedule::Assignment> {
        self.placements
            .iter()
            .filter(|(s, _)| !deleting.contains(*s))
            .flat_map(|(s, slots)| {
                slots.iter().map(|(slot, p)| crate::schedule::Assignment {
                    service: s.clone(),
                    slot: *slot,
                    node: p.node,
                })
            })
            .collect()
    }

    /// The scheduler's view of the nodes (only `up` nodes take instances).
    pub fn node_views(&self) -> Vec<crate::schedule::NodeView> {
        self.nodes
            .values()
            .map(|n| crate::schedule::NodeView {
                id: n.id,
                labels: n.labels.clone(),
                capacity: n.capacity,
                schedulable: n.status == NodeStatus::Up,
                kinds: Some(n.kinds.iter().cloned().collect()),
            })
            .collect()
    }

    /// The scheduler's view of the specs, leaving out services being removed.
    pub fn spec_views(&self) -> Vec<crate::schedule::SpecView> {
        self.specs
            .values()
            .filter(|s| !self.deleting.contains(&s.name))
            .map(|s| s.to_view())
            .collect()
    }

    /// What draining node `id` would leave stuck: its instances that could run nowhere
    /// else, each with why (`[{"instance": "web#0", "reason": ...}]`).
    pub fn drain_blockers(&self, id: u64) -> Result<serde_json::Value, QueryError> {
        if !self.nodes.contains_key(&id) {
            return Err(QueryError::NotFound(format!("no node {id}")));
        }
        let mut nodes = self.node_views();
        for n in nodes.iter_mut().filter(|n| n.id == id) {
            n.schedulable = false;
        }
        let current = self.assignments_except(&self.deleting);
        let on_node: std::collections::BTreeSet<(String, u32)> = current
            .iter()
            .filter(|a| a.node == id)
            .map(|a| (a.service.clone(), a.slot))
            .collect();
        let plan = crate::schedule::plan(&nodes, &self.spec_views(), &current);
        let stuck: Vec<serde_json::Value> = plan
            .unplaced
            .iter()
            .filter(|u| on_node.contains(&(u.service.clone(), u.slot)))
            .map(|u| {
                serde_json::json!({
                    "instance": format!("{}#{}", u.service, u.slot),
                    "reason": u.reason,
                })
            })
            .collect();
        Ok(serde_json::Value::Array(stuck))
    }

    /// What scaling `name` to `replicas` would leave unplaced that is placed (or placeable)
    /// now: how many more of its instances the scheduler could not place, and the most common
    /// reason. `None` when the scale adds no unplaced instance (or `name` is unknown).
    pub fn scale_shortfall(&self, name: &str, replicas: u32) -> Option<(usize, String)> {
        let spec = self.specs.get(name)?;
        // Over the limit is refused when committed, with its own message (and would be a
        // plan of billions of slots here).
        if spec.singleton
            || replicas <= spec.instances()
            || replicas > crate::model::limits::MAX_REPLICAS
            || self.deleting.contains(name)
        {
            return None;
        }
        let nodes = self.node_views();
        let current = self.assignments_except(&self.deleting);
        let unplaced = |views: &[crate::schedule::SpecView]| {
            let plan = crate::schedule::plan(&nodes, views, &current);
            let counts =
                crate::schedule::count_unplaced(plan.unplaced.iter().filter(|u| u.service == name));
            counts
                .values()
                .next()
                .map(|reasons| {
                    let (reason, _) = crate::schedule::most_common(reasons);
                    (reasons.values().sum::<usize>(), reason.to_string())
                })
                .unwrap_or_default()
        };
        let mut views = self.spec_views();
        let (before, _) = unplaced(&views);
        for v in views.iter_mut().filter(|v| v.name == name) {
            v.replicas = replicas;
        }
        let (after, reason) = unplaced(&views);
        let extra = after.saturating_sub(before);
        if extra == 0 {
            return None;
        }
        Some((extra, reason))
    }

    /// Services with fewer instances placed than wanted.
    pub fn short_services(&self) -> impl Iterator<Item = &str> {
        self.specs
            .values()
            .filter(|s| !self.deleting.contains(&s.name))
            .filter(|s| {
                self.placements.get(&s.name).map_or(0, |p| p.len()) < s.instances() as usize
            })
            .map(|s| s.name.as_str())
    }

    /// Why the scheduler cannot place the instances of services that have fewer placed than
    /// wanted: service -> the most common reason (one plan of the whole cluster; empty without
    /// running it when every service is fully placed).
    pub fn unplaced_reasons(&self) -> BTreeMap<String, String> {
        if self.short_services().next().is_none() {
            return BTreeMap::new();
        }
        let plan = crate::schedule::plan(
            &self.node_views(),
            &self.spec_views(),
            &self.assignments_except(&self.deleting),
        );
        crate::schedule::count_unplaced(&plan.unplaced)
            .into_iter()
            .map(|(service, reasons)| {
                let (reason, _) = crate::schedule::most_common(&reasons);
                (service.to_string(), reason.to_string())
            })
            .collect()
    }

    /// What removing node `id` would do that an operator should confirm: `None` when it is
    /// down and runs nothing that could not move.
    pub fn removal_hazards(&self, id: u64) -> Result<Option<String>, QueryError> {
        let Some(node) = self.nodes.get(&id) else {
            return Err(QueryError::NotFound(format!("no node {id}")));
        };
        let instances: Vec<String> = self
            .placements
            .iter()
            .flat_map(|(s, slots)| {
                slots
                    .iter()
                    .filter(|(_, p)| p.node == id)
                    .map(move |(slot, _)| format!("{s}#{slot}"))
            })
            .collect();
        // What could run with the node (up, as if it came back) but not without it: its own
        // instances that fit nowhere else, and those already stranded while it is down.
        let current = self.assignments_except(&self.deleting);
        let specs = self.spec_views();
        let mut with = self.node_views();
        for n in with.iter_mut().filter(|n| n.id == id) {
            n.schedulable = true;
        }
        let without: Vec<_> = with.iter().filter(|n| n.id != id).cloned().collect();
        let unplaced_with: std::collections::BTreeSet<(String, u32)> =
            crate::schedule::plan(&with, &specs, &current)
                .unplaced
                .into_iter()
                .map(|u| (u.service, u.slot))
                .collect();
        let stuck: Vec<String> = crate::schedule::plan(&without, &specs, &current)
            .unplaced
            .into_iter()
            .filter(|u| !unplaced_with.contains(&(u.service.clone(), u.slot)))
            .map(|u| format!("{}#{} ({})", u.service, u.slot, u.reason))
            .collect();
        let live = node.status != NodeStatus::Down;
        if !live && stuck.is_empty() {
            return Ok(None);
        }
        let mut why = Vec::new();
        if live {
            why.push(format!(
                "node {id} is {} (its heartbeats arrive): removing it stops it for good{}",
                if node.draining { "draining" } else { "up" },
                match instances.len() {
                    0 => String::new(),
                    n => format!(
                        " and its {n} instance{} ({}) start elsewhere",
                        if n == 1 { "" } else { "s" },
                        shown(&instances)
                    ),
                }
            ));
        }
        if !stuck.is_empty() {
            why.push(format!(
                "{} could run on no other node and would stay unplaced: {}",
                if stuck.len() == 1 {
                    "1 instance".to_string()
                } else {
                    format!("{} instances", stuck.len())
                },
                shown(&stuck)
            ));
        }
        Ok(Some(why.join("; ")))
    }

    /// Answer a read query: `nodes`, `specs`, `spec:<name>`, `placements`, `events`,
    /// `drain:<node id>`, `all`.
    pub fn query(&self, query: &str) -> Result<serde_json::Value, QueryError> {
        let v = match query {
            "nodes" => serde_json::to_value(self.nodes.values().collect::<Vec<_>>()),
            "specs" => serde_json::to_value(self.specs.values().collect::<Vec<_>>()),
            "placements" => serde_json::to_value(&self.placements),
            "kinds" => {
                let mut kinds: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
                for n in self.nodes.values() {
                    for k in &n.kinds {
                        kinds.entry(k.as_str()).or_default().push(n.id);
                    }
                }
                serde_json::to_value(kinds)
            }
            "events" => {
                // With a readable UTC time next to the raw milliseconds, for clients.
                let events: Vec<serde_json::Value> = self
                    .events
                    .iter()
                    .map(|e| {
                        let mut v = serde_json::to_value(e).unwrap_or_default();
                        v["time"] = crate::service::format_utc_ms(e.time_ms).into();
                        v
                    })
                    .collect();
                Ok(serde_json::Value::Array(events))
            }
            "all" => serde_json::to_value(self),
            // Nothing but the answering replica's applied index (a read barrier).
            "index" => Ok(serde_json::Value::Null),
            q if q.starts_with("drain:") => {
                let id = q["drain:".len()..].parse::<u64>().map_err(|_| {
                    QueryError::Unknown(format!("'{q}': drain:<node id> takes a node id"))
                })?;
                return self.drain_blockers(id);
            }
            q => match q.strip_prefix("spec:") {
                Some(name) => match self.specs.get(name) {
                    Some(spec) => serde_json::to_value(spec),
                    None => return Err(QueryError::NotFound(format!("no service named '{name}'"))),
                },
                None => return Err(QueryError::Unknown(format!(
                    "unknown query '{q}': use nodes, specs, spec:<name>, placements, kinds, events, drain:<node id> or all"
                ))),
            },
        };
        v.map_err(|e| QueryError::Unknown(e.to_string()))
    }
}

/// Why a query has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The query is not understood.
    #[error("{0}")]
    Unknown(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(command: Command) -> Proposal {
        Proposal {
            trace: None,
            at_ms: 1000,
            command,
            request_id: None,
            by: None,
        }
    }

    /// Node 1 reports `a#0` running, for the placement with fencing token `epoch`.
    fn running_report(epoch: u64) -> Command {
        Command::ReportInstance {
            service: "a".into(),
            slot: 0,
            node: 1,
            state: "running".into(),
            restart_count: 0,
            last_crash: None,
            epoch,
            healthy: None,
            retry_at_ms: None,
        }
    }

    /// Node `id` registers with data directory `incarnation` and heartbeat grace `grace_ms`.
    fn register(id: u64, incarnation: u64, grace_ms: u64) -> Command {
        Command::RegisterNode {
            id,
            address: format!("127.0.0.1:{id}"),
            labels: BTreeMap::new(),
            capacity: 10,
            kinds: vec![],
            incarnation,
            heartbeat_grace_ms: grace_ms,
            api_address: String::new(),
            role: NodeRole::Server,
        }
    }

    fn spec(name: &str) -> ServiceSpec {
        let mut s = ServiceSpec::new(name, "ticker");
        s.config = serde_json::json!({"every_ms": 100});
        s.replicas = 3;
        s
    }

    #[test]
    fn specs_get_increasing_generations_and_events() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(&p(Command::PutSpec { spec: spec("a") })).generation,
            Some(1)
        );
        assert_eq!(
            s.apply(&p(Command::PutSpec { spec: spec("a") })).generation,
            Some(2)
        );
        assert_eq!(s.specs["a"].generation, 2);
        assert_eq!(s.events.len(), 2);
        assert!(
            s.apply(&p(Command::DeleteSpec {
                name: "a".into(),
                force: false
            }))
            .ok
        );
        assert!(s.deleting.contains("a"));
        assert!(s.apply(&p(Command::PurgeSpec { name: "a".into() })).ok);
        assert!(
            !s.apply(&p(Command::DeleteSpec {
                name: "a".into(),
                force: false
            }))
            .ok
        );
        assert_eq!(
            s.query("spec:a").unwrap_err().to_string(),
            "no service named 'a'"
        );
    }

    #[test]
    fn nodes_register_idempotently_and_keep_their_status() {
        let mut s = ClusterState::default();
        let reg = Command::RegisterNode {
            id: 1,
            address: "127.0.0.1:1".into(),
            labels: BTreeMap::new(),
            capacity: 10,
            kinds: vec![],
            incarnation: 7,
            heartbeat_grace_ms: 1500,
            api_address: String::new(),
            role: NodeRole::Server,
        };
        assert!(s.apply(&p(reg.clone())).ok);
        assert!(
            s.apply(&p(Command::SetNodeStatus {
                id: 1,
                status: NodeStatus::Draining
            }))
            .ok
        );
        assert_eq!(s.apply(&p(reg)).message, "node 1 unchanged");
        assert_eq!(s.nodes[&1].status, NodeStatus::Draining);
        // Down and back: the control loop restores `draining` from the flag; only `up` clears it.
        s.apply(&p(Command::SetNodeStatus {
            id: 1,
            status: NodeStatus::Down,
        }));
        assert!(s.nodes[&1].draining);
        s.apply(&p(Command::SetNodeStatus {
            id: 1,
            status: NodeStatus::Up,
        }));
        assert!(!s.nodes[&1].draining);
        s.apply(&p(Command::SetNodeStatus {
            id: 1,
            status: NodeStatus::Draining,
        }));
        assert_eq!(
            s.events.len(),
            5,
            "registered, draining, down, up, draining"
        );
    }

    #[test]
    fn placements_are_assigned_moved_and_removed() {
        let mut s = ClusterState::default();
        let a = |slot, node| SlotAssignment {
            service: "web".into(),
            slot,
            node,
            moving_from: None,
        };
        assert!(
            s.apply(&p(Command::Place {
                assign: vec![a(0, 1), a(1, 2)],
                unassign: vec![]
            }))
            .ok
        );
        assert_eq!(s.placements["web"][&1].node, 2);
        assert_eq!(s.placements["web"][&1].state, "pending");
        s.apply(&p(Command::Place {
            assign: vec![a(1, 3)],
            unassign: vec![a(1, 2)],
        }));
        assert_eq!(s.placements["web"][&1].node, 3);
        s.apply(&p(Command::Place {
            assign: vec![],
            unassign: vec![a(0, 1), a(1, 3)],
        }));
        assert!(s.placements.is_empty());
        assert_eq!(s.query("placements").unwrap(), serde_json::json!({}));
    }

    #[test]
    fn a_batch_of_reports_applies_as_one_command_for_the_nodes_incarnation_only() {
        let mut s = ClusterState::default();
        assert!(s.apply(&p(register(4, 7, 1500))).ok);
        s.apply(&p(Command::PutSpec { spec: spec("web") }));
        let a = |slot| SlotAssignment {
            service: "web".into(),
            slot,
            node: 4,
            moving_from: None,
        };
        s.apply(&p(Command::Place {
            assign: vec![a(0), a(1)],
            unassign: vec![],
        }));
        let report = |slot, state: &str| InstanceReport {
            service: "web".into(),
            slot,
            state: state.into(),
            restart_count: 0,
            last_crash: None,
            epoch: 0,
            healthy: None,
            retry_at_ms: None,
            move_: String::new(),
        };
        let batch = |incarnation| Command::ReportInstances {
            node: 4,
            incarnation,
            reports: vec![
                report(0, "running"),
                report(1, "running"),
                report(9, "running"),
            ],
        };
        let refused = s.apply(&p(batch(8)));
        assert!(
            !refused.ok && refused.message.contains("incarnation"),
            "{refused:?}"
        );
        assert_eq!(s.placements["web"][&0].state, "pending");
        let done = s.apply(&p(batch(7)));
        assert_eq!(done.message, "2 of 3 reports applied");
        assert_eq!(s.placements["web"][&1].state, "running");
        let unknown = s.apply(&p(Command::ReportInstances {
            node: 5,
            incarnation: 0,
            reports: vec![],
        }));
        assert!(unknown.message.contains("not registered"), "{unknown:?}");
    }

    #[test]
    fn op_names_match_the_json_tags() {
        let cmds = [
            Command::PutSpec { spec: spec("a") },
            Command::DeleteSpec {
                name: "a".into(),
                force: false,
            },
            Command::PurgeSpec { name: "a".into() },
            Command::Place {
                assign: vec![],
                unassign: vec![],
            },
        ];
        for c in cmds {
            assert_eq!(serde_json::to_value(&c).unwrap()["op"], c.op());
        }
    }

    #[test]
    fn traced_proposals_leave_their_context_on_specs_and_placements() {
        let mut s = ClusterState::default();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string();
        let mut put = p(Command::PutSpec { spec: spec("a") });
        put.trace = Some(tp.clone());
        s.apply(&put);
        assert_eq!(s.traces["a"].context, tp);
        let mut place = p(Command::Place {
            assign: vec![SlotAssignment {
                service: "a".into(),
                slot: 0,
                node: 1,
                moving_from: None,
            }],
            unassign: vec![],
        });
        place.trace = Some(tp.clone());
        s.apply(&place);
        assert_eq!(s.placements["a"][&0].trace.as_deref(), Some(tp.as_str()));
        s.apply(&p(running_report(0)));
        assert_eq!(s.placements["a"][&0].trace, None, "done once it runs");
        // An untraced change forgets the old context.
        s.apply(&p(Command::PutSpec { spec: spec("a") }));
        assert!(!s.traces.contains_key("a"));
    }

    #[test]
    fn every_node_must_use_the_clusters_heartbeat_grace() {
        let mut s = ClusterState::default();
        let reg = |id, grace| register(id, id, grace);
        assert!(s.apply(&p(reg(1, 1500))).ok);
        assert_eq!(s.heartbeat_grace_ms, 1500);
        let refused = s.apply(&p(reg(2, 3000)));
        assert!(!refused.ok);
        assert!(
            refused.message.contains("--heartbeat-grace 1500ms"),
            "{}",
            refused.message
        );
        assert!(!s.nodes.contains_key(&2));
        assert!(s.apply(&p(reg(2, 1500))).ok);
    }

    #[test]
    fn a_wiped_or_removed_data_directory_cannot_register_as_the_member_it_was() {
        let mut s = ClusterState::default();
        let reg = |incarnation| register(3, incarnation, 0);
        assert!(s.apply(&p(reg(11))).ok);
        let wiped = s.apply(&p(reg(12)));
        assert!(
            !wiped.ok && wiped.message.contains("--rejoin"),
            "{}",
            wiped.message
        );
        assert!(s.apply(&p(Command::RemoveNode { id: 3 })).ok);
        let back = s.apply(&p(reg(11)));
        assert!(
            !back.ok && back.message.contains("was removed"),
            "{}",
            back.message
        );
        // A new data directory joining afresh may.
        assert!(s.apply(&p(reg(13))).ok);
    }

    #[test]
    fn a_request_id_applies_once_and_answers_its_first_outcome() {
        let mut s = ClusterState::default();
        let mut put = p(Command::PutSpec { spec: spec("a") });
        put.request_id = Some("r1".into());
        let first = s.apply(&put);
        let again = s.apply(&put);
        assert_eq!(first.generation, Some(1));
        assert_eq!(again.generation, Some(1));
        assert!(again.duplicate && !first.duplicate);
        assert_eq!(s.specs["a"].generation, 1);
        assert!(
            s.without_events().requests.is_empty(),
            "not copied to the agent"
        );
    }

    #[test]
    fn reports_about_an_older_assignment_are_discarded() {
        let mut s = ClusterState::default();
        s.apply(&p(Command::PutSpec { spec: spec("a") }));
        let place = |node| Command::Place {
            assign: vec![SlotAssignment {
                service: "a".into(),
                slot: 0,
                node,
                moving_from: None,
            }],
            unassign: vec![],
        };
        s.apply_at(&p(place(1)), 10);
        assert_eq!(s.placements["a"][&0].epoch, 10);
        s.apply_at(&p(place(1)), 20);
        let stale = s.apply(&p(running_report(10)));
        assert!(
            !stale.ok && stale.message.contains("stale report"),
            "{}",
            stale.message
        );
        assert_eq!(s.placements["a"][&0].state, "pending");
        assert!(s.apply(&p(running_report(20))).ok);
        assert_eq!(s.placements["a"][&0].state, "running");
    }

    #[test]
    fn restarts_are_counted_across_moves_and_reschedules_and_never_go_down() {
        let mut s = ClusterState::default();
        s.apply(&p(Command::PutSpec { spec: spec("a") }));
        let place = |node, moving_from| Command::Place {
            assign: vec![SlotAssignment {
                service: "a".into(),
                slot: 0,
                node,
                moving_from,
            }],
            unassign: vec![],
        };
        let report = |node, state: &str, restart_count, epoch| Command::ReportInstance {
            service: "a".into(),
            slot: 0,
            node,
            state: state.into(),
            restart_count,
            last_crash: Some("boom".into()),
            epoch,
            healthy: None,
            retry_at_ms: None,
        };
        let totals = |s: &ClusterState| {
            let i = &s.placements["a"][&0];
            (i.restart_count, i.restarts_total, s.restarts["a"])
        };
        s.apply_at(&p(place(1, None)), 10);
        assert!(s.apply(&p(report(1, "running", 2, 10))).ok);
        assert_eq!(totals(&s), (2, 2, 2));
        // The same count again is no new restart; a higher one counts what it adds.
        s.apply(&p(report(1, "running", 2, 10)));
        s.apply(&p(report(1, "crashed", 3, 10)));
        s.apply(&p(report(1, "failed", 3, 10)));
        assert_eq!(totals(&s), (3, 3, 3));
        // Rescheduled after the escalated crash: one more restart, and the new node's
        // reports start from 0 without taking anything away.
        s.apply_at(&p(place(2, None)), 20);
        assert_eq!(s.placements["a"][&0].reschedules, 1);
        assert_eq!(totals(&s), (0, 4, 4));
        s.apply(&p(report(2, "running", 0, 20)));
        assert_eq!(totals(&s), (0, 4, 4));
        s.apply(&p(report(2, "running", 1, 20)));
        assert_eq!(totals(&s), (1, 5, 5));
        // A drain moves it (no crash, so no restart); the old node's reports are refused.
        s.apply_at(&p(place(3, Some(2))), 30);
        assert!(!s.apply(&p(report(2, "running", 9, 20))).ok);
        s.apply(&p(report(3, "running", 0, 30)));
        assert_eq!(totals(&s), (0, 5, 5));
        // A requested restart starts a fresh copy too.
        s.apply_at(
            &p(Command::RestartInstance {
                service: "a".into(),
                slot: 0,
            }),
            40,
        );
        s.apply(&p(report(3, "running", 1, 40)));
        assert_eq!(totals(&s), (1, 6, 6));
        // Scaled away: the service's count stays.
        s.apply(&p(Command::Place {
            assign: vec![],
            unassign: vec![SlotAssignment {
                service: "a".into(),
                slot: 0,
                node: 3,
                moving_from: None,
            }],
        }));
        assert_eq!(s.restarts["a"], 6);
        // It survives a snapshot, and a snapshot from before the counts decodes.
        let json = serde_json::to_string(&s).unwrap();
        let back: ClusterState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.restarts["a"], 6);
        let old: Placement =
            serde_json::from_str(r#"{"node": 1, "state": "running", "restart_count": 3}"#).unwrap();
        assert_eq!((old.restarts_total, old.total_restarts()), (0, 3));
        // Purged with the service.
        s.apply(&p(Command::DeleteSpec {
            name: "a".into(),
            force: false,
        }));
        s.apply(&p(Command::PurgeSpec { name: "a".into() }));
        assert!(s.restarts.is_empty());
    }

    #[test]
    fn the_event_log_is_bounded() {
        let mut s = ClusterState::default();
        for i in 0..(MAX_EVENTS + 5) {
            s.apply(&p(Command::RecordEvent {
                kind: "test".into(),
                message: i.to_string(),
                service: None,
                node: None,
            }));
        }
        assert_eq!(s.events.len(), MAX_EVENTS);
        assert_eq!(s.events.front().unwrap().seq, 5);
        let listed = s.query("events").unwrap();
        assert_eq!(listed[0]["time"], "1970-01-01 00:00:01.000");
        assert_eq!(s.next_event_seq, MAX_EVENTS as u64 + 5);
    }

    #[test]
    fn over_limit_commands_are_refused_on_apply_and_recorded() {
        use crate::model::limits::{MAX_MESSAGE_BYTES, MAX_REPLICAS};
        let mut s = ClusterState::default();
        // As it would arrive from a log written by an older version or the raw `Write` RPC.
        let huge: Command = serde_json::from_value(serde_json::json!({
            "op": "put_spec",
            "spec": {"name": "web", "kind": "exec", "replicas": 4294967295u64}
        }))
        .unwrap();
        let r = s.apply(&p(huge));
        assert!(!r.ok);
        assert_eq!(
            r.message,
            "refused put_spec: replicas 4294967295 is over the limit of 50000"
        );
        assert!(s.specs.is_empty());
        let mut grace = spec("slow");
        grace.stop_grace_s = u64::MAX;
        let r = s.apply(&p(Command::PutSpec { spec: grace }));
        assert!(
            r.message.contains("stop_grace_s 18446744073709551615 s"),
            "{r:?}"
        );
        assert!(s.specs.is_empty());
        let kinds: Vec<&str> = s.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["command-refused", "command-refused"]);
        // Two services at the per-service limit fit; a third instance does not.
        for name in ["a", "b"] {
            let mut big = spec(name);
            big.replicas = MAX_REPLICAS;
            assert!(s.apply(&p(Command::PutSpec { spec: big })).ok);
        }
        let r = s.apply(&p(Command::PutSpec { spec: spec("c") }));
        assert!(r.message.contains("over the limit of 100000"), "{r:?}");
        // Messages are cut, not refused: a 50 MB event costs 4 KiB.
        let r = s.apply(&p(Command::RecordEvent {
            kind: "x".into(),
            message: "m".repeat(50 << 20),
            service: None,
            node: None,
        }));
        assert!(r.ok);
        let last = s.events.back().unwrap();
        assert!(last.message.len() <= MAX_MESSAGE_BYTES);
        assert!(last.message.ends_with("(cut: 52428800 bytes in all)"));
    }

    #[test]
    fn a_stored_over_limit_spec_is_clamped_where_it_is_used() {
        // A snapshot taken before the limits existed may hold one; nothing may allocate or
        // compute a deadline from the raw values.
        let mut bad = spec("web");
        bad.replicas = u32::MAX;
        bad.stop_grace_s = u64::MAX;
        bad.restart.within_s = u64::MAX;
        assert_eq!(bad.to_view().replicas, crate::model::limits::MAX_REPLICAS);
        assert_eq!(bad.stop_grace(), std::time::Duration::from_secs(3600));
        let _ = std::time::Instant::now() + bad.stop_grace() + bad.restart.within();
    }

    /// A state with one node offering the `ticker` kind.
    fn with_ticker_node() -> ClusterState {
        let mut s = ClusterState::default();
        let mut reg = register(1, 1, 0);
        if let Command::RegisterNode { kinds, .. } = &mut reg {
            kinds.push("ticker".into());
        }
        assert!(s.apply(&p(reg)).ok);
        s
    }

    fn apply_specs(specs: Vec<ServiceSpec>, expected: &[(&str, u64)]) -> Command {
        Command::ApplySpecs {
            specs,
            expected: expected.iter().map(|(n, g)| (n.to_string(), *g)).collect(),
        }
    }

    fn depending(name: &str, on: &str) -> ServiceSpec {
        let mut s = spec(name);
        s.depends_on = vec![on.to_string()];
        s
    }

    #[test]
    fn an_apply_stores_every_spec_or_none() {
        let mut s = with_ticker_node();
        let mut bad = spec("b");
        bad.kind = "nope".into();
        let events = s.events.len();
        let r = s.apply(&p(apply_specs(vec![spec("a"), bad], &[])));
        assert!(!r.ok);
        assert_eq!(r.refusal, Some(Refusal::Invalid));
        assert!(
            r.message.contains("spec 'b'") && r.message.contains("field 'kind'"),
            "{}",
            r.message
        );
        assert!(s.specs.is_empty(), "nothing stored");
        assert_eq!(s.events.len(), events, "no event");

        let r = s.apply(&p(apply_specs(vec![spec("a"), depending("b", "a")], &[])));
        assert!(r.ok, "{r:?}");
        let actions: Vec<_> = r
            .changes
            .iter()
            .map(|c| (c.name.as_str(), c.action))
            .collect();
        assert_eq!(
            actions,
            [("a", ChangeAction::Created), ("b", ChangeAction::Created)]
        );
        assert_eq!(s.specs["b"].generation, 1);
    }

    #[test]
    fn an_identical_spec_is_unchanged_and_keeps_its_generation() {
        let mut s = with_ticker_node();
        assert!(s.apply(&p(apply_specs(vec![spec("a")], &[]))).ok);
        let events = s.events.len();
        let r = s.apply(&p(apply_specs(vec![spec("a")], &[])));
        assert_eq!(r.changes[0].action, ChangeAction::Unchanged);
        assert_eq!(r.changes[0].generation, 1);
        assert_eq!(s.specs["a"].generation, 1);
        assert_eq!(s.events.len(), events, "no spec-applied event");

        let mut more = spec("a");
        more.replicas = 5;
        more.config = serde_json::json!({"every_ms": 5});
        let r = s.apply(&p(apply_specs(vec![more], &[])));
        assert_eq!(r.changes[0].action, ChangeAction::Updated);
        assert_eq!(r.changes[0].generation, 2);
        assert_eq!(r.changes[0].changed_fields, ["config", "replicas"]);
        assert_eq!(s.specs["a"].replicas, 5);
    }

    #[test]
    fn a_changed_secret_is_named_but_its_value_is_in_no_event_or_result() {
        use crate::model::secret::Secret;
        let with = |pairs: &[(&str, &str)]| {
            let mut a = spec("a");
            for (k, v) in pairs {
                a.secrets.insert(k.to_string(), Secret::new(*v));
            }
            a
        };
        let mut s = with_ticker_node();
        let r = s.apply(&p(apply_specs(
            vec![with(&[("DB_PASSWORD", "hunter2"), ("KEEP", "same-1")])],
            &[],
        )));
        assert!(r.ok, "{r:?}");
        let next = with(&[
            ("DB_PASSWORD", "hunter3"),
            ("KEEP", "same-1"),
            ("NEW", "fresh-9"),
        ]);
        let planned = s.plan_apply(std::slice::from_ref(&next), &BTreeMap::new());
        let r = s.apply(&p(apply_specs(vec![next], &[])));
        assert!(r.ok, "{r:?}");
        let fields = ["secrets.DB_PASSWORD", "secrets.NEW"];
        assert_eq!(r.changes[0].changed_fields, fields);
        assert_eq!(planned.unwrap()[0].changed_fields, fields);
        let removed = s.apply(&p(apply_specs(vec![with(&[("KEEP", "same-1")])], &[])));
        assert_eq!(
            removed.changes[0].changed_fields,
            ["secrets.DB_PASSWORD", "secrets.NEW"]
        );
        let said = format!(
            "{:?} {:?} {}",
            s.events,
            s.versions,
            serde_json::to_string(&s.events).unwrap()
        );
        assert!(said.contains("secrets.DB_PASSWORD"), "{said}");
        for value in ["hunter", "same-1", "fresh-9"] {
            assert!(!said.contains(value), "{value} in {said}");
            assert!(!format!("{r:?} {removed:?}").contains(value));
        }
        // The stored spec keeps the values (the nodes need them).
        assert_eq!(s.specs["a"].secrets["KEEP"].expose(), "same-1");
    }

    #[test]
    fn compare_and_set_refuses_a_stale_generation_and_changes_nothing() {
        let mut s = with_ticker_node();
        assert!(s.apply(&p(apply_specs(vec![spec("a")], &[("a", 0)]))).ok);
        let before = s.clone();
        let mut more = spec("a");
        more.replicas = 7;
        for expected in [0, 2] {
            let r = s.apply(&p(apply_specs(
                vec![more.clone(), spec("z")],
                &[("a", expected)],
            )));
            assert!(!r.ok);
            assert_eq!(r.refusal, Some(Refusal::Conflict), "{}", r.message);
        }
        assert_eq!(s, before);
        assert!(s.apply(&p(apply_specs(vec![more], &[("a", 1)]))).ok);
        assert_eq!(s.specs["a"].replicas, 7);
        let r = s.apply(&p(apply_specs(vec![spec("y")], &[("x", 0)])));
        assert_eq!(r.refusal, Some(Refusal::Invalid), "{}", r.message);
    }

    #[test]
    fn applies_that_close_a_cycle_are_refused_against_the_committed_state() {
        // Both were valid against the state each was checked on; the second applied finds
        // the first committed and is refused.
        let mut s = with_ticker_node();
        assert!(s.apply(&p(apply_specs(vec![spec("a"), spec("b")], &[]))).ok);
        let first = s.apply(&p(apply_specs(vec![depending("a", "b")], &[])));
        let second = s.apply(&p(apply_specs(vec![depending("b", "a")], &[])));
        assert!(first.ok);
        assert!(!second.ok);
        assert_eq!(second.refusal, Some(Refusal::Invalid));
        assert!(
            second.message.contains("dependency cycle"),
            "{}",
            second.message
        );
        assert!(s.specs["b"].depends_on.is_empty());
    }

    #[test]
    fn a_plan_is_what_the_apply_does() {
        let mut s = with_ticker_node();
        let cmd = apply_specs(vec![spec("a"), depending("b", "a")], &[]);
        let Command::ApplySpecs { specs, expected } = &cmd else {
            unreachable!()
        };
        let planned = s.plan_apply(specs, expected).unwrap();
        assert!(s.specs.is_empty(), "planning stores nothing");
        assert_eq!(s.apply(&p(cmd.clone())).changes, planned);
    }

    #[test]
    fn scaling_checks_the_generation_and_singletons() {
        let mut s = with_ticker_node();
        let mut one = spec("one");
        one.singleton = true;
        one.replicas = 1;
        assert!(s.apply(&p(apply_specs(vec![spec("a"), one], &[]))).ok);
        let scale = |name: &str, replicas, expected_generation| Command::ScaleSpec {
            name: name.into(),
            replicas,
            expected_generation,
        };
        let r = s.apply(&p(scale("a", 9, 5)));
        assert_eq!(r.refusal, Some(Refusal::Conflict));
        assert_eq!(s.specs["a"].replicas, 3);
        let r = s.apply(&p(scale("a", 9, 1)));
        assert!(r.ok);
        assert_eq!(r.generation, Some(2));
        assert_eq!(s.specs["a"].replicas, 9);
        let r = s.apply(&p(scale("a", 9, 0)));
        assert_eq!(r.generation, Some(2), "unchanged: {}", r.message);
        assert_eq!(
            s.apply(&p(scale("one", 2, 0))).refusal,
            Some(Refusal::Precondition)
        );
        assert_eq!(
            s.apply(&p(scale("nope", 2, 0))).refusal,
            Some(Refusal::NotFound)
        );
        let r = s.apply(&p(scale("a", u32::MAX, 0)));
        assert_eq!(r.refusal, Some(Refusal::OverLimit));
    }

    #[test]
    fn commands_round_trip_as_tagged_json() {
        let c = Command::SetNodeStatus {
            id: 2,
            status: NodeStatus::Down,
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, r#"{"op":"set_node_status","id":2,"status":"down"}"#);
        assert_eq!(serde_json::from_str::<Command>(&j).unwrap(), c);
        assert!(ClusterState::default()
            .query("bogus")
            .unwrap_err()
            .to_string()
            .contains("unknown query"));
    }

    #[test]
    fn a_raw_put_spec_cannot_commit_a_cycle_or_a_bad_spec() {
        let mut s = ClusterState::default();
        let mut a = spec("a");
        a.depends_on = vec!["b".into()];
        let mut b = spec("b");
        assert!(
            !s.apply(&p(Command::PutSpec { spec: a.clone() })).ok,
            "b does not exist"
        );
        assert!(s.apply(&p(Command::PutSpec { spec: b.clone() })).ok);
        assert!(s.apply(&p(Command::PutSpec { spec: a })).ok);
        b.depends_on = vec!["a".into()];
        let refused = s.apply(&p(Command::PutSpec { spec: b }));
        assert!(
            !refused.ok && refused.message.contains("cycle"),
            "{}",
            refused.message
        );
        assert!(s.specs["b"].depends_on.is_empty());
        let mut bad = spec("Bad_Name");
        bad.replicas = 1;
        assert!(!s.apply(&p(Command::PutSpec { spec: bad })).ok);
        assert!(!s.specs.contains_key("Bad_Name"));
    }

    #[test]
    fn a_purge_decided_before_a_re_apply_keeps_the_spec() {
        let mut s = ClusterState::default();
        s.apply(&p(Command::PutSpec { spec: spec("a") }));
        assert!(
            s.apply(&p(Command::DeleteSpec {
                name: "a".into(),
                force: false
            }))
            .ok
        );
        // Applied again before the control loop's purge commits.
        assert!(s.apply(&p(Command::PutSpec { spec: spec("a") })).ok);
        let purge = s.apply(&p(Command::PurgeSpec { name: "a".into() }));
        assert!(!purge.ok, "{}", purge.message);
        assert!(s.specs.contains_key("a"));
    }

    #[test]
    fn nothing_new_may_depend_on_a_service_being_removed() {
        let mut s = ClusterState::default();
        s.apply(&p(Command::PutSpec { spec: spec("a") }));
        s.apply(&p(Command::DeleteSpec {
            name: "a".into(),
            force: false,
        }));
        let mut b = spec("b");
        b.depends_on = vec!["a".into()];
        let refused = s.apply(&p(Command::PutSpec { spec: b.clone() }));
        assert!(
            !refused.ok && refused.message.contains("being removed"),
            "{}",
            refused.message
        );
        // Keeping the dependency in the same apply is fine.
        let r = s.plan_apply(&[spec("a"), b], &BTreeMap::new());
        assert!(
            r.is_ok()
                || r.as_ref()
                    .err()
                    .is_some_and(|e| !e.message.contains("being removed")),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn configs_round_trip_exactly_through_json() {
        // The leader applies its proposal from memory, followers from the JSON they received:
        // a float that did not round-trip would give them different specs.
        for text in [
            "0.10000010000000001",
            "1.7976931348623157e308",
            "5e-324",
            "0.3",
        ] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let again: serde_json::Value =
                serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
            assert_eq!(v, again, "{text}");
            let f: f64 = text.parse().unwrap();
            assert_eq!(v.as_f64(), Some(f), "{text}");
        }
    }
}

#[cfg(test)]
mod rollout_tests {
    use super::*;
    use crate::model::rollout::RolloutStatus;

    fn p(command: Command) -> Proposal {
        Proposal {
            trace: None,
            at_ms: 5_000,
            command,
            request_id: None,
            by: None,
        }
    }

    fn web(every_ms: u64, replicas: u32) -> ServiceSpec {
        let mut s = ServiceSpec::new("web", "ticker");
        s.config = serde_json::json!({ "every_ms": every_ms });
        s.replicas = replicas;
        s
    }

    fn apply(state: &mut ClusterState, spec: ServiceSpec) -> CommandResult {
        state.apply(&p(Command::ApplySpecs {
            specs: vec![spec],
            expected: BTreeMap::new(),
        }))
    }

    /// A cluster with one node offering `ticker` and web (generation 1, 3 instances running).
    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&p(Command::RegisterNode {
            id: 1,
            address: "127.0.0.1:1".into(),
            labels: BTreeMap::new(),
            capacity: 100,
            kinds: vec!["ticker".into(), "counter".into()],
            incarnation: 0,
            heartbeat_grace_ms: 0,
            api_address: String::new(),
            role: NodeRole::Server,
        }));
        assert!(apply(&mut s, web(100, 3)).ok);
        let assign = (0..3)
            .map(|slot| SlotAssignment {
                service: "web".into(),
                slot,
                node: 1,
                moving_from: None,
            })
            .collect();
        s.apply_at(
            &p(Command::Place {
                assign,
                unassign: vec![],
            }),
            10,
        );
        for slot in 0..3 {
            let epoch = s.placements["web"][&slot].epoch;
            s.apply(&p(Command::ReportInstance {
                service: "web".into(),
                slot,
                node: 1,
                state: "running".into(),
                restart_count: 0,
                last_crash: None,
                epoch,
                healthy: None,
                retry_at_ms: None,
            }));
        }
        s
    }

    fn generations(s: &ClusterState) -> Vec<u64> {
        s.placements["web"].values().map(|p| p.generation).collect()
    }

    #[test]
    fn instances_carry_their_generation_and_a_replica_change_replaces_none() {
        let mut s = cluster();
        assert_eq!(generations(&s), [1, 1, 1]);
        assert_eq!(s.placements["web"][&0].running_since_ms, Some(5_000));
        let epochs: Vec<u64> = s.placements["web"].values().map(|p| p.epoch).collect();
        assert!(apply(&mut s, web(100, 5)).ok);
        // Same runtime: adopted as they run, nothing restarted.
        assert_eq!(generations(&s), [2, 2, 2]);
        let after: Vec<u64> = s.placements["web"].values().map(|p| p.epoch).collect();
        assert_eq!(epochs, after);
        assert_eq!(
            s.current_version("web").unwrap().status,
            RolloutStatus::Rolling
        );
        // An unchanged re-apply stores nothing.
        let again = apply(&mut s, web(100, 5));
        assert_eq!(again.changes[0].action, ChangeAction::Unchanged);
        assert_eq!(s.specs["web"].generation, 2);
        assert_eq!(s.versions["web"].len(), 2);
    }

    #[test]
    fn a_config_change_leaves_instances_on_their_version_until_rolled() {
        let mut s = cluster();
        assert!(apply(&mut s, web(200, 3)).ok);
        assert_eq!(generations(&s), [1, 1, 1]);
        let old = s.spec_of("web", &s.placements["web"][&0]).unwrap();
        assert_eq!(old.config["every_ms"], 100);
        // A step for a stale generation is refused; the current one replaces in place.
        let stale = s.apply(&p(Command::RollInstances {
            service: "web".into(),
            generation: 1,
            slots: vec![0],
        }));
        assert_eq!(stale.refusal, Some(Refusal::Conflict));
        let epoch = s.placements["web"][&0].epoch;
        let step = s.apply_at(
            &p(Command::RollInstances {
                service: "web".into(),
                generation: 2,
                slots: vec![0],
            }),
            99,
        );
        assert!(step.ok, "{}", step.message);
        let rolled = &s.placements["web"][&0];
        assert_eq!((rolled.generation, rolled.state.as_str()), (2, "pending"));
        assert!(rolled.epoch > epoch);
        assert_eq!(rolled.running_since_ms, None);
        assert_eq!(generations(&s), [2, 1, 1]);
        assert_eq!(s.spec_of("web", rolled).unwrap().config["every_ms"], 200);
    }

    #[test]
    fn a_kind_change_is_accepted_and_replaces_instances_under_the_policy() {
        let mut s = cluster();
        let mut counter = web(100, 3);
        counter.kind = "counter".into();
        let out = apply(&mut s, counter);
        assert!(out.ok, "{}", out.message);
        assert_eq!(out.changes[0].changed_fields, ["kind"]);
        // Not adopted: each instance keeps running the ticker until the rollout replaces it.
        assert_eq!(generations(&s), [1, 1, 1]);
        assert_eq!(
            s.spec_of("web", &s.placements["web"][&1]).unwrap().kind,
            "ticker"
        );
        let plan = s.plan_placements(&[web(100, 3)]);
        assert!(
            plan.is_empty(),
            "back to what runs: nothing to replace: {plan:?}"
        );
    }

    #[test]
    fn finishing_and_reverting_a_rollout_is_recorded_in_the_history() {
        let mut s = cluster();
        let done = s.apply(&p(Command::FinishRollout {
            service: "web".into(),
            generation: 1,
            failed: None,
        }));
        assert!(done.ok);
        assert_eq!(s.versions["web"][0].status, RolloutStatus::Succeeded);
        // Finished once: a second verdict is refused.
        let twice = s.apply(&p(Command::FinishRollout {
            service: "web".into(),
            generation: 1,
            failed: Some("late".into()),
        }));
        assert!(!twice.ok);
        assert!(apply(&mut s, web(999, 3)).ok);
        s.apply_at(
            &p(Command::RollInstances {
                service: "web".into(),
                generation: 2,
                slots: vec![0],
            }),
            50,
        );
        let reverted = s.apply(&p(Command::RollbackSpec {
            name: "web".into(),
            to_generation: 1,
            expected_generation: 2,
            revert_of: Some(2),
            reason: Some("web#0 failed on node 1: boom".into()),
        }));
        assert!(reverted.ok, "{}", reverted.message);
        assert_eq!(reverted.generation, Some(3));
        assert_eq!(s.specs["web"].config["every_ms"], 100);
        let vs: Vec<(u64, RolloutStatus)> = s.versions["web"]
            .iter()
            .map(|v| (v.spec.generation, v.status))
            .collect();
        assert_eq!(
            vs,
            [
                (1, RolloutStatus::Succeeded),
                (2, RolloutStatus::Reverted),
                (3, RolloutStatus::Rolling)
            ]
        );
        assert_eq!(
            s.versions["web"][1].reason.as_deref(),
            Some("web#0 failed on node 1: boom")
        );
        assert_eq!(s.current_version("web").unwrap().revert_of, Some(2));
        // The instances still on generation 1 run what generation 3 is: adopted; the one
        // that got generation 2 is replaced by the rollout.
        assert_eq!(generations(&s), [2, 3, 3]);
        // A rollback to a version not kept says which are.
        let missing = s.apply(&p(Command::RollbackSpec {
            name: "web".into(),
            to_generation: 9,
            expected_generation: 0,
            revert_of: None,
            reason: None,
        }));
        assert_eq!(missing.refusal, Some(Refusal::NotFound));
        assert!(
            missing.message.contains("kept: 1, 2, 3"),
            "{}",
            missing.message
        );
    }

    #[test]
    fn versions_are_bounded_and_purged_with_the_service() {
        let mut s = cluster();
        for i in 0..(crate::model::rollout::MAX_VERSIONS as u64 + 5) {
            assert!(apply(&mut s, web(1000 + i, 3)).ok);
        }
        assert_eq!(s.versions["web"].len(), crate::model::rollout::MAX_VERSIONS);
        let superseded = s.versions["web"]
            .iter()
            .filter(|v| v.status == RolloutStatus::Superseded)
            .count();
        assert_eq!(superseded, crate::model::rollout::MAX_VERSIONS - 1);
        // The instances still run generation 1 (nothing rolled them): it is kept.
        assert_eq!(s.versions["web"][0].spec.generation, 1);
        assert_eq!(generations(&s), [1, 1, 1]);
        s.apply(&p(Command::DeleteSpec {
            name: "web".into(),
            force: false,
        }));
        s.apply(&p(Command::PurgeSpec { name: "web".into() }));
        assert!(!s.versions.contains_key("web"));
    }

    #[test]
    fn a_plan_lists_replacements_and_new_placements_and_changes_nothing() {
        let s = cluster();
        let before = serde_json::to_value(&s).unwrap();
        let plan = s.plan_placements(&[web(200, 4)]);
        let actions: Vec<(u32, &str)> = plan.iter().map(|p| (p.slot, p.action.as_str())).collect();
        assert_eq!(
            actions,
            [(0, "replace"), (1, "replace"), (2, "replace"), (3, "place")]
        );
        assert_eq!(serde_json::to_value(&s).unwrap(), before);
        let shrink = s.plan_placements(&[web(100, 2)]);
        assert_eq!(shrink.len(), 1);
        assert_eq!((shrink[0].slot, shrink[0].action.as_str()), (2, "remove"));
    }
}
