//! Human tables and JSON for modectl's answers.

use mode_proto::v1 as pb;
use serde_json::{json, Value};

use crate::convert::format_utc_ms;
use crate::json as js;

/// Print one line on stdout. When the reader has gone (`modectl ... | head`), stop quietly,
/// as a program killed by SIGPIPE would (Rust ignores the signal, so `println!` would panic).
pub(crate) fn say(line: std::fmt::Arguments) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

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
        say!("{}", parts.join("  ").trim_end());
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
            "agents": s.agents,
            "members": members,
        });
        say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    match leader {
        Some(l) => say!(
            "leader: node {l}   term: {}   commit: {}   applied: {}   agents: {}   (answered by node {})",
            s.term,
            s.commit_index,
            s.applied_index,
            s.agents,
            s.answered_by
        ),
        None => say!(
            "leader: none (no quorum yet?)   term: {}   (answered by node {})",
            s.term,
            s.answered_by
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

pub(crate) fn print_nodes(reply: &pb::ListNodesReply, as_json: bool) {
    if as_json {
        js::print(&js::nodes(reply));
        return;
    }
    let rows: Vec<Vec<String>> = reply
        .nodes
        .iter()
        .map(|n| {
            let mut labels: Vec<(&String, &String)> = n.labels.iter().collect();
            labels.sort();
            let labels = labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                n.id.to_string(),
                n.role.clone(),
                n.address.clone(),
                n.status.clone(),
                n.capacity.to_string(),
                labels,
            ]
        })
        .collect();
    table(
        &["ID", "ROLE", "ADDRESS", "STATUS", "CAPACITY", "LABELS"],
        &rows,
    );
}

/// One event as a line (`--follow`): no header; a JSON object per line with `-o json`.
pub(crate) fn print_event_line(e: &pb::Event, as_json: bool) {
    if as_json {
        say!("{}", js::event(e));
    } else {
        say!(
            "{}  {}  {}  {}{}",
            e.seq,
            format_utc_ms(e.time_ms),
            e.kind,
            e.message,
            by_suffix(e)
        );
    }
}

pub(crate) fn print_kinds(reply: &pb::ListKindsReply, as_json: bool) {
    if as_json {
        js::print(&js::kinds(reply));
        return;
    }
    let rows: Vec<Vec<String>> = reply
        .kinds
        .iter()
        .map(|k| {
            let ids: Vec<String> = k.nodes.iter().map(|n| n.to_string()).collect();
            vec![k.name.clone(), ids.join(",")]
        })
        .collect();
    table(&["KIND", "NODES"], &rows);
}

/// The event log as a table (or a JSON list).
pub(crate) fn print_events(events: &[pb::Event], as_json: bool) {
    if as_json {
        js::print(&Value::Array(events.iter().map(js::event).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                format_utc_ms(e.time_ms),
                e.kind.clone(),
                format!("{}{}", e.message, by_suffix(e)),
            ]
        })
        .collect();
    table(&["SEQ", "TIME (UTC)", "KIND", "MESSAGE"], &rows);
}

/// ` (by alice (operator, certificate))` for a change a client made.
fn by_suffix(e: &pb::Event) -> String {
    if e.by.is_empty() {
        String::new()
    } else {
        format!(" (by {})", e.by)
    }
}
