//! Protobuf <-> domain conversions for the public API: the one place that knows both the
//! `mode.v1` messages and the domain types (specs, state, events, the graph).

use std::collections::BTreeMap;

use mode_proto::prost_types;
use mode_proto::v1 as pb;

use crate::graph;
use crate::model::rollout::SpecVersion;
use crate::model::secret::Secret;
use crate::model::spec::{
    Amount, ConstraintSpec, HealthCheck, Probe, RestartPolicy, ServiceSpec, SpecError, UpdatePolicy,
};
use crate::model::state::{ClusterState, Event, NodeInfo, NodeStatus, Placement, SpecChange};
use crate::security::Caller;
use crate::service::BeaconNode;

// ---------------------------------------------------------------- JSON <-> Struct

/// A JSON value as a `google.protobuf.Value`.
pub fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(m) => Kind::StructValue(json_map_to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn json_map_to_struct(m: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// A spec's config (a JSON object, or null for none) as a `google.protobuf.Struct`; `None`
/// for null. A config that is not an object is wrapped as `{"value": ...}` (specs parsed by
/// [`crate::model::spec::parse_specs`] are always objects or null).
pub fn json_to_struct(v: &serde_json::Value) -> Option<prost_types::Struct> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::Object(m) => Some(json_map_to_struct(m)),
        other => Some(prost_types::Struct {
            fields: BTreeMap::from([("value".to_string(), json_to_value(other))]),
        }),
    }
}

/// A `google.protobuf.Value` as JSON. Numbers are doubles on the wire: a whole number in the
/// integer range comes back as a JSON integer (so `every_ms: 100` stays an integer).
pub fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

fn number_to_json(n: f64) -> serde_json::Value {
    // 2^53: beyond it a double no longer holds every integer exactly.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= EXACT {
        if n >= 0.0 {
            return (n as u64).into();
        }
        return (n as i64).into();
    }
    serde_json::Number::from_f64(n)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

/// Where `v` (at `path`) holds a number a `google.protobuf.Struct` cannot carry exactly: an
/// integer beyond 2^53 (Struct numbers are doubles). Clients check before they send.
pub fn inexact_number(v: &serde_json::Value, path: &str) -> Option<String> {
    match v {
        serde_json::Value::Number(n) => {
            let exact = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u <= 1 << 53,
                (None, Some(i)) => i.unsigned_abs() <= 1 << 53,
                _ => true,
            };
            (!exact).then(|| format!("{path} = {n}"))
        }
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| inexact_number(x, &format!("{path}[{i}]"))),
        serde_json::Value::Object(m) => m
            .iter()
            .find_map(|(k, x)| inexact_number(x, &format!("{path}.{k}"))),
        _ => None,
    }
}

/// Whether a Struct value holds a NaN or an infinity (JSON has no such number).
fn non_finite(v: &prost_types::Value) -> bool {
    use prost_types::value::Kind;
    match &v.kind {
        Some(Kind::NumberValue(n)) => !n.is_finite(),
        Some(Kind::ListValue(l)) => l.values.iter().any(non_finite),
        Some(Kind::StructValue(s)) => s.fields.values().any(non_finite),
        _ => false,
    }
}

/// A `google.protobuf.Struct` as a JSON object.
pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

// ---------------------------------------------------------------- specs

