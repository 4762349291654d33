//! The cluster at a glance, for the web view of a big cluster: counts by state per node and
//! per service, each service's health, and only the few instances that need attention (not
//! running, unhealthy, crashing), each with what it waits for. Built from one replica's
//! cluster state alone (no fan-out, no service trees), so it stays a few KB at 10,000
//! instances; one service's instances come on demand ([`service_detail`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::GraphContext;
use crate::model::state::{ClusterState, NodeStatus, Placement};

/// The most instances a summary lists by name (the rest are counted in
/// [`ClusterSummary::attention_omitted`]): with crash reasons of the longest kept (4 KB), a
/// summary stays near 200 KB.
pub const MAX_ATTENTION: usize = 50;

/// The most instances one service's detail lists, whatever `per_node` (so that a service on
/// hundreds of nodes stays a page's worth).
pub const MAX_DETAIL_INSTANCES: usize = 1_000;

/// Restarts from which an instance that is not running counts as crash-looping.
pub const CRASH_LOOP_RESTARTS: u32 = 1;

/// The whole cluster, summed up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    /// The node that built it (from its replica of the cluster state).
    pub answered_by: u64,
    /// The leader as that node knows it.
    #[serde(default)]
    pub leader: Option<u64>,
    /// The Raft term.
    #[serde(default)]
    pub term: u64,
    /// Instances placed on a node.
    pub instances: usize,
    /// Every member, by id.
    pub nodes: Vec<NodeSummary>,
    /// Every service, by name.
    pub services: Vec<ServiceHealth>,
    /// Instances that need attention (not running, unhealthy, crash-looping), at most
    /// [`MAX_ATTENTION`].
    pub attention: Vec<InstanceBrief>,
    /// Instances needing attention beyond [`MAX_ATTENTION`].
    #[serde(default)]
    pub attention_omitted: usize,
    /// The sequence number of the latest event (a client refetches events when it moves).
    #[serde(default)]
    pub last_event: u64,
}

/// One node: its state and what runs on it, counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Its id.
    pub id: u64,
    /// Its peer address.
    pub address: String,
    /// `up`, `down`, `draining`, or `unregistered` (a Raft member whose agent has not
    /// registered).
    pub state: String,
    /// Whether it leads the cluster.
    #[serde(default)]
    pub leader: bool,
    /// Its placement labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Instances placed on it.
    pub instances: usize,
    /// Its instances by state.
    pub states: BTreeMap<String, usize>,
    /// Its instances by service, then by state.
    pub services: BTreeMap<String, BTreeMap<String, usize>>,
}

/// One service's health across the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceHealth {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Instances wanted.
    pub replicas: u32,
    /// Instances placed on a node.
    pub placed: u32,
    /// Instances running.
    pub running: u32,
    /// Instances whose health check fails.
    pub unhealthy: u32,
    /// Instances crash-looping ([`is_crash_looping`]).
    pub crash_looping: u32,
    /// Restarts of its instances, summed.
    pub restarts: u64,
    /// Its instances by state.
    pub states: BTreeMap<String, usize>,
    /// Wanted instances with no node.
    pub unplaced: u32,
    /// What its unplaced instances wait for ([`waiting_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Services it depends on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Being removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// One instance, as the control plane records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceBrief {
    /// Its service.
    pub service: String,
    /// Its slot.
    pub slot: u32,
    /// The node it is placed on.
    pub node: u64,
    /// Its state as its node last reported (`pending` until it does).
    pub state: String,
    /// Restarts reported by its node.
    #[serde(default)]
    pub restart_count: u32,
    /// Its last crash reason, in full (as the state keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crash: Option<String>,
    /// Its health check's verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// While moving: the node it moves from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_from: Option<u64>,
    /// What it waits for ([`waiting_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// One service in detail: its health and its instances (at most `per_node` on each node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDetail {
    /// Its health.
    pub service: ServiceHealth,
    /// Its instances by node then slot, at most `per_node` on each node and
    /// [`MAX_DETAIL_INSTANCES`] in all.
    pub instances: Vec<InstanceBrief>,
    /// Instances left out by the limits.
    #[serde(default)]
    pub omitted: usize,
}

