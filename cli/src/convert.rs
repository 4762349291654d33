//! Between the typed API's messages and what modectl works with: specs parsed from a file,
//! JSON configs (`google.protobuf.Struct`), and the graph the renderers draw.
//!
//! The server converts the same way in the other direction (node/src/api); this is the
//! client's small copy, so that modectl depends on the messages, not on server internals.

use std::collections::BTreeMap;

use mode::graph as domain;
use mode::model::spec::ServiceSpec;
use mode_proto::prost_types::{self, value::Kind};
use mode_proto::v1 as pb;
use serde_json::Value;

/// A JSON value as a protobuf `Value` (numbers become doubles, as JSON's are).
pub(crate) fn to_proto_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_proto_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), to_proto_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A config as a `Struct`: a JSON object's fields (`null` or absent: none).
pub(crate) fn to_struct(v: &Value) -> Option<prost_types::Struct> {
    match v {
        Value::Object(o) => Some(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), to_proto_value(v)))
                .collect(),
        }),
        _ => None,
    }
}

/// A protobuf `Value` as JSON; whole numbers print as integers.
pub(crate) fn from_proto_value(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(from_proto_value).collect()),
        Some(Kind::StructValue(s)) => from_struct(s),
    }
}

/// A `Struct` as a JSON object.
pub(crate) fn from_struct(s: &prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), from_proto_value(v)))
            .collect(),
    )
}

/// A spec parsed from a file, as the API takes it.
pub(crate) fn spec_to_proto(s: &ServiceSpec) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: s.name.clone(),
        kind: s.kind.clone(),
        config: to_struct(&s.config),
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
        generation: 0,
    }
}

/// How many instances a spec wants (a singleton: one; replicas default to one).
pub(crate) fn wanted(spec: &pb::ServiceSpec) -> u32 {
    if spec.singleton {
        1
    } else {
        spec.replicas.unwrap_or(1)
    }
}

fn none_if_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn beacon(b: &pb::BeaconNode) -> mode::service::BeaconNode {
    mode::service::BeaconNode {
        // Unknown kinds read as `other` (the enum's catch-all).
        kind: serde_json::from_value(Value::String(b.kind.clone()))
            .unwrap_or(mode::service::NodeKind::Other),
        label: b.label.clone(),
        state: b.state.clone(),
        restart_count: b.restart_count,
        crash_reason: none_if_empty(&b.crash_reason),
        last_crash_reason: none_if_empty(&b.last_crash_reason),
        uptime_s: b.uptime_s,
        detail: none_if_empty(&b.detail),
        children: b.children.iter().map(beacon).collect(),
    }
}

/// The graph as the renderers (tree, dot, SVG, JSON) take it.
pub(crate) fn graph(g: &pb::ClusterGraph) -> domain::ClusterGraph {
    domain::ClusterGraph {
        answered_by: g.answered_by,
        leader: (g.leader != 0).then_some(g.leader),
        term: g.term,
        applied_index: g.applied_index,
        generated_at: g.generated_at.clone(),
        filters: g.filters.clone(),
        nodes: g
            .nodes
            .iter()
            .map(|n| domain::NodeGraph {
                id: n.id,
                address: n.address.clone(),
                state: n.state.clone(),
                reachable: n.reachable,
                error: none_if_empty(&n.error),
                leader: n.leader,
                labels: n
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>(),
                instances: n
                    .instances
                    .iter()
                    .map(|i| domain::InstanceGraph {
                        service: i.service.clone(),
                        slot: i.slot,
                        state: i.state.clone(),
                        placement: none_if_empty(&i.placement),
                        restart_count: i.restart_count,
                        last_crash: none_if_empty(&i.last_crash),
                        tree: i.tree.as_ref().map(beacon),
                    })
                    .collect(),
                daemon: n.daemon.as_ref().map(beacon),
            })
            .collect(),
        services: g
            .services
            .iter()
            .map(|s| domain::ServiceSummary {
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
            .map(|e| domain::DependencyEdge {
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

/// `2026-11-25 08:14:20.123` (UTC) from milliseconds since the Unix epoch.
pub(crate) fn format_utc_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_survives_the_round_trip_through_a_struct() {
        let config = serde_json::json!({
            "command": "/bin/sh", "args": ["-c", "true"], "every_ms": 200,
            "ratio": 0.5, "on": true, "none": null, "nested": {"k": [1, {"x": "y"}]}
        });
        let s = to_struct(&config).unwrap();
        assert_eq!(from_struct(&s), config);
        assert!(to_struct(&Value::Null).is_none());
    }

    #[test]
    fn a_parsed_spec_keeps_every_field() {
        let specs = mode::model::spec::parse_specs(
            "t.yaml",
            "name: web\nkind: ticker\nreplicas: 3\nspread: zone\ndepends_on: [db]\nconstraints: [{label: zone, in: [a, b]}]\nconfig: {every_ms: 5}\n",
        )
        .unwrap();
        let p = spec_to_proto(&specs[0]);
        assert_eq!(p.name, "web");
        assert_eq!(p.replicas, Some(3));
        assert_eq!(p.spread, "zone");
        assert_eq!(p.depends_on, vec!["db".to_string()]);
        assert_eq!(
            p.constraints[0].r#in,
            vec!["a".to_string(), "b".to_string()]
        );
        assert_eq!(
            from_struct(p.config.as_ref().unwrap()),
            serde_json::json!({"every_ms": 5})
        );
        assert_eq!(wanted(&p), 3);
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(format_utc_ms(0), "1970-01-01 00:00:00.000");
        assert_eq!(format_utc_ms(1_764_576_860_123), "2025-12-01 08:14:20.123");
    }
}
