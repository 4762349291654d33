//! Building the combined beacon graph: this node's own report, and the fan-out to every member
//! that the gRPC `Graph` call and the HTTP `/api/graph` share.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mode_proto::v1 as pb;
use mode_proto::v1::peer_client::PeerClient;

use crate::graph::{skeleton, ClusterGraph, GraphFilter, LocalInstance, NodeReport, TreeForm};
use crate::replication::ClusterNode;
use crate::service::{BeaconNode, NodeKind, ServiceHandle};

/// How long the fan-out waits for a node unless told otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

/// The largest graph or node report accepted (10k instances take a few MB).
pub const MAX_GRAPH_BYTES: usize = 256 << 20;

/// The longest a fan-out waits for a node, whatever it is asked.
pub const MAX_DEADLINE: Duration = Duration::from_secs(60);

/// The report of node `id`: each instance's service tree (of the instances running under
/// `instances`), and the daemon's services. (Agent-only nodes, which have no [`Inspector`],
/// answer beacons with it too.)
pub(crate) fn local_report(
    id: u64,
    instances: Option<&ServiceHandle>,
    daemon: Option<&[ServiceHandle]>,
    filter: &GraphFilter,
) -> NodeReport {
    let mut found = Vec::new();
    if let Some(sup) = instances {
        for child in sup.dependencies().iter() {
            let Some((service, _)) = child.label().rsplit_once('#') else {
                continue;
            };
            if !filter.wants_service(service) {
                continue;
            }
            if let Some(i) = LocalInstance::from_beacon(child.beacon()) {
                found.push(i);
            }
        }
    }
    let daemon = filter.daemon.then(|| daemon_tree(id, instances, daemon));
    NodeReport {
        node: id,
        instances: found,
        daemon,
    }
}

