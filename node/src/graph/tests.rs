use std::collections::BTreeMap;

use super::*;
use crate::model::spec::ServiceSpec;
use crate::model::state::{NodeInfo, Placement};
use crate::service::NodeKind;

fn beacon(label: &str, state: &str, children: Vec<BeaconNode>) -> BeaconNode {
    BeaconNode {
        kind: NodeKind::Service,
        label: label.to_string(),
        state: state.to_string(),
        restart_count: 0,
        crash_reason: None,
        last_crash_reason: None,
        uptime_s: Some(1.5),
        detail: None,
        children,
    }
}

fn node_info(id: u64) -> NodeInfo {
    NodeInfo {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        labels: BTreeMap::new(),
        capacity: 100,
        status: NodeStatus::Up,
        kinds: vec!["ticker".into()],
        draining: false,
        registered_at_ms: 0,
        incarnation: 0,
        api_address: String::new(),
        role: Default::default(),
    }
}

/// `db` on node 1, `web` on nodes 1 and 2 depending on it; node 3 registered, empty.
fn state() -> ClusterState {
    let mut s = ClusterState::default();
    for id in 1..=3 {
        s.nodes.insert(id, node_info(id));
    }
    s.specs
        .insert("db".into(), ServiceSpec::new("db", "ticker"));
    let mut web = ServiceSpec::new("web", "ticker");
    web.replicas = 2;
    web.depends_on = vec!["db".into()];
    s.specs.insert("web".into(), web);
    let running = |node| {
        let mut p = Placement::on(node);
        p.state = "running".into();
        p
    };
    s.placements
        .insert("db".into(), BTreeMap::from([(0, running(1))]));
    s.placements.insert(
        "web".into(),
        BTreeMap::from([(0, running(1)), (1, running(2))]),
    );
    s
}

fn report(node: u64, instances: &[(&str, u32, &str)]) -> NodeReport {
    NodeReport {
        node,
        instances: instances
            .iter()
            .map(|(svc, slot, st)| {
                let inner = beacon(svc, st, vec![beacon("tick", "running", vec![])]);
                let mut supervise = beacon("supervise", "running", vec![]);
                supervise.kind = NodeKind::Task;
                LocalInstance::from_beacon(beacon(
                    &format!("{svc}#{slot}"),
                    "running",
                    vec![supervise, inner],
                ))
                .unwrap()
            })
            .collect(),
        daemon: Some(beacon("mode-node", "running", vec![])),
    }
}

fn ctx() -> GraphContext {
    GraphContext {
        answered_by: 1,
        leader: Some(1),
        term: 3,
        applied_index: 42,
        members: BTreeMap::new(),
    }
}

#[test]
fn merge_puts_each_instance_under_its_node_with_its_tree() {
    let reports = BTreeMap::from([
        (
            1,
            Ok(report(1, &[("db", 0, "running"), ("web", 0, "running")])),
        ),
        (2, Ok(report(2, &[("web", 1, "crashed")]))),
        (3, Ok(report(3, &[]))),
    ]);
    let g = merge(&state(), &ctx(), reports.clone(), &GraphFilter::default());
    assert_eq!(g.nodes.len(), 3);
    assert!(g.nodes[0].leader && !g.nodes[1].leader);
    let names: Vec<String> = g.nodes[0].instances.iter().map(|i| i.name()).collect();
    assert_eq!(names, ["db#0", "web#0"]);
    // The node's own view wins over the recorded one: web#1 crashed inside its supervisor.
    let web1 = &g.nodes[1].instances[0];
    assert_eq!(
        (web1.state.as_str(), web1.placement.as_deref()),
        ("crashed", Some("running"))
    );
    assert!(g.nodes[2].instances.is_empty());
    assert!(g.nodes[0].daemon.is_none(), "daemon trees only when asked");
    // web@1 → db@1 (same machine), web@2 → db@1 (crosses machines).
    assert_eq!(g.edges.len(), 2);
    assert_eq!(g.edges.iter().filter(|e| e.cross_node).count(), 1);
    let web = g.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!((web.replicas, web.running), (2, 2));
}

