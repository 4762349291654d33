//! Human tables and JSON for modectl's answers.

use mode_proto::v1 as pb;
use serde_json::{json, Value};

/// Print rows as left-aligned columns under a header.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

pub(crate) fn print_status(s: &pb::ClusterStatusReply, as_json: bool) {
    let leader = s.has_leader.then_some(s.leader);
    if as_json {
        let members: Vec<Value> = s
            .members
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "address": m.address,
                    "role": m.role,
                    "voter": m.voter,
                    "lag": (m.lag >= 0).then_some(m.lag),
                    "reachable": m.reachable,
                    "last_error": (!m.last_error.is_empty()).then_some(&m.last_error),
                })
            })
            .collect();
        let v = json!({
            "answered_by": s.answered_by,
            "leader": leader,
            "term": s.term,
            "commit_index": s.commit_index,
            "applied_index": s.applied_index,
            "last_log_index": s.last_log_index,
            "snapshot_index": s.snapshot_index,
            "purged_index": s.purged_index,
            "members": members,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    match leader {
        Some(l) => println!(
            "leader: node {l}   term: {}   commit: {}   applied: {}   (answered by node {})",
            s.term, s.commit_index, s.applied_index, s.answered_by
        ),
        None => println!(
            "leader: none (no quorum yet?)   term: {}   (answered by node {})",
            s.term, s.answered_by
        ),
    }
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.address.clone(),
                m.role.clone(),
                yes(m.voter),
                if m.lag >= 0 {
                    m.lag.to_string()
                } else {
                    "-".into()
                },
                yes(m.reachable),
                m.last_error.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "ADDRESS",
            "ROLE",
            "VOTER",
            "LAG",
            "REACHABLE",
            "LAST ERROR",
        ],
        &rows,
    );
}

pub(crate) fn print_nodes(nodes: &Value, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(nodes).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<Vec<String>> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let labels = n["labels"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                n["id"].to_string(),
                n["address"].as_str().unwrap_or("").to_string(),
                n["status"].as_str().unwrap_or("").to_string(),
                n["capacity"].to_string(),
                labels,
            ]
        })
        .collect();
    table(&["ID", "ADDRESS", "STATUS", "CAPACITY", "LABELS"], &rows);
}

/// Events as they arrive (`--follow`): one line each, no header; JSON lines with `-o json`.
pub(crate) fn print_event_lines(events: &Value, service: Option<&str>, as_json: bool) {
    for e in events.as_array().into_iter().flatten() {
        if service.is_some_and(|s| e["service"].as_str() != Some(s)) {
            continue;
        }
        if as_json {
            println!("{e}");
        } else {
            println!(
                "{}  {}  {}  {}",
                e["seq"],
                e["time"].as_str().unwrap_or(""),
                e["kind"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            );
        }
    }
}

pub(crate) fn print_kinds(kinds: &Value, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(kinds).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<Vec<String>> = kinds
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, nodes)| {
            let ids: Vec<String> = nodes
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| n.to_string())
                .collect();
            vec![k.clone(), ids.join(",")]
        })
        .collect();
    table(&["KIND", "NODES"], &rows);
}

pub(crate) fn print_events(events: &Value, service: Option<&str>, as_json: bool) {
    let selected: Vec<&Value> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| service.is_none_or(|s| e["service"].as_str() == Some(s)))
        .collect();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&selected).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<Vec<String>> = selected
        .iter()
        .map(|e| {
            vec![
                e["seq"].to_string(),
                e["time"].as_str().unwrap_or("").to_string(),
                e["kind"].as_str().unwrap_or("").to_string(),
                e["message"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    table(&["SEQ", "TIME (UTC)", "KIND", "MESSAGE"], &rows);
}