/// A spec as the client sent it, defaults filled in. Its generation is ignored (the state
/// machine sets it). Fails only on what the domain type cannot hold (a constraint with both
/// `equals` and `in`); everything else is checked by [`ServiceSpec::validate`].
pub fn spec_from_proto(p: pb::ServiceSpec) -> Result<ServiceSpec, SpecError> {
    let mut spec = ServiceSpec::new(p.name, p.kind);
    if let Some(c) = &p.config {
        if c.fields.values().any(non_finite) {
            return Err(SpecError::new(
                "holds a number that is not finite (NaN or infinity), which JSON configs cannot hold: send a finite number",
            )
            .with_spec(spec.name.clone())
            .with_field("config"));
        }
    }
    spec.config = p
        .config
        .as_ref()
        .map(struct_to_json)
        .unwrap_or(serde_json::Value::Null);
    spec.secrets = p
        .secrets
        .into_iter()
        .map(|(k, v)| (k, Secret::new(v)))
        .collect();
    if let Some(r) = p.replicas {
        spec.replicas = r;
    }
    spec.singleton = p.singleton;
    for (i, c) in p.constraints.into_iter().enumerate() {
        if c.equals.is_some() && !c.r#in.is_empty() {
            return Err(
                SpecError::new("set exactly one of `equals` and `in`, not both")
                    .with_spec(spec.name.clone())
                    .with_field(format!("constraints[{i}]")),
            );
        }
        spec.constraints.push(ConstraintSpec {
            label: c.label,
            equals: c.equals,
            in_: (!c.r#in.is_empty()).then_some(c.r#in),
        });
    }
    spec.spread = (!p.spread.is_empty()).then_some(p.spread);
    spec.anti_affinity = p.anti_affinity;
    if let Some(cost) = p.cost {
        spec.cost = cost;
    }
    spec.depends_on = p.depends_on;
    if let Some(r) = p.restart {
        let d = RestartPolicy::default();
        spec.restart = RestartPolicy {
            max_restarts: r.max_restarts.unwrap_or(d.max_restarts),
            within_s: r.within_s.unwrap_or(d.within_s),
            backoff_initial_ms: r.backoff_initial_ms.unwrap_or(d.backoff_initial_ms),
            backoff_max_ms: r.backoff_max_ms.unwrap_or(d.backoff_max_ms),
        };
    }
    if let Some(g) = p.stop_grace_s {
        spec.stop_grace_s = g;
    }
    if let Some(u) = p.update {
        let d = UpdatePolicy::default();
        let max_unavailable = if u.max_unavailable.trim().is_empty() {
            d.max_unavailable
        } else {
            Amount::parse(&u.max_unavailable).map_err(|e| {
                SpecError::new(e)
                    .with_spec(spec.name.clone())
                    .with_field("update.max_unavailable")
            })?
        };
        spec.update = UpdatePolicy {
            max_unavailable,
            min_healthy_ms: u.min_healthy_ms.unwrap_or(d.min_healthy_ms),
            deadline_s: u.deadline_s.unwrap_or(d.deadline_s),
            auto_revert: u.auto_revert,
        };
    }
    if let Some(h) = p.health {
        spec.health = Some(Box::new(health_from_proto(&spec.name, h)?));
    }
    Ok(spec)
}

fn health_from_proto(spec: &str, h: pb::HealthCheck) -> Result<HealthCheck, SpecError> {
    let port = |field: &str, port: u32| {
        u16::try_from(port).map_err(|_| {
            SpecError::new(format!("{port} is not a port (1-65535)"))
                .with_spec(spec.to_string())
                .with_field(field.to_string())
        })
    };
    let probe = match h.probe {
        Some(pb::health_check::Probe::Http(p)) => Probe::Http {
            port: port("health.http.port", p.port)?,
            path: if p.path.is_empty() {
                "/".to_string()
            } else {
                p.path
            },
        },
        Some(pb::health_check::Probe::Tcp(p)) => Probe::Tcp {
            port: port("health.tcp.port", p.port)?,
        },
        Some(pb::health_check::Probe::Command(c)) => Probe::Command(c.argv),
        None => {
            return Err(
                SpecError::new("needs exactly one of `http`, `tcp` or `command`")
                    .with_spec(spec.to_string())
                    .with_field("health"),
            )
        }
    };
    Ok(HealthCheck {
        probe,
        port_plus_slot: h.port_plus_slot,
        interval_ms: h.interval_ms.unwrap_or(1000),
        timeout_ms: h.timeout_ms.unwrap_or(1000),
        healthy_threshold: h.healthy_threshold.unwrap_or(1),
        unhealthy_threshold: h.unhealthy_threshold.unwrap_or(3),
    })
}

