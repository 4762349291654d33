//! The combined beacon graph of a cluster: cluster → nodes → instances → their service trees,
//! plus the dependency edges between services (which cross machines).
//!
//! Each node reports its local beacon ([`NodeReport`]); the node asked for the graph fans out
//! to every member and [`merge`]s the reports with its replica of the cluster state. A node that
//! did not answer appears as `unreachable` with the error, its instances as the control plane
//! last recorded them. Renderings: [`ClusterGraph::render_tree`], [`ClusterGraph::to_dot`],
//! [`svg::render`], JSON (serde). For big clusters, [`summary`] sums the state up without
//! asking any node.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::state::{ClusterState, NodeStatus};
use crate::service::BeaconNode;

mod render;
pub mod summary;
pub mod svg;

pub use render::Palette;

/// What one node reports of itself: the beacon subtree of every instance it runs, and the tree
/// of the daemon's own services (Raft, servers, agent) without the instances.
///
/// `T` is how instance trees are held: parsed ([`BeaconNode`]) to draw them, or as raw JSON
/// ([`RawTree`]) by the node that merges a graph only to send it on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct NodeReport<T = BeaconNode> {
    /// The reporting node.
    pub node: u64,
    /// Instances running (or stopping) here.
    pub instances: Vec<LocalInstance<T>>,
    /// The daemon's services, instances left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<BeaconNode>,
}

/// One instance as its node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct LocalInstance<T = BeaconNode> {
    /// Its service.
    pub service: String,
    /// Its slot.
    pub slot: u32,
    /// Its state: its supervisor's, unless the service inside is in another state (crashed
    /// and waiting for a restart, starting).
    pub state: String,
    /// Restarts of the service inside.
    #[serde(default)]
    pub restart_count: u32,
    /// Its current or last crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crash: Option<String>,
    /// Its service tree: the instance's supervisor, the kind's service, tasks and timers.
    pub tree: T,
}

impl LocalInstance {
    /// Parse an instance supervisor's beacon (labelled `service#slot`).
    pub fn from_beacon(tree: BeaconNode) -> Option<LocalInstance> {
        let (service, slot) = tree.label.rsplit_once('#')?;
        let slot = slot.parse().ok()?;
        let inner = inner_service(&tree);
        Some(LocalInstance {
            service: service.to_string(),
            slot,
            state: match inner {
                Some(inner) if tree.state == "running" => inner.state.clone(),
                _ => tree.state.clone(),
            },
            restart_count: inner.map_or(tree.restart_count, |c| c.restart_count),
            last_crash: inner
                .and_then(|c| c.crash_reason.clone().or(c.last_crash_reason.clone()))
                .or(tree.crash_reason.clone()),
            tree,
        })
    }
}

/// An instance tree kept as the JSON its node sent (merged and sent on without parsing).
pub type RawTree = Box<serde_json::value::RawValue>;

/// How a merging node holds instance trees.
pub trait TreeForm: serde::de::DeserializeOwned + Serialize + Send + 'static {
    /// From this node's own beacon.
    fn from_tree(tree: BeaconNode) -> Self;
}

impl TreeForm for BeaconNode {
    fn from_tree(tree: BeaconNode) -> Self {
        tree
    }
}

impl TreeForm for RawTree {
    fn from_tree(tree: BeaconNode) -> Self {
        serde_json::value::to_raw_value(&tree).unwrap_or_else(|_| {
            serde_json::value::RawValue::from_string("null".to_string()).expect("valid JSON")
        })
    }
}

impl NodeReport {
    /// The same report with its trees in another form.
    pub fn into_form<T: TreeForm>(self) -> NodeReport<T> {
        NodeReport {
            node: self.node,
            instances: self
                .instances
                .into_iter()
                .map(|i| LocalInstance {
                    service: i.service,
                    slot: i.slot,
                    state: i.state,
                    restart_count: i.restart_count,
                    last_crash: i.last_crash,
                    tree: T::from_tree(i.tree),
                })
                .collect(),
            daemon: self.daemon,
        }
    }
}

