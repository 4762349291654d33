use std::collections::BTreeMap;

use super::*;
use crate::graph::{DependencyEdge, ServiceSummary};
use crate::service::NodeKind;

fn beacon(kind: NodeKind, label: &str, state: &str, children: Vec<BeaconNode>) -> BeaconNode {
    BeaconNode {
        kind,
        label: label.to_string(),
        state: state.to_string(),
        restart_count: 0,
        crash_reason: None,
        last_crash_reason: None,
        uptime_s: Some(2.0),
        detail: None,
        children,
    }
}

/// An instance's tree: its supervisor, the kind's service, a task and a timer.
fn tree(service: &str, slot: u32, state: &str) -> BeaconNode {
    let inner = beacon(
        NodeKind::Service,
        service,
        state,
        vec![
            beacon(NodeKind::Task, "accept", "running", vec![]),
            beacon(NodeKind::Timer, "tick", "running", vec![]),
        ],
    );
    let supervise = beacon(NodeKind::Task, "supervise", "running", vec![]);
    beacon(
        NodeKind::Supervisor,
        &format!("{service}#{slot}"),
        "running",
        vec![supervise, inner],
    )
}

fn instance(service: &str, slot: u32, state: &str, with_tree: bool) -> InstanceGraph {
    InstanceGraph {
        service: service.to_string(),
        slot,
        state: state.to_string(),
        placement: Some(state.to_string()),
        restart_count: 0,
        last_crash: None,
        tree: with_tree.then(|| tree(service, slot, state)),
    }
}

fn node(id: u64, instances: Vec<InstanceGraph>) -> NodeGraph {
    NodeGraph {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        state: "up".to_string(),
        reachable: true,
        error: None,
        leader: false,
        labels: BTreeMap::new(),
        instances,
        daemon: None,
    }
}

fn edge(from_service: &str, from_node: u64, to_service: &str, to_node: u64) -> DependencyEdge {
    DependencyEdge {
        from_service: from_service.to_string(),
        from_node,
        to_service: to_service.to_string(),
        to_node,
        cross_node: from_node != to_node,
    }
}

fn empty() -> ClusterGraph {
    ClusterGraph {
        answered_by: 1,
        leader: None,
        term: 0,
        applied_index: 0,
        generated_at: String::new(),
        filters: vec![],
        nodes: vec![],
        services: vec![],
        edges: vec![],
        edges_omitted: 0,
    }
}

/// `db` on node 1, `web` on nodes 1, 2 and 3 depending on it; node 3 unreachable; node 4
/// empty; node 1 leads and shows its daemon.
fn sample() -> ClusterGraph {
    let mut n1 = node(
        1,
        vec![
            instance("db", 0, "running", true),
            instance("web", 0, "running", true),
        ],
    );
    n1.leader = true;
    n1.labels.insert("zone".into(), "a".into());
    n1.daemon = Some(beacon(
        NodeKind::Worker,
        "mode-node",
        "running",
        vec![beacon(NodeKind::Service, "Raft", "running", vec![])],
    ));
    let mut crashed = instance("web", 1, "crashed", true);
    crashed.restart_count = 3;
    crashed.last_crash = Some("panicked at src/web.rs:12".into());
    let n2 = node(2, vec![crashed]);
    let mut n3 = node(3, vec![instance("web", 2, "running", false)]);
    n3.reachable = false;
    n3.state = "unreachable".into();
    n3.error = Some("connection refused (os error 111)".into());
    let n4 = node(4, vec![]);
    ClusterGraph {
        answered_by: 2,
        leader: Some(1),
        term: 7,
        applied_index: 42,
        generated_at: "2026-11-25 08:14:20.123Z".into(),
        filters: vec!["service=web".into()],
        nodes: vec![n1, n2, n3, n4],
        edges_omitted: 0,
        services: vec![
            ServiceSummary {
                name: "db".into(),
                kind: "kv".into(),
                replicas: 1,
                running: 1,
                depends_on: vec![],
                deleting: false,
            },
            ServiceSummary {
                name: "web".into(),
                kind: "http".into(),
                replicas: 3,
                running: 2,
                depends_on: vec!["db".into()],
                deleting: false,
            },
        ],
        edges: vec![
            edge("web", 1, "db", 1),
            edge("web", 2, "db", 1),
            edge("web", 3, "db", 1),
        ],
    }
}

