//! The peer API server: Raft between servers, forwarding to the leader, the agents'
//! operations and the per-node beacon. Served on its own listener (`--peer-listen`).

use std::sync::Arc;

use mode_proto::v1 as pb;
use mode_proto::v1::peer_server::{Peer, PeerServer};
use tonic::{Request, Response, Status};

use super::inspect::Inspector;
use crate::graph::GraphFilter;
use crate::model::limits;
use crate::model::state::Command;
use crate::replication::{
    status_to_proto, to_status, ClusterNode, RaftService, FORWARDED, REQUEST_ID,
};

/// The peer API of one node.
pub struct PeerService {
    node: Arc<ClusterNode>,
    raft: RaftService,
    inspector: Arc<Inspector>,
}

impl PeerService {
    /// Serve the node `inspector` looks at.
    pub fn new(inspector: Arc<Inspector>) -> Self {
        let node = inspector.node().clone();
        PeerService {
            raft: node.raft_service(),
            node,
            inspector,
        }
    }

    /// As a tonic service, with the peer API's message limits.
    pub fn into_server(self) -> PeerServer<PeerService> {
        PeerServer::new(self)
            .max_decoding_message_size(limits::MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(limits::MAX_ANSWER_BYTES.max(super::MAX_GRAPH_BYTES))
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
        self.raft.vote(request).await
    }

    async fn append_entries(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft.append_entries(request).await
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft.install_snapshot(request).await
    }

    async fn pre_vote(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft.pre_vote(request).await
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        let forward = may_forward(&request);
        let id = request_id(&request)
            .or_else(|| Some(request.get_ref().request_id.clone()).filter(|id| !id.is_empty()));
        let text = &request.get_ref().command_json;
        limits::check_write_bytes(text.len())
            .map_err(|e| Status::invalid_argument(format!("{e}: send less in one write")))?;
        let command: Command = serde_json::from_str(text)
            .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
        let out = self
            .node
            .write_request(command, forward, id)
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
        let forward = may_forward(&request);
        let r = request.into_inner();
        let (value, applied) = self
            .node
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
            answered_by: self.node.id(),
        }))
    }

    async fn member_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        let forward = may_forward(&request);
        let status = self.node.status(request.into_inner().local, forward).await;
        Ok(Response::new(status_to_proto(&status)))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let forward = may_forward(&request);
        let r = request.into_inner();
        let (voter, message) = self
            .node
            .join_member(r.id, &r.address, r.incarnation, r.rejoin, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::JoinReply { voter, message }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        let forward = may_forward(&request);
        let message = self
            .node
            .remove_member(request.into_inner().id, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::RemoveNodeReply { message }))
    }

    async fn register(
        &self,
        _request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        Err(Status::unimplemented(
            "Register: agent-only nodes are not built yet",
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let forward = may_forward(&request);
        let grant = self
            .node
            .heartbeat(request.into_inner().node, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::HeartbeatReply {
            leader: grant.leader,
            lease_ms: grant.lease.as_millis() as u64,
            lease_index: grant.index,
        }))
    }

    async fn report_instances(
        &self,
        _request: Request<pb::ReportInstancesRequest>,
    ) -> Result<Response<pb::ReportInstancesReply>, Status> {
        Err(Status::unimplemented(
            "ReportInstances: agent-only nodes are not built yet",
        ))
    }

    type WatchPlacementsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::PlacementsUpdate, Status>> + Send>,
    >;

    async fn watch_placements(
        &self,
        _request: Request<pb::WatchPlacementsRequest>,
    ) -> Result<Response<Self::WatchPlacementsStream>, Status> {
        Err(Status::unimplemented(
            "WatchPlacements: agent-only nodes are not built yet",
        ))
    }

    async fn node_beacon(
        &self,
        request: Request<pb::NodeBeaconRequest>,
    ) -> Result<Response<pb::NodeBeaconReply>, Status> {
        let r = request.into_inner();
        let filter = GraphFilter::from_request(r.service, 0, r.daemon);
        // Walking thousands of instance trees is CPU work: off the async threads.
        let inspector = self.inspector.clone();
        let report_json = tokio::task::spawn_blocking(move || {
            serde_json::to_vec(&inspector.local_report(&filter))
        })
        .await
        .map_err(|e| Status::internal(format!("reading this node's beacon failed: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::NodeBeaconReply {
            node: self.node.id(),
            report_json,
        }))
    }
}
