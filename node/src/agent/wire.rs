//! Domain <-> wire conversions the agent's side of the peer API needs: service specs (with
//! their JSON config as a `google.protobuf.Struct`) and placements, for `WatchPlacements`.
//! (The public API converts the same types; the lead may fold the two into one module.)

use mode_proto::prost_types::{value::Kind, ListValue, Struct, Value};
use mode_proto::v1 as pb;

use crate::model::spec::{ConstraintSpec, RestartPolicy, ServiceSpec};
use crate::model::state::Placement;

/// JSON -> `google.protobuf.Value`.
pub(crate) fn json_to_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// `google.protobuf.Value` -> JSON (whole numbers come back as integers).
pub(crate) fn value_to_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                serde_json::Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

fn struct_to_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

/// A stored spec, as sent to agents.
pub(crate) fn spec_to_proto(s: &ServiceSpec) -> pb::ServiceSpec {
    let config = match json_to_value(&s.config).kind {
        Some(Kind::StructValue(st)) => Some(st),
        _ => None,
    };
    pb::ServiceSpec {
        name: s.name.clone(),
        kind: s.kind.clone(),
        config,
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
    }
}

/// A spec sent by a server (stored, so valid): absent optional fields take their defaults.
pub(crate) fn spec_from_proto(p: &pb::ServiceSpec) -> ServiceSpec {
    let mut s = ServiceSpec::new(&p.name, &p.kind);
    s.config = p
        .config
        .as_ref()
        .map(struct_to_json)
        .unwrap_or(serde_json::Value::Null);
    if let Some(r) = p.replicas {
        s.replicas = r;
    }
    s.singleton = p.singleton;
    s.constraints = p
        .constraints
        .iter()
        .map(|c| ConstraintSpec {
            label: c.label.clone(),
            equals: c.equals.clone(),
            in_: (!c.r#in.is_empty()).then(|| c.r#in.clone()),
        })
        .collect();
    s.spread = (!p.spread.is_empty()).then(|| p.spread.clone());
    s.anti_affinity = p.anti_affinity.clone();
    if let Some(c) = p.cost {
        s.cost = c;
    }
    s.depends_on = p.depends_on.clone();
    let d = RestartPolicy::default();
    if let Some(r) = &p.restart {
        s.restart = RestartPolicy {
            max_restarts: r.max_restarts.unwrap_or(d.max_restarts),
            within_s: r.within_s.unwrap_or(d.within_s),
            backoff_initial_ms: r.backoff_initial_ms.unwrap_or(d.backoff_initial_ms),
            backoff_max_ms: r.backoff_max_ms.unwrap_or(d.backoff_max_ms),
        };
    }
    if let Some(g) = p.stop_grace_s {
        s.stop_grace_s = g;
    }
    s.generation = p.generation;
    s
}

/// One placed instance, as sent to agents.
pub(crate) fn instance_to_proto(service: &str, slot: u32, p: &Placement) -> pb::Instance {
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
    }
}

/// The fields of a placement an agent acts on.
pub(crate) fn instance_from_proto(i: &pb::Instance) -> Placement {
    let mut p = Placement::on(i.node);
    p.state = i.state.clone();
    p.restart_count = i.restart_count;
    p.last_crash = (!i.last_crash.is_empty()).then(|| i.last_crash.clone());
    p.moving_from = (i.moving_from != 0).then_some(i.moving_from);
    p.reschedules = i.reschedules;
    p.epoch = i.epoch;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_the_wire() {
        let mut s = ServiceSpec::new("web", "exec");
        s.config = serde_json::json!({"cmd": ["sh", "-c", "x"], "n": 3, "f": 1.5, "z": null});
        s.replicas = 7;
        s.singleton = true;
        s.spread = Some("zone".into());
        s.depends_on = vec!["db".into()];
        s.constraints = vec![ConstraintSpec {
            label: "zone".into(),
            equals: None,
            in_: Some(vec!["a".into()]),
        }];
        s.restart.max_restarts = 2;
        s.stop_grace_s = 3;
        s.generation = 9;
        assert_eq!(spec_from_proto(&spec_to_proto(&s)), s);
    }

    #[test]
    fn placements_round_trip_in_what_agents_use() {
        let mut p = Placement::on(4);
        p.state = "running".into();
        p.restart_count = 2;
        p.moving_from = Some(3);
        p.epoch = 17;
        let back = instance_from_proto(&instance_to_proto("a", 1, &p));
        assert_eq!(
            (back.node, back.state, back.moving_from, back.epoch),
            (4, "running".to_string(), Some(3), 17)
        );
    }
}