/// A small XML well-formedness check: tags nest and match, attribute values are quoted, and
/// `<` and `&` appear only as markup or entities.
fn assert_well_formed(xml: &str) {
    let xml = xml.trim_end();
    assert!(xml.starts_with("<svg "), "starts with <svg: {xml:.80}");
    assert!(xml.ends_with("</svg>"), "ends with </svg>");
    let mut stack: Vec<&str> = Vec::new();
    let mut rest = xml;
    while let Some(open) = rest.find(['<', '&']) {
        let tail = &rest[open..];
        if tail.starts_with('&') {
            let end = tail.find(';').expect("entity ends with ;");
            let entity = &tail[1..end];
            assert!(
                matches!(entity, "amp" | "lt" | "gt" | "quot" | "#39"),
                "unknown entity &{entity};"
            );
            rest = &tail[end + 1..];
            continue;
        }
        let end = tag_end(tail);
        let tag = &tail[1..end];
        rest = &tail[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop(), Some(name), "closing </{name}>");
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name = tag.split(' ').next().unwrap_or_default();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "tag name {name:?}"
        );
        assert_attributes(&tag[name.len()..]);
        if !self_closing {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    for c in xml.chars() {
        assert!(c >= ' ' || c == '\n', "control character {c:?}");
    }
}

/// The `>` closing a tag, skipping quoted attribute values.
fn tag_end(tail: &str) -> usize {
    let mut quoted = false;
    for (i, c) in tail.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if i > 0 => panic!("'<' inside a tag: {:.80}", tail),
            '>' if !quoted => return i,
            _ => {}
        }
    }
    panic!("unterminated tag: {:.80}", tail);
}

fn assert_attributes(mut attrs: &str) {
    loop {
        attrs = attrs.trim_start();
        if attrs.is_empty() {
            return;
        }
        let eq = attrs.find("=\"").expect("attribute name=\"value\"");
        let name = &attrs[..eq];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':'),
            "attribute name {name:?}"
        );
        let value_and_rest = &attrs[eq + 2..];
        let close = value_and_rest.find('"').expect("closing quote");
        let value = &value_and_rest[..close];
        assert!(!value.contains('<'), "'<' in attribute {name}={value:?}");
        attrs = &value_and_rest[close + 1..];
    }
}

#[test]
fn every_node_and_instance_is_drawn_with_its_data_attributes() {
    let g = sample();
    let svg = render(&g);
    assert_well_formed(&svg);
    for n in &g.nodes {
        let group = format!(
            "<g class=\"node\" data-node=\"{}\" data-state=\"{}\"",
            n.id, n.state
        );
        assert!(svg.contains(&group), "{group} missing");
        assert!(svg.contains(&format!("node {} ({})", n.id, n.address)));
        for i in &n.instances {
            let group = format!(
                "<g class=\"instance\" data-instance=\"{}\" data-node=\"{}\" data-state=\"{}\"",
                i.name(),
                n.id,
                i.state
            );
            assert!(svg.contains(&group), "{group} missing");
        }
    }
    assert_eq!(svg.matches("class=\"node\"").count(), 4);
    assert_eq!(svg.matches("class=\"instance\"").count(), 4);
    // Trees as rows, the leader marked, the daemon drawn, the crash shown.
    assert!(svg.contains("tick [timer] running"));
    assert!(svg.contains("accept [task] running"));
    assert!(svg.contains(">leader</text>"));
    assert!(svg.contains("data-daemon=\"1\"") && svg.contains("daemon: mode-node running"));
    assert!(svg.contains("Raft [service] running"));
    assert!(svg.contains("web#1 crashed, restarts=3"));
    assert!(svg.contains("last crash: panicked at src/web.rs:12"));
    assert!(
        svg.contains("fill=\"salmon\""),
        "crashed instance filled by its state"
    );
    assert!(svg.contains("no instances"), "node 4 says it is empty");
    assert!(svg.contains("cluster: 4 nodes, 4 instances, leader 1, term 7, answered by 2"));
    assert!(svg.contains("[service=web]"));
}

#[test]
fn an_unreachable_node_is_misty_rose_with_its_error() {
    let mut g = sample();
    let long = format!("transport error: {}", "x".repeat(300));
    g.nodes[2].error = Some(long.clone());
    let svg = render(&g);
    assert_well_formed(&svg);
    let start = svg
        .find("data-node=\"3\" data-state=\"unreachable\"")
        .unwrap();
    let column = &svg[start..];
    let column = &column[..column.find("</g>\n</g>").unwrap_or(column.len())];
    assert!(column.contains("fill=\"mistyrose\""));
    assert!(column.contains("class=\"err\">transport error: xxx"));
    assert!(
        column.contains("…<title>transport error:"),
        "cut, full text in a title"
    );
    assert!(column.contains(&long), "full error kept");
    let short = render(&sample());
    assert!(short.contains("class=\"err\">connection refused (os error 111)</text>"));
}