fn health_to_proto(h: &HealthCheck) -> pb::HealthCheck {
    let probe = match &h.probe {
        Probe::Http { port, path } => pb::health_check::Probe::Http(pb::HttpProbe {
            port: u32::from(*port),
            path: path.clone(),
        }),
        Probe::Tcp { port } => pb::health_check::Probe::Tcp(pb::TcpProbe {
            port: u32::from(*port),
        }),
        Probe::Command(argv) => {
            pb::health_check::Probe::Command(pb::CommandProbe { argv: argv.clone() })
        }
    };
    pb::HealthCheck {
        probe: Some(probe),
        port_plus_slot: h.port_plus_slot,
        interval_ms: Some(h.interval_ms),
        timeout_ms: Some(h.timeout_ms),
        healthy_threshold: Some(h.healthy_threshold),
        unhealthy_threshold: Some(h.unhealthy_threshold),
    }
}

/// A spec as `caller` may read it: with the secret values only for a caller who
/// [sees secrets](Caller::sees_secrets), else [redacted](ServiceSpec::redacted).
pub fn spec_for(caller: &Caller, s: &ServiceSpec) -> pb::ServiceSpec {
    if caller.sees_secrets() {
        spec_to_proto(s)
    } else {
        spec_to_proto(&s.redacted())
    }
}

/// A spec as sent (every field set), secret values included: to a client through
/// [`spec_for`] only; as is to the nodes that run it and by clients sending their own.
pub fn spec_to_proto(s: &ServiceSpec) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: s.name.clone(),
        kind: s.kind.clone(),
        config: json_to_struct(&s.config),
        secrets: s
            .secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string()))
            .collect(),
        replicas: Some(s.replicas),
        singleton: s.singleton,
        constraints: s
            .constraints
            .iter()
            .map(|c| pb::Constraint {
                label: c.label.clone(),
                equals: c.equals.clone(),
                r#in: c.in_.clone().unwrap_or_default(),
            })
            .collect(),
        spread: s.spread.clone().unwrap_or_default(),
        anti_affinity: s.anti_affinity.clone(),
        cost: Some(s.cost),
        depends_on: s.depends_on.clone(),
        restart: Some(pb::RestartPolicy {
            max_restarts: Some(s.restart.max_restarts),
            within_s: Some(s.restart.within_s),
            backoff_initial_ms: Some(s.restart.backoff_initial_ms),
            backoff_max_ms: Some(s.restart.backoff_max_ms),
        }),
        stop_grace_s: Some(s.stop_grace_s),
        generation: s.generation,
        update: Some(pb::UpdatePolicy {
            max_unavailable: s.update.max_unavailable.to_string(),
            min_healthy_ms: Some(s.update.min_healthy_ms),
            deadline_s: Some(s.update.deadline_s),
            auto_revert: s.update.auto_revert,
        }),
        health: s.health.as_deref().map(health_to_proto),
    }
}

/// A health verdict as the API says it: `healthy`, `unhealthy` or "".
pub fn health_word(healthy: Option<bool>) -> &'static str {
    match healthy {
        Some(true) => "healthy",
        Some(false) => "unhealthy",
        None => "",
    }
}

/// The API's health word as a verdict.
pub fn health_from_word(word: &str) -> Option<bool> {
    match word {
        "healthy" => Some(true),
        "unhealthy" => Some(false),
        _ => None,
    }
}

/// A kept version's rollout as sent to clients; `progress` for the current version.
pub fn rollout_to_proto(
    v: &SpecVersion,
    progress: Option<crate::model::rollout::Progress>,
) -> pb::Rollout {
    let p = progress.unwrap_or_default();
    pb::Rollout {
        generation: v.spec.generation,
        status: v.status.as_str().to_string(),
        reason: v.reason.clone().unwrap_or_default(),
        unplaced: v.unplaced.clone().unwrap_or_default(),
        revert_of: v.revert_of.unwrap_or(0),
        wanted: p.wanted,
        updated: p.updated,
        available: p.available,
        applied_at_ms: v.applied_at_ms,
        finished_at_ms: v.finished_at_ms.unwrap_or(0),
        change: v.change.clone(),
    }
}