#[test]
fn an_unreachable_node_keeps_its_recorded_instances_and_error() {
    let reports = BTreeMap::from([
        (
            1,
            Ok(report(1, &[("db", 0, "running"), ("web", 0, "running")])),
        ),
        (
            2,
            Err("no answer from 127.0.0.1:7002 within 500 ms".to_string()),
        ),
    ]);
    let g = merge(&state(), &ctx(), reports.clone(), &GraphFilter::default());
    let n2 = &g.nodes[1];
    assert_eq!((n2.state.as_str(), n2.reachable), ("unreachable", false));
    assert!(n2.error.as_deref().unwrap().contains("within 500 ms"));
    assert_eq!(n2.instances[0].state, "running", "as last recorded");
    assert!(n2.instances[0].tree.is_none());
    // Node 3 was never asked (no report at all).
    assert_eq!(g.nodes[2].error.as_deref(), Some("not asked"));
}

#[test]
fn a_node_that_answers_without_a_placed_instance_shows_it_missing_and_extras_unplaced() {
    let reports = BTreeMap::from([
        (1, Ok(report(1, &[("db", 0, "running")]))),
        (
            2,
            Ok(report(2, &[("web", 1, "running"), ("old", 0, "stopping")])),
        ),
    ]);
    let g = merge(&state(), &ctx(), reports.clone(), &GraphFilter::default());
    let web0 = g.nodes[0]
        .instances
        .iter()
        .find(|i| i.name() == "web#0")
        .unwrap();
    assert_eq!(web0.state, "missing");
    let old = g.nodes[1]
        .instances
        .iter()
        .find(|i| i.service == "old")
        .unwrap();
    assert_eq!(old.placement, None);
    assert_eq!(old.state, "stopping");
}

#[test]
fn filters_narrow_nodes_instances_and_edges() {
    let reports = BTreeMap::from([
        (
            1,
            Ok(report(1, &[("db", 0, "running"), ("web", 0, "running")])),
        ),
        (2, Ok(report(2, &[("web", 1, "running")]))),
    ]);
    let only_db = GraphFilter {
        service: Some("db".into()),
        ..GraphFilter::default()
    };
    let g = merge(&state(), &ctx(), reports.clone(), &only_db);
    assert_eq!(g.instance_count(), 1);
    assert_eq!(g.services.len(), 1);
    assert_eq!(g.edges.len(), 2, "edges touching db stay");
    assert_eq!(g.filters, ["service=db"]);
    let only_2 = GraphFilter {
        node: Some(2),
        daemon: true,
        ..GraphFilter::default()
    };
    let g = merge(&state(), &ctx(), reports.clone(), &only_2);
    assert_eq!(g.nodes.len(), 1);
    assert!(g.nodes[0].daemon.is_some());
    assert!(g.edges.iter().all(|e| e.from_node == 2 || e.to_node == 2));
}

#[test]
fn signature_ignores_uptimes_but_not_states() {
    let reports = BTreeMap::from([(1, Ok(report(1, &[("db", 0, "running")])))]);
    let a = merge(&state(), &ctx(), reports.clone(), &GraphFilter::default());
    let mut b = a.clone();
    b.generated_at = "later".into();
    b.nodes[0].instances[0].tree.as_mut().unwrap().uptime_s = Some(99.0);
    assert_eq!(a.signature(), b.signature());
    b.nodes[0].instances[0].state = "crashed".into();
    assert_ne!(a.signature(), b.signature());
}

#[test]
fn tree_and_dot_show_nodes_instances_trees_and_edges() {
    let reports = BTreeMap::from([
        (
            1,
            Ok(report(1, &[("db", 0, "running"), ("web", 0, "running")])),
        ),
        (2, Err("connection refused".to_string())),
    ]);
    let g = merge(&state(), &ctx(), reports.clone(), &GraphFilter::default());
    let tree = g.render_tree(Palette::Plain);
    assert!(tree.starts_with("cluster: 3 node(s), 3 instance(s), leader 1"));
    assert!(tree.contains("node 2 (127.0.0.1:7002) unreachable: connection refused"));
    assert!(tree.contains("db#0 running"));
    assert!(tree.contains("tick [service] running"));
    assert!(tree.contains("web @ node 2 → db @ node 1 (cross-node)"));
    assert!(!tree.contains('\x1b'));
    let coloured = g.render_tree(Palette::Ansi);
    assert!(coloured.contains("\x1b[32mdb#0 running\x1b[0m"));
    let dot = g.to_dot();
    assert!(dot.contains("subgraph cluster_node2"));
    assert!(dot.contains("i2_web_1 -> i1_db_0 [style=\"dashed\""));
    // The JSON form round-trips.
    let back: ClusterGraph = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
    assert_eq!(back, g);
}
