//! Placement decisions.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

fn node(id: u64, zone: &str) -> NodeView {
    NodeView {
        id,
        labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
        capacity: 100,
        schedulable: true,
        kinds: None,
    }
}

fn spec(name: &str, replicas: u32) -> SpecView {
    SpecView {
        name: name.into(),
        kind: "ticker".into(),
        replicas,
        constraints: vec![],
        spread: None,
        anti_affinity: BTreeSet::new(),
        cost: 1,
    }
}

fn nodes_of(plan: &Plan, service: &str) -> Vec<u64> {
    let mut v: Vec<u64> = plan
        .assign
        .iter()
        .filter(|a| a.service == service)
        .map(|a| a.node)
        .collect();
    v.sort();
    v
}

/// Apply a plan to the current assignments.
fn apply(current: &[Assignment], p: &Plan) -> Vec<Assignment> {
    let mut v: Vec<Assignment> = current
        .iter()
        .filter(|a| !p.unassign.contains(a))
        .cloned()
        .collect();
    v.extend(p.assign.iter().cloned());
    v.sort();
    v
}

#[test]
fn three_replicas_on_three_nodes_run_one_per_node() {
    let nodes = [node(1, "a"), node(2, "a"), node(3, "a")];
    let p = plan(&nodes, &[spec("web", 3)], &[]);
    assert_eq!(nodes_of(&p, "web"), [1, 2, 3]);
    assert!(p.unassign.is_empty() && p.unplaced.is_empty());
}

#[test]
fn the_same_input_gives_the_same_plan() {
    let nodes: Vec<NodeView> = (1..=20)
        .map(|i| node(i, if i % 2 == 0 { "a" } else { "b" }))
        .collect();
    let specs: Vec<SpecView> = (0..10).map(|i| spec(&format!("s{i}"), 7)).collect();
    assert_eq!(plan(&nodes, &specs, &[]), plan(&nodes, &specs, &[]));
}

#[test]
fn adding_a_node_moves_nothing() {
    let mut nodes = vec![node(1, "a"), node(2, "a")];
    let first = plan(&nodes, &[spec("web", 4)], &[]);
    let current = apply(&[], &first);
    nodes.push(node(3, "a"));
    let again = plan(&nodes, &[spec("web", 4)], &current);
    assert_eq!(again, Plan::default());
}

#[test]
fn instances_on_a_down_node_move_to_the_others() {
    let mut nodes = vec![node(1, "a"), node(2, "a"), node(3, "a")];
    let current = apply(&[], &plan(&nodes, &[spec("web", 3)], &[]));
    nodes[1].schedulable = false;
    let p = plan(&nodes, &[spec("web", 3)], &current);
    assert_eq!(p.unassign.len(), 1);
    assert_eq!(p.unassign[0].node, 2);
    assert_eq!(p.assign.len(), 1);
    assert_ne!(p.assign[0].node, 2);
    assert_eq!(p.assign[0].slot, p.unassign[0].slot);
}

#[test]
fn constraints_select_nodes_by_label() {
    let nodes = [node(1, "a"), node(2, "b"), node(3, "c")];
    let mut s = spec("db", 2);
    s.constraints = vec![Constraint::In {
        label: "zone".into(),
        values: BTreeSet::from(["b".into(), "c".into()]),
    }];
    assert_eq!(nodes_of(&plan(&nodes, &[s.clone()], &[]), "db"), [2, 3]);
    s.constraints = vec![Constraint::Equals {
        label: "zone".into(),
        value: "z".into(),
    }];
    let p = plan(&nodes, &[s], &[]);
    assert_eq!(p.unplaced.len(), 2);
    assert!(
        p.unplaced[0].reason.contains("3 do not match zone=z"),
        "{}",
        p.unplaced[0].reason
    );
}

#[test]
fn capacity_is_respected_and_a_shortfall_is_explained() {
    let mut nodes = vec![node(1, "a"), node(2, "a")];
    nodes[0].capacity = 10;
    nodes[1].capacity = 4;
    let mut s = spec("big", 3);
    s.cost = 5;
    let p = plan(&nodes, &[s], &[]);
    assert_eq!(nodes_of(&p, "big"), [1, 1]);
    assert_eq!(p.unplaced.len(), 1);
    assert!(
        p.unplaced[0].reason.contains("lack capacity (needs 5"),
        "{}",
        p.unplaced[0].reason
    );
}

