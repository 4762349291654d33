//! The beacon: a snapshot tree of every service, task and timer with its state, rendered as an
//! indented text tree, JSON or Graphviz dot.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::handle::lock;
use super::task::TaskKind;
use super::ServiceHandle;

/// What a beacon node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A service.
    Service,
    /// A supervisor (a service that restarts its children).
    Supervisor,
    /// A service running on its own OS thread.
    Thread,
    /// The worker at the root of a program.
    Worker,
    /// A background task.
    Task,
    /// A one-shot future.
    Future,
    /// A fixed-rate timer.
    Timer,
    /// A cron job.
    Cron,
    /// A kind this build does not know (sent by a newer node during a rolling upgrade).
    #[serde(other)]
    Other,
}

impl NodeKind {
    /// Its name (`service`, `timer`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Service => "service",
            NodeKind::Supervisor => "supervisor",
            NodeKind::Thread => "thread",
            NodeKind::Worker => "worker",
            NodeKind::Task => "task",
            NodeKind::Future => "future",
            NodeKind::Timer => "timer",
            NodeKind::Cron => "cron",
            NodeKind::Other => "other",
        }
    }

    /// A task, future, timer or cron job (not a service).
    pub fn is_task(self) -> bool {
        matches!(
            self,
            NodeKind::Task | NodeKind::Future | NodeKind::Timer | NodeKind::Cron
        )
    }
}

impl From<TaskKind> for NodeKind {
    fn from(k: TaskKind) -> Self {
        match k {
            TaskKind::Task => NodeKind::Task,
            TaskKind::Future => NodeKind::Future,
            TaskKind::Timer => NodeKind::Timer,
            TaskKind::Cron => NodeKind::Cron,
        }
    }
}

/// One node of the beacon tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeaconNode {
    /// What the node is.
    pub kind: NodeKind,
    /// Its label.
    pub label: String,
    /// Lifecycle state (`running`, `crashed`, ... for services; `running`, `done`, `failed`
    /// for tasks).
    pub state: String,
    /// Restarts so far (services).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restart_count: u32,
    /// Why it is crashed, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_reason: Option<String>,
    /// The most recent crash, kept across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crash_reason: Option<String>,
    /// Seconds since it started, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<f64>,
    /// Extra facts (timer rate and drift, forced stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Dependencies, tasks and timers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<BeaconNode>,
}

impl ServiceHandle {
    /// A snapshot of this service's beacon subtree.
    pub fn beacon(&self) -> BeaconNode {
        let mut children: Vec<BeaconNode> = lock(&self.cell.tasks)
            .iter()
            .map(|t| {
                let info = &t.info;
                BeaconNode {
                    kind: info.kind.into(),
                    label: info.name.to_string(),
                    state: format!("{:?}", info.state()).to_lowercase(),
                    restart_count: 0,
                    crash_reason: None,
                    last_crash_reason: None,
                    uptime_s: Some(millis(info.started.elapsed())),
                    detail: info.timer.as_ref().map(|s| s.describe()),
                    children: Vec::new(),
                }
            })
            .collect();
        for dep in self.dependencies().iter().chain(self.mirrored().iter()) {
            children.push(dep.beacon());
        }
        BeaconNode {
            kind: self.cell.kind,
            label: self.label().to_string(),
            state: self.state().to_string(),
            restart_count: self.restart_count(),
            crash_reason: self.crash_reason().map(|r| r.to_string()),
            last_crash_reason: self.last_crash_reason().map(|r| r.to_string()),
            uptime_s: self.uptime().map(millis),
            detail: self.detail(),
            children,
        }
    }
}

impl ServiceHandle {
    /// What a service is busy with (while starting or stopping) and whether its last stop was
    /// forced.
    fn detail(&self) -> Option<String> {
        let forced = self.was_forced().then_some("last stop was forced");
        match (self.waiting_for(), forced) {
            (Some(busy), Some(forced)) => Some(format!("{busy}; {forced}")),
            (Some(busy), None) => Some(busy),
            (None, forced) => forced.map(str::to_string),
        }
    }

    /// Every service in this subtree (this one included) that is still stopping and busy with
    /// a hook or its tasks, with what it waits for, e.g. `Worker/Db: in on_stop`.
    pub(crate) fn stuck_stopping(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_stuck(&mut out);
        out
    }

