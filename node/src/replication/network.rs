//! The Raft network over gRPC: one cached tonic channel per peer, per-call timeouts, backoff
//! for unreachable peers, a protocol version on every call, and per-peer health for status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mode_proto::v1::peer_client::PeerClient as PeerRpc;
use mode_proto::v1::{RaftReply, RaftRequest};
use mode_proto::PROTOCOL_VERSION;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::types::TypeConfig;
use crate::model::limits::{APPEND_TARGET_BYTES, MAX_RAFT_MESSAGE_BYTES};
use crate::service::lock;

/// How long to wait for a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// What this node last saw of a peer.
#[derive(Debug, Clone, Default)]
pub struct PeerHealth {
    /// When a call last succeeded.
    pub last_ok: Option<Instant>,
    /// The last failure, if the last call failed.
    pub last_error: Option<String>,
}

impl PeerHealth {
    /// Reachable if the last call succeeded within the last 5 s.
    pub fn reachable(&self) -> bool {
        self.last_error.is_none()
            && self
                .last_ok
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
    }
}

/// Channels and health by peer, shared by the Raft network and the control API's forwarding.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    forward_channels: Mutex<HashMap<String, Channel>>,
    side_channels: Mutex<HashMap<String, Channel>>,
    health: Mutex<HashMap<u64, PeerHealth>>,
    /// Peers that refused this node's vote requests because it is not a member.
    refused_membership: Mutex<std::collections::BTreeSet<u64>>,
    /// The node's TLS for its calls (None: plaintext).
    tls: Option<crate::security::tls::ClientTls>,
    /// Peers that said they were shutting down cleanly: not reaching them is expected.
    left: Mutex<std::collections::BTreeSet<u64>>,
}

impl Peers {
    /// Peers reached over TLS with `tls` when given, else in plaintext.
    pub fn new(tls: Option<crate::security::tls::ClientTls>) -> Peers {
        Peers {
            tls,
            ..Peers::default()
        }
    }

    /// The TLS this node calls other nodes with (None: plaintext).
    pub fn tls(&self) -> Option<&crate::security::tls::ClientTls> {
        self.tls.as_ref()
    }

    /// The cached channel to `address` (`host:port`), created lazily on first use.
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        self.cached(&self.channels, address)
    }

    /// A cached channel to `address` for client work forwarded to the leader (writes, relayed
    /// heartbeats): thousands of agents' calls, some cancelled when they time out, must not
    /// share Raft's connection (a burst of cancelled streams makes the server close it).
    pub fn forward_channel(&self, address: &str) -> Result<Channel, String> {
        self.cached(&self.forward_channels, address)
    }

    /// A second cached channel to `address`, for bulky calls that must not share Raft's
    /// connection (the graph fan-out).
    pub fn side_channel(&self, address: &str) -> Result<Channel, String> {
        self.cached(&self.side_channels, address)
    }

    fn cached(
        &self,
        channels: &Mutex<HashMap<String, Channel>>,
        address: &str,
    ) -> Result<Channel, String> {
        let mut channels = lock(channels);
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let channel = crate::security::tls::channel(address, self.tls.clone(), |e| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .map_err(|e| format!("invalid peer address '{address}': {e}"))?;
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// Peers that said this node is not a member.
    pub fn refused_membership(&self) -> std::collections::BTreeSet<u64> {
        lock(&self.refused_membership).clone()
    }

    /// Health of every peer this node has called.
    pub fn health(&self) -> HashMap<u64, PeerHealth> {
        lock(&self.health).clone()
    }

    /// `peer` said it is shutting down cleanly: calls to it failing until it is back is
    /// expected, not a warning.
    pub(crate) fn note_left(&self, peer: u64) {
        lock(&self.left).insert(peer);
    }

    fn record(&self, peer: u64, result: Result<(), String>) {
        let mut health = lock(&self.health);
        let h = health.entry(peer).or_default();
        match result {
            Ok(()) => {
                if h.last_error.is_some() {
                    tracing::info!("peer {peer} is reachable again");
                    // Back (calls still answered between its notice and its exit are not).
                    lock(&self.left).remove(&peer);
                }
                h.last_ok = Some(Instant::now());
                h.last_error = None;
            }
            Err(e) => {
                if h.last_error.as_deref() != Some(e.as_str()) {
                    if lock(&self.left).contains(&peer) {
                        tracing::info!("peer {peer}, which shut down cleanly: {e}");
                    } else {
                        tracing::warn!("peer {peer}: {e}");
                    }
                }
                h.last_error = Some(e);
            }
        }
    }
}

/// Creates a client per peer (openraft keeps one per replication stream).
#[derive(Clone)]
pub(crate) struct Network {
    pub(crate) my_id: u64,
    pub(crate) incarnation: u64,
    pub(crate) peers: Arc<Peers>,
    pub(crate) sm: super::store::StateMachineStore,
    pub(crate) refused: super::node::Refusal,
    /// How long an AppendEntries that carries entries may take (see [`PeerClient`]).
    pub(crate) replication_timeout: Duration,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            caller: self.caller_for(target, &node.addr),
            replication_timeout: self.replication_timeout,
            in_flight: None,
        }
    }
}

