//! The receiving side of the Raft transport (served by the peer API): decode, check the
//! protocol version and who is speaking, hand to openraft.

use mode_proto::v1::{RaftReply, RaftRequest};
use mode_proto::PROTOCOL_VERSION;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::node::Refusal;
use super::store::StateMachineStore;
use super::types::Raft;

/// Answers Raft RPCs for one server.
pub struct RaftService {
    pub(crate) raft: Raft,
    pub(crate) me: u64,
    pub(crate) incarnation: u64,
    pub(crate) sm: StateMachineStore,
    pub(crate) refused: Refusal,
    pub(crate) pre_voter: super::election::PreVoter,
    pub(crate) snapshot_chunks: std::sync::Arc<SnapshotChunks>,
}

/// How much of the snapshot being received has arrived, so that each chunk continues it.
/// openraft writes a chunk at its offset into the receiving buffer (a `Cursor<Vec<u8>>`): a
/// chunk far past the end would have it allocate and zero the whole gap (a terabyte for an
/// offset of 2^40) and take the node down.
#[derive(Default)]
pub(crate) struct SnapshotChunks(std::sync::Mutex<Option<(String, u64)>>);

impl SnapshotChunks {
    /// Admit a chunk of `len` bytes at `offset` of snapshot `id` (the last one when `done`):
    /// it must start within what arrived of that snapshot (a new snapshot starts at 0; a
    /// chunk sent again overlaps).
    pub(crate) fn admit(
        &self,
        id: &str,
        offset: u64,
        len: usize,
        done: bool,
    ) -> Result<(), String> {
        let mut receiving = crate::service::lock(&self.0);
        let arrived = match &*receiving {
            Some((current, arrived)) if current == id => *arrived,
            _ => 0,
        };
        if offset > arrived {
            return Err(format!(
                "snapshot {id}: a chunk at byte {offset} would leave a gap after the {arrived} bytes received (chunks follow each other from byte 0)"
            ));
        }
        *receiving = (!done).then(|| {
            (
                id.to_string(),
                arrived.max(offset.saturating_add(len as u64)),
            )
        });
        Ok(())
    }
}

/// The marker in a refusal that tells the sender its data directory is not the member's.
pub(crate) const WIPED: &str = "[wiped]";
/// The marker in a refusal that tells the sender it is not a member.
pub(crate) const NOT_A_MEMBER: &str = "[not a member]";

impl RaftService {
    /// Refuse messages between a wiped data directory and the cluster that knew the member it
    /// replaced, both ways, and votes from nodes that are not members.
    fn admit(&self, req: &RaftRequest, is_vote: bool) -> Result<(), Status> {
        check_protocol(req)?;
        if req.to_incarnation != 0 && req.to_incarnation != self.incarnation {
            let why = format!(
                "node {} sent a Raft message to node {} with data directory incarnation {:016x}, but this data directory has {:016x}: it was wiped or replaced, so it must not act as the member it was (it could vote twice or forget acknowledged writes). Remove the member (`modectl node rm {}`) and start this node with --join, or start it with --rejoin to come back as a new learner",
                req.from, self.me, req.to_incarnation, self.incarnation, self.me
            );
            let mut refused = crate::service::lock(&self.refused);
            if refused.is_none() {
                tracing::error!("{why}");
            }
            *refused = Some(why.clone());
            return Err(Status::failed_precondition(format!("{WIPED} {why}")));
        }
        let directory = self.sm.directory();
        let (known, member, initialized, server) = (
            directory.incarnation(req.from),
            directory.is_member(req.from),
            directory.initialized(),
            directory.is_server(req.from),
        );
        if known != 0 && req.incarnation != 0 && known != req.incarnation {
            return Err(Status::failed_precondition(format!(
                "{WIPED} node {} spoke with data directory incarnation {:016x}, but the cluster knows node {} as {known:016x}: its data was lost, so it must not act as the member it was. Remove it (`modectl node rm {}`) and start it with --join, or start it with --rejoin",
                req.from, req.incarnation, req.from, req.from
            )));
        }
        let effective_member = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&req.from)
            .is_some();
        if is_vote && initialized && !member && !effective_member {
            return Err(Status::failed_precondition(format!(
                "{NOT_A_MEMBER} node {} is not a member of this cluster (removed?); node {} does not vote for it",
                req.from, self.me
            )));
        }
        // Entries and snapshots only from members: a stranger (or a removed node) must never
        // write into this node's log. A node that has no membership yet (joining) takes them
        // from anyone; a registered server is let through too, for a follower that missed
        // the entry adding its new leader while it was away.
        if !is_vote && initialized && !member && !effective_member && !server {
            return Err(Status::permission_denied(format!(
                "{NOT_A_MEMBER} node {} is not a member of this cluster; node {} takes no Raft entries from it",
                req.from, self.me
            )));
        }
        Ok(())
    }
}

