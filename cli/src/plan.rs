//! `modectl svc plan -f FILE` (alias `diff`): what applying a file would change — each field
//! that differs from the stored spec, old and new value (a secret: only that it was added,
//! removed or changed), and what would happen to the instances (placed, moved, removed,
//! replaced by a rollout, unplaced) — writing nothing.

use mode::model::secret::PLACEHOLDER;
use mode::model::spec::ServiceSpec;
use mode_proto::v1 as pb;
use serde_json::{json, Value};

use crate::conn::{Call, Conn};
use crate::convert::spec_to_proto;
use crate::json as js;
use crate::svc::{fail, read_specs};
use crate::Failure;

/// One differing field: its dotted path, old and new value (`None`: absent).
#[derive(Debug, PartialEq)]
pub(crate) struct FieldDiff {
    pub(crate) path: String,
    pub(crate) old: Option<Value>,
    pub(crate) new: Option<Value>,
}

/// The fields of `new` that differ from `old`, leaf by leaf (objects are walked; lists and
/// scalars compare whole), in a stable order; `generation` is left out.
pub(crate) fn diff(old: &Value, new: &Value) -> Vec<FieldDiff> {
    let mut out = Vec::new();
    walk("", Some(old), Some(new), &mut out);
    out.retain(|d| d.path != "generation");
    out
}

fn walk(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<FieldDiff>) {
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(&p, a.get(k), b.get(k), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(FieldDiff {
            path: path.to_string(),
            old: a.cloned(),
            new: b.cloned(),
        }),
    }
}

/// `fields` with the secrets by name only. The local diff of `secrets` is dropped: it would
/// print values, and a reader who may not see them holds placeholders. In its place, the
/// secrets the server says changed (`changed`: its `secrets.NAME` fields, from the real
/// values), each side [`PLACEHOLDER`] or absent.
pub(crate) fn hide_secrets(
    mut fields: Vec<FieldDiff>,
    changed: &[String],
    old: Option<&ServiceSpec>,
    new: &ServiceSpec,
) -> Vec<FieldDiff> {
    fields.retain(|d| d.path != "secrets" && !d.path.starts_with("secrets."));
    let side = |spec: Option<&ServiceSpec>, name: &str| {
        spec.is_some_and(|s| s.secrets.contains_key(name))
            .then(|| json!(PLACEHOLDER))
    };
    for path in changed {
        if let Some(name) = path.strip_prefix("secrets.") {
            fields.push(FieldDiff {
                path: path.clone(),
                old: side(old, name),
                new: side(Some(new), name),
            });
        }
    }
    fields.sort_by(|a, b| a.path.cmp(&b.path));
    fields
}

/// A changed secret, for people: whether it was added, removed or changed.
fn secret_change(d: &FieldDiff) -> &'static str {
    match (&d.old, &d.new) {
        (None, Some(_)) => "added",
        (Some(_), None) => "removed",
        _ => "changed",
    }
}

fn show(v: &Option<Value>) -> String {
    match v {
        None => "(absent)".to_string(),
        Some(v) => v.to_string(),
    }
}