/// One instance of a dry run's plan.
pub fn planned_to_proto(p: &crate::model::state::PlannedInstance) -> pb::PlannedInstance {
    pb::PlannedInstance {
        service: p.service.clone(),
        slot: p.slot,
        action: p.action.clone(),
        node: p.node,
        from_node: p.from_node.unwrap_or(0),
        reason: p.reason.clone().unwrap_or_default(),
    }
}

/// One spec's change in an apply's answer.
pub fn change_to_proto(c: &SpecChange) -> pb::ServiceChange {
    pb::ServiceChange {
        name: c.name.clone(),
        action: c.action.as_str().to_string(),
        generation: c.generation,
        changed_fields: c.changed_fields.clone(),
        message: c.describe(),
    }
}

/// An instance as sent to clients.
pub fn instance_to_proto(service: &str, slot: u32, p: &Placement) -> pb::Instance {
    pb::Instance {
        service: service.to_string(),
        slot,
        node: p.node,
        state: p.state.clone(),
        restart_count: p.restart_count,
        last_crash: p.last_crash.clone().unwrap_or_default(),
        moving_from: p.moving_from.unwrap_or(0),
        reschedules: p.reschedules,
        epoch: p.epoch,
        generation: p.generation,
        health: health_word(p.healthy).to_string(),
        running_since_ms: p.running_since_ms.unwrap_or(0),
        restarts_total: p.total_restarts(),
        last_crash_ms: p.last_crash_at_ms.unwrap_or(0),
        last_crash_generation: p.last_crash_generation.unwrap_or(0),
        ..Default::default()
    }
}

/// A crash within this long of now, by an instance that has restarted or moved this often,
/// makes a running instance `crash-loop` (it keeps failing soon after each start).
const CRASH_LOOP_WINDOW_MS: u64 = 30_000;
const CRASH_LOOP_RESTARTS: u32 = 3;

/// What instance `service#slot` is doing and waits for, for people: fills `status`,
/// `next_attempt_ms` and `waiting_for` of `i`.
fn describe_instance(
    state: &ClusterState,
    spec: &crate::model::spec::ServiceSpec,
    p: &Placement,
    now_ms: u64,
    i: &mut pb::Instance,
) {
    let node_status = state.nodes.get(&p.node).map(|n| n.status);
    let crashed_recently = p
        .last_crash_at_ms
        .is_some_and(|at| now_ms.saturating_sub(at) < CRASH_LOOP_WINDOW_MS);
    let (status, waiting_for) = match p.state.as_str() {
        "failed" => {
            let at = crate::control::reschedule_at(p);
            i.next_attempt_ms = at;
            (
                "backing-off",
                format!(
                    "exceeded its restart intensity on node {}: moves to another node in {}",
                    p.node,
                    in_words(at.saturating_sub(now_ms))
                ),
            )
        }
        "crashed" => {
            i.next_attempt_ms = p.retry_at_ms.unwrap_or(0);
            (
                "crash-loop",
                match p.retry_at_ms {
                    Some(at) => format!(
                        "its node to restart it in {} ({} restarts so far)",
                        in_words(at.saturating_sub(now_ms)),
                        p.restart_count
                    ),
                    None => format!(
                        "its node to restart it after a backoff ({} restarts so far)",
                        p.restart_count
                    ),
                },
            )
        }
        "waiting" => {
            let missing: Vec<&str> = spec
                .depends_on
                .iter()
                .filter(|d| {
                    !state
                        .placements
                        .get(*d)
                        .is_some_and(|slots| slots.values().any(|q| q.state == "running"))
                })
                .map(String::as_str)
                .collect();
            (
                "waiting",
                if missing.is_empty() {
                    "its dependencies (they run now: it starts soon)".to_string()
                } else {
                    format!("its dependencies to run: {}", missing.join(", "))
                },
            )
        }
        "running"
            if crashed_recently
                && p.restart_count.saturating_add(p.reschedules) >= CRASH_LOOP_RESTARTS =>
        {
            ("crash-loop", String::new())
        }
        "running" => ("running", String::new()),
        _ if node_status == Some(NodeStatus::Down) => (
            p.state.as_str(),
            format!(
                "node {} is down: it moves once the node's grace ends",
                p.node
            ),
        ),
        _ if p.moving_from.is_some() => (
            "moving",
            format!(
                "node {} to start it (node {} keeps it until then)",
                p.node,
                p.moving_from.unwrap_or_default()
            ),
        ),
        "pending" => ("pending", format!("node {} to start it", p.node)),
        "starting" => ("starting", String::new()),
        other => (other, String::new()),
    };
    i.status = status.to_string();
    i.waiting_for = waiting_for;
}