#[test]
fn text_is_escaped_for_xml() {
    let mut g = sample();
    g.nodes[1].instances[0].last_crash = Some("bad <&>\"' input\u{1b}[31m\0".into());
    g.nodes[0].address = "[::1]:7001 <a&b>".into();
    g.nodes[0].instances[0].tree.as_mut().unwrap().children[1].label = "Db<T>".into();
    g.nodes[0].state = "up\"&".into();
    let svg = render(&g);
    assert_well_formed(&svg);
    assert!(svg.contains("bad &lt;&amp;&gt;&quot;&#39; input [31m "));
    assert!(svg.contains("[::1]:7001 &lt;a&amp;b&gt;"));
    assert!(svg.contains("Db&lt;T&gt; [service]"));
    assert!(svg.contains("data-state=\"up&quot;&amp;\""));
    assert!(!svg.contains("<&>"));
}

#[test]
fn long_labels_are_cut_with_an_ellipsis_and_kept_in_a_title() {
    let mut g = sample();
    let label = format!("very_{}_long", "é".repeat(200));
    g.nodes[0].instances[0].tree.as_mut().unwrap().children[1].label = label.clone();
    let svg = render(&g);
    assert_well_formed(&svg);
    assert!(svg.contains("…<title>"));
    assert!(svg.contains(&format!("<title>{label} [service] running</title>")));
}

#[test]
fn dependency_edges_are_dashed_curves_with_an_arrow() {
    let mut g = sample();
    // Edges naming instances that are not in the graph are left out, not a panic.
    g.edges.push(edge("web", 9, "db", 1));
    g.edges.push(edge("api", 1, "nope", 4));
    let svg = render(&g);
    assert_well_formed(&svg);
    assert!(svg.contains("<marker id=\"mode-arrow\""));
    for e in ["web@1->db@1", "web@2->db@1", "web@3->db@1"] {
        let path = format!("<path class=\"edge\" data-edge=\"{e}\" d=\"M");
        assert!(svg.contains(&path), "{path} missing");
    }
    assert_eq!(svg.matches("class=\"edge\"").count(), 3);
    assert_eq!(svg.matches("marker-end=\"url(#mode-arrow)\"").count(), 3);
    assert!(svg.contains("<title>web on node 2 depends on db on node 1</title>"));
    assert!(svg.contains(".mode-graph .edge{fill:none;stroke:steelblue"));
    assert!(svg.contains("stroke-dasharray"));
}

#[test]
fn edges_in_one_column_and_to_the_left_and_to_itself_stay_inside_the_document() {
    let mut g = sample();
    g.edges = vec![
        edge("web", 1, "db", 1),
        edge("db", 1, "web", 2),
        edge("web", 2, "db", 1),
        edge("db", 1, "db", 1),
    ];
    let svg = render(&g);
    assert_well_formed(&svg);
    let width: i64 = svg
        .split("width=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    for path in svg.split("data-edge=\"").skip(1) {
        let d = path
            .split("d=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        for number in d.split(|c: char| !c.is_ascii_digit() && c != '-') {
            if let Ok(n) = number.parse::<i64>() {
                assert!((0..=width).contains(&n), "{n} outside 0..{width} in {d}");
            }
        }
    }
}

