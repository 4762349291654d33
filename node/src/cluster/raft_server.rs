//! The gRPC side of the Raft transport: decode, check the protocol version, hand to openraft.

use mode_proto::v1::raft_server::Raft as RaftRpc;
use mode_proto::v1::{RaftReply, RaftRequest};
use mode_proto::PROTOCOL_VERSION;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::types::Raft;

pub(crate) struct RaftService {
    pub(crate) raft: Raft,
}

/// Payloads larger than this are decoded on a blocking thread (megabytes of entries must not
/// hold up the async threads that carry heartbeats).
const BIG_PAYLOAD_BYTES: usize = 64 << 10;

async fn decode_big<T: DeserializeOwned + Send + 'static>(
    req: Request<RaftRequest>,
) -> Result<T, Status> {
    let req = req.into_inner();
    if req.payload.len() <= BIG_PAYLOAD_BYTES {
        return decode(&req);
    }
    tokio::task::spawn_blocking(move || decode(&req))
        .await
        .map_err(|e| Status::internal(format!("decoding a Raft message failed: {e}")))?
}

fn decode<T: DeserializeOwned>(req: &RaftRequest) -> Result<T, Status> {
    if req.protocol != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "node {} speaks mode protocol {}, this node speaks {PROTOCOL_VERSION}: run the same mode version on every node",
            req.from, req.protocol
        )));
    }
    serde_json::from_slice(&req.payload).map_err(|e| {
        Status::invalid_argument(format!(
            "undecodable Raft message from node {}: {e}",
            req.from
        ))
    })
}

fn reply<T: Serialize, E: Serialize>(result: Result<T, E>) -> Result<Response<RaftReply>, Status> {
    let (payload, is_error) = match &result {
        Ok(v) => (serde_json::to_vec(v), false),
        Err(e) => (serde_json::to_vec(e), true),
    };
    let payload = payload.map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftReply { payload, is_error }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc = decode(request.get_ref())?;
        reply(self.raft.vote(rpc).await)
    }

    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc = decode_big(request).await?;
        reply(self.raft.append_entries(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc = decode_big(request).await?;
        reply(self.raft.install_snapshot(rpc).await)
    }
}
