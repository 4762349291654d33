//! Text renderings of the cluster graph: an indented tree (optionally coloured by state) and
//! Graphviz dot.

use std::fmt::Write as _;

use super::{ClusterGraph, InstanceGraph, NodeGraph};

use crate::service::{dot_escape, state_color, BeaconNode};

/// Colours for the text tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Palette {
    /// Plain text (pipes, files, `NO_COLOR`).
    Plain,
    /// ANSI colours by state (a terminal).
    Ansi,
}

impl Palette {
    fn paint(self, state: &str, text: &str) -> String {
        if self == Palette::Plain {
            return text.to_string();
        }
        let code = match state {
            "running" | "up" => "32",
            "starting" | "stopping" | "pending" | "draining" => "33",
            "crashed" | "failed" | "missing" => "31",
            "unreachable" | "down" => "1;31",
            "shutdown" | "done" | "stopped" => "90",
            _ => "0",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

impl ClusterGraph {
    /// An indented tree: the cluster, its nodes, their instances and each instance's service
    /// tree, then the dependency edges.
    pub fn render_tree(&self, palette: Palette) -> String {
        let mut out = String::new();
        let leader = self
            .leader
            .map_or("no leader".to_string(), |l| format!("leader {l}"));
        let _ = write!(
            out,
            "cluster: {} node(s), {} instance(s), {leader}, term {}, answered by {}",
            self.nodes.len(),
            self.instance_count(),
            self.term,
            self.answered_by
        );
        if !self.filters.is_empty() {
            let _ = write!(out, " [{}]", self.filters.join(", "));
        }
        out.push('\n');
        let n = self.nodes.len();
        for (i, node) in self.nodes.iter().enumerate() {
            let last = i + 1 == n && self.edges.is_empty();
            let (branch, cont) = branches(last);
            write_node(&mut out, node, branch, cont, palette);
        }
        if !self.edges.is_empty() {
            let _ = writeln!(out, "└── dependencies");
            if self.edges_omitted > 0 {
                let _ = writeln!(out, "    ({} more not listed)", self.edges_omitted);
            }
            let m = self.edges.len();
            for (i, e) in self.edges.iter().enumerate() {
                let (branch, _) = branches(i + 1 == m);
                let _ = writeln!(
                    out,
                    "    {branch}{} @ node {} → {} @ node {}{}",
                    e.from_service,
                    e.from_node,
                    e.to_service,
                    e.to_node,
                    if e.cross_node { " (cross-node)" } else { "" }
                );
            }
        }
        out
    }

    /// A Graphviz digraph: one cluster box per node, instances and their trees inside,
    /// dependency edges dashed between instances.
    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "digraph cluster {\n    graph [rankdir=\"LR\", fontname=\"Helvetica\", compound=true];\n    node [shape=\"box\", style=\"filled,rounded\", fontname=\"Helvetica\"];\n",
        );
        let mut next = 0usize;
        for node in &self.nodes {
            let _ = writeln!(out, "    subgraph cluster_node{} {{", node.id);
            let mut label = format!("node {} ({})\\n{}", node.id, node.address, node.state);
            if let Some(e) = &node.error {
                let _ = write!(label, "\\n{}", dot_escape(e));
            }
            let _ = writeln!(
                out,
                "        label=\"{label}\"; style=\"filled\"; fillcolor=\"{}\";",
                if node.reachable {
                    "aliceblue"
                } else {
                    "mistyrose"
                }
            );
            for inst in &node.instances {
                let id = format!(
                    "i{}_{}_{}",
                    node.id,
                    inst.service.replace('-', "_"),
                    inst.slot
                );
                let _ = writeln!(
                    out,
                    "        {id} [label=\"{}\\n{}\", fillcolor=\"{}\"];",
                    inst.name(),
                    inst.state,
                    state_color(&inst.state)
                );
                if let Some(tree) = &inst.tree {
                    for child in &tree.children {
                        let cid = child.write_dot(&mut out, &mut next, "        ");
                        let _ = writeln!(out, "        {id} -> {cid};");
                    }
                }
            }
            out.push_str("    }\n");
        }
        for e in &self.edges {
            let from = self.first_instance(e.from_node, &e.from_service);
            let to = self.first_instance(e.to_node, &e.to_service);
            if let (Some(f), Some(t)) = (from, to) {
                let _ = writeln!(
                    out,
                    "    i{}_{}_{} -> i{}_{}_{} [style=\"dashed\", color=\"steelblue\", label=\"depends on\"];",
                    e.from_node,
                    f.service.replace('-', "_"),
                    f.slot,
                    e.to_node,
                    t.service.replace('-', "_"),
                    t.slot
                );
            }
        }
        out.push_str("}\n");
        out
    }

    /// The first instance of `service` on `node` (edges are drawn between these).
    pub fn first_instance(&self, node: u64, service: &str) -> Option<&InstanceGraph> {
        self.nodes
            .iter()
            .find(|n| n.id == node)?
            .instances
            .iter()
            .find(|i| i.service == service)
    }
}

fn branches(last: bool) -> (&'static str, &'static str) {
    if last {
        ("└── ", "    ")
    } else {
        ("├── ", "│   ")
    }
}

fn write_node(out: &mut String, node: &NodeGraph, branch: &str, cont: &str, palette: Palette) {
    let mut line = format!("node {} ({}) {}", node.id, node.address, node.state);
    if node.leader {
        line.push_str(", leader");
    }
    if let Some(e) = &node.error {
        let _ = write!(line, ": {e}");
    }
    let _ = writeln!(out, "{branch}{}", palette.paint(&node.state, &line));
    let total = node.instances.len() + usize::from(node.daemon.is_some());
    let mut i = 0;
    if let Some(d) = &node.daemon {
        i += 1;
        let (b, c) = branches(i == total);
        write_beacon(
            out,
            d,
            &format!("{cont}{b}"),
            &format!("{cont}{c}"),
            palette,
        );
    }
    for inst in &node.instances {
        i += 1;
        let (b, c) = branches(i == total);
        let mut line = String::new();
        inst.write_headline(&mut line);
        if let Some(r) = &inst.last_crash {
            let _ = write!(line, ", last crash: {r}");
        }
        let _ = writeln!(out, "{cont}{b}{}", palette.paint(&inst.state, &line));
        // The instance's supervisor is the line above; draw what it supervises.
        if let Some(tree) = &inst.tree {
            write_children(out, &tree.children, &format!("{cont}{c}"), palette);
        }
    }
}

fn write_beacon(out: &mut String, b: &BeaconNode, first: &str, rest: &str, palette: Palette) {
    let line = b.summary();
    let _ = writeln!(out, "{first}{}", palette.paint(&b.state, &line));
    write_children(out, &b.children, rest, palette);
}

fn write_children(out: &mut String, children: &[BeaconNode], rest: &str, palette: Palette) {
    let m = children.len();
    for (j, child) in children.iter().enumerate() {
        let (b, c) = branches(j + 1 == m);
        write_beacon(
            out,
            child,
            &format!("{rest}{b}"),
            &format!("{rest}{c}"),
            palette,
        );
    }
}
