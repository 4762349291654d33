//! The peer API server: Raft between servers, forwarding to the leader, the agents'
//! operations and the per-node beacon. Served on its own listener (`--peer-listen`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mode_proto::v1 as pb;
use mode_proto::v1::peer_server::{Peer, PeerServer};
use tonic::{Request, Response, Status};

use super::inspect::Inspector;
use super::logs;
use crate::agent::output::OutputLog;
use crate::agent::KindRegistry;
use crate::graph::GraphFilter;
use crate::model::limits;
use crate::model::state::{Command, NodeRole};
use crate::replication::{
    status_to_proto, to_status, ClusterNode, RaftService, FORWARDED, REQUEST_ID,
};
use crate::security::{Caller, Proof, Role};
use crate::service::ServiceHandle;

/// The peer API of one node: a server's, or an agent-only node's (which answers beacons and
/// instance logs, and refuses everything else).
pub struct PeerService {
    server: Option<(Arc<ClusterNode>, RaftService)>,
    beacon: Beacon,
    /// What this node's instances wrote.
    output: OutputLog,
}

enum Beacon {
    Server(Arc<Inspector>),
    Agent(Arc<AgentBeacon>),
}

/// What an agent-only node's beacon shows: its instances and the daemon's services.
pub struct AgentBeacon {
    id: u64,
    instances: ServiceHandle,
    daemon: OnceLock<Vec<ServiceHandle>>,
}

impl AgentBeacon {
    /// Node `id`'s instances run under `instances`.
    pub fn new(id: u64, instances: ServiceHandle) -> Arc<AgentBeacon> {
        Arc::new(AgentBeacon {
            id,
            instances,
            daemon: OnceLock::new(),
        })
    }

    /// Record the daemon's services, shown with `--daemon`.
    pub fn set_daemon_services(&self, services: Vec<ServiceHandle>) {
        let _ = self.daemon.set(services);
    }
}

impl PeerService {
    /// Serve the server `inspector` looks at, whose instances run with `kinds`.
    pub fn new(inspector: Arc<Inspector>, kinds: &KindRegistry) -> Self {
        let node = inspector.node().clone();
        PeerService {
            server: Some((node.clone(), node.raft_service())),
            beacon: Beacon::Server(inspector),
            output: kinds.output().clone(),
        }
    }

    /// Serve an agent-only node, whose instances run with `kinds`.
    pub fn agent(beacon: Arc<AgentBeacon>, kinds: &KindRegistry) -> Self {
        PeerService {
            server: None,
            beacon: Beacon::Agent(beacon),
            output: kinds.output().clone(),
        }
    }

    /// This node's id.
    fn id(&self) -> u64 {
        match &self.beacon {
            Beacon::Agent(b) => b.id,
            Beacon::Server(i) => i.node().id(),
        }
    }

    fn server(&self) -> Result<&(Arc<ClusterNode>, RaftService), Status> {
        self.server.as_ref().ok_or_else(|| {
            let id = self.id();
            Status::failed_precondition(format!(
                "node {id} is an agent-only node (--role agent): it takes no part in Raft and answers only NodeBeacon and InstanceLogs; send this to a server (one of its --servers)"
            ))
        })
    }

    fn node(&self) -> Result<&Arc<ClusterNode>, Status> {
        Ok(&self.server()?.0)
    }

    fn raft(&self) -> Result<&RaftService, Status> {
        Ok(&self.server()?.1)
    }

    /// Server-to-server calls (forwarding, relays, membership) come from Raft members only.
    fn require_member<T>(&self, req: &Request<T>, what: &str) -> Result<(), Status> {
        match calling_node(req)? {
            Some(id) if !self.node()?.is_raft_member(id) => Err(Status::permission_denied(
                format!("{what} is for the cluster's servers; node {id} is not a Raft member"),
            )),
            _ => Ok(()),
        }
    }

