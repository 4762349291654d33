//! The replication's side of the fuzz targets ([`crate::fuzzing`]): Raft messages and their
//! answers decoded as the peer API and the network decode them, snapshots and stored log
//! entries decoded as the store decodes them, and what they carry applied as the state machine
//! applies it. openraft's types stay here; the callers see bytes in, domain state out.

use std::io::{Cursor, Seek, SeekFrom, Write};

use mode_proto::v1::{RaftReply, RaftRequest};
use openraft::error::{Infallible, InstallSnapshotError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, LogId, SnapshotMeta};

use super::election::{PreVoteRequest, PreVoteResponse};
use super::store::{apply_entry, decode_entry, decode_meta, decode_snapshot, Applied};
use super::types::{Entry, StoredMembership, TypeConfig, Vote};
use super::views::{Touched, Views};
use crate::model::state::{Batch, ClusterState, Proposal};

/// Nodes whose views are built after an apply (a decoded state may name thousands).
const MAX_VIEWS: usize = 16;

/// A follower of a fuzz input: its replicated state, its per-node views and the snapshot it is
/// receiving, fed one peer message at a time.
pub(crate) struct Follower {
    applied: Applied,
    views: std::sync::Arc<Views>,
    chunks: super::raft_server::SnapshotChunks,
    receiving: Option<(String, Cursor<Vec<u8>>)>,
}

impl Follower {
    /// A follower whose state machine holds `state`.
    pub(crate) fn new(state: ClusterState) -> Follower {
        Follower {
            views: Views::new(&state, 0),
            applied: Applied {
                last_applied: None,
                membership: StoredMembership::default(),
                state,
            },
            chunks: Default::default(),
            receiving: None,
        }
    }

    /// Its state.
    pub(crate) fn state(&self) -> &ClusterState {
        &self.applied.state
    }

    /// Take the Raft message `req` as the peer API does for RPC `method` (0 vote,
    /// 1 append entries, 2 install snapshot, 3 pre-vote): check its protocol, decode its
    /// payload; then apply what an AppendEntries carries as if committed, and take a snapshot
    /// chunk as openraft's receiver does (installing the snapshot when it is complete).
    /// Whether the message decoded.
    pub(crate) fn take_request(&mut self, method: u8, req: &RaftRequest) -> bool {
        use super::raft_server::decode;
        if super::raft_server::check_protocol(req).is_err() {
            return false;
        }
        match method % 4 {
            0 => decode::<VoteRequest<u64>>(req).is_ok(),
            1 => decode::<AppendEntriesRequest<TypeConfig>>(req)
                .map(|rpc| self.apply(&rpc.entries))
                .is_ok(),
            2 => decode::<InstallSnapshotRequest<TypeConfig>>(req)
                .map(|rpc| self.receive_chunk(rpc))
                .is_ok(),
            _ => decode::<PreVoteRequest>(req).is_ok(),
        }
    }

    /// Apply `entries` as the state machine does once they are committed (and index them
    /// for the per-node views).
    pub(crate) fn apply(&mut self, entries: &[Entry]) {
        let mut touched = Touched::default();
        for entry in entries {
            apply_entry(&mut self.applied, entry, &mut touched);
        }
        let index = self.applied.last_applied.map_or(0, |l| l.index);
        self.views.applied(&self.applied.state, touched, index);
    }