/// What is waiting: one placed instance, or a service's instances that have no node.
#[derive(Debug, Clone, Copy)]
pub enum Waiting<'a> {
    /// The instance in `slot` of `service`.
    Placed {
        /// Its service.
        service: &'a str,
        /// Its placement.
        placement: &'a Placement,
    },
    /// `count` wanted instances of `service` that are on no node.
    Unplaced {
        /// The service.
        service: &'a str,
        /// How many.
        count: u32,
        /// Why, as the scheduler says now ([`ClusterState::unplaced_reasons`]), when known.
        reason: Option<&'a str>,
    },
}

/// What an instance (or a service's unplaced instances) waits for, in words, from what the
/// cluster state says: its state, its node's status, a move under way, its dependencies,
/// the reason a rollout recorded or the latest `unplaced` event. `None` when it waits for
/// nothing (running and healthy).
///
/// This is the one place that text is made: the web view and any other reader show it as is.
pub fn waiting_for(state: &ClusterState, waiting: Waiting) -> Option<String> {
    let (service, p) = match waiting {
        Waiting::Unplaced { count: 0, .. } => return None,
        Waiting::Unplaced {
            service,
            count,
            reason,
        } => {
            let noun = if count == 1 { "instance" } else { "instances" };
            if state.deleting.contains(service) {
                return None;
            }
            let rolling = state
                .versions
                .get(service)
                .and_then(|v| v.back())
                .and_then(|v| v.unplaced.clone());
            let event = || {
                state
                    .events
                    .iter()
                    .rev()
                    .find(|e| e.kind == "unplaced" && e.service.as_deref() == Some(service))
                    .map(|e| e.message.clone())
            };
            let why = rolling
                .or_else(|| reason.map(str::to_string))
                .or_else(event)
                .unwrap_or_else(|| {
                    "the control plane to place them (no reason recorded yet)".to_string()
                });
            return Some(format!("{count} {noun} on no node: {why}"));
        }
        Waiting::Placed { service, placement } => (service, placement),
    };
    let node = p.node;
    let node_status = state.nodes.get(&node).map(|n| n.status);
    if state.deleting.contains(service) {
        return (p.state != "stopped").then(|| "its service to be removed".to_string());
    }
    if let Some(from) = p.moving_from {
        if p.state != "running" {
            return Some(format!(
                "its move from node {from} to node {node}: node {from} keeps it running until it runs on node {node} (now {})",
                p.state
            ));
        }
    }
    match node_status {
        Some(NodeStatus::Down) => {
            return Some(format!(
                "node {node}, which is down (missed its heartbeats): it will be placed elsewhere"
            ))
        }
        None => return Some(format!("node {node}, which is not registered")),
        _ => {}
    }
    let deps_down: Vec<String> = state
        .specs
        .get(service)
        .map(|spec| {
            spec.depends_on
                .iter()
                .filter(|d| {
                    !state
                        .placements
                        .get(*d)
                        .is_some_and(|slots| slots.values().any(|p| p.state == "running"))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let deps = || {
        format!(
            "its dependencies to run: {} (none running)",
            deps_down.join(", ")
        )
    };
    let restarts = if p.restart_count > 0 {
        format!(" ({} restarts so far)", p.restart_count)
    } else {
        String::new()
    };
    match p.state.as_str() {
        "running" if p.healthy == Some(false) => {
            Some("its health check to pass (it runs, but fails its check)".to_string())
        }
        "running" => None,
        "pending" if !deps_down.is_empty() => Some(deps()),
        "pending" => Some(format!(
            "node {node} to start it (assigned, not reported running yet)"
        )),
        "waiting" if !deps_down.is_empty() => Some(deps()),
        "waiting" => Some("its dependencies to run (its node has not seen them yet)".to_string()),
        "starting" => Some(format!("its service to finish starting on node {node}")),
        "crashed" => Some(format!(
            "a restart on node {node} after its crash, with backoff{restarts}"
        )),
        "failed" => Some(format!(
            "a new node: it exceeded its restart intensity on node {node}{restarts}"
        )),
        "stopped" => Some(format!("a restart: it is stopped on node {node}")),
        other => Some(format!("node {node} to report it running (it is {other})")),
    }
}

/// Whether an instance is crash-looping: not running, and crashed or restarted since it was
/// placed.
pub fn is_crash_looping(p: &Placement) -> bool {
    p.state != "running"
        && (matches!(p.state.as_str(), "crashed" | "failed")
            || p.state.contains("crash")
            || p.state.contains("backoff")
            || p.restart_count >= CRASH_LOOP_RESTARTS)
}

/// Whether an instance belongs in a summary's short list.
fn needs_attention(p: &Placement) -> bool {
    p.state != "running" || p.healthy == Some(false)
}

fn brief(state: &ClusterState, service: &str, slot: u32, p: &Placement) -> InstanceBrief {
    InstanceBrief {
        service: service.to_string(),
        slot,
        node: p.node,
        state: p.state.clone(),
        restart_count: p.restart_count,
        last_crash: p.last_crash.clone(),
        healthy: p.healthy,
        moving_from: p.moving_from,
        waiting_for: waiting_for(
            state,
            Waiting::Placed {
                service,
                placement: p,
            },
        ),
    }
}

/// The health of service `name` (which has a spec, or instances left after its spec went);
/// `reasons`: why each short service's instances cannot be placed now.
fn health(state: &ClusterState, name: &str, reasons: &BTreeMap<String, String>) -> ServiceHealth {
    let spec = state.specs.get(name);
    let slots = state.placements.get(name);
    let mut h = ServiceHealth {
        name: name.to_string(),
        kind: spec.map(|s| s.kind.clone()).unwrap_or_default(),
        replicas: spec.map_or(0, |s| s.instances()),
        placed: 0,
        running: 0,
        unhealthy: 0,
        crash_looping: 0,
        restarts: 0,
        states: BTreeMap::new(),
        unplaced: 0,
        waiting_for: None,
        depends_on: spec.map(|s| s.depends_on.clone()).unwrap_or_default(),
        deleting: state.deleting.contains(name),
    };
    for p in slots.into_iter().flat_map(|s| s.values()) {
        h.placed += 1;
        h.running += u32::from(p.state == "running");
        h.unhealthy += u32::from(p.healthy == Some(false));
        h.crash_looping += u32::from(is_crash_looping(p));
        h.restarts += u64::from(p.restart_count);
        *h.states.entry(p.state.clone()).or_default() += 1;
    }
    h.unplaced = h.replicas.saturating_sub(h.placed);
    h.waiting_for = waiting_for(
        state,
        Waiting::Unplaced {
            service: name,
            count: h.unplaced,
            reason: reasons.get(name).map(String::as_str),
        },
    );
    h
}

/// Sum the cluster up (see the module doc).
pub fn summarize(state: &ClusterState, ctx: &GraphContext) -> ClusterSummary {
    let mut ids: std::collections::BTreeSet<u64> = state.nodes.keys().copied().collect();
    ids.extend(ctx.members.keys().copied());
    let mut nodes: BTreeMap<u64, NodeSummary> = ids
        .into_iter()
        .map(|id| {
            let info = state.nodes.get(&id);
            let node = NodeSummary {
                id,
                address: info
                    .map(|n| n.address.clone())
                    .or_else(|| ctx.members.get(&id).cloned())
                    .unwrap_or_default(),
                state: match info.map(|n| n.status) {
                    Some(NodeStatus::Up) => "up",
                    Some(NodeStatus::Down) => "down",
                    Some(NodeStatus::Draining) => "draining",
                    None => "unregistered",
                }
                .to_string(),
                leader: ctx.leader == Some(id),
                labels: info.map(|n| n.labels.clone()).unwrap_or_default(),
                instances: 0,
                states: BTreeMap::new(),
                services: BTreeMap::new(),
            };
            (id, node)
        })
        .collect();
    let mut attention = Vec::new();
    let mut attention_omitted = 0;
    let mut instances = 0;
    for (service, slots) in &state.placements {
        for (slot, p) in slots {
            instances += 1;
            if let Some(n) = nodes.get_mut(&p.node) {
                n.instances += 1;
                *n.states.entry(p.state.clone()).or_default() += 1;
                *n.services
                    .entry(service.clone())
                    .or_default()
                    .entry(p.state.clone())
                    .or_default() += 1;
            }
            if needs_attention(p) {
                if attention.len() < MAX_ATTENTION {
                    attention.push(brief(state, service, *slot, p));
                } else {
                    attention_omitted += 1;
                }
            }
        }
    }
    let mut names: std::collections::BTreeSet<&str> =
        state.specs.keys().map(String::as_str).collect();
    names.extend(state.placements.keys().map(String::as_str));
    ClusterSummary {
        answered_by: ctx.answered_by,
        leader: ctx.leader,
        term: ctx.term,
        instances,
        nodes: nodes.into_values().collect(),
        services: {
            // A plan, only when some service is short.
            let reasons = state.unplaced_reasons();
            names
                .into_iter()
                .map(|n| health(state, n, &reasons))
                .collect()
        },
        attention,
        attention_omitted,
        last_event: state.events.back().map_or(0, |e| e.seq),
    }
}

/// Service `name` in detail, at most `per_node` instances on each node and
/// [`MAX_DETAIL_INSTANCES`] in all; `None` when the
/// cluster has no such service.
pub fn service_detail(state: &ClusterState, name: &str, per_node: usize) -> Option<ServiceDetail> {
    if !state.specs.contains_key(name) && !state.placements.contains_key(name) {
        return None;
    }
    let mut by_node: BTreeMap<u64, Vec<InstanceBrief>> = BTreeMap::new();
    let mut omitted = 0;
    let mut listed = 0;
    for (slot, p) in state.placements.get(name).into_iter().flatten() {
        let list = by_node.entry(p.node).or_default();
        if list.len() < per_node && listed < MAX_DETAIL_INSTANCES {
            listed += 1;
            list.push(brief(state, name, *slot, p));
        } else {
            omitted += 1;
        }
    }
    Some(ServiceDetail {
        service: health(state, name, &state.unplaced_reasons()),
        instances: by_node.into_values().flatten().collect(),
        omitted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::{Event, NodeInfo};

    fn placement(node: u64, state: &str) -> Placement {
        serde_json::from_value(serde_json::json!({"node": node, "state": state})).unwrap()
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            let mut info: NodeInfo = serde_json::from_value(serde_json::json!({
                "id": id, "address": format!("127.0.0.1:{id}"), "status": "up"
            }))
            .unwrap();
            if id == 3 {
                info.status = NodeStatus::Down;
            }
            s.nodes.insert(id, info);
        }
        for (name, replicas, deps) in [("db", 1, vec![]), ("web", 4, vec!["db".to_string()])] {
            let spec = serde_json::from_value(serde_json::json!({
                "name": name, "kind": "ticker", "replicas": replicas, "depends_on": deps
            }))
            .unwrap();
            s.specs.insert(name.to_string(), spec);
        }
        s
    }

    #[test]
    fn a_summary_counts_by_node_and_service_and_lists_only_what_needs_attention() {
        let mut s = cluster();
        s.placements
            .entry("db".into())
            .or_default()
            .insert(0, placement(1, "running"));
        let web = s.placements.entry("web".into()).or_default();
        web.insert(0, placement(1, "running"));
        let mut crashed = placement(2, "crashed");
        crashed.restart_count = 4;
        crashed.last_crash = Some("x".repeat(500));
        web.insert(1, crashed);
        web.insert(2, placement(3, "pending"));
        let ctx = GraphContext {
            answered_by: 1,
            leader: Some(1),
            ..GraphContext::default()
        };
        let sum = summarize(&s, &ctx);
        assert_eq!(sum.instances, 4);
        assert_eq!(sum.nodes.len(), 3);
        assert_eq!(sum.nodes[0].services["web"]["running"], 1);
        assert_eq!(sum.nodes[1].states["crashed"], 1);
        assert_eq!(sum.nodes[2].state, "down");
        let web = sum.services.iter().find(|h| h.name == "web").unwrap();
        assert_eq!((web.replicas, web.placed, web.running), (4, 3, 1));
        assert_eq!((web.crash_looping, web.restarts, web.unplaced), (1, 4, 1));
        assert!(web
            .waiting_for
            .as_deref()
            .unwrap()
            .contains("1 instance on no node"));
        assert_eq!(sum.attention.len(), 2, "{:#?}", sum.attention);
        let crashed = &sum.attention[0];
        assert_eq!(crashed.last_crash.as_deref().map(str::len), Some(500));
        assert!(crashed.waiting_for.as_deref().unwrap().contains("restart"));
        assert!(sum.attention[1]
            .waiting_for
            .as_deref()
            .unwrap()
            .contains("node 3, which is down"));
    }

    #[test]
    fn what_an_instance_waits_for_comes_from_the_state() {
        let mut s = cluster();
        let pending = placement(1, "pending");
        let wait = |s: &ClusterState, p: &Placement| {
            waiting_for(
                s,
                Waiting::Placed {
                    service: "web",
                    placement: p,
                },
            )
            .unwrap_or_default()
        };
        assert!(wait(&s, &pending).contains("dependencies to run: db"));
        s.placements
            .entry("db".into())
            .or_default()
            .insert(0, placement(2, "running"));
        assert!(wait(&s, &pending).contains("node 1 to start it"));
        let mut moving = placement(2, "starting");
        moving.moving_from = Some(1);
        assert!(wait(&s, &moving).contains("move from node 1 to node 2"));
        assert_eq!(wait(&s, &placement(1, "running")), "");
        let mut unhealthy = placement(1, "running");
        unhealthy.healthy = Some(false);
        assert!(wait(&s, &unhealthy).contains("health check"));

        // Unplaced: the latest `unplaced` event of the service says why.
        let unplaced = |s: &ClusterState| {
            waiting_for(
                s,
                Waiting::Unplaced {
                    service: "web",
                    count: 2,
                    reason: None,
                },
            )
            .unwrap()
        };
        assert!(unplaced(&s).contains("no reason recorded"));
        for (seq, service, message) in [
            (1, "web", "web: 2 of 4 instances could not be placed: old"),
            (
                2,
                "web",
                "web: 2 of 4 instances could not be placed: no node with zone=mars",
            ),
            (3, "db", "db: elsewhere"),
        ] {
            s.events.push_back(Event {
                seq,
                time_ms: 0,
                kind: "unplaced".into(),
                message: message.into(),
                service: Some(service.into()),
                node: None,
                by: None,
            });
        }
        assert_eq!(
            unplaced(&s),
            "2 instances on no node: web: 2 of 4 instances could not be placed: no node with zone=mars"
        );
        // What the scheduler says now wins over an older event.
        let now = waiting_for(
            &s,
            Waiting::Unplaced {
                service: "web",
                count: 2,
                reason: Some("no node has label gpu"),
            },
        );
        assert_eq!(
            now.as_deref(),
            Some("2 instances on no node: no node has label gpu")
        );
    }

    #[test]
    fn service_detail_keeps_at_most_per_node_instances_on_each_node() {
        let mut s = cluster();
        let web = s.placements.entry("web".into()).or_default();
        for slot in 0..10 {
            web.insert(slot, placement(1 + u64::from(slot % 2), "running"));
        }
        let d = service_detail(&s, "web", 3).unwrap();
        assert_eq!(d.instances.len(), 6);
        assert_eq!(d.omitted, 4);
        assert!(d.instances[..3].iter().all(|i| i.node == 1));
        assert!(service_detail(&s, "nope", 3).is_none());
        let web = s.placements.entry("web".into()).or_default();
        for slot in 0..(MAX_DETAIL_INSTANCES as u32 + 10) {
            web.insert(slot, placement(1, "running"));
        }
        let d = service_detail(&s, "web", usize::MAX).unwrap();
        assert_eq!((d.instances.len(), d.omitted), (MAX_DETAIL_INSTANCES, 10));
    }
}