/// `3.2s`, `45s`, `2m10s`.
fn in_words(ms: u64) -> String {
    match ms {
        0..=9_999 => format!("{:.1}s", ms as f64 / 1000.0),
        10_000..=119_999 => format!("{}s", ms / 1000),
        _ => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
    }
}

/// Service `name` (spec and instances) in `state`, when it is stored. `unplaced_reasons`
/// ([`ClusterState::unplaced_reasons`]) say why instances wanted are not placed.
/// `now_ms` is the answering server's clock (for `min_healthy_ms` in the rollout's progress).
/// With its instances only when `with_instances`: without them it is a summary (counts,
/// rollout and restarts; `ListServices { summary }`) that never builds an instance's message.
pub fn service_to_proto(
    state: &ClusterState,
    name: &str,
    applied: u64,
    now_ms: u64,
    caller: &Caller,
    unplaced_reasons: Option<&BTreeMap<String, String>>,
    with_instances: bool,
) -> Option<pb::Service> {
    let spec = state.specs.get(name)?;
    let rollout = state.current_version(name).map(|v| {
        let empty = BTreeMap::new();
        let placed = state.placements.get(name).unwrap_or(&empty);
        rollout_to_proto(
            v,
            Some(crate::model::rollout::progress(spec, placed, now_ms)),
        )
    });
    let placed = state.placements.get(name);
    let instances: Vec<pb::Instance> = placed
        .into_iter()
        .flatten()
        .filter(|_| with_instances)
        .map(|(slot, p)| {
            let mut i = instance_to_proto(name, *slot, p);
            describe_instance(state, spec, p, now_ms, &mut i);
            i
        })
        .collect();
    let running = placed
        .into_iter()
        .flatten()
        .filter(|(_, p)| p.state == "running")
        .count() as u32;
    let deleting = state.deleting.contains(name);
    let unplaced = if deleting {
        0
    } else {
        (spec.instances() as usize).saturating_sub(placed.map_or(0, |p| p.len())) as u32
    };
    let unplaced_reason = match unplaced {
        0 => String::new(),
        _ => unplaced_reasons
            .and_then(|r| r.get(name).cloned())
            .unwrap_or_else(|| "not placed yet".to_string()),
    };
    Some(pb::Service {
        spec: Some(spec_for(caller, spec)),
        deleting,
        running,
        instances,
        applied_index: applied,
        rollout,
        restarts_total: state.restarts.get(name).copied().unwrap_or(0),
        unplaced,
        unplaced_reason,
    })
}

// ---------------------------------------------------------------- nodes, events, kinds

/// A node as sent to clients. `members` are the Raft members (id -> address): a node among
/// them is a `server`, any other an `agent`.
pub fn node_to_proto(n: &NodeInfo, members: &BTreeMap<u64, String>, instances: u32) -> pb::Node {
    let server = members.contains_key(&n.id);
    pb::Node {
        id: n.id,
        address: n.address.clone(),
        // The public API is served beside the peer API (one listener) on servers; agents
        // serve none.
        api_address: if server {
            n.address.clone()
        } else {
            String::new()
        },
        status: n.status.as_str().to_string(),
        role: if server { "server" } else { "agent" }.to_string(),
        labels: n.labels.clone().into_iter().collect(),
        capacity: n.capacity,
        kinds: n.kinds.clone(),
        draining: n.draining,
        registered_at_ms: n.registered_at_ms,
        instances,
    }
}

