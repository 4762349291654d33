//! Building the combined beacon graph: this node's own report, and the fan-out to every member
//! that the gRPC `Graph` call and the HTTP `/api/graph` share.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mode_proto::v1 as pb;
use mode_proto::v1::control_client::ControlClient;

use crate::cluster::ClusterNode;
use crate::graph::{skeleton, ClusterGraph, GraphFilter, LocalInstance, NodeReport, TreeForm};
use crate::service::{BeaconNode, NodeKind, ServiceHandle};

/// How long the fan-out waits for a node unless told otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

/// The largest graph or node report accepted (10k instances take a few MB).
pub const MAX_GRAPH_BYTES: usize = 256 << 20;

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
        let mut instances = Vec::new();
        if let Some(sup) = &self.instances {
            for child in sup.dependencies().iter() {
                let Some((service, _)) = child.label().rsplit_once('#') else {
                    continue;
                };
                if !filter.wants_service(service) {
                    continue;
                }
                if let Some(i) = LocalInstance::from_beacon(child.beacon()) {
                    instances.push(i);
                }
            }
        }
        let daemon = filter.daemon.then(|| self.daemon_tree());
        NodeReport {
            node: self.node.id(),
            instances,
            daemon,
        }
    }

    fn daemon_tree(&self) -> BeaconNode {
        let children = self
            .daemon
            .get()
            .map(|services| {
                services
                    .iter()
                    .map(|s| {
                        if self.instances.as_ref().is_some_and(|i| i.same(s)) {
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
            label: format!("mode-node {}", self.node.id()),
            state: "running".to_string(),
            restart_count: 0,
            crash_reason: None,
            last_crash_reason: None,
            uptime_s: None,
            detail: None,
            children,
        }
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
        &self,
        filter: &GraphFilter,
        deadline: Duration,
    ) -> ClusterGraph<T> {
        let ctx = self.node.graph_context();
        let mut targets: BTreeMap<u64, String> = ctx.members.clone();
        self.node.local_state(|s| {
            for n in s.nodes.values() {
                targets.insert(n.id, n.address.clone());
            }
        });
        if let Some(only) = filter.node {
            targets.retain(|id, _| *id == only);
        }
        let me = self.node.id();
        let mut calls = tokio::task::JoinSet::new();
        for (id, address) in targets {
            if id == me {
                continue;
            }
            let peers = self.node.peers().clone();
            let request = pb::NodeBeaconRequest {
                service: filter.service.clone().unwrap_or_default(),
                daemon: filter.daemon,
            };
            calls.spawn(async move {
                let answer =
                    tokio::time::timeout(deadline, ask_node(&peers, &address, request, deadline))
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!(
                                "no answer from {address} within {} ms",
                                deadline.as_millis()
                            ))
                        });
                (id, answer)
            });
        }
        let mut reports = BTreeMap::new();
        if filter.node.is_none_or(|n| n == me) {
            reports.insert(me, Ok(self.local_report(filter).into_form()));
        }
        while let Some(joined) = calls.join_next().await {
            if let Ok((id, answer)) = joined {
                reports.insert(id, answer);
            }
        }
        // The replica's state is held only while the skeleton is built; the trees are moved
        // in afterwards.
        let mut graph = self.node.local_state(|state| skeleton(state, &ctx, filter));
        graph.attach(reports, filter);
        graph
    }
}

async fn ask_node<T: TreeForm>(
    peers: &crate::cluster::Peers,
    address: &str,
    request: pb::NodeBeaconRequest,
    deadline: Duration,
) -> Result<NodeReport<T>, String> {
    let channel = peers.channel(address)?;
    let mut client = ControlClient::new(channel).max_decoding_message_size(MAX_GRAPH_BYTES);
    let mut req = tonic::Request::new(request);
    req.set_timeout(deadline);
    let reply = client
        .node_beacon(req)
        .await
        .map_err(|s| crate::cluster::describe_status(address, &s))?
        .into_inner();
    serde_json::from_slice(&reply.report_json)
        .map_err(|e| format!("{address} sent an undecodable beacon: {e}"))
}