    /// Apply `proposals` as the next committed entry (what a `Propose` becomes).
    pub(crate) fn apply_proposals(&mut self, proposals: Vec<Proposal>) {
        let index = self
            .applied
            .last_applied
            .map_or(100, |l| l.index.saturating_add(1));
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Batch {
                proposals: proposals.into(),
            }),
        };
        self.apply(std::slice::from_ref(&entry));
    }

    /// A snapshot chunk, admitted as the peer API admits it, then taken as openraft's
    /// receiver takes it (`Streaming::receive`: a new snapshot id starts at offset 0; a chunk
    /// is written at its offset) into the buffer [`super::store`] hands it; the last chunk
    /// installs the snapshot.
    fn receive_chunk(&mut self, rpc: InstallSnapshotRequest<TypeConfig>) {
        let id = &rpc.meta.snapshot_id;
        if self
            .chunks
            .admit(id, rpc.offset, rpc.data.len(), rpc.done)
            .is_err()
        {
            return;
        }
        if self.receiving.as_ref().map(|(current, _)| current) != Some(id) {
            if rpc.offset != 0 {
                return;
            }
            self.receiving = Some((id.clone(), Cursor::new(Vec::new())));
        }
        let Some((_, data)) = self.receiving.as_mut() else {
            return;
        };
        if data.seek(SeekFrom::Start(rpc.offset)).is_err() || data.write_all(&rpc.data).is_err() {
            return;
        }
        if rpc.done {
            if let Some((_, data)) = self.receiving.take() {
                self.install(&rpc.meta, &data.into_inner());
            }
        }
    }

    /// Install snapshot `data` as the state machine does.
    fn install(&mut self, meta: &SnapshotMeta<u64, openraft::BasicNode>, data: &[u8]) {
        let Ok(state) = decode_snapshot(data) else {
            return;
        };
        self.applied.state = state;
        self.applied.last_applied = meta.last_log_id;
        self.applied.membership = meta.last_membership.clone();
        let mut all = Touched::default();
        all.everything();
        let index = self.applied.last_applied.map_or(0, |l| l.index);
        self.views.applied(&self.applied.state, all, index);
    }

    /// The views of the first few nodes, as `WatchPlacements` sends them (once an input's
    /// messages are applied: building them after each would make the fuzzers slow).
    pub(crate) fn send_views(&self) {
        for id in self.applied.state.nodes.keys().take(MAX_VIEWS) {
            let _ = self.view(*id);
        }
    }

    /// Node `id`'s view, as `WatchPlacements` sends it.
    pub(crate) fn view(&self, id: u64) -> mode_proto::v1::PlacementsUpdate {
        let view = self
            .views
            .watch(&self.applied.state, id, 0)
            .0
            .borrow()
            .clone();
        crate::agent::view_to_proto(&view, 1)
    }
}

/// Decode `reply` as the answer to Raft RPC `method` (as [`Follower::take_request`] numbers
/// them), as the sending node's network does. Whether it decoded.
pub(crate) fn take_reply(method: u8, reply: &RaftReply) -> bool {
    use super::network::decode_reply;
    match method % 4 {
        0 => decode_reply::<VoteResponse<u64>, Infallible>(reply).is_ok(),
        1 => decode_reply::<AppendEntriesResponse<u64>, Infallible>(reply).is_ok(),
        2 => decode_reply::<InstallSnapshotResponse<u64>, InstallSnapshotError>(reply).is_ok(),
        _ => decode_reply::<PreVoteResponse, Infallible>(reply).is_ok(),
    }
}

/// A snapshot's state as stored or received, then the views a server builds from it at start.
/// `None` when it does not decode.
pub(crate) fn snapshot(data: &[u8]) -> Option<ClusterState> {
    let follower = Follower::new(decode_snapshot(data).ok()?);
    follower.send_views();
    Some(follower.applied.state)
}

/// One value as read back from the data directory, by `what` (0 a log entry, then applied
/// to `follower` as at start; 1 the vote; 2 the committed log id; 3 the purged log id;
/// 4 a snapshot's metadata). Whether it decoded.
pub(crate) fn stored(what: u8, bytes: &[u8], follower: &mut Follower) -> bool {
    match what % 5 {
        0 => decode_entry(bytes)
            .map(|entry| follower.apply(std::slice::from_ref(&entry)))
            .is_ok(),
        1 => decode_meta::<Vote>("vote", bytes).is_ok(),
        2 => decode_meta::<Option<super::types::LogId>>("committed", bytes).is_ok(),
        3 => decode_meta::<super::types::LogId>("purged", bytes).is_ok(),
        _ => decode_meta::<SnapshotMeta<u64, openraft::BasicNode>>("snapshot meta", bytes).is_ok(),
    }
}

// ---------------------------------------------------------------- seeds

fn log_id(term: u64, index: u64) -> super::types::LogId {
    LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
}

fn membership() -> openraft::Membership<u64, openraft::BasicNode> {
    let nodes: std::collections::BTreeMap<u64, openraft::BasicNode> = (1..=3)
        .map(|id| (id, openraft::BasicNode::new(format!("10.0.0.{id}:7071"))))
        .collect();
    openraft::Membership::new(vec![nodes.keys().copied().collect()], nodes)
}

fn snapshot_meta(index: u64) -> SnapshotMeta<u64, openraft::BasicNode> {
    SnapshotMeta {
        last_log_id: Some(log_id(2, index)),
        last_membership: StoredMembership::new(Some(log_id(1, 2)), membership()),
        snapshot_id: format!("2-{index}-0"),
    }
}