/// The merged graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct ClusterGraph<T = BeaconNode> {
    /// The node that built it (its replica of the cluster state was used).
    pub answered_by: u64,
    /// The leader as that node knows it.
    #[serde(default)]
    pub leader: Option<u64>,
    /// The Raft term.
    #[serde(default)]
    pub term: u64,
    /// The replica's applied log index.
    #[serde(default)]
    pub applied_index: u64,
    /// When it was built (UTC).
    #[serde(default)]
    pub generated_at: String,
    /// Filters applied (`service=...`, `node=...`), for people reading the output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// Every member, by id.
    pub nodes: Vec<NodeGraph<T>>,
    /// Service-level summary: desired and running instances, dependencies.
    #[serde(default)]
    pub services: Vec<ServiceSummary>,
    /// Dependency edges between the nodes running dependent services (at most
    /// [`MAX_EDGES`]).
    #[serde(default)]
    pub edges: Vec<DependencyEdge>,
    /// Edges left out beyond [`MAX_EDGES`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub edges_omitted: usize,
}

/// The most dependency edges a graph lists: two services on 1,000 nodes each would otherwise
/// make a million.
pub const MAX_EDGES: usize = 2_000;

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct NodeGraph<T = BeaconNode> {
    /// Its id.
    pub id: u64,
    /// Its gRPC address.
    pub address: String,
    /// `up`, `down` or `draining` as the control plane records it; `unreachable` when it did
    /// not answer for this graph.
    pub state: String,
    /// Whether it answered for this graph.
    pub reachable: bool,
    /// Why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether it leads the cluster.
    #[serde(default)]
    pub leader: bool,
    /// Its placement labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Instances assigned to it or still running on it.
    pub instances: Vec<InstanceGraph<T>>,
    /// The daemon's own services (with `--daemon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<BeaconNode>,
}

/// One instance of a service on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct InstanceGraph<T = BeaconNode> {
    /// Its service.
    pub service: String,
    /// Its slot.
    pub slot: u32,
    /// What it is doing: its node's own view when the node answered, else the control
    /// plane's last record.
    pub state: String,
    /// What the control plane last recorded (`None`: not placed here, e.g. still stopping
    /// after a move).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// Restarts on this node.
    #[serde(default)]
    pub restart_count: u32,
    /// The last crash reason known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_crash: Option<String>,
    /// Its service tree, from its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<T>,
}

impl<T> InstanceGraph<T> {
    /// `service#slot`.
    pub fn name(&self) -> String {
        format!("{}#{}", self.service, self.slot)
    }

    /// Write `web#0 running, restarts=2 (recorded pending)` into `out`: its name, state,
    /// restarts and where the control plane's record differs.
    pub fn write_headline(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(out, "{}#{} {}", self.service, self.slot, self.state);
        if self.restart_count > 0 {
            let _ = write!(out, ", restarts={}", self.restart_count);
        }
        match &self.placement {
            Some(p) if p != &self.state => {
                let _ = write!(out, " (recorded {p})");
            }
            Some(_) => {}
            None => out.push_str(" (not placed here)"),
        }
    }
}

/// A service across the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Instances wanted.
    pub replicas: u32,
    /// Instances running.
    pub running: u32,
    /// Services it depends on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Being removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// `from_service` on `from_node` depends on `to_service` on `to_node`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DependencyEdge {
    /// The dependent service.
    pub from_service: String,
    /// A node running it.
    pub from_node: u64,
    /// The service it depends on.
    pub to_service: String,
    /// A node running that.
    pub to_node: u64,
    /// Whether the edge crosses machines.
    pub cross_node: bool,
}

/// What the graph is narrowed to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphFilter {
    /// Only this service's instances (and the edges touching it).
    pub service: Option<String>,
    /// Only this node.
    pub node: Option<u64>,
    /// Include each node's daemon services.
    pub daemon: bool,
}

impl GraphFilter {
    /// From a request's fields: `""` for every service, node `0` for every node.
    pub fn from_request(service: String, node: u64, daemon: bool) -> GraphFilter {
        GraphFilter {
            service: (!service.is_empty()).then_some(service),
            node: (node != 0).then_some(node),
            daemon,
        }
    }

    fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = &self.service {
            out.push(format!("service={s}"));
        }
        if let Some(n) = self.node {
            out.push(format!("node={n}"));
        }
        out
    }

    /// Whether an instance of `service` passes the filter.
    pub fn wants_service(&self, service: &str) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
    }
}