/// A Raft message's vote names its sender: a node cannot campaign or lead as another.
fn speaks_for_itself(req: &RaftRequest, voted_for: Option<u64>) -> Result<(), Status> {
    speaks_for_itself_from(req.from, voted_for)
}

fn speaks_for_itself_from(from: u64, voted_for: Option<u64>) -> Result<(), Status> {
    match voted_for {
        Some(v) if v != from => Err(Status::permission_denied(format!(
            "a Raft message from node {from} speaks for node {v}: refused"
        ))),
        _ => Ok(()),
    }
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

pub(super) fn check_protocol(req: &RaftRequest) -> Result<(), Status> {
    if req.protocol != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "node {} speaks mode protocol {}, this node speaks {PROTOCOL_VERSION}: run the same mode version on every node",
            req.from, req.protocol
        )));
    }
    Ok(())
}

pub(super) fn decode<T: DeserializeOwned>(req: &RaftRequest) -> Result<T, Status> {
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

impl RaftService {
    /// A vote request.
    pub async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.admit(request.get_ref(), true)?;
        let rpc: openraft::raft::VoteRequest<u64> = decode(request.get_ref())?;
        speaks_for_itself(request.get_ref(), rpc.vote.leader_id().voted_for())?;
        reply(self.raft.vote(rpc).await)
    }

    /// A pre-vote: would this node vote for the sender now?
    pub async fn pre_vote(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.admit(request.get_ref(), true)?;
        let req: super::election::PreVoteRequest = decode(request.get_ref())?;
        reply::<_, openraft::error::Infallible>(Ok(self.pre_voter.answer(&req)))
    }

    /// Entries (or a heartbeat) from the leader.
    pub async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.admit(request.get_ref(), false)?;
        let from = request.get_ref().from;
        let rpc: openraft::raft::AppendEntriesRequest<super::types::TypeConfig> =
            decode_big(request).await?;
        speaks_for_itself_from(from, rpc.vote.leader_id().voted_for())?;
        let result = self.raft.append_entries(rpc).await;
        if matches!(&result, Ok(r) if !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_)))
        {
            self.pre_voter.contact.heard();
        }
        reply(result)
    }

    /// A snapshot from the leader.
    pub async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.admit(request.get_ref(), false)?;
        let from = request.get_ref().from;
        let rpc: openraft::raft::InstallSnapshotRequest<super::types::TypeConfig> =
            decode_big(request).await?;
        speaks_for_itself_from(from, rpc.vote.leader_id().voted_for())?;
        self.snapshot_chunks
            .admit(&rpc.meta.snapshot_id, rpc.offset, rpc.data.len(), rpc.done)
            .map_err(Status::invalid_argument)?;
        let result = self.raft.install_snapshot(rpc).await;
        if result.is_ok() {
            self.pre_voter.contact.heard();
        }
        reply(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_chunks_must_follow_each_other() {
        let chunks = SnapshotChunks::default();
        chunks.admit("2-200-0", 0, 100, false).unwrap();
        chunks.admit("2-200-0", 100, 100, false).unwrap();
        // Sent again after a lost answer: overlaps what arrived.
        chunks.admit("2-200-0", 100, 100, false).unwrap();
        let gap = chunks.admit("2-200-0", 1 << 40, 1, false).unwrap_err();
        assert!(gap.contains("gap after the 200 bytes"), "{gap}");
        // Another snapshot starts at byte 0.
        assert!(chunks.admit("2-300-0", 200, 1, false).is_err());
        chunks.admit("2-200-0", 200, 10, true).unwrap();
        // Once complete, the same id starts again from byte 0.
        assert!(chunks.admit("2-200-0", 100, 1, false).is_err());
    }

    /// A peer sent a first chunk, then one at byte 2^40: the receiver (openraft writes each
    /// chunk at its offset into a `Cursor<Vec<u8>>`) allocated a terabyte and the node died.
    #[test]
    fn a_snapshot_chunk_past_the_end_is_refused_before_it_is_written() {
        let mut follower = super::super::fuzz::Follower::new(Default::default());
        let chunk = |offset: usize, data: &[u8], done: bool| {
            let rpc = serde_json::json!({
                "vote": {"leader_id": {"term": 2, "node_id": 1}, "committed": true},
                "meta": {"last_log_id": null, "last_membership": {"log_id": null,
                    "membership": {"configs": [], "nodes": {}}}, "snapshot_id": "2-200-0"},
                "offset": offset, "data": data, "done": done});
            RaftRequest {
                protocol: PROTOCOL_VERSION,
                payload: serde_json::to_vec(&rpc).unwrap(),
                ..Default::default()
            }
        };
        let head = br#"{"nodes": {}, "specs": {}, "events": [], "next_event_seq": 7"#;
        assert!(follower.take_request(2, &chunk(0, head, false)));
        assert!(follower.take_request(2, &chunk(1 << 40, b"}", true)));
        assert!(follower.take_request(2, &chunk(head.len(), b"}", true)));
        assert_eq!(
            follower.state().next_event_seq,
            7,
            "the snapshot was installed"
        );
    }
}