    /// A Raft message: its sender's certificate must name the node the message says it is from.
    fn raft_call(&self, req: &Request<pb::RaftRequest>) -> Result<&RaftService, Status> {
        speaks_for(req, req.get_ref().from, "Raft message")?;
        self.raft()
    }

    /// As a tonic service, with the peer API's message limits.
    pub fn into_server(self) -> PeerServer<PeerService> {
        PeerServer::new(self)
            .max_decoding_message_size(limits::MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(limits::MAX_ANSWER_BYTES.max(super::MAX_GRAPH_BYTES))
    }
}

/// The node a peer call comes from, by its certificate (None with authentication off).
fn calling_node<T>(req: &Request<T>) -> Result<Option<u64>, Status> {
    match Caller::of(req) {
        Caller::Node(id) => Ok(Some(id)),
        Caller::Client {
            proof: Proof::None,
            role: Role::Admin,
            ..
        } => Ok(None),
        other => Err(Status::permission_denied(format!(
            "{other} may not call the peer API: it takes calls from cluster nodes only"
        ))),
    }
}

/// A node speaks only for itself: the caller's certificate must name `node`.
fn speaks_for<T>(req: &Request<T>, node: u64, what: &str) -> Result<(), Status> {
    match calling_node(req)? {
        Some(id) if id != node => Err(Status::permission_denied(format!(
            "node {id}'s certificate cannot send a {what} for node {node}: a node speaks only for itself"
        ))),
        _ => Ok(()),
    }
}

/// Whether the receiving server may forward the request once more (not when it was forwarded
/// to it already).
pub(crate) fn may_forward<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED).is_none()
}

