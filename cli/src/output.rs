//! Human tables and JSON for modectl's answers, and the one place that makes text from the
//! cluster safe to print.
//!
//! Much of what modectl prints was written by someone else: a workload (crash reasons, its
//! stderr), another client (spec names, labels, config values), a node (errors). Control
//! characters in it could move the cursor, rewrite what is on screen or retitle the window,
//! so every line goes out through [`printable`]: [`say`] (and `say!`, `say_err!`) keep line
//! breaks and tabs, and a table cell or a one-line field has those escaped too.

use std::borrow::Cow;
use std::fmt::Write as _;

use mode_proto::v1 as pb;
use serde_json::{json, Value};

use crate::convert::format_utc_ms;
use crate::json as js;

/// `-o yaml`: structured answers are written as YAML instead of JSON.
static YAML: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// `-o wide`: tables with more columns.
static WIDE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once, from `-o`, before anything is printed.
pub(crate) fn set_style(yaml: bool, wide: bool) {
    YAML.store(yaml, std::sync::atomic::Ordering::Relaxed);
    WIDE.store(wide, std::sync::atomic::Ordering::Relaxed);
}

/// Whether structured answers are YAML.
pub(crate) fn yaml() -> bool {
    YAML.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether tables are wide.
pub(crate) fn wide() -> bool {
    WIDE.load(std::sync::atomic::Ordering::Relaxed)
}

/// How [`printable`] treats line breaks and tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Breaks {
    /// One line (a table cell, a field in a line): `\n`, `\t` are escaped like the rest.
    Escape,
    /// A block of lines: `\n` and `\t` stay (`\r` does not: it rewrites the line).
    Keep,
}