/// Instances placed on each node.
pub fn instances_per_node(state: &ClusterState) -> BTreeMap<u64, u32> {
    let mut counts = BTreeMap::new();
    for p in state.placements.values().flat_map(|slots| slots.values()) {
        *counts.entry(p.node).or_insert(0u32) += 1;
    }
    counts
}

/// An event as sent to clients.
pub fn event_to_proto(e: &Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time_ms: e.time_ms,
        kind: e.kind.clone(),
        message: e.message.clone(),
        service: e.service.clone().unwrap_or_default(),
        node: e.node.unwrap_or(0),
        gap: false,
        by: e.by.clone().unwrap_or_default(),
    }
}

/// A token's record, without its hash.
pub fn token_to_proto(t: &crate::model::state::TokenRecord) -> pb::Token {
    pb::Token {
        id: t.id.clone(),
        name: t.name.clone(),
        role: t.role.clone(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        created_by: t.created_by.clone().unwrap_or_default(),
    }
}

/// The kinds nodes offer, each with the nodes offering it.
pub fn kinds_to_proto(state: &ClusterState) -> Vec<pb::Kind> {
    let mut kinds: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for n in state.nodes.values() {
        for k in &n.kinds {
            kinds.entry(k.as_str()).or_default().push(n.id);
        }
    }
    kinds
        .into_iter()
        .map(|(name, nodes)| pb::Kind {
            name: name.to_string(),
            nodes,
        })
        .collect()
}

// ---------------------------------------------------------------- graph

/// A beacon tree as sent to clients.
pub fn beacon_to_proto(b: &BeaconNode) -> pb::BeaconNode {
    let kind = serde_json::to_value(b.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "other".to_string());
    pb::BeaconNode {
        kind,
        label: b.label.clone(),
        state: b.state.clone(),
        restart_count: b.restart_count,
        crash_reason: b.crash_reason.clone().unwrap_or_default(),
        last_crash_reason: b.last_crash_reason.clone().unwrap_or_default(),
        uptime_s: b.uptime_s,
        detail: b.detail.clone().unwrap_or_default(),
        children: b.children.iter().map(beacon_to_proto).collect(),
    }
}

/// The merged cluster graph as sent to clients.
pub fn graph_to_proto(g: &graph::ClusterGraph) -> pb::ClusterGraph {
    pb::ClusterGraph {
        answered_by: g.answered_by,
        leader: g.leader.unwrap_or(0),
        term: g.term,
        applied_index: g.applied_index,
        generated_at: g.generated_at.clone(),
        filters: g.filters.clone(),
        nodes: g
            .nodes
            .iter()
            .map(|n| pb::NodeGraph {
                id: n.id,
                address: n.address.clone(),
                state: n.state.clone(),
                reachable: n.reachable,
                error: n.error.clone().unwrap_or_default(),
                leader: n.leader,
                labels: n.labels.clone().into_iter().collect(),
                instances: n
                    .instances
                    .iter()
                    .map(|i| pb::InstanceGraph {
                        service: i.service.clone(),
                        slot: i.slot,
                        state: i.state.clone(),
                        placement: i.placement.clone().unwrap_or_default(),
                        restart_count: i.restart_count,
                        last_crash: i.last_crash.clone().unwrap_or_default(),
                        tree: i.tree.as_ref().map(beacon_to_proto),
                    })
                    .collect(),
                daemon: n.daemon.as_ref().map(beacon_to_proto),
            })
            .collect(),
        services: g
            .services
            .iter()
            .map(|s| pb::ServiceSummary {
                name: s.name.clone(),
                kind: s.kind.clone(),
                replicas: s.replicas,
                running: s.running,
                depends_on: s.depends_on.clone(),
                deleting: s.deleting,
            })
            .collect(),
        edges: g
            .edges
            .iter()
            .map(|e| pb::DependencyEdge {
                from_service: e.from_service.clone(),
                from_node: e.from_node,
                to_service: e.to_service.clone(),
                to_node: e.to_node,
                cross_node: e.cross_node,
            })
            .collect(),
        edges_omitted: g.edges_omitted as u64,
    }
}

// ---------------------------------------------------------------- graph, back

fn none_if_empty_str(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn beacon_from_proto(b: &pb::BeaconNode) -> crate::service::BeaconNode {
    crate::service::BeaconNode {
        // Unknown kinds read as `other` (the enum's catch-all).
        kind: serde_json::from_value(serde_json::Value::String(b.kind.clone()))
            .unwrap_or(crate::service::NodeKind::Other),
        label: b.label.clone(),
        state: b.state.clone(),
        restart_count: b.restart_count,
        crash_reason: none_if_empty_str(&b.crash_reason),
        last_crash_reason: none_if_empty_str(&b.last_crash_reason),
        uptime_s: b.uptime_s,
        detail: none_if_empty_str(&b.detail),
        children: b.children.iter().map(beacon_from_proto).collect(),
    }
}

/// A graph from the wire, as the renderers (tree, dot, SVG, JSON) take it (the other way of
/// [`graph_to_proto`]; clients such as modectl render with it).
pub fn graph_from_proto(g: &pb::ClusterGraph) -> graph::ClusterGraph {
    graph::ClusterGraph {
        answered_by: g.answered_by,
        leader: (g.leader != 0).then_some(g.leader),
        term: g.term,
        applied_index: g.applied_index,
        generated_at: g.generated_at.clone(),
        filters: g.filters.clone(),
        nodes: g
            .nodes
            .iter()
            .map(|n| graph::NodeGraph {
                id: n.id,
                address: n.address.clone(),
                state: n.state.clone(),
                reachable: n.reachable,
                error: none_if_empty_str(&n.error),
                leader: n.leader,
                labels: n
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>(),
                instances: n
                    .instances
                    .iter()
                    .map(|i| graph::InstanceGraph {
                        service: i.service.clone(),
                        slot: i.slot,
                        state: i.state.clone(),
                        placement: none_if_empty_str(&i.placement),
                        restart_count: i.restart_count,
                        last_crash: none_if_empty_str(&i.last_crash),
                        tree: i.tree.as_ref().map(beacon_from_proto),
                    })
                    .collect(),
                daemon: n.daemon.as_ref().map(beacon_from_proto),
            })
            .collect(),
        services: g
            .services
            .iter()
            .map(|s| graph::ServiceSummary {
                name: s.name.clone(),
                kind: s.kind.clone(),
                replicas: s.replicas,
                running: s.running,
                depends_on: s.depends_on.clone(),
                deleting: s.deleting,
            })
            .collect(),
        edges: g
            .edges
            .iter()
            .map(|e| graph::DependencyEdge {
                from_service: e.from_service.clone(),
                from_node: e.from_node,
                to_service: e.to_service.clone(),
                to_node: e.to_node,
                cross_node: e.cross_node,
            })
            .collect(),
        edges_omitted: usize::try_from(g.edges_omitted).unwrap_or(usize::MAX),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn configs_with_non_finite_or_inexact_numbers_are_refused() {
        let mut nan = json_to_struct(&serde_json::json!({"a": 1})).unwrap();
        nan.fields.insert(
            "x".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
            },
        );
        let p = pb::ServiceSpec {
            name: "web".into(),
            kind: "ticker".into(),
            config: Some(nan),
            ..Default::default()
        };
        let e = spec_from_proto(p).unwrap_err().to_string();
        assert!(e.contains("not finite") && e.contains("config"), "{e}");
        let big =
            serde_json::json!({"seed": 12345678901234567891u64, "ok": [1, 9007199254740992u64]});
        assert_eq!(
            inexact_number(&big, "config").as_deref(),
            Some("config.seed = 12345678901234567891")
        );
        assert_eq!(
            inexact_number(&serde_json::json!({"ok": 1.5}), "config"),
            None
        );
    }
    use super::*;

    #[test]
    fn a_spec_survives_the_round_trip_through_protobuf() {
        let text = r#"
name: web
kind: exec
config: {command: /bin/sleep, args: ["1000"], every_ms: 100, ratio: 0.5, on: true, none: null}
replicas: 3
constraints:
  - {label: zone, equals: a}
  - {label: disk, in: [ssd, nvme]}
spread: zone
anti_affinity: [db]
cost: 2
depends_on: [db]
restart: {max_restarts: 3, within_s: 10}
stop_grace_s: 5
secrets: {DB_PASSWORD: hunter2}
"#;
        let spec = crate::model::spec::parse_specs("web.yaml", text)
            .unwrap()
            .remove(0);
        let back = spec_from_proto(spec_to_proto(&spec)).unwrap();
        assert_eq!(back, spec);
        assert_eq!(back.config["every_ms"], serde_json::json!(100));
        assert!(back.config["every_ms"].is_u64(), "integers stay integers");
    }

    #[test]
    fn absent_fields_take_the_spec_defaults() {
        let p = pb::ServiceSpec {
            name: "web".into(),
            kind: "exec".into(),
            restart: Some(pb::RestartPolicy {
                max_restarts: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = spec_from_proto(p).unwrap();
        let mut want = ServiceSpec::new("web", "exec");
        want.restart.max_restarts = 2;
        assert_eq!(spec, want);
    }

    #[test]
    fn a_constraint_with_both_forms_is_refused_naming_it() {
        let p = pb::ServiceSpec {
            name: "web".into(),
            kind: "exec".into(),
            constraints: vec![pb::Constraint {
                label: "zone".into(),
                equals: Some("a".into()),
                r#in: vec!["b".into()],
            }],
            ..Default::default()
        };
        let e = spec_from_proto(p).unwrap_err().to_string();
        assert_eq!(
            e,
            "spec 'web': field 'constraints[0]': set exactly one of `equals` and `in`, not both"
        );
    }

    #[test]
    fn a_summary_counts_the_instances_it_leaves_out() {
        let mut spec = ServiceSpec::new("web", "ticker");
        spec.replicas = 4;
        let mut state = ClusterState::default();
        state.specs.insert("web".into(), spec);
        let mut running = Placement::on(1);
        running.state = "running".into();
        let mut starting = Placement::on(2);
        starting.state = "starting".into();
        let placed = BTreeMap::from([(0, running.clone()), (1, starting), (2, running)]);
        state.placements.insert("web".into(), placed);
        let caller = Caller::anonymous();
        let full = service_to_proto(&state, "web", 7, 0, &caller, None, true).unwrap();
        let summary = service_to_proto(&state, "web", 7, 0, &caller, None, false).unwrap();
        assert_eq!(full.instances.len(), 3);
        assert!(summary.instances.is_empty(), "{:?}", summary.instances);
        for s in [&full, &summary] {
            assert_eq!((s.running, s.unplaced), (2, 1));
            assert_eq!(s.unplaced_reason, "not placed yet");
            assert_eq!(s.applied_index, 7);
        }
        assert_eq!(
            pb::Service {
                instances: vec![],
                ..full
            },
            summary
        );
    }

    #[test]
    fn only_callers_who_see_secrets_read_their_values() {
        use crate::security::{Proof, Role};
        let mut spec = ServiceSpec::new("db", "exec");
        spec.secrets
            .insert("DB_PASSWORD".into(), Secret::new("hunter2"));
        let mut state = ClusterState::default();
        state.specs.insert("db".into(), spec.clone());
        let client = |role| Caller::Client {
            name: "alice".into(),
            role,
            proof: Proof::Certificate,
        };
        let read = |caller: &Caller| {
            let s = service_to_proto(&state, "db", 1, 0, caller, None, true).unwrap();
            s.spec.unwrap().secrets["DB_PASSWORD"].clone()
        };
        assert_eq!(read(&client(Role::Viewer)), "(secret)");
        assert_eq!(read(&Caller::Node(2)), "(secret)");
        assert_eq!(read(&client(Role::Operator)), "hunter2");
        assert_eq!(read(&Caller::anonymous()), "hunter2");
        assert_eq!(
            spec_for(&client(Role::Viewer), &spec),
            spec_to_proto(&spec.redacted())
        );
    }
}