/// The cluster facts a graph is merged with, read from one replica.
#[derive(Debug, Clone, Default)]
pub struct GraphContext {
    /// The node building the graph.
    pub answered_by: u64,
    /// The leader it knows.
    pub leader: Option<u64>,
    /// The Raft term.
    pub term: u64,
    /// Its applied index.
    pub applied_index: u64,
    /// Members of the Raft cluster not (yet) registered by their agent: id → address.
    pub members: BTreeMap<u64, String>,
}

/// Merge the node reports (`Err`: why a node could not be asked) with the cluster state.
pub fn merge<T>(
    state: &ClusterState,
    ctx: &GraphContext,
    reports: BTreeMap<u64, Result<NodeReport<T>, String>>,
    filter: &GraphFilter,
) -> ClusterGraph<T> {
    let mut graph = skeleton(state, ctx, filter);
    graph.attach(reports, filter);
    graph
}

/// The graph as the cluster state records it: every node (not yet asked: unreachable) and
/// the instances placed on it, without their trees. Cheap: built while holding the state.
pub fn skeleton<T>(
    state: &ClusterState,
    ctx: &GraphContext,
    filter: &GraphFilter,
) -> ClusterGraph<T> {
    let mut ids: BTreeSet<u64> = state.nodes.keys().copied().collect();
    ids.extend(ctx.members.keys().copied());
    if let Some(only) = filter.node {
        ids.retain(|id| *id == only);
    }
    let mut nodes: BTreeMap<u64, NodeGraph<T>> = ids
        .into_iter()
        .map(|id| {
            let info = state.nodes.get(&id);
            let recorded = match info.map(|n| n.status) {
                Some(NodeStatus::Up) => "up",
                Some(NodeStatus::Down) => "down",
                Some(NodeStatus::Draining) => "draining",
                None => "unregistered",
            };
            let node = NodeGraph {
                id,
                address: info
                    .map(|n| n.address.clone())
                    .or_else(|| ctx.members.get(&id).cloned())
                    .unwrap_or_default(),
                state: recorded.to_string(),
                reachable: false,
                error: Some(match info.map(|n| n.status) {
                    Some(NodeStatus::Down) => "down (missed its heartbeats): not asked".to_string(),
                    _ => "not asked".to_string(),
                }),
                leader: ctx.leader == Some(id),
                labels: info.map(|n| n.labels.clone()).unwrap_or_default(),
                instances: Vec::new(),
                daemon: None,
            };
            (id, node)
        })
        .collect();
    for (service, slots) in &state.placements {
        if !filter.wants_service(service) {
            continue;
        }
        for (slot, p) in slots {
            if let Some(n) = nodes.get_mut(&p.node) {
                n.instances.push(InstanceGraph {
                    service: service.clone(),
                    slot: *slot,
                    state: p.state.clone(),
                    placement: Some(p.state.clone()),
                    restart_count: p.restart_count,
                    last_crash: p.last_crash.clone(),
                    tree: None,
                });
            }
        }
    }
    let services = state
        .specs
        .values()
        .filter(|s| filter.wants_service(&s.name))
        .map(|s| ServiceSummary {
            name: s.name.clone(),
            kind: s.kind.clone(),
            replicas: s.instances(),
            running: state.placements.get(&s.name).map_or(0, |slots| {
                slots.values().filter(|p| p.state == "running").count() as u32
            }),
            depends_on: s.depends_on.clone(),
            deleting: state.deleting.contains(&s.name),
        })
        .collect();
    let (edges, edges_omitted) = edges(state, filter);
    ClusterGraph {
        answered_by: ctx.answered_by,
        leader: ctx.leader,
        term: ctx.term,
        applied_index: ctx.applied_index,
        generated_at: format!("{}Z", crate::service::format_utc_ms(now_ms())),
        filters: filter.describe(),
        edges,
        edges_omitted,
        nodes: nodes.into_values().collect(),
        services,
    }
}

