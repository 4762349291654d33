//! The cluster graph as SVG, laid out without Graphviz: one column per node, its daemon and
//! instances stacked inside as boxes listing their service trees, dependency edges drawn as
//! dashed lines between instances that run only in the gaps between columns and the channel
//! above them, never over a box or its text.
//!
//! Every element a test or a browser looks for carries data attributes: node columns
//! `class="node" data-node data-state`, instance boxes `class="instance" data-instance
//! data-node data-state`, edges `class="edge" data-edge="web@1->db@2"`.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::{ClusterGraph, InstanceGraph, NodeGraph};
use crate::service::{state_color, BeaconNode};

// Geometry in pixels. Text is 12px monospace, about 7.3px a character; we measure by
// counting characters, which is close enough to keep labels inside their boxes.
const MARGIN: u32 = 16;
const LINE: u32 = 16;
const PAD: u32 = 10;
const COLUMN_GAP: u32 = 48;
const BOX_GAP: u32 = 8;
const INDENT: u32 = 14;
/// Deeper rows are drawn at this depth, so a deep tree cannot push text out of its box.
const MAX_INDENT_DEPTH: u32 = 8;
const MIN_COLUMN: u32 = 240;
const MAX_COLUMN: u32 = 440;
const MIN_WIDTH: u32 = 720;
/// Room right of the last column for the curves of same-column edges.
const EDGE_ROOM: u32 = 40;
/// Header lines above the columns: summary, services, legend.
const COLUMNS_TOP: u32 = MARGIN + 3 * LINE + 12;
const LEADER_BADGE: u32 = 60;
/// Errors and crash reasons widen their column up to this many characters, then are cut.
const WIDENING_CHARS: usize = 48;
/// Rows of a service tree drawn per box; the rest is summed up in one "… N more" row.
const MAX_ROWS: usize = 12;

/// Render `graph` as a standalone SVG document (also fit to be inlined into HTML).
///
/// ```
/// # use mode::graph::{svg, ClusterGraph};
/// let graph = ClusterGraph {
///     answered_by: 1, leader: Some(1), term: 2, applied_index: 9,
///     generated_at: String::new(), filters: vec![], nodes: vec![],
///     services: vec![], edges: vec![], edges_omitted: 0,
/// };
/// let svg = svg::render(&graph);
/// assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
/// ```
pub fn render(graph: &ClusterGraph) -> String {
    let mut scratch = String::with_capacity(256);
    let layout = Layout::of(graph, &mut scratch);
    let mut out = String::with_capacity(layout.estimated_bytes(graph));
    write_document(&mut out, &mut scratch, graph, &layout);
    out
}

/// What a box shows: a node's daemon or one instance.
#[derive(Clone, Copy)]
enum Content<'a> {
    Daemon(&'a BeaconNode),
    Instance(&'a InstanceGraph),
}

impl<'a> Content<'a> {
    /// The boxes of a column, in drawing order: the daemon first.
    fn of(node: &'a NodeGraph) -> impl Iterator<Item = Content<'a>> {
        node.daemon
            .iter()
            .map(Content::Daemon)
            .chain(node.instances.iter().map(Content::Instance))
    }

    fn state(self) -> &'a str {
        match self {
            Content::Daemon(d) => &d.state,
            Content::Instance(i) => &i.state,
        }
    }

    fn title(self, out: &mut String) {
        out.clear();
        match self {
            Content::Daemon(d) => {
                let _ = write!(out, "daemon: {} {}", d.label, d.state);
                if d.restart_count > 0 {
                    let _ = write!(out, ", restarts={}", d.restart_count);
                }
            }
            Content::Instance(i) => i.write_headline(out),
        }
    }

    fn crash(self) -> Option<&'a str> {
        match self {
            Content::Daemon(d) => d.crash_reason.as_deref().or(d.last_crash_reason.as_deref()),
            Content::Instance(i) => i.last_crash.as_deref(),
        }
    }

    /// The rows under the title: what the daemon or the instance's supervisor supervises.
    fn tree(self) -> &'a [BeaconNode] {
        match self {
            Content::Daemon(d) => &d.children,
            Content::Instance(i) => i.tree.as_ref().map_or(&[], |t| t.children.as_slice()),
        }
    }
}

