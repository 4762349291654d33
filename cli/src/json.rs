//! `-o json`: the typed API's messages as JSON, field names as in control.proto (snake_case).
//! Hand-mapped so that the names stay stable whatever the generated code calls them; absent
//! optional fields print as `null`.

use mode_proto::v1 as pb;
use serde_json::{json, Value};

use crate::convert::{format_utc_ms, struct_to_json};

pub(crate) fn spec(s: &pb::ServiceSpec) -> Value {
    json!({
        "name": s.name,
        "kind": s.kind,
        "config": s.config.as_ref().map(struct_to_json),
        // As the server sent them: "(secret)" for each value unless the caller may see them.
        "secrets": s.secrets.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "replicas": s.replicas,
        "singleton": s.singleton,
        "constraints": s.constraints.iter().map(|c| json!({
            "label": c.label, "equals": c.equals, "in": c.r#in,
        })).collect::<Vec<_>>(),
        "spread": s.spread,
        "anti_affinity": s.anti_affinity,
        "cost": s.cost,
        "depends_on": s.depends_on,
        "restart": s.restart.as_ref().map(|r| json!({
            "max_restarts": r.max_restarts,
            "within_s": r.within_s,
            "backoff_initial_ms": r.backoff_initial_ms,
            "backoff_max_ms": r.backoff_max_ms,
        })),
        "stop_grace_s": s.stop_grace_s,
        "update": s.update.as_ref().map(|u| json!({
            "max_unavailable": u.max_unavailable,
            "min_healthy_ms": u.min_healthy_ms,
            "deadline_s": u.deadline_s,
            "auto_revert": u.auto_revert,
        })),
        "health": mode::api::convert::spec_from_proto(s.clone())
            .ok()
            .and_then(|d| d.health)
            .and_then(|h| serde_json::to_value(h).ok()),
        "generation": s.generation,
    })
}

pub(crate) fn rollout(r: &pb::Rollout) -> Value {
    json!({
        "generation": r.generation,
        "status": r.status,
        "reason": r.reason,
        "unplaced": r.unplaced,
        "revert_of": r.revert_of,
        "wanted": r.wanted,
        "updated": r.updated,
        "available": r.available,
        "applied_at_ms": r.applied_at_ms,
        "applied_at": format_utc_ms(r.applied_at_ms),
        "finished_at_ms": r.finished_at_ms,
        "change": r.change,
    })
}

pub(crate) fn instance(i: &pb::Instance) -> Value {
    json!({
        "service": i.service,
        "slot": i.slot,
        "node": i.node,
        "state": i.state,
        "restart_count": i.restart_count,
        "restarts_total": i.restarts_total,
        "last_crash": i.last_crash,
        "moving_from": i.moving_from,
        "reschedules": i.reschedules,
        "epoch": i.epoch,
        "generation": i.generation,
        "health": i.health,
        "running_since_ms": i.running_since_ms,
        "status": i.status,
        "waiting_for": i.waiting_for,
        "next_attempt_ms": i.next_attempt_ms,
        "last_crash_ms": i.last_crash_ms,
        "last_crash_generation": i.last_crash_generation,
    })
}

pub(crate) fn service(s: &pb::Service) -> Value {
    json!({
        "spec": s.spec.as_ref().map(spec),
        "deleting": s.deleting,
        "instances": s.instances.iter().map(instance).collect::<Vec<_>>(),
        "running": s.running,
        "applied_index": s.applied_index,
        "rollout": s.rollout.as_ref().map(rollout),
        "restarts_total": s.restarts_total,
        "unplaced": s.unplaced,
        "unplaced_reason": s.unplaced_reason,
    })
}

pub(crate) fn services(r: &pb::ListServicesReply) -> Value {
    json!({
        "services": r.services.iter().map(service).collect::<Vec<_>>(),
        "applied_index": r.applied_index,
    })
}

pub(crate) fn apply(r: &pb::ApplyServicesReply) -> Value {
    json!({
        "changes": r.changes.iter().map(|c| json!({
            "name": c.name,
            "action": c.action,
            "generation": c.generation,
            "changed_fields": c.changed_fields,
            "message": c.message,
        })).collect::<Vec<_>>(),
        "dry_run": r.dry_run,
        "log_index": r.log_index,
    })
}

pub(crate) fn node(n: &pb::Node) -> Value {
    json!({
        "id": n.id,
        "address": n.address,
        "api_address": n.api_address,
        "status": n.status,
        "role": n.role,
        "labels": n.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "capacity": n.capacity,
        "kinds": n.kinds,
        "draining": n.draining,
        "registered_at_ms": n.registered_at_ms,
        "instances": n.instances,
    })
}

pub(crate) fn nodes(r: &pb::ListNodesReply) -> Value {
    json!({
        "nodes": r.nodes.iter().map(node).collect::<Vec<_>>(),
        "applied_index": r.applied_index,
    })
}

/// One event, with its time readable next to the milliseconds.
pub(crate) fn event(e: &pb::Event) -> Value {
    json!({
        "seq": e.seq,
        "time_ms": e.time_ms,
        "time": format_utc_ms(e.time_ms),
        "kind": e.kind,
        "message": e.message,
        "service": e.service,
        "node": e.node,
        "gap": e.gap,
        "by": e.by,
    })
}

pub(crate) fn kinds(r: &pb::ListKindsReply) -> Value {
    json!({
        "kinds": r.kinds.iter().map(|k| json!({"name": k.name, "nodes": k.nodes})).collect::<Vec<_>>(),
    })
}

/// A structured answer on stdout: pretty JSON (`-o json`) or YAML (`-o yaml`).
pub(crate) fn print(v: &Value) {
    if crate::output::yaml() {
        say!("{}", yaml(v).trim_end());
    } else {
        say!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

/// One record of a stream or a one-line answer: a line of JSON (NDJSON), or with `-o yaml` a
/// YAML document (`---` first, so that a stream of them is one multi-document file).
pub(crate) fn line(v: &Value) {
    if crate::output::yaml() {
        say!("---\n{}", yaml(v).trim_end());
    } else {
        say!("{v}");
    }
}

/// `v` as YAML (the same tree as its JSON).
fn yaml(v: &Value) -> String {
    serde_norway::to_string(v).unwrap_or_else(|e| format!("# cannot write this as YAML: {e}\n"))
}