impl<T> ClusterGraph<T> {
    /// Put each node's answer into the graph: the trees of its instances (moved, not copied),
    /// or why it could not be asked.
    pub fn attach(
        &mut self,
        mut reports: BTreeMap<u64, Result<NodeReport<T>, String>>,
        filter: &GraphFilter,
    ) {
        for node in &mut self.nodes {
            let report = match reports.remove(&node.id) {
                None => continue,
                Some(Err(e)) => {
                    node.error = Some(e);
                    node.state = "unreachable".to_string();
                    continue;
                }
                Some(Ok(r)) => r,
            };
            node.reachable = true;
            node.error = None;
            if filter.daemon {
                node.daemon = report.daemon;
            }
            // Placements come sorted by (service, slot); so do the lookups.
            node.instances
                .sort_unstable_by(|a, b| (&a.service, a.slot).cmp(&(&b.service, b.slot)));
            let placed = node.instances.len();
            for local in report.instances {
                if !filter.wants_service(&local.service) {
                    continue;
                }
                let found = node.instances[..placed].binary_search_by(|i| {
                    (i.service.as_str(), i.slot).cmp(&(local.service.as_str(), local.slot))
                });
                match found {
                    Ok(k) => node.instances[k].observe(local),
                    // Running here without a placement here: moved away and still stopping,
                    // or removed.
                    Err(_) => node.instances.push(InstanceGraph {
                        service: local.service,
                        slot: local.slot,
                        state: local.state,
                        placement: None,
                        restart_count: local.restart_count,
                        last_crash: local.last_crash,
                        tree: Some(local.tree),
                    }),
                }
            }
            for i in &mut node.instances[..placed] {
                // The node answered and does not run it (yet).
                if i.tree.is_none() && i.state == "running" {
                    i.state = "missing".to_string();
                }
            }
            node.instances
                .sort_unstable_by(|a, b| (&a.service, a.slot).cmp(&(&b.service, b.slot)));
        }
    }
}

impl<T> InstanceGraph<T> {
    /// Take what the instance's node sees: its tree, state, restarts and last crash.
    fn observe(&mut self, local: LocalInstance<T>) {
        self.state = local.state;
        self.restart_count = local.restart_count;
        if local.last_crash.is_some() {
            self.last_crash = local.last_crash;
        }
        self.tree = Some(local.tree);
    }
}

/// The kind's service inside an instance's supervisor (its first child that is not a task).
pub fn inner_service(tree: &BeaconNode) -> Option<&BeaconNode> {
    tree.children.iter().find(|c| !c.kind.is_task())
}

fn edges(state: &ClusterState, filter: &GraphFilter) -> (Vec<DependencyEdge>, usize) {
    let nodes_of = |service: &str| -> BTreeSet<u64> {
        state
            .placements
            .get(service)
            .map(|slots| slots.values().map(|p| p.node).collect())
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for spec in state.specs.values() {
        for dep in &spec.depends_on {
            if !filter.wants_service(&spec.name) && !filter.wants_service(dep) {
                continue;
            }
            let targets = nodes_of(dep);
            for from in nodes_of(&spec.name) {
                for to in &targets {
                    if filter.node.is_some_and(|n| n != from && n != *to) {
                        continue;
                    }
                    out.insert(DependencyEdge {
                        from_service: spec.name.clone(),
                        from_node: from,
                        to_service: dep.clone(),
                        to_node: *to,
                        cross_node: from != *to,
                    });
                }
            }
        }
    }
    let total = out.len();
    (
        out.into_iter().take(MAX_EDGES).collect(),
        total.saturating_sub(MAX_EDGES),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<T> ClusterGraph<T> {
    /// Instances in the graph.
    pub fn instance_count(&self) -> usize {
        self.nodes.iter().map(|n| n.instances.len()).sum()
    }
}

impl ClusterGraph {
    /// The graph with everything that changes on its own (uptimes, timer statistics, the
    /// time it was built) removed: two graphs with the same signature show the same cluster.
    pub fn signature(&self) -> String {
        let mut g = self.clone();
        g.generated_at.clear();
        // Any write moves it, also those that change nothing shown.
        g.applied_index = 0;
        for n in &mut g.nodes {
            for i in &mut n.instances {
                if let Some(t) = &mut i.tree {
                    strip_volatile(t);
                }
            }
            if let Some(d) = &mut n.daemon {
                strip_volatile(d);
            }
        }
        serde_json::to_string(&g).unwrap_or_default()
    }
}

fn strip_volatile(b: &mut BeaconNode) {
    b.uptime_s = None;
    b.detail = None;
    for c in &mut b.children {
        strip_volatile(c);
    }
}

#[cfg(test)]
mod tests;
