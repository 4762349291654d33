//! Forwarding to the leader (and other calls between servers) over the peer API.

use std::time::Duration;

use mode_proto::v1 as pb;
use mode_proto::v1::peer_client::PeerClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::network::{describe_status, Peers};
use super::node::{
    ClusterError, ClusterStatus, LeaseGrant, MemberStatus, WriteOutcome, FORWARDED, REQUEST_ID,
};
use crate::model::limits;
use crate::model::state::Proposal;

const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers larger than this are decoded on a blocking thread.
const BIG_ANSWER_BYTES: usize = 256 << 10;

fn client(peers: &Peers, address: &str) -> Result<PeerClient<Channel>, ClusterError> {
    let channel = peers
        .forward_channel(address)
        .map_err(ClusterError::Config)?;
    Ok(sized(PeerClient::new(channel)))
}

/// The limits every node's server applies, on the forwarding side too: whatever the leader may
/// answer, the follower accepts (gRPC's default of 4 MiB failed reads of larger states).
fn sized(client: PeerClient<Channel>) -> PeerClient<Channel> {
    client
        .max_decoding_message_size(limits::MAX_ANSWER_BYTES)
        .max_encoding_message_size(limits::MAX_REQUEST_BYTES)
}

fn forwarded<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(FORWARD_TIMEOUT);
    req.metadata_mut()
        .insert(FORWARDED, MetadataValue::from_static("1"));
    crate::telemetry::inject(req.metadata_mut());
    req
}

/// The error a caller sees for a failed call to another node.
pub(crate) fn from_status(address: &str, status: &tonic::Status) -> ClusterError {
    let msg = status.message().to_string();
    match status.code() {
        tonic::Code::NotFound => ClusterError::NotFound(msg),
        tonic::Code::InvalidArgument => ClusterError::Invalid(msg),
        tonic::Code::AlreadyExists => ClusterError::Conflict(msg),
        _ => ClusterError::Unavailable(describe_status(address, status)),
    }
}

/// The status code for a cluster error.
pub(crate) fn to_status(e: &ClusterError) -> tonic::Status {
    let msg = e.to_string();
    match e {
        ClusterError::Unavailable(_) => tonic::Status::unavailable(msg),
        ClusterError::NotFound(_) => tonic::Status::not_found(msg),
        ClusterError::Invalid(_) | ClusterError::Config(_) => tonic::Status::invalid_argument(msg),
        ClusterError::Conflict(_) => tonic::Status::already_exists(msg),
        ClusterError::Fatal(_) | ClusterError::DataDir(_) => tonic::Status::internal(msg),
    }
}

/// Why a forwarded write failed.
pub(crate) enum Forwarded {
    /// The leader could not have received it (no connection): retry elsewhere.
    NotSent(String),
    /// It may have reached the leader (no answer in time, connection lost): retry with the
    /// same request id.
    MaybeSent(String),
    /// The leader answered with an error.
    Answer(ClusterError),
}

pub(crate) async fn write(
    peers: &Peers,
    address: &str,
    proposal: &Proposal,
) -> Result<WriteOutcome, Forwarded> {
    let command_json = serde_json::to_string(&proposal.command)
        .map_err(|e| Forwarded::Answer(ClusterError::Invalid(e.to_string())))?;
    let mut req = forwarded(pb::ProposeRequest {
        command_json,
        request_id: proposal.request_id.clone().unwrap_or_default(),
        by: proposal.by.clone().unwrap_or_default(),
    });
    if let Some(id) = proposal
        .request_id
        .as_deref()
        .and_then(|id| id.parse().ok())
    {
        req.metadata_mut().insert(REQUEST_ID, id);
    }
    let reply = client(peers, address)
        .map_err(|e| Forwarded::NotSent(e.to_string()))?
        .propose(req)
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable if super::network::never_connected(&s) => {
                Forwarded::NotSent(describe_status(address, &s))
            }
            tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown => Forwarded::MaybeSent(describe_status(address, &s)),
            _ => Forwarded::Answer(from_status(address, &s)),
        })?
        .into_inner();
    let result = serde_json::from_str(&reply.response_json)
        .map_err(|e| Forwarded::MaybeSent(format!("undecodable answer from {address}: {e}")))?;
    Ok(WriteOutcome {
        result,
        log_index: reply.log_index,
        leader: reply.leader,
    })
}

pub(crate) async fn read(
    peers: &Peers,
    address: &str,
    query: &str,
) -> Result<(serde_json::Value, u64), ClusterError> {
    // Megabytes of state must not queue up behind (or ahead of) Raft's heartbeats.
    let channel = peers.side_channel(address).map_err(ClusterError::Config)?;
    let reply = sized(PeerClient::new(channel))
        .query(forwarded(pb::QueryRequest {
            query: query.to_string(),
            stale: false,
        }))
        .await
        .map_err(|s| from_status(address, &s))?
        .into_inner();
    let applied = reply.applied_index;
    let big = reply.result_json.len() > BIG_ANSWER_BYTES;
    let decode = move || serde_json::from_str(&reply.result_json);
    let decoded = if big {
        tokio::task::spawn_blocking(decode)
            .await
            .map_err(|e| ClusterError::Fatal(format!("decoding an answer: {e}")))?
    } else {
        decode()
    };
    let value = decoded.map_err(|e| {
        ClusterError::Unavailable(format!("undecodable answer from {address}: {e}"))
    })?;
    Ok((value, applied))
}