fn daemon_tree(
    id: u64,
    instances: Option<&ServiceHandle>,
    daemon: Option<&[ServiceHandle]>,
) -> BeaconNode {
    let children = daemon
        .map(|services| {
            services
                .iter()
                .map(|s| {
                    if instances.is_some_and(|i| i.same(s)) {
                        // Instances are drawn on their own; only count them here.
                        let mut b = s.beacon();
                        b.detail = Some(format!("{} instance(s)", b.children.len()));
                        b.children.clear();
                        b
                    } else {
                        s.beacon()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    BeaconNode {
        kind: NodeKind::Worker,
        label: format!("mode-node {id}"),
        state: "running".to_string(),
        restart_count: 0,
        crash_reason: None,
        last_crash_reason: None,
        uptime_s: None,
        detail: None,
        children,
    }
}

/// Reads this node's beacon and builds the cluster graph.
pub struct Inspector {
    node: Arc<ClusterNode>,
    /// The supervisor every instance runs under.
    instances: Option<ServiceHandle>,
    /// The daemon's services (set once the daemon has built them all).
    daemon: OnceLock<Vec<ServiceHandle>>,
}

impl Inspector {
    /// Inspect `node`, whose instances run under `instances` (if it runs any).
    pub fn new(node: Arc<ClusterNode>, instances: Option<ServiceHandle>) -> Arc<Inspector> {
        Arc::new(Inspector {
            node,
            instances,
            daemon: OnceLock::new(),
        })
    }

    /// The cluster node inspected.
    pub fn node(&self) -> &Arc<ClusterNode> {
        &self.node
    }

    /// Record the daemon's services, shown with `--daemon`.
    pub fn set_daemon_services(&self, services: Vec<ServiceHandle>) {
        let _ = self.daemon.set(services);
    }

    /// This node's report: each instance's service tree, and the daemon's services.
    pub fn local_report(&self, filter: &GraphFilter) -> NodeReport {
        local_report(
            self.node.id(),
            self.instances.as_ref(),
            self.daemon.get().map(Vec::as_slice),
            filter,
        )
    }

    /// Whether the service and node a filter names exist (an error says which does not).
    pub fn check_filter(&self, filter: &GraphFilter) -> Result<(), String> {
        let members = self.node.graph_context().members;
        self.node.local_state(|s| {
            if let Some(name) = &filter.service {
                if !s.specs.contains_key(name) && !s.placements.contains_key(name) {
                    return Err(format!("no service named '{name}' (see `modectl svc ls`)"));
                }
            }
            if let Some(id) = filter.node {
                if !s.nodes.contains_key(&id) && !members.contains_key(&id) {
                    return Err(format!(
                        "no node {id} in the cluster (see `modectl node ls`)"
                    ));
                }
            }
            Ok(())
        })
    }

    /// Ask every member for its report (in parallel, each within `deadline`) and merge the
    /// answers with this node's replica of the cluster state.
    ///
    /// `T` is how instance trees are held: [`RawTree`](crate::graph::RawTree) to send the graph
    /// on (no parsing), [`BeaconNode`] to draw it.
    pub async fn graph<T: TreeForm>(
        self: &Arc<Self>,
        filter: &GraphFilter,
        deadline: Duration,
    ) -> ClusterGraph<T> {
        let deadline = deadline.min(MAX_DEADLINE);
        let ctx = self.node.graph_context();
        // The skeleton comes from the state as it was before anyone was asked: an instance
        // recorded running that its node then does not report is really missing.
        let mut graph = self
            .node
            .local_state(|state| skeleton::<T>(state, &ctx, filter));
        let me = self.node.id();
        let mut calls = tokio::task::JoinSet::new();
        for node in &graph.nodes {
            // A node that missed its heartbeats would cost the whole deadline every time.
            if node.id == me || node.state == "down" || node.address.is_empty() {
                continue;
            }
            let (id, address) = (node.id, node.address.clone());
            let peers = self.node.peers().clone();
            let request = pb::NodeBeaconRequest {
                service: filter.service.clone().unwrap_or_default(),
                daemon: filter.daemon,
            };
            // The calls belong to the caller's trace, if it has one.
            let span = tracing::Span::current();
            let call = async move {
                let answer = tokio::time::timeout(deadline, ask_node(&peers, id, &address, request, deadline))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no answer from {address} within {} ms (is node {id} overloaded or cut off? a longer --deadline-ms waits more)",
                            deadline.as_millis()
                        ))
                    });
                (id, answer)
            };
            calls.spawn(tracing::Instrument::instrument(call, span));
        }
        let mut reports = BTreeMap::new();
        if filter.node.is_none_or(|n| n == me) {
            // Walking thousands of instance trees is CPU work: off the async threads.
            let (me_, filter_) = (self.clone(), filter.clone());
            let local = tokio::task::spawn_blocking(move || me_.local_report(&filter_).into_form())
                .await
                .map_err(|e| format!("reading this node's beacon failed: {e}"));
            reports.insert(me, local);
        }
        while let Some(joined) = calls.join_next().await {
            if let Ok((id, answer)) = joined {
                reports.insert(id, answer);
            }
        }
        graph.attach(reports, filter);
        graph
    }
}

async fn ask_node<T: TreeForm>(
    peers: &crate::replication::Peers,
    id: u64,
    address: &str,
    request: pb::NodeBeaconRequest,
    deadline: Duration,
) -> Result<NodeReport<T>, String> {
    // Not Raft's connection: megabytes of trees must not queue up behind (or ahead of) its
    // heartbeats.
    let channel = peers.side_channel(address)?;
    let mut client = PeerClient::new(channel).max_decoding_message_size(MAX_GRAPH_BYTES);
    let mut req = tonic::Request::new(request);
    // The node may give up when the caller will; the caller's own timer (with the clearer
    // message) fires first.
    req.set_timeout(deadline + Duration::from_millis(250));
    crate::telemetry::inject(req.metadata_mut());
    let reply = client
        .node_beacon(req)
        .await
        .map_err(|s| crate::replication::describe_status(address, &s))?
        .into_inner();
    report_from_reply(&reply, id, address)
}

/// The report in node `id`'s answer (from `address`) to a beacon request.
pub(crate) fn report_from_reply<T: TreeForm>(
    reply: &pb::NodeBeaconReply,
    id: u64,
    address: &str,
) -> Result<NodeReport<T>, String> {
    if reply.node != id {
        return Err(format!(
            "{address} answered as node {} (is node {id} registered with a stale address?)",
            reply.node
        ));
    }
    serde_json::from_slice(&reply.report_json)
        .map_err(|e| format!("{address} sent an undecodable beacon: {e}"))
}