/// One replication stream's client.
///
/// openraft 0.9 gives every AppendEntries one heartbeat interval (50 ms) and drops the call
/// after that, so a round trip or a follower's fsync slower than a heartbeat used to stall
/// replication: the same entries were sent again and again, never answered in time. Here an
/// append that carries entries runs in its own task for up to the replication timeout; when
/// openraft gives up on it, it keeps going, and the next append waits for it and then sends
/// only what the follower does not have yet. Heartbeats (no entries) go at once, beside it, so
/// the follower keeps hearing from its leader.
pub(crate) struct PeerClient {
    /// The peer, and what a call to it needs.
    caller: Caller,
    replication_timeout: Duration,
    in_flight: Option<InFlight>,
}

type AppendResult = RpcResult<AppendEntriesResponse<u64>, RaftError<u64>>;

/// An append still being sent.
struct InFlight {
    vote: openraft::Vote<u64>,
    /// The last entry it carries.
    last: Option<openraft::LogId<u64>>,
    task: tokio::task::JoinHandle<AppendResult>,
}

impl Drop for PeerClient {
    fn drop(&mut self) {
        if let Some(f) = self.in_flight.take() {
            f.task.abort();
        }
    }
}

/// A transport-level failure: the peer could not be reached or did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

type RpcResult<T, E> = Result<T, RPCError<u64, BasicNode, E>>;

/// What one call needs, detached from the client so that it can run in its own task.
#[derive(Clone)]
pub(crate) struct Caller {
    my_id: u64,
    incarnation: u64,
    target: u64,
    address: String,
    channel: Result<Channel, String>,
    peers: Arc<Peers>,
    sm: super::store::StateMachineStore,
    refused: super::node::Refusal,
}