pub(crate) async fn status(peers: &Peers, address: &str) -> Result<ClusterStatus, ClusterError> {
    let reply = client(peers, address)?
        .member_status(forwarded(pb::ClusterStatusRequest { local: true }))
        .await
        .map_err(|s| from_status(address, &s))?
        .into_inner();
    Ok(status_from_proto(reply))
}

pub(crate) async fn join(
    peers: &Peers,
    address: &str,
    id: u64,
    joiner: &str,
    incarnation: u64,
    rejoin: bool,
) -> Result<(bool, String), ClusterError> {
    let reply = client(peers, address)?
        .join(forwarded(pb::JoinRequest {
            id,
            address: joiner.to_string(),
            incarnation,
            rejoin,
        }))
        .await
        .map_err(|s| from_status(address, &s))?
        .into_inner();
    Ok((reply.voter, reply.message))
}

pub(crate) async fn remove(peers: &Peers, address: &str, id: u64) -> Result<String, ClusterError> {
    let reply = client(peers, address)?
        .remove_member(forwarded(pb::RemoveNodeRequest {
            id,
            ..Default::default()
        }))
        .await
        .map_err(|s| from_status(address, &s))?
        .into_inner();
    Ok(reply.message)
}

/// Tell the leader at `address` that `node` is leaving (see [`super::ClusterNode::leave`]).
pub(crate) async fn leave(
    peers: &Peers,
    address: &str,
    node: u64,
    incarnation: u64,
) -> Result<(), ClusterError> {
    let mut req = forwarded(pb::HeartbeatRequest {
        node,
        incarnation,
        leaving: true,
    });
    req.set_timeout(Duration::from_secs(3));
    client(peers, address)?
        .heartbeat(req)
        .await
        .map_err(|s| from_status(address, &s))?;
    Ok(())
}

/// Relay agents' heartbeats `(node, incarnation)` to the leader at `address`: its grant, and
/// the heartbeats it refused (node -> why).
pub(crate) async fn relay_heartbeats(
    peers: &Peers,
    address: &str,
    beats: &[(u64, u64)],
) -> Result<(LeaseGrant, std::collections::HashMap<u64, String>), ClusterError> {
    let mut req = forwarded(pb::RelayHeartbeatsRequest {
        heartbeats: beats
            .iter()
            .map(|(node, incarnation)| pb::HeartbeatRequest {
                node: *node,
                incarnation: *incarnation,
                leaving: false,
            })
            .collect(),
    });
    const TIMEOUT: Duration = Duration::from_secs(1);
    req.set_timeout(TIMEOUT);
    // The grpc-timeout header bounds the leader's work, not a call stuck on its way (a
    // connection the leader does not read, a partition): the relay would wait for TCP's
    // keep-alive, and every agent's heartbeat through this server with it.
    let mut client = client(peers, address)?;
    let reply = tokio::time::timeout(TIMEOUT, client.relay_heartbeats(req))
        .await
        .map_err(|_| {
            ClusterError::Unavailable(format!(
                "{address} did not answer the relayed heartbeats within {TIMEOUT:?}"
            ))
        })?
        .map_err(|s| from_status(address, &s))?
        .into_inner();
    let grant = reply.grant.unwrap_or_default();
    Ok((
        LeaseGrant {
            leader: grant.leader,
            lease: Duration::from_millis(grant.lease_ms),
            index: grant.lease_index,
        },
        reply.refused.into_iter().collect(),
    ))
}

/// Domain status → wire.
pub(crate) fn status_to_proto(s: &ClusterStatus) -> pb::ClusterStatusReply {
    pb::ClusterStatusReply {
        answered_by: s.answered_by,
        leader: s.leader.unwrap_or(0),
        has_leader: s.leader.is_some(),
        term: s.term,
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        last_log_index: s.last_log_index,
        snapshot_index: s.snapshot_index,
        purged_index: s.purged_index,
        agents: 0,
        version: env!("CARGO_PKG_VERSION").to_string(),
        members: s
            .members
            .iter()
            .map(|m| pb::MemberStatus {
                id: m.id,
                address: m.address.clone(),
                role: m.role.clone(),
                voter: m.voter,
                lag: m.lag.map(|l| l as i64).unwrap_or(-1),
                reachable: m.reachable,
                last_error: m.last_error.clone().unwrap_or_default(),
                matched_index: m.matched_index.unwrap_or(0),
            })
            .collect(),
    }
}

/// Wire status → domain.
pub fn status_from_proto(r: pb::ClusterStatusReply) -> ClusterStatus {
    ClusterStatus {
        answered_by: r.answered_by,
        leader: r.has_leader.then_some(r.leader),
        term: r.term,
        commit_index: r.commit_index,
        applied_index: r.applied_index,
        last_log_index: r.last_log_index,
        snapshot_index: r.snapshot_index,
        purged_index: r.purged_index,
        members: r
            .members
            .into_iter()
            .map(|m| MemberStatus {
                id: m.id,
                address: m.address,
                role: m.role,
                voter: m.voter,
                lag: (m.lag >= 0).then_some(m.lag as u64),
                reachable: m.reachable,
                last_error: (!m.last_error.is_empty()).then_some(m.last_error),
                matched_index: (m.lag >= 0).then_some(m.matched_index),
            })
            .collect(),
    }
}