/// A box's size, its position relative to its column.
#[derive(Clone, Copy)]
struct BoxLayout {
    y: u32,
    height: u32,
    crash_line: bool,
    /// Tree rows drawn.
    rows: usize,
    /// Tree rows left out.
    hidden: usize,
}

struct Column {
    x: u32,
    width: u32,
    height: u32,
    /// Lines of the column's header (node, state, error, "no instances").
    header_lines: u32,
    /// Its boxes in `Layout::boxes`, from here.
    first_box: usize,
}

/// Where an edge attaches to an instance box, in document coordinates.
#[derive(Clone, Copy)]
struct Anchor {
    right: i64,
    y: i64,
    column: usize,
    index: usize,
}

struct Layout<'a> {
    width: u32,
    height: u32,
    columns: Vec<Column>,
    boxes: Vec<BoxLayout>,
    /// The first instance of each service on each node.
    anchors: HashMap<(u64, &'a str), Anchor>,
    rows: usize,
}

impl<'a> Layout<'a> {
    fn of(graph: &'a ClusterGraph, scratch: &mut String) -> Layout<'a> {
        let box_count = graph
            .nodes
            .iter()
            .map(|n| n.instances.len() + usize::from(n.daemon.is_some()))
            .sum();
        let mut boxes = Vec::with_capacity(box_count);
        let mut columns = Vec::with_capacity(graph.nodes.len());
        let mut anchors = HashMap::with_capacity(graph.instance_count());
        let mut rows = 0;
        let mut x = MARGIN;
        let mut tallest = 0;
        for (c, node) in graph.nodes.iter().enumerate() {
            let first_box = boxes.len();
            let header_lines = node_header_lines(node);
            node_line(scratch, node);
            let badge = if node.leader { LEADER_BADGE } else { 0 };
            let mut needed = text_width(scratch.chars().count()) + badge;
            state_line(scratch, node);
            needed = needed.max(text_width(scratch.chars().count()));
            if let Some(e) = &node.error {
                needed = needed.max(text_width(e.chars().count().min(WIDENING_CHARS)));
            }
            let mut y = header_lines * LINE + 8;
            for content in Content::of(node) {
                let (mut b, width) = measure(content, scratch);
                needed = needed.max(width);
                b.y = y;
                y += b.height + BOX_GAP;
                rows += b.rows;
                boxes.push(b);
            }
            let width = (needed + 2 * PAD + 16).clamp(MIN_COLUMN, MAX_COLUMN);
            for (i, inst) in node.instances.iter().enumerate() {
                let index = first_box + usize::from(node.daemon.is_some()) + i;
                let b = boxes[index];
                anchors
                    .entry((node.id, inst.service.as_str()))
                    .or_insert(Anchor {
                        right: i64::from(x + width - PAD),
                        y: i64::from(COLUMNS_TOP + b.y + 12),
                        column: c,
                        index,
                    });
            }
            let height = y + 4;
            tallest = tallest.max(height);
            columns.push(Column {
                x,
                width,
                height,
                header_lines,
                first_box,
            });
            x += width + COLUMN_GAP;
        }
        let columns_right = x.saturating_sub(COLUMN_GAP) + EDGE_ROOM;
        let body = if graph.nodes.is_empty() {
            LINE * 2
        } else {
            tallest
        };
        Layout {
            width: columns_right.max(MIN_WIDTH) + MARGIN,
            height: COLUMNS_TOP + body + MARGIN,
            columns,
            boxes,
            anchors,
            rows,
        }
    }

    fn estimated_bytes(&self, graph: &ClusterGraph) -> usize {
        4096 + self.columns.len() * 800
            + self.boxes.len() * 320
            + self.rows * 120
            + graph.edges.len() * 280
    }
}

fn node_header_lines(node: &NodeGraph) -> u32 {
    let empty = node.instances.is_empty() && node.daemon.is_none();
    2 + u32::from(node.error.is_some()) + u32::from(empty)
}

fn node_line(out: &mut String, node: &NodeGraph) {
    out.clear();
    if node.address.is_empty() {
        let _ = write!(out, "node {}", node.id);
    } else {
        let _ = write!(out, "node {} ({})", node.id, node.address);
    }
}

fn state_line(out: &mut String, node: &NodeGraph) {
    out.clear();
    let n = node.instances.len();
    let _ = write!(
        out,
        "{}, {n} instance{}",
        node.state,
        if n == 1 { "" } else { "s" }
    );
    let mut sep = " · ";
    for (k, v) in &node.labels {
        let _ = write!(out, "{sep}{k}={v}");
        sep = " ";
    }
}

/// A box's height and the width its title and rows would like.
fn measure(content: Content, scratch: &mut String) -> (BoxLayout, u32) {
    content.title(scratch);
    let mut width = text_width(scratch.chars().count()) + 16;
    let tree = content.tree();
    let total: usize = tree.iter().map(BeaconNode::count).sum();
    let (budget, hidden) = row_budget(total);
    let mut rows = 0;
    let mut left = budget;
    walk(tree, 0, &mut left, &mut |depth, b| {
        rows += 1;
        row_text(scratch, b);
        width = width.max(row_x(depth) + text_width(scratch.chars().count()) + 8);
    });
    let crash = content.crash();
    if let Some(c) = crash {
        let chars = "last crash: ".len() + c.chars().count();
        width = width.max(text_width(chars.min(WIDENING_CHARS)) + 16);
    }
    let crash_line = crash.is_some();
    let lines = 1 + u32::from(crash_line) + rows as u32 + u32::from(hidden > 0);
    let b = BoxLayout {
        y: 0,
        height: lines * LINE + 8,
        crash_line,
        rows,
        hidden,
    };
    (b, width)
}

/// Rows to draw and rows to leave out of a tree of `total` nodes.
fn row_budget(total: usize) -> (usize, usize) {
    if total > MAX_ROWS {
        (MAX_ROWS - 1, total - (MAX_ROWS - 1))
    } else {
        (total, 0)
    }
}

/// Depth-first, at most `budget` nodes (so the recursion is at most `budget` deep).
fn walk<'b>(
    nodes: &'b [BeaconNode],
    depth: u32,
    budget: &mut usize,
    f: &mut impl FnMut(u32, &'b BeaconNode),
) {
    for n in nodes {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        f(depth, n);
        walk(&n.children, depth + 1, budget, f);
    }
}

fn row_text(out: &mut String, b: &BeaconNode) {
    out.clear();
    let _ = write!(out, "{} [{}] {}", b.label, b.kind.as_str(), b.state);
    if b.restart_count > 0 {
        let _ = write!(out, ", restarts={}", b.restart_count);
    }
    if let Some(r) = &b.crash_reason {
        let _ = write!(out, ", crashed: {r}");
    }
}

/// Where a row's text starts inside its box.
fn row_x(depth: u32) -> u32 {
    20 + depth.min(MAX_INDENT_DEPTH) * INDENT
}

fn text_width(chars: usize) -> u32 {
    (chars.min(100_000) as u32) * 73 / 10
}

/// Characters that fit in `px`.
fn chars_fitting(px: u32) -> usize {
    (px as usize * 10 / 73).max(4)
}

fn write_document(out: &mut String, scratch: &mut String, graph: &ClusterGraph, layout: &Layout) {
    let (w, h) = (layout.width, layout.height);
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"mode-graph\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"monospace\" font-size=\"12\""
    );
    // The summary, for the page that shows this document (one request per refresh).
    let _ = write!(
        out,
        " data-nodes=\"{}\" data-instances=\"{}\" data-unreachable=\"{}\" data-leader=\"{}\" data-term=\"{}\" data-answered-by=\"{}\" data-filters=\"",
        graph.nodes.len(),
        graph.instance_count(),
        graph.nodes.iter().filter(|n| !n.reachable).count(),
        graph.leader.map(|l| l.to_string()).unwrap_or_default(),
        graph.term,
        graph.answered_by
    );
    push_escaped(out, &graph.filters.join(", "));
    out.push_str("\">\n");
    // Selectors are scoped to `.mode-graph`: the page inlines this document into its own.
    out.push_str(concat!(
        "<style>",
        ".mode-graph text{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;fill:#222}",
        ".mode-graph .b{font-weight:bold}",
        ".mode-graph .err{fill:#a40000}",
        ".mode-graph .crash{fill:#8b0000;font-style:italic}",
        ".mode-graph .muted{fill:#666}",
        ".mode-graph .col{stroke:#7a8ca0}",
        ".mode-graph .box{stroke:#555;stroke-width:.8}",
        ".mode-graph .dot{stroke:#444;stroke-width:.6}",
        ".mode-graph .rows{fill:#fff;fill-opacity:.65}",
        ".mode-graph .edge{fill:none;stroke:steelblue;stroke-width:1.5;stroke-dasharray:6 4;stroke-opacity:.85}",
        ".mode-graph .edge:hover{stroke-width:3}",
        "</style>\n",
        "<defs><marker id=\"mode-arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto\">",
        "<path d=\"M0,0 L10,5 L0,10 z\" fill=\"steelblue\" stroke=\"none\"/></marker></defs>\n",
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
    ));
    let fit = chars_fitting(w - 2 * MARGIN);
    summary_line(scratch, graph);
    text(out, scratch, MARGIN, MARGIN + 12, "b", fit);
    services_line(scratch, graph);
    text(out, scratch, MARGIN, MARGIN + LINE + 12, "muted", fit);
    write_legend(out, MARGIN + 2 * LINE + 2);
    if graph.nodes.is_empty() {
        text(out, "no nodes", MARGIN, COLUMNS_TOP + 12, "muted", fit);
    }
    for (node, column) in graph.nodes.iter().zip(&layout.columns) {
        write_column(out, scratch, node, column, &layout.boxes);
    }
    if !graph.edges.is_empty() {
        out.push_str("<g class=\"edges\">\n");
        for (k, e) in graph.edges.iter().enumerate() {
            let from = layout.anchors.get(&(e.from_node, e.from_service.as_str()));
            let to = layout.anchors.get(&(e.to_node, e.to_service.as_str()));
            if let (Some(from), Some(to)) = (from, to) {
                write_edge(out, e, from, to, &layout.columns, k);
            }
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
}

fn summary_line(out: &mut String, graph: &ClusterGraph) {
    out.clear();
    let n = graph.nodes.len();
    let i = graph.instance_count();
    let _ = write!(
        out,
        "cluster: {n} node{}, {i} instance{}, ",
        if n == 1 { "" } else { "s" },
        if i == 1 { "" } else { "s" }
    );
    match graph.leader {
        Some(l) => {
            let _ = write!(out, "leader {l}");
        }
        None => out.push_str("no leader"),
    }
    let _ = write!(
        out,
        ", term {}, answered by {}",
        graph.term, graph.answered_by
    );
    if !graph.generated_at.is_empty() {
        let _ = write!(out, ", at {}", graph.generated_at);
    }
    if !graph.filters.is_empty() {
        out.push_str(" [");
        for (k, f) in graph.filters.iter().enumerate() {
            if k > 0 {
                out.push_str(", ");
            }
            out.push_str(f);
        }
        out.push(']');
    }
}

fn services_line(out: &mut String, graph: &ClusterGraph) {
    out.clear();
    if graph.services.is_empty() {
        out.push_str("no services");
        return;
    }
    out.push_str("services:");
    for s in &graph.services {
        let _ = write!(out, " {} {}/{}", s.name, s.running, s.replicas);
        if s.deleting {
            out.push_str(" (deleting)");
        }
        if !s.depends_on.is_empty() {
            out.push_str(" →");
            for d in &s.depends_on {
                let _ = write!(out, " {d}");
            }
        }
        out.push(';');
    }
    out.pop();
}

/// State colours; the samples go through `state_color` so the legend follows it.
fn write_legend(out: &mut String, top: u32) {
    const ENTRIES: [(&str, &str); 6] = [
        ("running", "running"),
        ("starting/stopping", "starting"),
        ("crashed/failed", "crashed"),
        ("shutdown/done", "done"),
        ("unreachable", "unreachable"),
        ("other", ""),
    ];
    out.push_str("<g class=\"legend\">");
    let mut x = MARGIN;
    for (label, state) in ENTRIES {
        let _ = write!(
            out,
            "<rect class=\"box\" x=\"{x}\" y=\"{top}\" width=\"12\" height=\"12\" rx=\"2\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{label}</text>",
            state_color(state),
            x + 16,
            top + 10
        );
        x += 16 + text_width(label.len()) + 16;
    }
    out.push_str("</g>\n");
}

fn write_column(
    out: &mut String,
    scratch: &mut String,
    node: &NodeGraph,
    column: &Column,
    boxes: &[BoxLayout],
) {
    let (w, h) = (column.width, column.height);
    out.push_str("<g class=\"node\" data-node=\"");
    let _ = write!(out, "{}\" data-state=\"", node.id);
    push_escaped(out, &node.state);
    let _ = write!(
        out,
        "\" transform=\"translate({},{COLUMNS_TOP})\">\n<rect class=\"col\" width=\"{w}\" height=\"{h}\" rx=\"8\" fill=\"{}\"/>",
        column.x,
        if node.reachable {
            "aliceblue"
        } else {
            "mistyrose"
        }
    );
    let badge = if node.leader { LEADER_BADGE } else { 0 };
    node_line(scratch, node);
    text(
        out,
        scratch,
        PAD,
        16,
        "b",
        chars_fitting(w - 2 * PAD - badge),
    );
    if node.leader {
        let _ = write!(
            out,
            "<rect x=\"{}\" y=\"4\" width=\"52\" height=\"16\" rx=\"8\" fill=\"gold\"/><text class=\"b\" x=\"{}\" y=\"16\">leader</text>",
            w - PAD - 52,
            w - PAD - 48
        );
    }
    let fit = chars_fitting(w - 2 * PAD);
    state_line(scratch, node);
    text(out, scratch, PAD, 32, "", fit);
    let mut line = 2;
    if let Some(e) = &node.error {
        text(out, e, PAD, 16 + line * LINE, "err", fit);
        line += 1;
    }
    if line < column.header_lines {
        text(out, "no instances", PAD, 16 + line * LINE, "muted", fit);
    }
    out.push('\n');
    let boxes = boxes.get(column.first_box..).unwrap_or_default();
    for (content, b) in Content::of(node).zip(boxes) {
        write_box(out, scratch, node.id, content, b, w - 2 * PAD);
    }
    out.push_str("</g>\n");
}

fn write_box(
    out: &mut String,
    scratch: &mut String,
    node: u64,
    content: Content,
    b: &BoxLayout,
    width: u32,
) {
    let state = content.state();
    match content {
        Content::Daemon(_) => {
            let _ = write!(out, "<g class=\"daemon\" data-daemon=\"{node}\"");
        }
        Content::Instance(i) => {
            out.push_str("<g class=\"instance\" data-instance=\"");
            push_escaped(out, &i.service);
            let _ = write!(out, "#{}\" data-node=\"{node}\"", i.slot);
        }
    }
    out.push_str(" data-state=\"");
    push_escaped(out, state);
    let _ = write!(
        out,
        "\" transform=\"translate({PAD},{})\"><rect class=\"box\" width=\"{width}\" height=\"{}\" rx=\"6\" fill=\"{}\"/>",
        b.y,
        b.height,
        state_color(state)
    );
    if b.height > LINE + 8 {
        // A lighter panel under the title, so the rows' state dots show on any fill.
        let _ = write!(
            out,
            "<rect class=\"rows\" x=\"4\" y=\"{}\" width=\"{}\" height=\"{}\" rx=\"4\"/>",
            LINE + 6,
            width - 8,
            b.height - LINE - 10
        );
    }
    content.title(scratch);
    text(out, scratch, 8, 16, "b", chars_fitting(width - 16));
    let mut y = 16 + LINE;
    if b.crash_line {
        scratch.clear();
        scratch.push_str("last crash: ");
        scratch.push_str(content.crash().unwrap_or_default());
        text(out, scratch, 8, y, "crash", chars_fitting(width - 16));
        y += LINE;
    }
    let mut budget = b.rows;
    walk(content.tree(), 0, &mut budget, &mut |depth, node| {
        let x = row_x(depth);
        let _ = write!(
            out,
            "<circle class=\"dot\" cx=\"{}\" cy=\"{}\" r=\"4\" fill=\"{}\"/>",
            x - 8,
            y - 4,
            state_color(&node.state)
        );
        row_text(scratch, node);
        text(
            out,
            scratch,
            x,
            y,
            "",
            chars_fitting(width.saturating_sub(x + 8)),
        );
        y += LINE;
    });
    if b.hidden > 0 {
        let _ = write!(
            out,
            "<text class=\"muted\" x=\"20\" y=\"{y}\">… {} more</text>",
            b.hidden
        );
    }
    out.push_str("</g>\n");
}

/// Lanes in a gap between columns (and in the channel above them), so that parallel edges
/// stay apart.
const LANES: i64 = 8;

/// An edge drawn only where nothing else is: out of the right edge of its box, along the gap
/// right of its column, across the channel above the columns (when it changes columns), down
/// the gap right of the target's column, and into the right edge of the target's box. It
/// never crosses a box or a line of text.
fn write_edge(
    out: &mut String,
    e: &super::DependencyEdge,
    from: &Anchor,
    to: &Anchor,
    columns: &[Column],
    lane: usize,
) {
    out.push_str("<path class=\"edge\" data-edge=\"");
    push_escaped(out, &e.from_service);
    let _ = write!(out, "@{}->", e.from_node);
    push_escaped(out, &e.to_service);
    let _ = write!(out, "@{}\" d=\"", e.to_node);
    let lane = (lane as i64) % LANES;
    // Gaps are COLUMN_GAP wide (EDGE_ROOM right of the last column): lanes 4 px apart.
    let gap = |c: usize| columns.get(c).map_or(0, |c| i64::from(c.x + c.width)) + 6 + 4 * lane;
    let (y1, y2) = (from.y, to.y);
    let (x1, x2) = (from.right, to.right);
    if from.index == to.index {
        // A service depending on itself: a small loop in the gap.
        let _ = write!(out, "M{x1},{y1} H{} V{} H{x1}", gap(from.column), y1 + 8);
    } else if from.column == to.column {
        let _ = write!(out, "M{x1},{y1} H{} V{y2} H{x2}", gap(from.column));
    } else {
        // The channel between the legend and the tops of the columns.
        let channel = i64::from(COLUMNS_TOP) - 3 - lane;
        let _ = write!(
            out,
            "M{x1},{y1} H{} V{channel} H{} V{y2} H{x2}",
            gap(from.column),
            gap(to.column)
        );
    }
    out.push_str("\" marker-end=\"url(#mode-arrow)\"><title>");
    push_escaped(out, &e.from_service);
    let _ = write!(out, " on node {} depends on ", e.from_node);
    push_escaped(out, &e.to_service);
    let _ = writeln!(out, " on node {}</title></path>", e.to_node);
}

/// `<text>` with `s` cut to `max` characters; when cut, the full text goes in a `<title>`
/// (the tooltip).
fn text(out: &mut String, s: &str, x: u32, y: u32, class: &str, max: usize) {
    let _ = write!(out, "<text x=\"{x}\" y=\"{y}\"");
    if !class.is_empty() {
        let _ = write!(out, " class=\"{class}\"");
    }
    out.push('>');
    if push_clipped(out, s, max) {
        out.push_str("<title>");
        push_escaped(out, s);
        out.push_str("</title>");
    }
    out.push_str("</text>");
}

/// Write `s` escaped, cut to `max` characters with an ellipsis; whether it was cut.
fn push_clipped(out: &mut String, s: &str, max: usize) -> bool {
    let max = max.max(1);
    if s.len() <= max {
        push_escaped(out, s);
        return false;
    }
    let mut cut = s.len();
    for (n, (i, _)) in s.char_indices().enumerate() {
        if n == max - 1 {
            cut = i;
        } else if n == max {
            push_escaped(out, &s[..cut]);
            out.push('…');
            return true;
        }
    }
    push_escaped(out, s);
    false
}

/// Escape for XML text and attribute values. Control characters, which XML 1.0 does not
/// allow even escaped, become spaces, and the non-characters U+FFFE/U+FFFF become U+FFFD.
fn push_escaped(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let (replacement, len) = match bytes[i] {
            b'&' => ("&amp;", 1),
            b'<' => ("&lt;", 1),
            b'>' => ("&gt;", 1),
            b'"' => ("&quot;", 1),
            b'\'' => ("&#39;", 1),
            b if b < 0x20 => (" ", 1),
            0xEF if bytes.get(i + 1) == Some(&0xBF)
                && matches!(bytes.get(i + 2), Some(0xBE | 0xBF)) =>
            {
                ("\u{FFFD}", 3)
            }
            _ => {
                i += 1;
                continue;
            }
        };
        // `i` is at an ASCII byte or the start of a three-byte character: a char boundary.
        out.push_str(&s[start..i]);
        out.push_str(replacement);
        i += len;
        start = i;
    }
    out.push_str(&s[start..]);
}

#[cfg(test)]
#[path = "svg_tests.rs"]
mod tests;