/// The `x`, `width` of each column's `<g class="node" ... translate(x,...)><rect ... width=`.
fn column_spans(svg: &str) -> Vec<(i64, i64)> {
    svg.split("<g class=\"node\"")
        .skip(1)
        .map(|g| {
            let x = g
                .split("translate(")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap();
            let w = g
                .split("width=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let x: i64 = x.parse().unwrap();
            (x, x + w.parse::<i64>().unwrap())
        })
        .collect()
}

#[test]
fn edges_run_in_the_gaps_between_columns_never_over_a_box() {
    let mut g = sample();
    g.edges = vec![
        edge("web", 1, "db", 1),
        edge("web", 2, "db", 1),
        edge("db", 1, "web", 2),
        edge("db", 1, "db", 1),
    ];
    let svg = render(&g);
    let columns = column_spans(&svg);
    assert!(columns.len() >= 2, "{svg}");
    let inside = |x: i64| columns.iter().any(|(l, r)| *l < x && x < *r);
    let mut paths = 0;
    for path in svg.split("class=\"edge\" data-edge=\"").skip(1) {
        paths += 1;
        let d = path
            .split("d=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        // M x,y then H x / V y steps: every vertical run is outside every column, and every
        // horizontal run above the columns or between a box's right edge and a gap.
        let mut parts = d.split_whitespace();
        let (x, y) = parts.next().unwrap()[1..].split_once(',').unwrap();
        let (mut x, mut y): (i64, i64) = (x.parse().unwrap(), y.parse().unwrap());
        for step in parts {
            let v: i64 = step[1..]
                .parse()
                .unwrap_or_else(|_| panic!("{step} is not a straight run (H or V): {d}"));
            match &step[..1] {
                "V" => {
                    assert!(!inside(x), "a vertical run at x={x} crosses a column: {d}");
                    y = v;
                }
                "H" => {
                    let (lo, hi) = (x.min(v), x.max(v));
                    let crossed: Vec<_> = columns
                        .iter()
                        .filter(|(l, r)| lo < *r - 12 && *l + 12 < hi)
                        .collect();
                    assert!(
                        crossed.is_empty() || y < i64::from(super::COLUMNS_TOP),
                        "a horizontal run at y={y} from {x} to {v} crosses {crossed:?}: {d}"
                    );
                    x = v;
                }
                other => panic!("unexpected step {other} in {d}"),
            }
        }
    }
    assert_eq!(paths, 4);
}

#[test]
fn an_empty_graph_is_a_valid_document() {
    let svg = render(&empty());
    assert_well_formed(&svg);
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.contains("viewBox=\"0 0 "));
    assert!(svg.contains("cluster: 0 nodes, 0 instances, no leader"));
    assert!(svg.contains("no nodes"));
    assert!(!svg.contains("class=\"edges\""));
}

#[test]
fn nodes_without_instances_and_instances_without_trees_are_drawn() {
    let mut g = empty();
    let mut bare = node(5, vec![instance("solo", 0, "pending", false)]);
    bare.address.clear();
    bare.instances[0].placement = None;
    g.nodes = vec![bare, node(6, vec![])];
    g.edges = vec![edge("solo", 5, "solo", 6)];
    let svg = render(&g);
    assert_well_formed(&svg);
    assert!(svg.contains(">node 5</text>"));
    assert!(svg.contains("solo#0 pending (not placed here)"));
    assert!(svg.contains("data-node=\"6\""));
    assert!(
        !svg.contains("class=\"edge\""),
        "no instance of solo on node 6"
    );
}

#[test]
fn big_trees_are_capped_with_a_more_row() {
    let mut g = sample();
    let children = (0..50)
        .map(|i| beacon(NodeKind::Timer, &format!("t{i}"), "running", vec![]))
        .collect();
    g.nodes[0].instances[0].tree = Some(beacon(NodeKind::Supervisor, "db#0", "running", children));
    // A chain deeper than the cap: only the first rows are visited.
    let mut deep = beacon(NodeKind::Service, "leaf", "running", vec![]);
    for i in 0..500 {
        deep = beacon(
            NodeKind::Service,
            &format!("level{i}"),
            "running",
            vec![deep],
        );
    }
    g.nodes[1].instances[0].tree =
        Some(beacon(NodeKind::Supervisor, "web#1", "crashed", vec![deep]));
    let svg = render(&g);
    assert_well_formed(&svg);
    assert!(svg.contains(">t10 [timer] running</text>"));
    assert!(!svg.contains(">t11 [timer]"));
    assert!(svg.contains("… 39 more"));
    assert!(svg.contains("… 490 more"));
}

#[test]
fn ten_thousand_instances_render() {
    let mut g = sample();
    g.nodes = (1..=50)
        .map(|id| {
            node(
                id,
                (0..200)
                    .map(|slot| instance(&format!("svc{}", slot % 20), slot, "running", true))
                    .collect(),
            )
        })
        .collect();
    g.edges = (1..=50)
        .flat_map(|id| (0..19).map(move |s| edge(&format!("svc{s}"), id, "svc19", 51 - id)))
        .collect();
    let started = std::time::Instant::now();
    let svg = render(&g);
    let took = started.elapsed();
    eprintln!("10,000 instances: {} bytes in {took:?}", svg.len());
    assert_eq!(svg.matches("class=\"instance\"").count(), 10_000);
    assert_eq!(svg.matches("class=\"edge\"").count(), 950);
    assert!(svg.ends_with("</svg>\n"));
}