/// The caller's request id (metadata `x-mode-request-id`), if it sent one.
pub(crate) fn request_id<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn vote(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft_call(&request)?.vote(request).await
    }

    async fn append_entries(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft_call(&request)?.append_entries(request).await
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft_call(&request)?.install_snapshot(request).await
    }

    async fn pre_vote(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft_call(&request)?.pre_vote(request).await
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        self.require_member(&request, "Propose")?;
        let forward = may_forward(&request);
        let id = request_id(&request)
            .or_else(|| Some(request.get_ref().request_id.clone()).filter(|id| !id.is_empty()));
        let by = Some(request.get_ref().by.clone()).filter(|b| !b.is_empty());
        let command = command_from_json(&request.get_ref().command_json)?;
        let out = self
            .node()?
            .write_request(command, forward, id, by)
            .await
            .map_err(|e| to_status(&e))?;
        let response_json =
            serde_json::to_string(&out.result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ProposeReply {
            response_json,
            log_index: out.log_index,
            leader: out.leader,
        }))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryReply>, Status> {
        self.require_member(&request, "Query")?;
        let forward = may_forward(&request);
        let r = request.into_inner();
        let (value, applied) = self
            .node()?
            .read(&r.query, r.stale, forward)
            .await
            .map_err(|e| to_status(&e))?;
        // The event log or a large state is megabytes of JSON: off the async threads.
        let result_json = tokio::task::spawn_blocking(move || value.to_string())
            .await
            .map_err(|e| Status::internal(format!("encoding the answer failed: {e}")))?;
        if result_json.len() > limits::MAX_ANSWER_BYTES {
            return Err(Status::resource_exhausted(format!(
                "the answer to '{}' is {} bytes, over the limit of {} bytes: ask for less (nodes, specs, spec:<name>, placements or events)",
                r.query,
                result_json.len(),
                limits::MAX_ANSWER_BYTES
            )));
        }
        Ok(Response::new(pb::QueryReply {
            result_json,
            applied_index: applied,
            answered_by: self.node()?.id(),
        }))
    }

    async fn member_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        self.require_member(&request, "MemberStatus")?;
        let forward = may_forward(&request);
        let status = self
            .node()?
            .status(request.into_inner().local, forward)
            .await;
        Ok(Response::new(status_to_proto(&status)))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let forward = may_forward(&request);
        if forward {
            speaks_for(&request, request.get_ref().id, "join request")?;
        } else {
            self.require_member(&request, "a forwarded Join")?;
        }
        let r = request.into_inner();
        let (voter, message) = self
            .node()?
            .join_member(r.id, &r.address, r.incarnation, r.rejoin, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::JoinReply { voter, message }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        self.require_member(&request, "RemoveMember")?;
        let forward = may_forward(&request);
        let message = self
            .node()?
            .remove_member(request.into_inner().id, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::RemoveNodeReply { message }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        speaks_for(&request, request.get_ref().node, "registration")?;
        let node = self.node()?;
        let command = register_command(request.into_inner())?;
        let out = node.write(command, true).await.map_err(|e| to_status(&e))?;
        if !out.result.ok {
            return Err(Status::failed_precondition(out.result.message));
        }
        Ok(Response::new(pb::RegisterReply {
            leader: out.leader,
            message: out.result.message,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let forward = may_forward(&request);
        if forward {
            speaks_for(&request, request.get_ref().node, "heartbeat")?;
        } else {
            // Relayed by a server for one of its agents.
            self.require_member(&request, "a relayed heartbeat")?;
        }
        let node = self.node()?;
        let budget = deadline(&request).unwrap_or(DEFAULT_HEARTBEAT_BUDGET);
        let r = request.into_inner();
        if r.leaving {
            node.leave(r.node, r.incarnation, forward)
                .await
                .map_err(|e| heartbeat_status(&e))?;
            return Ok(Response::new(pb::HeartbeatReply {
                leader: node.leader().unwrap_or(0),
                lease_ms: 0,
                lease_index: 0,
            }));
        }
        // From the agent: through the leader, translated into the index of the view this
        // server sends it. From another server (relayed): the leader's own answer.
        let grant = if forward {
            node.agent_heartbeat(r.node, r.incarnation, budget).await
        } else {
            node.heartbeat(r.node, r.incarnation, false).await
        }
        .map_err(|e| heartbeat_status(&e))?;
        Ok(Response::new(pb::HeartbeatReply {
            leader: grant.leader,
            lease_ms: grant.lease.as_millis() as u64,
            lease_index: grant.index,
        }))
    }

    async fn relay_heartbeats(
        &self,
        request: Request<pb::RelayHeartbeatsRequest>,
    ) -> Result<Response<pb::RelayHeartbeatsReply>, Status> {
        self.require_member(&request, "RelayHeartbeats")?;
        let node = self.node()?;
        if !node.is_leader() {
            return Err(Status::unavailable(format!(
                "node {} is not the leader: relay heartbeats to the leader",
                node.id()
            )));
        }
        let grant = node.lease_grant();
        let beats: Vec<(u64, u64)> = request
            .into_inner()
            .heartbeats
            .iter()
            .map(|h| (h.node, h.incarnation))
            .collect();
        let refused = node.take_heartbeats(&beats).into_iter().collect();
        Ok(Response::new(pb::RelayHeartbeatsReply {
            grant: Some(pb::HeartbeatReply {
                leader: grant.leader,
                lease_ms: grant.lease.as_millis() as u64,
                lease_index: grant.index,
            }),
            refused,
        }))
    }

    async fn report_instances(
        &self,
        request: Request<pb::ReportInstancesRequest>,
    ) -> Result<Response<pb::ReportInstancesReply>, Status> {
        speaks_for(&request, request.get_ref().node, "report")?;
        let node = self.node()?;
        let r = request.into_inner();
        node.check_incarnation(r.node, r.incarnation)
            .map_err(|e| heartbeat_status(&e))?;
        let command = reports_command(&r)?;
        // One command for the whole batch: one Raft write.
        let out = node.write(command, true).await.map_err(|e| to_status(&e))?;
        if !out.result.ok {
            return Err(Status::failed_precondition(out.result.message));
        }
        let applied = out
            .result
            .message
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Ok(Response::new(pb::ReportInstancesReply { applied }))
    }

    type WatchPlacementsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::PlacementsUpdate, Status>> + Send>,
    >;

    async fn watch_placements(
        &self,
        request: Request<pb::WatchPlacementsRequest>,
    ) -> Result<Response<Self::WatchPlacementsStream>, Status> {
        speaks_for(&request, request.get_ref().node, "placement watch")?;
        let node = self.node()?.clone();
        let r = request.into_inner();
        node.check_incarnation(r.node, r.incarnation)
            .map_err(|e| heartbeat_status(&e))?;
        let (mut views, unchanged) = node.watch_placements(r.node, r.after_index);
        tracing::debug!(
            "node {} watches its placements here (after index {}, unchanged: {unchanged})",
            r.node,
            r.after_index
        );
        let server = node.id();
        // Idle agents cost a parked task each: it wakes only when its view is republished.
        let stream = async_stream_of(move |tx| async move {
            if unchanged {
                views.borrow_and_update();
            } else {
                let first = views.borrow_and_update().clone();
                if tx
                    .send(Ok(crate::agent::view_to_proto(&first, server)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            while views.changed().await.is_ok() {
                let view = views.borrow_and_update().clone();
                if tx
                    .send(Ok(crate::agent::view_to_proto(&view, server)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn node_beacon(
        &self,
        request: Request<pb::NodeBeaconRequest>,
    ) -> Result<Response<pb::NodeBeaconReply>, Status> {
        let r = request.into_inner();
        let filter = GraphFilter::from_request(r.service, 0, r.daemon);
        // Walking thousands of instance trees is CPU work: off the async threads.
        let (id, report) = match &self.beacon {
            Beacon::Server(i) => {
                let i = i.clone();
                (
                    i.node().id(),
                    Box::new(move |f: &GraphFilter| i.local_report(f))
                        as Box<dyn Fn(&GraphFilter) -> crate::graph::NodeReport + Send>,
                )
            }
            Beacon::Agent(b) => {
                let b = b.clone();
                (
                    b.id,
                    Box::new(move |f: &GraphFilter| {
                        super::inspect::local_report(
                            b.id,
                            Some(&b.instances),
                            b.daemon.get().map(Vec::as_slice),
                            f,
                        )
                    })
                        as Box<dyn Fn(&GraphFilter) -> crate::graph::NodeReport + Send>,
                )
            }
        };
        let report_json = tokio::task::spawn_blocking(move || serde_json::to_vec(&report(&filter)))
            .await
            .map_err(|e| Status::internal(format!("reading this node's beacon failed: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::NodeBeaconReply {
            node: id,
            report_json,
        }))
    }

    type InstanceLogsStream = logs::LineStream;

    async fn instance_logs(
        &self,
        request: Request<pb::InstanceLogsRequest>,
    ) -> Result<Response<Self::InstanceLogsStream>, Status> {
        calling_node(&request)?;
        let r = request.into_inner();
        let me = self.id();
        if r.node != me {
            return Err(Status::failed_precondition(format!(
                "this is node {me}, not node {}: is node {} registered with a stale address?",
                r.node, r.node
            )));
        }
        let ask = logs::Ask::new(r.previous, r.follow, r.tail, r.since_ms)?;
        logs::local(&self.output, me, &r.service, &r.slots, ask).map(Response::new)
    }
}

/// The command a `Propose` carries (its `command_json`), within the write limit.
pub(crate) fn command_from_json(text: &str) -> Result<Command, Status> {
    limits::check_write_bytes(text.len())
        .map_err(|e| Status::invalid_argument(format!("{e}: send less in one write")))?;
    serde_json::from_str(text)
        .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))
}

/// The command a `Register` asks for, once its role, id and address are checked.
pub(crate) fn register_command(r: pb::RegisterRequest) -> Result<Command, Status> {
    let role = match r.role.as_str() {
        "" | "server" => NodeRole::Server,
        "agent" => NodeRole::Agent,
        other => {
            return Err(Status::invalid_argument(format!(
                "role '{other}' is neither \"server\" nor \"agent\""
            )))
        }
    };
    if r.node == 0 {
        return Err(Status::invalid_argument("node ids start at 1"));
    }
    crate::replication::check_address("the node's peer address", &r.address)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(Command::RegisterNode {
        id: r.node,
        address: r.address,
        labels: r.labels.into_iter().collect(),
        capacity: r.capacity,
        kinds: r.kinds,
        incarnation: r.incarnation,
        heartbeat_grace_ms: r.heartbeat_grace_ms,
        api_address: r.api_address,
        role,
    })
}

/// The one command a `ReportInstances` batch is committed as, once every report is checked.
pub(crate) fn reports_command(r: &pb::ReportInstancesRequest) -> Result<Command, Status> {
    let reports: Vec<_> = r
        .reports
        .iter()
        .map(crate::agent::report_from_proto)
        .collect();
    for report in &reports {
        report
            .to_command(r.node)
            .map_err(Status::invalid_argument)?;
    }
    Ok(Command::ReportInstances {
        node: r.node,
        incarnation: r.incarnation,
        reports,
    })
}

/// A refusal of the node itself (another incarnation) is FAILED_PRECONDITION, so that agents
/// do not fail over for it; the rest as usual.
/// How long a heartbeat without a deadline may take to answer.
const DEFAULT_HEARTBEAT_BUDGET: Duration = Duration::from_millis(1500);

/// The caller's deadline: its `grpc-timeout` header (digits and a unit, e.g. `2500m`).
fn deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn heartbeat_status(e: &crate::replication::ClusterError) -> Status {
    match e {
        crate::replication::ClusterError::Conflict(m) => Status::failed_precondition(m.clone()),
        e => to_status(e),
    }
}

/// A stream fed by a task through a small channel (ends when the task does or the client
/// goes away).
fn async_stream_of<F, Fut>(
    body: F,
) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::PlacementsUpdate, Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::PlacementsUpdate, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Cancelled streams a peer connection may have waiting to be accepted (see [`serve_peer`]).
const PEER_MAX_PENDING_RESETS: usize = 4096;

/// Serve the peer API on `listener` until `shutdown`. With `tls`, only nodes presenting a
/// certificate signed by the cluster's CA get in (see [`crate::security`]).
pub async fn serve_peer(
    service: PeerService,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<crate::security::tls::NodeTls>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    use crate::security::auth::{AuthLayer, Policy, Surface};
    let policy = Policy::new(Surface::Peer, tls.is_some(), None);
    let incoming = crate::security::tls::incoming(
        listener,
        tls.map(|t| (t, crate::security::tls::ClientCerts::Required)),
    );
    tonic::transport::Server::builder()
        .trace_fn(crate::telemetry::server_span)
        // Peers and agents cancel calls that time out (heartbeats, relayed reports) under
        // load; h2's default of 20 such streams pending per connection closes the connection
        // (and every Raft call on it) exactly when the cluster is busiest.
        .http2_max_pending_accept_reset_streams(Some(PEER_MAX_PENDING_RESETS))
        // Outside the auth layer: refused calls are counted too.
        .layer(super::metrics::GrpcMetricsLayer)
        .layer(AuthLayer::new(policy))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("grpc-timeout", value.parse().expect("ascii"));
        r
    }

    #[test]
    fn a_heartbeat_answers_within_the_callers_deadline() {
        assert_eq!(
            deadline(&with_timeout("2500m")),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(deadline(&with_timeout("3S")), Some(Duration::from_secs(3)));
        assert_eq!(
            deadline(&with_timeout("1500000u")),
            Some(Duration::from_millis(1500))
        );
        // What tonic sends for a request timeout.
        let mut r = Request::new(());
        r.set_timeout(Duration::from_millis(2500));
        assert_eq!(deadline(&r), Some(Duration::from_millis(2500)));
        for bad in ["", "m", "12x", "123456789m", "-5m"] {
            assert_eq!(deadline(&with_timeout(bad)), None, "{bad:?}");
        }
        assert_eq!(deadline(&Request::new(())), None);
    }
}