#[test]
fn anti_affinity_is_symmetric() {
    let nodes = [node(1, "a"), node(2, "a")];
    let a = spec("a", 1);
    let mut b = spec("b", 1);
    b.anti_affinity = BTreeSet::from(["a".into()]);
    let p = plan(&nodes, &[a, b], &[]);
    assert_ne!(nodes_of(&p, "a"), nodes_of(&p, "b"));
    // Declared on one side only, it still keeps a third replica of `a` off b's node.
    let mut a3 = spec("a", 2);
    a3.anti_affinity = BTreeSet::new();
    let mut b = spec("b", 1);
    b.anti_affinity = BTreeSet::from(["a".into()]);
    let p = plan(&nodes, &[b, a3], &[]);
    let b_node = nodes_of(&p, "b")[0];
    let other = if b_node == 1 { 2 } else { 1 };
    assert_eq!(
        nodes_of(&p, "a"),
        [other, other],
        "replicas share the only node left"
    );
    // With that node full, the reason names the anti-affinity.
    let mut small = nodes.to_vec();
    small.iter_mut().for_each(|n| n.capacity = 1);
    let mut b = spec("b", 1);
    b.anti_affinity = BTreeSet::from(["a".into()]);
    let p = plan(&small, &[b, spec("a", 2)], &[]);
    assert_eq!(p.unplaced.len(), 1);
    assert!(
        p.unplaced[0]
            .reason
            .contains("1 run an anti-affine service"),
        "{}",
        p.unplaced[0].reason
    );
}

#[test]
fn spreading_over_a_label_balances_zones_first() {
    let nodes = [node(1, "a"), node(2, "a"), node(3, "a"), node(4, "b")];
    let mut s = spec("web", 4);
    s.spread = Some("zone".into());
    let p = plan(&nodes, &[s], &[]);
    let on_b = p.assign.iter().filter(|a| a.node == 4).count();
    assert_eq!(on_b, 2, "{:?}", p.assign);
}

#[test]
fn a_kind_no_node_offers_is_placed_nowhere_with_the_reason() {
    let mut nodes = vec![node(1, "a")];
    nodes[0].kinds = Some(BTreeSet::from(["exec".into()]));
    let p = plan(&nodes, &[spec("t", 1)], &[]);
    assert_eq!(p.unplaced.len(), 1);
    assert!(
        p.unplaced[0]
            .reason
            .contains("1 do not offer kind 'ticker'"),
        "{}",
        p.unplaced[0].reason
    );
    assert!(plan(&[], &[spec("t", 1)], &[]).unplaced[0]
        .reason
        .contains("no nodes"));
}

#[test]
fn scaling_down_and_removing_services_unassign_instances() {
    let nodes = [node(1, "a"), node(2, "a"), node(3, "a")];
    let current = apply(&[], &plan(&nodes, &[spec("web", 3), spec("old", 2)], &[]));
    let p = plan(&nodes, &[spec("web", 1)], &current);
    let mut gone: Vec<(String, u32)> = p
        .unassign
        .iter()
        .map(|a| (a.service.clone(), a.slot))
        .collect();
    gone.sort();
    assert_eq!(
        gone,
        [
            ("old".to_string(), 0),
            ("old".to_string(), 1),
            ("web".to_string(), 1),
            ("web".to_string(), 2)
        ]
    );
    assert!(p.assign.is_empty());
}

#[test]
fn an_instance_avoids_the_nodes_where_it_failed_when_it_can() {
    let nodes = [node(1, "a"), node(2, "a")];
    let mut avoid = Avoid::new();
    avoid.insert(("web".to_string(), 0), BTreeSet::from([1]));
    let p = plan_avoiding(&nodes, &[spec("web", 1)], &[], &avoid);
    assert_eq!(nodes_of(&p, "web"), [2]);
    avoid.insert(("web".to_string(), 0), BTreeSet::from([1, 2]));
    let p = plan_avoiding(&nodes, &[spec("web", 1)], &[], &avoid);
    assert_eq!(
        p.assign.len(),
        1,
        "with nowhere else to go, an avoided node is better than none"
    );
}