pub(crate) async fn run(
    conn: &mut Conn,
    file: &[std::path::PathBuf],
    json: bool,
) -> Result<(), Failure> {
    let (file_name, specs) = read_specs(file)?;
    // The server checks the file against the committed state and plans the placements.
    let reply = rpc!(
        conn,
        Call::Read,
        apply_services,
        pb::ApplyServicesRequest {
            specs: specs.iter().map(spec_to_proto).collect(),
            file: file_name.clone(),
            dry_run: true,
            ..Default::default()
        }
    )
    .await
    .map_err(|f| {
        if f.grpc == Some(tonic::Code::InvalidArgument) {
            Failure { code: 2, ..f }
        } else {
            f
        }
    })?;
    let mut out = Vec::new();
    for spec in &specs {
        let stored = match rpc!(
            conn,
            Call::Read,
            get_service,
            pb::GetServiceRequest {
                name: spec.name.clone(),
                stale: false,
            }
        )
        .await
        {
            Ok(s) => s
                .spec
                .and_then(|p| mode::api::convert::spec_from_proto(p).ok()),
            Err(f) if f.code == 3 => None,
            Err(f) => return Err(f),
        };
        let new = serde_json::to_value(spec).map_err(|e| fail(1, e.to_string()))?;
        let change = reply.changes.iter().find(|c| c.name == spec.name);
        let fields = match &stored {
            Some(old) => {
                let old_json = serde_json::to_value(old).map_err(|e| fail(1, e.to_string()))?;
                hide_secrets(
                    diff(&old_json, &new),
                    change.map_or(&[][..], |c| &c.changed_fields),
                    Some(old),
                    spec,
                )
            }
            None => Vec::new(),
        };
        let instances: Vec<&pb::PlannedInstance> = reply
            .plan
            .iter()
            .filter(|p| p.service == spec.name)
            .collect();
        if json {
            out.push(json!({
                "name": spec.name,
                "action": change.map(|c| c.action.clone()),
                "generation": change.map(|c| c.generation),
                "fields": fields.iter().map(|d| json!({"field": d.path, "old": d.old, "new": d.new})).collect::<Vec<_>>(),
                "instances": instances.iter().map(|p| json!({
                    "slot": p.slot, "action": p.action, "node": p.node,
                    "from_node": p.from_node, "reason": p.reason,
                })).collect::<Vec<_>>(),
            }));
            continue;
        }
        match change {
            Some(c) if c.action == "unchanged" => {
                say!("{}: unchanged (generation {})", spec.name, c.generation);
            }
            Some(c) => say!("{}: {} (generation {})", spec.name, c.action, c.generation),
            None => say!("{}:", spec.name),
        }
        for d in &fields {
            if d.path.starts_with("secrets.") {
                say!("  {}: {} (value not shown)", d.path, secret_change(d));
            } else {
                say!("  {}: {} -> {}", d.path, show(&d.old), show(&d.new));
            }
        }
        for p in &instances {
            let label = format!("{}#{}", p.service, p.slot);
            match p.action.as_str() {
                "place" => say!("  + {label} placed on node {}", p.node),
                "move" => say!(
                    "  ~ {label} moved from node {} to node {}",
                    p.from_node,
                    p.node
                ),
                "remove" => say!("  - {label} removed from node {}", p.node),
                "replace" => say!("  ~ {label} replaced on node {} ({})", p.node, p.reason),
                "unplaced" => say!("  ! {label} cannot be placed: {}", p.reason),
                other => say!("  ? {label} {other} on node {}", p.node),
            }
        }
    }
    if json {
        js::print(&json!({"services": out, "stored": false}));
    } else {
        say!("plan only: nothing was stored");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_names_each_changed_leaf_with_both_values() {
        let old = json!({"name": "web", "replicas": 3, "config": {"command": "/bin/sleep", "args": ["1"]}, "generation": 4});
        let new = json!({"name": "web", "replicas": 5, "config": {"command": "/bin/python9", "args": ["1"], "env": {"A": "1"}}, "generation": 0});
        let d = diff(&old, &new);
        let paths: Vec<&str> = d.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, ["config.command", "config.env", "replicas"]);
        assert_eq!(d[0].old, Some(json!("/bin/sleep")));
        assert_eq!(d[0].new, Some(json!("/bin/python9")));
        assert_eq!(d[1].old, None);
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn a_plan_names_changed_secrets_without_their_values() {
        use mode::model::secret::Secret;
        let spec = |pairs: &[(&str, &str)]| {
            let mut s = ServiceSpec::new("db", "exec");
            for (k, v) in pairs {
                s.secrets.insert(k.to_string(), Secret::new(*v));
            }
            s
        };
        let old = spec(&[
            ("DB_PASSWORD", "hunter2"),
            ("GONE", "bye-1"),
            ("SAME", "same-1"),
        ]);
        let new = spec(&[
            ("DB_PASSWORD", "hunter3"),
            ("NEW", "fresh-1"),
            ("SAME", "same-1"),
        ]);
        let local = diff(
            &serde_json::to_value(&old).unwrap(),
            &serde_json::to_value(&new).unwrap(),
        );
        let changed: Vec<String> = ["secrets.DB_PASSWORD", "secrets.GONE", "secrets.NEW"]
            .map(String::from)
            .to_vec();
        let d = hide_secrets(local, &changed, Some(&old), &new);
        let shown: Vec<(&str, &str)> = d
            .iter()
            .map(|d| (d.path.as_str(), secret_change(d)))
            .collect();
        assert_eq!(
            shown,
            [
                ("secrets.DB_PASSWORD", "changed"),
                ("secrets.GONE", "removed"),
                ("secrets.NEW", "added")
            ]
        );
        let text = format!("{d:?}");
        for value in ["hunter", "bye-1", "fresh-1", "same-1"] {
            assert!(!text.contains(value), "{text}");
        }
        // A first secret: the local diff is the whole map, dropped all the same.
        let d = hide_secrets(
            diff(
                &serde_json::to_value(spec(&[])).unwrap(),
                &serde_json::to_value(&new).unwrap(),
            ),
            &[],
            Some(&spec(&[])),
            &new,
        );
        assert!(d.is_empty(), "{d:?}");
    }
}