    fn collect_stuck(&self, out: &mut Vec<String>) {
        if self.state() == super::ServiceState::Stopping {
            if let Some(busy) = self.waiting_for() {
                if !matches!(
                    self.activity(),
                    super::handle::Activity::StoppingDependencies
                ) {
                    out.push(format!(
                        "{}: {busy} (grace period {:?})",
                        self.path(),
                        self.grace_period()
                    ));
                }
            }
        }
        for dep in self.dependencies().iter().chain(self.mirrored().iter()) {
            dep.collect_stuck(out);
        }
    }
}

impl BeaconNode {
    /// Number of nodes in this subtree, itself included.
    pub fn count(&self) -> usize {
        1 + self.children.iter().map(BeaconNode::count).sum::<usize>()
    }

    /// Depth-first search by label.
    pub fn find(&self, label: &str) -> Option<&BeaconNode> {
        if self.label == label {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(label))
    }

    /// An indented tree, one node per line:
    ///
    /// ```text
    /// Worker [worker] running, up 3.2s
    /// └── AppService [service] running, up 3.2s
    ///     ├── Websockets [service] running, up 3.2s
    ///     └── remove_expired_users [timer] running, every 1s, fires=3 ...
    /// ```
    pub fn render_tree(&self) -> String {
        let mut out = String::new();
        self.write_tree(&mut out, "", "");
        out
    }

    /// One line: label, kind, state, restarts, uptime, detail, crash.
    pub fn summary(&self) -> String {
        let mut s = format!("{} [{}] {}", self.label, self.kind.as_str(), self.state);
        if self.restart_count > 0 {
            let _ = write!(s, ", restarts={}", self.restart_count);
        }
        if let Some(up) = self.uptime_s {
            let _ = write!(s, ", up {}", human_duration(up));
        }
        if let Some(d) = &self.detail {
            let _ = write!(s, ", {d}");
        }
        if let Some(r) = &self.crash_reason {
            let _ = write!(s, ", crashed: {r}");
        } else if let Some(r) = &self.last_crash_reason {
            let _ = write!(s, ", last crash: {r}");
        }
        s
    }

    fn write_tree(&self, out: &mut String, first: &str, rest: &str) {
        let _ = writeln!(out, "{first}{}", self.summary());
        let n = self.children.len();
        for (i, child) in self.children.iter().enumerate() {
            let last = i + 1 == n;
            let (branch, cont) = if last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            child.write_tree(out, &format!("{rest}{branch}"), &format!("{rest}{cont}"));
        }
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A Graphviz digraph: one node per service, task and timer (two services with the same
    /// label stay two nodes, unlike mode), filled by state.
    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "digraph beacon {\n    graph [rankdir=\"LR\", fontname=\"Helvetica\", bgcolor=\"mintcream\"];\n    node [shape=\"box\", style=\"filled,rounded\", fontname=\"Helvetica\"];\n",
        );
        let mut next_id = 0usize;
        self.write_dot(&mut out, &mut next_id, "    ");
        out.push_str("}\n");
        out
    }

    /// Write this subtree's dot nodes and edges (ids `n0`, `n1`, ... from `next_id`, lines
    /// indented by `indent`); returns the id of its root.
    pub(crate) fn write_dot(&self, out: &mut String, next_id: &mut usize, indent: &str) -> String {
        let id = format!("n{next_id}");
        *next_id += 1;
        let shape = if self.kind.is_task() {
            "ellipse"
        } else {
            "box"
        };
        let _ = writeln!(
            out,
            "{indent}{id} [label=\"{}\\n{} {}\", shape=\"{shape}\", fillcolor=\"{}\"];",
            dot_escape(&self.label),
            self.kind.as_str(),
            self.state,
            state_color(&self.state)
        );
        for child in &self.children {
            let cid = child.write_dot(out, next_id, indent);
            let _ = writeln!(out, "{indent}{id} -> {cid};");
        }
        id
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Seconds, to the millisecond (shorter JSON; the beacon of 10k instances is megabytes).
fn millis(d: std::time::Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// The fill colour of a state in dot and SVG renderings.
pub fn state_color(state: &str) -> &'static str {
    match state {
        "running" => "palegreen",
        "starting" | "stopping" => "khaki",
        "crashed" | "failed" => "salmon",
        "shutdown" | "done" => "lightgrey",
        "unreachable" => "orange",
        _ => "white",
    }
}

/// A string inside a dot double-quoted label.
pub(crate) fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn human_duration(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0}ms", secs * 1000.0)
    } else if secs < 120.0 {
        format!("{secs:.1}s")
    } else if secs < 7200.0 {
        format!("{:.1}m", secs / 60.0)
    } else {
        format!("{:.1}h", secs / 3600.0)
    }
}