impl PeerClient {
    fn caller(&self) -> Caller {
        self.caller.clone()
    }

    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, RaftError<u64, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload =
            serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.caller().send(method, payload, option.hard_ttl()).await
    }

    /// Send an append that carries entries (see [`PeerClient`]).
    async fn append(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> AppendResult {
        let started = Instant::now();
        // What is left of openraft's time once an append has been waited for this long goes
        // to a heartbeat instead.
        let patience = option.soft_ttl() / 2;
        let asked_from = rpc.prev_log_id;
        if let Some(f) = self.in_flight.as_mut() {
            let Ok(done) = tokio::time::timeout(patience, &mut f.task).await else {
                return self.keep_alive(&rpc, option, started).await;
            };
            let (vote, last) = (f.vote, f.last);
            self.in_flight = None;
            if matches!(done, Ok(Ok(AppendEntriesResponse::Success))) && vote == rpc.vote {
                if let Some(last) = last {
                    rpc = skip_known(rpc, last);
                }
            }
        }
        let trimmed = rpc.prev_log_id != asked_from;
        let vote = rpc.vote;
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let beat = heartbeat_like(&rpc, asked_from);
        let task = tokio::spawn(self.caller().send_append(rpc, self.replication_timeout));
        let f = self.in_flight.insert(InFlight { vote, last, task });
        let Ok(done) = tokio::time::timeout(patience, &mut f.task).await else {
            return self.keep_alive(&beat, option, started).await;
        };
        self.in_flight = None;
        match done {
            // The follower lost entries it had acknowledged: let openraft send the whole range
            // again rather than report a conflict where it did not ask.
            Ok(Ok(AppendEntriesResponse::Conflict)) if trimmed => Err(RPCError::Network(
                NetworkError::new(&TransportError(format!(
                    "node {} no longer has the entries it acknowledged; sending them again",
                    self.caller.target
                ))),
            )),
            Ok(r) => r,
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    /// While an append is on its way: a heartbeat at the point openraft asked from, so the
    /// follower keeps hearing from its leader (and openraft learns it is alive and matches
    /// there) instead of starting an election.
    async fn keep_alive(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
        started: Instant,
    ) -> AppendResult {
        let beat = heartbeat_like(rpc, rpc.prev_log_id);
        let left = option
            .hard_ttl()
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        let payload =
            serde_json::to_vec(&beat).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self.caller().send(Method::Append, payload, left).await?;
        Ok(match reply {
            AppendEntriesResponse::Success => {
                AppendEntriesResponse::PartialSuccess(beat.prev_log_id)
            }
            other => other,
        })
    }
}

/// An append with no entries from `prev` on, otherwise like `rpc`.
fn heartbeat_like(
    rpc: &AppendEntriesRequest<TypeConfig>,
    prev: Option<openraft::LogId<u64>>,
) -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: rpc.vote,
        prev_log_id: prev,
        leader_commit: rpc.leader_commit,
        entries: Vec::new(),
    }
}

/// `rpc` without the entries up to `known`, which the follower acknowledged under the same
/// vote (a leader's log does not change while it leads, so they are the same entries).
fn skip_known(
    mut rpc: AppendEntriesRequest<TypeConfig>,
    known: openraft::LogId<u64>,
) -> AppendEntriesRequest<TypeConfig> {
    let keep_from = rpc
        .entries
        .iter()
        .position(|e| e.log_id.index > known.index)
        .unwrap_or(rpc.entries.len());
    if keep_from == 0 {
        return rpc;
    }
    let new_prev = rpc.entries[keep_from - 1].log_id;
    if new_prev.index == known.index && new_prev != known {
        return rpc; // not the log that was acknowledged
    }
    rpc.prev_log_id = Some(new_prev);
    rpc.entries.drain(..keep_from);
    rpc
}

