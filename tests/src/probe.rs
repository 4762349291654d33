//! Singleton probes: an `exec` instance that appends `<unix-time-ms> <pid>` to a file every
//! 50 ms, and what its file says afterwards: which processes ran when, and whether two of them
//! ever ran at once. A line may carry a third number, when its process started: a restarted
//! container reuses pids, and two processes with the same pid and another start are two runs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// How often a probe writes a line.
pub const PROBE_EVERY_MS: u64 = 50;

/// The JSON text (YAML accepts it) of a singleton `exec` spec named `name` appending to
/// `file`; `extra` fields (constraints, ...) are merged in.
pub fn probe_spec(name: &str, file: &Path, extra: serde_json::Value) -> String {
    let script = format!(
        "while :; do echo \"$(date +%s%3N) $$\" >> '{}'; sleep 0.05; done",
        file.display()
    );
    let mut spec = serde_json::json!({
        "name": name,
        "kind": "exec",
        "singleton": true,
        "stop_grace_s": 1,
        "config": {"command": "/bin/sh", "args": ["-c", script]},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    spec.to_string()
}

/// When one probe process wrote its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub pid: u32,
    /// When the process started (the optional third number of its lines; 0 without one).
    pub born: u64,
    pub first_ms: u64,
    pub last_ms: u64,
    pub lines: u64,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {}{} from {} to {} ({} ms, {} lines)",
            self.pid,
            if self.born == 0 {
                String::new()
            } else {
                format!(" (started {})", self.born)
            },
            self.first_ms,
            self.last_ms,
            self.last_ms - self.first_ms,
            self.lines
        )
    }
}

/// Every process that wrote to `file`, in order of its first line.
pub fn runs(file: &Path) -> Vec<Run> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut by_pid: BTreeMap<(u32, u64), Run> = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(Ok(t)), Some(Ok(pid))) = (
            parts.next().map(str::parse::<u64>),
            parts.next().map(str::parse::<u32>),
        ) else {
            continue;
        };
        let born = match parts.next().map(str::parse::<u64>) {
            None => 0,
            Some(Ok(born)) => born,
            Some(Err(_)) => continue,
        };
        let r = by_pid.entry((pid, born)).or_insert(Run {
            pid,
            born,
            first_ms: t,
            last_ms: t,
            lines: 0,
        });
        r.first_ms = r.first_ms.min(t);
        r.last_ms = r.last_ms.max(t);
        r.lines += 1;
    }
    let mut runs: Vec<Run> = by_pid.into_values().collect();
    runs.sort_by_key(|r| (r.first_ms, r.pid));
    runs
}

/// Two processes that ran at the same time.
#[derive(Debug, Clone, Copy)]
pub struct Overlap {
    pub a: Run,
    pub b: Run,
    pub ms: u64,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms of overlap: {} and {}", self.ms, self.a, self.b)
    }
}

/// Pairs of runs whose spans intersect by more than `tolerance_ms` (a line is written every
/// [`PROBE_EVERY_MS`], so a clean hand-over never intersects at all).
pub fn overlaps(runs: &[Run], tolerance_ms: u64) -> Vec<Overlap> {
    let mut out = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            let from = a.first_ms.max(b.first_ms);
            let to = a.last_ms.min(b.last_ms);
            if to > from + tolerance_ms {
                out.push(Overlap {
                    a: *a,
                    b: *b,
                    ms: to - from,
                });
            }
        }
    }
    out
}

/// Every process now: its pid and its /proc directory.
fn processes() -> impl Iterator<Item = (u32, std::path::PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// The probe processes writing to `file` that run now (by their command line; the shell's
/// short-lived forks for `$(date)` are not counted).
pub fn live(file: &Path) -> Vec<u32> {
    let needle = file.display().to_string();
    let mut matching = BTreeMap::new();
    for (pid, dir) in processes() {
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(&needle) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the fields after the last ')'.
        let mut after = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace();
        let state = after.next().unwrap_or("");
        let ppid: u32 = after.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if state != "Z" {
            matching.insert(pid, ppid);
        }
    }
    matching
        .iter()
        .filter(|(_, ppid)| !matching.contains_key(ppid))
        .map(|(pid, _)| *pid)
        .collect()
}

/// The `mode-keeper` processes in process group `pgid` (the watcher a node gives each process
/// group it starts; for a singleton it also kills the group when the node's lease passes).
pub fn keepers(pgid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for (pid, dir) in processes() {
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        // "pid (comm) state ppid pgrp ..."
        let group: Option<u32> = rest.split_whitespace().nth(2).and_then(|g| g.parse().ok());
        if head.ends_with("(mode-keeper") && group == Some(pgid) {
            found.push(pid);
        }
    }
    found
}

/// Whether process `pid`'s parent is a `mode-node` (its command line has `--peers`): false
/// for a process that outlived the node that started it.
pub fn parent_is_a_node(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ppid = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().nth(1))
        .unwrap_or("0");
    std::fs::read(format!("/proc/{ppid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--peers"))
}

/// The runs, one per line, for failure messages.
pub fn describe(runs: &[Run]) -> String {
    runs.iter()
        .map(|r| format!("  {r}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_hand_over_does_not_overlap_and_a_second_copy_does() {
        let dir = crate::Scratch::new("probe");
        let file = dir.0.join("probe");
        std::fs::write(
            &file,
            "1000 7\n1050 7\n1100 7\n1150 8\n1200 8\n1100 9\n2000 9\ngarbage\n\
             3000 7 2990\n3050 7 2990\n3100 7 x\n",
        )
        .unwrap();
        let r = runs(&file);
        let spans: Vec<(u32, u64, u64, u64)> = r
            .iter()
            .map(|r| (r.pid, r.first_ms, r.last_ms, r.lines))
            .collect();
        assert_eq!(
            spans,
            [
                (7, 1000, 1100, 3),
                (9, 1100, 2000, 2),
                (8, 1150, 1200, 2),
                (7, 3000, 3050, 2)
            ]
        );
        let o = overlaps(&r, 10);
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!((o[0].a.pid, o[0].b.pid, o[0].ms), (9, 8, 50));
        assert!(
            overlaps(&r[..2], 0).is_empty(),
            "touching is not overlapping"
        );
    }
}