/// Log entries as the leader replicates them: a blank one, a membership change, then one
/// batch per group of `batches`, from index `first`.
pub(crate) fn seed_entries(first: u64, batches: Vec<Vec<Proposal>>) -> Vec<Entry> {
    let mut entries = vec![
        Entry {
            log_id: log_id(2, first),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(2, first + 1),
            payload: EntryPayload::Membership(membership()),
        },
    ];
    for (i, proposals) in batches.into_iter().enumerate() {
        entries.push(Entry {
            log_id: log_id(2, first + 2 + i as u64),
            payload: EntryPayload::Normal(Batch {
                proposals: proposals.into(),
            }),
        });
    }
    entries
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("seeds encode")
}

/// Raft messages' payloads a follower receives, each with its RPC (as
/// [`Follower::take_request`] numbers them): a vote, a pre-vote, a heartbeat, entries carrying
/// `batches`, and `state` as a snapshot in two chunks.
pub(crate) fn seed_requests(
    batches: Vec<Vec<Proposal>>,
    state: &ClusterState,
) -> Vec<(u8, Vec<u8>)> {
    let vote = openraft::Vote::new_committed(2, 1);
    let entries = seed_entries(101, batches);
    let last = entries.last().map(|e| e.log_id);
    let data = json(state);
    let (head, tail) = data.split_at(data.len() / 2);
    let chunk = |offset: usize, data: &[u8], done: bool| InstallSnapshotRequest::<TypeConfig> {
        vote,
        meta: snapshot_meta(200),
        offset: offset as u64,
        data: data.to_vec(),
        done,
    };
    vec![
        (0, json(&VoteRequest::new(openraft::Vote::new(3, 2), last))),
        (
            3,
            json(&PreVoteRequest {
                candidate: 2,
                last_log_id: last,
            }),
        ),
        (
            1,
            json(&AppendEntriesRequest::<TypeConfig> {
                vote,
                prev_log_id: Some(log_id(1, 100)),
                entries: Vec::new(),
                leader_commit: Some(log_id(1, 100)),
            }),
        ),
        (
            1,
            json(&AppendEntriesRequest::<TypeConfig> {
                vote,
                prev_log_id: Some(log_id(1, 100)),
                entries,
                leader_commit: last,
            }),
        ),
        (2, json(&chunk(0, head, false))),
        (2, json(&chunk(head.len(), tail, true))),
    ]
}

/// Answers to Raft RPCs, each with its RPC, as a leader or candidate receives them.
pub(crate) fn seed_replies() -> Vec<(u8, RaftReply)> {
    let vote = openraft::Vote::new_committed(2, 1);
    let ok = |payload: Vec<u8>| RaftReply {
        payload,
        is_error: false,
    };
    let mismatch: openraft::error::RaftError<u64, InstallSnapshotError> =
        openraft::error::RaftError::APIError(InstallSnapshotError::SnapshotMismatch(
            openraft::error::SnapshotMismatch {
                expect: openraft::SnapshotSegmentId {
                    id: "2-200-0".into(),
                    offset: 0,
                },
                got: openraft::SnapshotSegmentId {
                    id: "2-200-0".into(),
                    offset: 4096,
                },
            },
        ));
    vec![
        (
            0,
            ok(json(&VoteResponse::new(vote, Some(log_id(2, 7)), true))),
        ),
        (1, ok(json(&AppendEntriesResponse::<u64>::Success))),
        (1, ok(json(&AppendEntriesResponse::<u64>::Conflict))),
        (
            1,
            ok(json(&AppendEntriesResponse::<u64>::PartialSuccess(Some(
                log_id(2, 5),
            )))),
        ),
        (1, ok(json(&AppendEntriesResponse::HigherVote(vote)))),
        (2, ok(json(&InstallSnapshotResponse { vote }))),
        (
            2,
            RaftReply {
                payload: json(&mismatch),
                is_error: true,
            },
        ),
        (
            3,
            ok(json(&PreVoteResponse {
                granted: false,
                reason: "node 1 leads".into(),
            })),
        ),
    ]
}

/// Values as stored in the data directory, each with what it is (as [`stored`] numbers them).
pub(crate) fn seed_stored(batches: Vec<Vec<Proposal>>) -> Vec<(u8, Vec<u8>)> {
    let mut out: Vec<(u8, Vec<u8>)> = seed_entries(101, batches)
        .iter()
        .map(|e| (0, json(e)))
        .collect();
    out.push((1, json(&openraft::Vote::new_committed(2, 1))));
    out.push((2, json(&Some(log_id(2, 104)))));
    out.push((2, json(&None::<super::types::LogId>)));
    out.push((3, json(&log_id(1, 50))));
    out.push((4, json(&snapshot_meta(200))));
    out
}
