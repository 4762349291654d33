//! The control API server: `modectl` and other nodes call it; it answers in domain terms
//! through [`ClusterNode`].

use std::sync::Arc;

use mode_proto::v1 as pb;
use mode_proto::v1::control_server::{Control, ControlServer};
use mode_proto::v1::raft_server::RaftServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::cluster::state::Command;
use crate::cluster::{status_to_proto, to_status, ClusterNode, FORWARDED};

/// The control API of one node.
pub struct ControlService {
    node: Arc<ClusterNode>,
}

impl ControlService {
    /// Serve `node`.
    pub fn new(node: Arc<ClusterNode>) -> Self {
        ControlService { node }
    }
}

fn may_forward<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED).is_none()
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        let forward = may_forward(&request);
        let status = self.node.status(request.into_inner().local, forward).await;
        Ok(Response::new(status_to_proto(&status)))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let forward = may_forward(&request);
        let command: Command = serde_json::from_str(&request.get_ref().command_json)
            .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
        let out = self
            .node
            .write(command, forward)
            .await
            .map_err(|e| to_status(&e))?;
        let response_json =
            serde_json::to_string(&out.result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::WriteReply {
            response_json,
            log_index: out.log_index,
            leader: out.leader,
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadReply>, Status> {
        let forward = may_forward(&request);
        let r = request.into_inner();
        let (value, applied) = self
            .node
            .read(&r.query, r.stale, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ReadReply {
            result_json: value.to_string(),
            applied_index: applied,
            answered_by: self.node.id(),
        }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let forward = may_forward(&request);
        let r = request.into_inner();
        let (voter, message) = self
            .node
            .join_member(r.id, &r.address, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::JoinReply { voter, message }))
    }

    async fn remove_node(
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

    async fn compact(
        &self,
        _request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactReply>, Status> {
        let (snapshot_index, purged_index) =
            self.node.compact().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::CompactReply {
            snapshot_index,
            purged_index,
        }))
    }
}

/// Serve the Raft transport and the control API for `node` on `listener` until `shutdown`.
pub async fn serve(
    node: Arc<ClusterNode>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(RaftServer::new(node.raft_service()).max_decoding_message_size(64 << 20))
        .add_service(ControlServer::new(ControlService::new(node)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