/// `text` with every control character (C0, DEL and C1: `char::is_control`) written as a
/// visible escape, in the form JSON uses: `\n`, `\r`, `\t`, `\u001b`, `\u009b`. So an
/// escape sequence from a workload prints as `\u001b[31m`, never raw; and JSON output, whose
/// C0 characters serde has escaped already and which has DEL and C1 only inside strings, stays
/// valid JSON with the same values.
pub(crate) fn printable(text: &str, breaks: Breaks) -> Cow<'_, str> {
    let escaped = |c: char| c.is_control() && !(breaks == Breaks::Keep && matches!(c, '\n' | '\t'));
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            c if !escaped(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

/// Every string in `value` (keys too) made [`printable`] as one line: for data that a renderer
/// lays out itself (the graph's tree).
pub(crate) fn printable_strings(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let Cow::Owned(escaped) = printable(s, Breaks::Escape) {
                *s = escaped;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(printable_strings),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (key, mut v) in entries {
                printable_strings(&mut v);
                map.insert(printable(&key, Breaks::Escape).into_owned(), v);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Print one line (or a block of lines) on stdout, [`printable`]. When the reader has gone
/// (`modectl ... | head`), stop quietly, as a program killed by SIGPIPE would (Rust ignores
/// the signal, so `println!` would panic).
pub(crate) fn say(line: std::fmt::Arguments) {
    use std::io::Write as _;
    let text = line.to_string();
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "{}", printable(&text, Breaks::Keep)).and_then(|()| out.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Print one line (or a block) on stderr, [`printable`].
pub(crate) fn say_err(line: std::fmt::Arguments) {
    let text = line.to_string();
    eprintln!("{}", printable(&text, Breaks::Keep));
}

/// Print rows as left-aligned columns under a header; each cell [`printable`] as one line.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| printable(cell, Breaks::Escape).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
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
        line(row);
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
        js::print(&v);
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
    let (wide, now) = (crate::output::wide(), mode::replication::now_ms());
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
            let mut row = vec![
                n.id.to_string(),
                n.role.clone(),
                n.address.clone(),
                n.status.clone(),
                n.capacity.to_string(),
                labels,
            ];
            if wide {
                row.extend([
                    n.instances.to_string(),
                    n.kinds.join(","),
                    match n.registered_at_ms {
                        0 => "-".to_string(),
                        at => crate::convert::age(now.saturating_sub(at)),
                    },
                    if n.api_address.is_empty() {
                        "-".to_string()
                    } else {
                        n.api_address.clone()
                    },
                ]);
            }
            row
        })
        .collect();
    let mut header = vec!["ID", "ROLE", "ADDRESS", "STATUS", "CAPACITY", "LABELS"];
    if wide {
        header.extend(["INSTANCES", "KINDS", "REGISTERED", "API ADDRESS"]);
    }
    table(&header, &rows);
}

/// One event as a line (`--follow`): no header; a JSON object per line with `-o json`.
pub(crate) fn print_event_line(e: &pb::Event, as_json: bool) {
    if as_json {
        js::line(&js::event(e));
    } else {
        say!(
            "{}  {}  {}  {}",
            e.seq,
            format_utc_ms(e.time_ms),
            e.kind,
            printable(&format!("{}{}", e.message, by_suffix(e)), Breaks::Escape)
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
    // Wide: who made the change, the service and node in columns of their own.
    let wide = crate::output::wide();
    let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            if wide {
                vec![
                    e.seq.to_string(),
                    format_utc_ms(e.time_ms),
                    e.kind.clone(),
                    dash(e.service.clone()),
                    dash(if e.node == 0 {
                        String::new()
                    } else {
                        e.node.to_string()
                    }),
                    dash(e.by.clone()),
                    e.message.clone(),
                ]
            } else {
                vec![
                    e.seq.to_string(),
                    format_utc_ms(e.time_ms),
                    e.kind.clone(),
                    format!("{}{}", e.message, by_suffix(e)),
                ]
            }
        })
        .collect();
    if wide {
        table(
            &[
                "SEQ",
                "TIME (UTC)",
                "KIND",
                "SERVICE",
                "NODE",
                "BY",
                "MESSAGE",
            ],
            &rows,
        );
    } else {
        table(&["SEQ", "TIME (UTC)", "KIND", "MESSAGE"], &rows);
    }
}

/// ` (by alice (operator, certificate))` for a change a client made.
fn by_suffix(e: &pb::Event) -> String {
    if e.by.is_empty() {
        String::new()
    } else {
        format!(" (by {})", e.by)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_print_as_visible_escapes() {
        let reason = "exit 1: \x1b[31mred\x1b[0m \x1b]0;title\x07 \u{9b}2J \x7f";
        assert_eq!(
            printable(reason, Breaks::Escape),
            "exit 1: \\u001b[31mred\\u001b[0m \\u001b]0;title\\u0007 \\u009b2J \\u007f"
        );
        // Nothing to escape: the text itself, not a copy.
        assert!(matches!(
            printable("plain text, ünïcode ✓", Breaks::Escape),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn line_breaks_and_tabs_stay_only_in_blocks() {
        let text = "one\ttwo\nthree\r\n";
        assert_eq!(printable(text, Breaks::Escape), "one\\ttwo\\nthree\\r\\n");
        assert_eq!(printable(text, Breaks::Keep), "one\ttwo\nthree\\r\n");
    }

    #[test]
    fn json_output_stays_json_with_the_same_values() {
        let value = json!({"reason": "\x1b[31m \u{85} \u{9b} \x7f \n", "k\u{9b}": 1});
        let text = serde_json::to_string_pretty(&value).unwrap();
        let shown = printable(&text, Breaks::Keep);
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown}"
        );
        assert_eq!(serde_json::from_str::<Value>(&shown).unwrap(), value);
    }

    #[test]
    fn every_string_of_a_value_is_escaped_keys_too() {
        let mut value = json!({"labels": {"zone\x1b": "a\nb"}, "list": ["\u{9b}", 3, null]});
        printable_strings(&mut value);
        assert_eq!(
            value,
            json!({"labels": {"zone\\u001b": "a\\nb"}, "list": ["\\u009b", 3, null]})
        );
    }
}