impl Caller {
    /// Encode (off the async threads: entries can be megabytes), split when too large, send.
    async fn send_append(
        self,
        rpc: AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> AppendResult {
        let entries = rpc.entries.len();
        let payload = tokio::task::spawn_blocking(move || serde_json::to_vec(&rpc))
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if payload.len() > APPEND_TARGET_BYTES && entries > 1 {
            // openraft sends fewer entries next time; a single entry always goes.
            let fit = (entries * APPEND_TARGET_BYTES / payload.len()).max(1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fit as u64),
            ));
        }
        self.send(Method::Append, payload, timeout).await
    }

    async fn send<Resp, E>(
        &self,
        method: Method,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> RpcResult<Resp, RaftError<u64, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                    e.clone(),
                ))))
            }
        };
        let to_incarnation = self.sm.directory().incarnation(self.target);
        let request = RaftRequest {
            protocol: PROTOCOL_VERSION,
            from: self.my_id,
            payload,
            incarnation: self.incarnation,
            to: self.target,
            to_incarnation,
        };
        let mut client = PeerRpc::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        let call = async {
            match method {
                Method::Vote => client.vote(request).await,
                Method::Append => client.append_entries(request).await,
                Method::Snapshot => client.install_snapshot(request).await,
                Method::PreVote => client.pre_vote(request).await,
            }
        };
        let reply: RaftReply = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                let msg = format!("no answer from {} within {timeout:?}", self.address);
                self.peers.record(self.target, Err(msg.clone()));
                return Err(RPCError::Network(NetworkError::new(&TransportError(msg))));
            }
            Ok(Err(status)) => {
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().starts_with(super::raft_server::WIPED)
                    && status
                        .message()
                        .contains(&format!("node {} spoke", self.my_id))
                {
                    // A peer says this node's data directory is not the member's.
                    let why = status
                        .message()
                        .trim_start_matches(super::raft_server::WIPED)
                        .trim()
                        .to_string();
                    let mut refused = lock(&self.refused);
                    if refused.is_none() {
                        tracing::error!("{why}");
                    }
                    *refused = Some(why);
                }
                if status.code() == tonic::Code::FailedPrecondition
                    && status
                        .message()
                        .starts_with(super::raft_server::NOT_A_MEMBER)
                {
                    lock(&self.peers.refused_membership).insert(self.target);
                }
                let msg = describe_status(&self.address, &status);
                self.peers.record(self.target, Err(msg.clone()));
                let err = TransportError(msg);
                return Err(match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::Unimplemented => RPCError::Unreachable(Unreachable::new(&err)),
                    _ => RPCError::Network(NetworkError::new(&err)),
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        self.peers.record(self.target, Ok(()));
        lock(&self.peers.refused_membership).remove(&self.target);
        decode_reply(&reply)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// A peer's answer to a Raft RPC: what it answered, or the Raft error it sent.
pub(super) fn decode_reply<Resp, E>(
    reply: &RaftReply,
) -> serde_json::Result<Result<Resp, RaftError<u64, E>>>
where
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    if reply.is_error {
        return serde_json::from_slice(&reply.payload).map(Err);
    }
    serde_json::from_slice(&reply.payload).map(Ok)
}

/// Whether a failed call never reached the peer (the connection could not be made), so the
/// request cannot have been taken.
pub(crate) fn never_connected(status: &tonic::Status) -> bool {
    let cause = root_cause(status).to_lowercase();
    cause.contains("connection refused")
        || cause.contains("tcp connect error")
        || cause.contains("no route to host")
        || cause.contains("network is unreachable")
}

/// The innermost cause of a failed call ("Connection refused (os error 111)").
fn root_cause(status: &tonic::Status) -> String {
    let mut cause = status.message().to_string();
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        cause = e.to_string();
        next = e.source();
    }
    cause
}

/// A one-line explanation of a failed call, naming the peer.
pub(crate) fn describe_status(address: &str, status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unavailable => format!("{address} is unreachable: {}", root_cause(status)),
        tonic::Code::Unimplemented => format!(
            "{address} does not speak mode's Raft protocol (mode.v1): is it a mode node of the same version?"
        ),
        tonic::Code::FailedPrecondition => format!("{address} refused: {}", status.message()),
        code => format!("{address} answered {code:?}: {}", status.message()),
    }
}

#[derive(Clone, Copy)]
enum Method {
    Vote,
    Append,
    Snapshot,
    PreVote,
}

impl Network {
    /// A caller for one-off calls to `target` at `address` (pre-votes).
    pub(crate) fn caller_for(&self, target: u64, address: &str) -> Caller {
        Caller {
            my_id: self.my_id,
            incarnation: self.incarnation,
            target,
            address: address.to_string(),
            channel: self.peers.channel(address),
            peers: self.peers.clone(),
            sm: self.sm.clone(),
            refused: self.refused.clone(),
        }
    }
}

impl Caller {
    /// Ask the peer whether it would vote for this node now.
    pub(crate) async fn pre_vote(
        &self,
        req: &super::election::PreVoteRequest,
        timeout: Duration,
    ) -> Result<super::election::PreVoteResponse, String> {
        let payload = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        self.send::<_, openraft::error::Infallible>(Method::PreVote, payload, timeout)
            .await
            .map_err(|e| e.to_string())
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, RaftError<u64>> {
        if rpc.entries.is_empty() {
            // A heartbeat goes at once, within openraft's time, beside any append in flight.
            return self.call(Method::Append, &rpc, &option).await;
        }
        self.append(rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        self.call(Method::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, RaftError<u64>> {
        self.call(Method::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // Unreachable peers are retried after 50 ms, doubling up to 1 s.
        openraft::network::Backoff::new(
            (0..).map(|i: u32| Duration::from_millis((50u64 << i.min(5)).min(1000))),
        )
    }
}
