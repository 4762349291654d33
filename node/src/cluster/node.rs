//! `ClusterNode`: this node's member of the control plane — open the data directory, run
//! Raft, bootstrap or join, and serve writes (forwarded to the leader), linearizable or stale
//! reads, status and membership changes in domain terms.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mode_proto::v1::control_client::ControlClient;
use mode_proto::v1::{ClusterStatusRequest, JoinRequest};
use openraft::error::{CheckIsLeaderError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use super::network::{describe_status, Network, Peers};
use super::proposer::{Proposer, Rejected};
use super::state::{Command, CommandResult, Proposal, QueryError};
use super::store::{self, DataDirError, LogStore, StateMachineStore};
use super::types::Raft;

/// How long a write waits for a leader before reporting the cluster unavailable.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC metadata key marking a request forwarded by another node (never forwarded again).
pub const FORWARDED: &str = "x-mode-forwarded";

/// How this node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id.
    pub id: u64,
    /// The `host:port` other nodes and clients reach this node at.
    pub advertise: String,
    /// Static bootstrap members (id → address), including this node; empty for a single node.
    pub peers: BTreeMap<u64, String>,
    /// Join an existing cluster through this address instead.
    pub join: Option<String>,
    /// Where the Raft log, vote and snapshots live.
    pub data_dir: PathBuf,
    /// Joining nodes are promoted to voters while there are fewer than this.
    pub max_voters: usize,
    /// Leader heartbeat period.
    pub heartbeat: Duration,
    /// Election timeout range (randomised between the two).
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot after this many new log entries.
    pub snapshot_every: u64,
    /// How long an AppendEntries carrying entries may take (a large entry, a slow fsync);
    /// openraft's own timeout is one heartbeat, which is kept for heartbeats.
    pub replication_timeout: Duration,
}

impl ClusterConfig {
    /// Defaults for a node: 50 ms heartbeats, 120–240 ms election timeouts, a snapshot every
    /// 10,000 entries, 5 s for an AppendEntries that carries entries.
    pub fn new(id: u64, advertise: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        ClusterConfig {
            id,
            advertise: advertise.into(),
            peers: BTreeMap::new(),
            join: None,
            data_dir: data_dir.into(),
            max_voters: 5,
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(120), Duration::from_millis(240)),
            snapshot_every: 10_000,
            replication_timeout: Duration::from_secs(5),
        }
    }
}

/// Errors of cluster operations, by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The data directory cannot be used.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The flags or configuration are inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No leader, no quorum, or peers unreachable: retry later.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// What was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the cluster's state (e.g. a node id already in use).
    #[error("{0}")]
    Conflict(String),
    /// Raft stopped on this node.
    #[error("raft stopped on this node: {0}")]
    Fatal(String),
}

/// A committed write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteOutcome {
    /// What applying it did.
    pub result: CommandResult,
    /// Its log index.
    pub log_index: u64,
    /// The leader that committed it.
    pub leader: u64,
}

/// One member as seen by the answering node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberStatus {
    /// Node id.
    pub id: u64,
    /// Address.
    pub address: String,
    /// `leader`, `follower`, `learner`, `candidate` or `unknown`.
    pub role: String,
    /// Whether it votes.
    pub voter: bool,
    /// Entries behind the leader, when the answer comes from the leader.
    pub lag: Option<u64>,
    /// Whether the answering node reached it recently.
    pub reachable: bool,
    /// The last error reaching it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Highest log index known to be replicated to it (leader's view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_index: Option<u64>,
}

/// The cluster as seen by one node (the leader, unless asked locally).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    /// The node that answered.
    pub answered_by: u64,
    /// The leader, if known.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Highest committed log index.
    pub commit_index: u64,
    /// Highest applied log index.
    pub applied_index: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Last log index covered by a snapshot.
    pub snapshot_index: u64,
    /// Last purged log index.
    pub purged_index: u64,
    /// Members, by id.
    pub members: Vec<MemberStatus>,
}

/// This node's member of the control plane.
pub struct ClusterNode {
    config: ClusterConfig,
    raft: Raft,
    log: LogStore,
    sm: StateMachineStore,
    peers: Arc<Peers>,
    proposer: Proposer,
    membership: tokio::sync::Mutex<()>,
    heartbeats: super::reconciler::Heartbeats,
    counters: super::metrics::Counters,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `host:port` with a numeric port.
pub fn check_address(what: &str, address: &str) -> Result<(), ClusterError> {
    let ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Config(format!(
            "{what} '{address}' is not host:port (e.g. 10.0.0.5:7070 or mode-0.mode:7070)"
        )))
    }
}

impl ClusterNode {
    /// Open the data directory and start Raft. Nothing is written to a data directory that
    /// belongs to another node or is damaged.
    pub async fn open(config: ClusterConfig) -> Result<Arc<ClusterNode>, ClusterError> {
        check_address("advertise address", &config.advertise)?;
        for (id, addr) in &config.peers {
            check_address(&format!("address of peer {id}"), addr)?;
        }
        if !config.peers.is_empty() {
            match config.peers.get(&config.id) {
                None => {
                    return Err(ClusterError::Config(format!(
                        "--peers has no entry for this node (--id {}); list every member, this one included",
                        config.id
                    )))
                }
                Some(addr) if *addr != config.advertise => {
                    return Err(ClusterError::Config(format!(
                        "--peers says node {} is at {addr}, but this node advertises {}: make them agree",
                        config.id, config.advertise
                    )))
                }
                Some(_) => {}
            }
        }
        if config.join.is_some() && !config.peers.is_empty() {
            return Err(ClusterError::Config(
                "use either --peers (bootstrap) or --join, not both".into(),
            ));
        }
        if let Some(j) = &config.join {
            check_address("--join address", j)?;
        }
        let dir = config.data_dir.clone();
        let id = config.id;
        let (db, recovered) = tokio::task::spawn_blocking(move || store::open(&dir, id))
            .await
            .map_err(|e| ClusterError::Fatal(e.to_string()))??;
        let (log, sm) = store::stores(db, recovered)?;
        let (emin, emax) = config.election_timeout;
        let raft_config = openraft::Config {
            cluster_name: "mode".into(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: emin.as_millis() as u64,
            election_timeout_max: emax.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: 1000,
            max_payload_entries: 1000,
            install_snapshot_timeout: 2000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Config(e.to_string()))?;
        let peers = Arc::new(Peers::default());
        let network = Network {
            my_id: config.id,
            peers: peers.clone(),
            replication_timeout: config.replication_timeout,
        };
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            network,
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        Ok(Arc::new(ClusterNode {
            config,
            proposer: Proposer::start(raft.clone()),
            heartbeats: Default::default(),
            counters: Default::default(),
            raft,
            log,
            sm,
            peers,
            membership: tokio::sync::Mutex::new(()),
        }))
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Peer channels and health (shared with forwarding).
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    pub(crate) fn raft_service(&self) -> super::raft_server::RaftService {
        super::raft_server::RaftService {
            raft: self.raft.clone(),
        }
    }

    /// The leader this node currently knows of.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// What a combined graph built on this node is merged with: leader, term, applied index
    /// and the Raft members' addresses.
    pub fn graph_context(&self) -> crate::graph::GraphContext {
        let m = self.raft.metrics();
        let m = m.borrow();
        crate::graph::GraphContext {
            answered_by: self.config.id,
            leader: m.current_leader,
            term: m.current_term,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            members: m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
        }
    }

    /// Watch leader changes: `(leader, term)` each time either changes.
    pub fn leader_changes(
        &self,
    ) -> tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, BasicNode>> {
        self.raft.metrics()
    }

    /// Stop Raft on this node.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
    }

    // ---- bootstrap and join -------------------------------------------------------------

    /// Become part of a cluster: initialize a fresh static cluster (lowest id only), or join
    /// through `--join`; then wait for a leader up to `timeout`.
    pub async fn bootstrap(&self, timeout: Duration) -> Result<(), ClusterError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        if let Some(via) = self.config.join.clone() {
            if !initialized {
                self.join_via(&via, timeout).await?;
            }
        } else if !initialized {
            let members: BTreeMap<u64, String> = if self.config.peers.is_empty() {
                BTreeMap::from([(self.config.id, self.config.advertise.clone())])
            } else {
                self.config.peers.clone()
            };
            let lowest = members.keys().next().copied();
            if lowest == Some(self.config.id) {
                if members.len() > 1 && self.existing_cluster_among(&members).await {
                    tracing::warn!(
                        "this node's data directory is empty but its peers already form a cluster: not initializing; waiting to be caught up"
                    );
                } else {
                    let nodes: BTreeMap<u64, BasicNode> = members
                        .iter()
                        .map(|(id, a)| (*id, BasicNode::new(a)))
                        .collect();
                    match self.raft.initialize(nodes).await {
                        Ok(()) => tracing::info!(
                            "initialized a new cluster with members {:?}",
                            members.keys().collect::<Vec<_>>()
                        ),
                        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                        Err(e) => return Err(ClusterError::Fatal(e.to_string())),
                    }
                }
            }
        }
        self.wait_for_leader(timeout).await
    }

    async fn wait_for_leader(&self, timeout: Duration) -> Result<(), ClusterError> {
        let waited = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await;
        if waited.is_ok() {
            return Ok(());
        }
        let health = self.peers.health();
        let mut problems: Vec<String> = self
            .config
            .peers
            .iter()
            .filter(|(id, _)| **id != self.config.id)
            .map(
                |(id, addr)| match health.get(id).and_then(|h| h.last_error.clone()) {
                    Some(e) => format!("node {id}: {e}"),
                    None if health.get(id).is_some_and(|h| h.reachable()) => {
                        format!("node {id} at {addr}: reachable")
                    }
                    None => format!("node {id} at {addr}: never answered"),
                },
            )
            .collect();
        problems.sort();
        Err(ClusterError::Unavailable(format!(
            "no leader was elected within {timeout:?}; a quorum of peers must be reachable ({})",
            if problems.is_empty() {
                "no peers".to_string()
            } else {
                problems.join("; ")
            }
        )))
    }

    /// Whether any of `members` (other than this node) reports an initialized cluster.
    async fn existing_cluster_among(&self, members: &BTreeMap<u64, String>) -> bool {
        for (id, addr) in members {
            if *id == self.config.id {
                continue;
            }
            let Ok(channel) = self.peers.channel(addr) else {
                continue;
            };
            let mut client = ControlClient::new(channel);
            let req = ClusterStatusRequest { local: true };
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_secs(1), client.cluster_status(req)).await
            {
                if !reply.into_inner().members.is_empty() {
                    return true;
                }
            }
        }
        false
    }

    async fn join_via(&self, via: &str, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            let channel = self.peers.channel(via).map_err(ClusterError::Config)?;
            let mut client = ControlClient::new(channel);
            let req = JoinRequest {
                id: self.config.id,
                address: self.config.advertise.clone(),
            };
            match tokio::time::timeout(Duration::from_secs(30), client.join(req)).await {
                Ok(Ok(reply)) => {
                    let r = reply.into_inner();
                    tracing::info!("joined the cluster through {via}: {}", r.message);
                    return Ok(());
                }
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::AlreadyExists | tonic::Code::InvalidArgument
                    ) =>
                {
                    return Err(ClusterError::Conflict(format!(
                        "joining through {via} was refused: {}",
                        status.message()
                    )));
                }
                Ok(Err(status)) => {
                    tracing::warn!(
                        "joining through {via}: {}; retrying",
                        describe_status(via, &status)
                    )
                }
                Err(_) => tracing::warn!("joining through {via}: no answer within 30s; retrying"),
            }
            if Instant::now() + delay > deadline {
                return Err(ClusterError::Unavailable(format!(
                    "could not join through {via} within {timeout:?}: check the address and that the cluster has a leader"
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    // ---- writes and reads -------------------------------------------------------------------

    /// Commit `command` through Raft. On a follower it is forwarded to the leader (unless
    /// `may_forward` is false, for requests that were forwarded already); while there is no
    /// leader it waits for one, up to [`WRITE_TIMEOUT`].
    pub async fn write(
        &self,
        command: Command,
        may_forward: bool,
    ) -> Result<WriteOutcome, ClusterError> {
        // Only writes made for a traced request are traced: agents' reports, heartbeats and
        // events would otherwise each start a trace of their own.
        let span = if crate::telemetry::in_trace() {
            tracing::info_span!(
                target: crate::telemetry::TARGET,
                "raft.propose",
                otel.name = "raft.propose",
                op = command.op(),
                node = self.config.id,
            )
        } else {
            tracing::Span::none()
        };
        let proposal = Proposal {
            at_ms: now_ms(),
            trace: crate::telemetry::traceparent(&span),
            command,
        };
        self.write_proposal(proposal, may_forward)
            .instrument(span)
            .await
    }

    async fn write_proposal(
        &self,
        proposal: Proposal,
        may_forward: bool,
    ) -> Result<WriteOutcome, ClusterError> {
        let started = Instant::now();
        let deadline = started + WRITE_TIMEOUT;
        loop {
            match self.proposer.propose(proposal.clone()).await {
                Ok((result, log_index)) => {
                    self.counters.proposal_done(started.elapsed());
                    return Ok(WriteOutcome {
                        result,
                        log_index,
                        leader: self.config.id,
                    });
                }
                Err(Rejected::NotLeader(leader)) => {
                    if !may_forward {
                        return Err(ClusterError::Unavailable(format!(
                            "node {} is not the leader",
                            self.config.id
                        )));
                    }
                    if let Some((leader, addr)) = leader {
                        match super::forward::write(&self.peers, &addr, &proposal.command).await {
                            Ok(mut out) => {
                                out.leader = leader;
                                return Ok(out);
                            }
                            Err(ClusterError::Unavailable(e)) => {
                                tracing::debug!("forwarding to node {leader}: {e}")
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(Rejected::Invalid(e)) => return Err(ClusterError::Invalid(e)),
                Err(Rejected::Fatal(e)) => return Err(ClusterError::Fatal(e)),
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Unavailable(format!(
                    "no leader accepted the write within {WRITE_TIMEOUT:?}; is a quorum of nodes up?"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Answer a query from the replicated state. Linearizable unless `stale`: the leader
    /// confirms its leadership with a quorum first (followers forward to it).
    pub async fn read(
        &self,
        query: &str,
        stale: bool,
        may_forward: bool,
    ) -> Result<(serde_json::Value, u64), ClusterError> {
        if !stale {
            // Just after an election (or a restart) the leader may not have heard from a quorum
            // yet: wait for one, as writes do, rather than failing at once.
            let deadline = Instant::now() + WRITE_TIMEOUT;
            loop {
                let problem = match self.raft.ensure_linearizable().await {
                    Ok(_) => break,
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                        match (may_forward, f.leader_node.map(|n| n.addr)) {
                            (true, Some(addr)) => {
                                return super::forward::read(&self.peers, &addr, query).await
                            }
                            (false, _) => {
                                return Err(ClusterError::Unavailable(format!(
                                    "node {} is not the leader",
                                    self.config.id
                                )))
                            }
                            (true, None) => format!("node {} knows no leader yet", self.config.id),
                        }
                    }
                    Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                        e.to_string()
                    }
                    Err(RaftError::Fatal(e)) => return Err(ClusterError::Fatal(e.to_string())),
                };
                if Instant::now() >= deadline {
                    return Err(ClusterError::Unavailable(problem));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.sm.read(|a| {
            let applied = a.last_applied.map(|l| l.index).unwrap_or(0);
            a.state
                .query(query)
                .map(|v| (v, applied))
                .map_err(|e| match e {
                    QueryError::NotFound(m) => ClusterError::NotFound(m),
                    QueryError::Unknown(m) => ClusterError::Invalid(m),
                })
        })
    }

    /// Count a leadership change seen by this node (for `/metrics`).
    pub fn note_leader_change(&self) {
        self.counters
            .leader_changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Ready to serve: a member of a cluster with a leader, and caught up with the commit index.
    pub fn readiness(&self) -> Result<(), String> {
        let m = self.raft.metrics().borrow().clone();
        let member = m
            .membership_config
            .membership()
            .get_node(&self.config.id)
            .is_some();
        if !member {
            return Err(format!(
                "node {} is not a member of a cluster yet",
                self.config.id
            ));
        }
        if m.current_leader.is_none() {
            return Err("no leader".to_string());
        }
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let committed = self.log.committed_index();
        if applied + 100 < committed {
            return Err(format!("catching up: applied {applied} of {committed}"));
        }
        Ok(())
    }

    /// The node's metrics in Prometheus text format.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering;
        let m = self.raft.metrics().borrow().clone();
        let id = self.config.id;
        let l = format!("node=\"{id}\"");
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{l}}} {value}"
            );
        };
        gauge(
            "mode_raft_term",
            "Current Raft term.",
            "gauge",
            m.current_term as f64,
        );
        gauge(
            "mode_raft_leader",
            "Id of the leader this node knows (0: none).",
            "gauge",
            m.current_leader.unwrap_or(0) as f64,
        );
        gauge(
            "mode_raft_is_leader",
            "1 if this node leads.",
            "gauge",
            f64::from(u8::from(m.current_leader == Some(id))),
        );
        gauge(
            "mode_raft_commit_index",
            "Highest committed log index.",
            "gauge",
            self.log.committed_index() as f64,
        );
        gauge(
            "mode_raft_applied_index",
            "Highest applied log index.",
            "gauge",
            m.last_applied.map(|x| x.index).unwrap_or(0) as f64,
        );
        gauge(
            "mode_raft_last_log_index",
            "Last log index.",
            "gauge",
            m.last_log_index.unwrap_or(0) as f64,
        );
        gauge(
            "mode_raft_leader_changes_total",
            "Leadership changes seen by this node.",
            "counter",
            self.counters.leader_changes.load(Ordering::Relaxed) as f64,
        );
        gauge(
            "mode_raft_proposals_total",
            "Writes committed through this node.",
            "counter",
            self.counters.proposals.load(Ordering::Relaxed) as f64,
        );
        let _ = writeln!(out, "# HELP mode_raft_proposal_duration_seconds Time from a write's arrival to its commit.\n# TYPE mode_raft_proposal_duration_seconds histogram");
        self.counters
            .latency_histogram("mode_raft_proposal_duration_seconds", &l, &mut out);
        let (by_state, restarts, placements, nodes) = self.local_state(|s| {
            let mut by_state: std::collections::BTreeMap<String, u64> = Default::default();
            let mut restarts = 0u64;
            let mut placements = 0u64;
            for slots in s.placements.values() {
                for p in slots.values() {
                    placements += 1;
                    if p.node == id {
                        *by_state.entry(p.state.clone()).or_default() += 1;
                        restarts += u64::from(p.restart_count);
                    }
                }
            }
            let mut nodes: std::collections::BTreeMap<String, u64> = Default::default();
            for n in s.nodes.values() {
                *nodes
                    .entry(format!("{:?}", n.status).to_lowercase())
                    .or_default() += 1;
            }
            (by_state, restarts, placements, nodes)
        });
        let _ = writeln!(out, "# HELP mode_instances Instances placed on this node, by reported state.\n# TYPE mode_instances gauge");
        for (state, n) in by_state {
            let _ = writeln!(out, "mode_instances{{{l},state=\"{state}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP mode_instance_restarts Local restarts of the instances on this node.\n# TYPE mode_instance_restarts gauge\nmode_instance_restarts{{{l}}} {restarts}");
        let _ = writeln!(out, "# HELP mode_placements Instances placed in the whole cluster.\n# TYPE mode_placements gauge\nmode_placements{{{l}}} {placements}");
        let _ = writeln!(
            out,
            "# HELP mode_nodes Cluster nodes by status.\n# TYPE mode_nodes gauge"
        );
        for (status, n) in nodes {
            let _ = writeln!(out, "mode_nodes{{{l},status=\"{status}\"}} {n}");
        }
        if m.current_leader == Some(id) {
            let _ = writeln!(out, "# HELP mode_heartbeat_age_seconds Time since each node's last heartbeat (leader only).\n# TYPE mode_heartbeat_age_seconds gauge");
            for (peer, age) in self.heartbeats.ages() {
                let _ = writeln!(
                    out,
                    "mode_heartbeat_age_seconds{{{l},peer=\"{peer}\"}} {}",
                    age.as_secs_f64()
                );
            }
        }
        out
    }

    /// The last log index applied to the local state.
    pub fn applied_index(&self) -> u64 {
        self.sm
            .read(|a| a.last_applied.map(|l| l.index).unwrap_or(0))
    }

    /// Read the local replicated state directly (no Raft round trip).
    pub fn local_state<T>(&self, f: impl FnOnce(&super::state::ClusterState) -> T) -> T {
        self.sm.read(|a| f(&a.state))
    }

    // ---- status -------------------------------------------------------------------------------

    /// The cluster's status. Unless `local`, a follower asks the leader (which knows every
    /// member's lag), falling back to its own view when the leader does not answer.
    pub async fn status(&self, local: bool, may_forward: bool) -> ClusterStatus {
        let leader_addr = {
            let m = self.raft.metrics();
            let m = m.borrow();
            match m.current_leader {
                Some(l) if l != self.config.id => m
                    .membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone()),
                _ => None,
            }
        };
        if !local && may_forward {
            if let Some(addr) = leader_addr {
                match super::forward::status(&self.peers, &addr).await {
                    Ok(s) => return s,
                    Err(e) => {
                        tracing::debug!("status from the leader at {addr}: {e}; answering locally")
                    }
                }
            }
        }
        self.local_status()
    }

    fn local_status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let health = self.peers.health();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let last_log = m.last_log_index.unwrap_or(0);
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let voter = voters.contains(id);
                let role = if Some(*id) == m.current_leader {
                    "leader"
                } else if !voter {
                    "learner"
                } else if *id == self.config.id {
                    match m.state {
                        ServerState::Candidate => "candidate",
                        ServerState::Follower => "follower",
                        _ => "unknown",
                    }
                } else if m.current_leader.is_some() {
                    "follower"
                } else {
                    "unknown"
                };
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned())
                    .map(|l| l.map(|l| l.index).unwrap_or(0));
                let matched = if *id == self.config.id && m.replication.is_some() {
                    Some(last_log)
                } else {
                    matched
                };
                let h = health.get(id);
                MemberStatus {
                    id: *id,
                    address: node.addr.clone(),
                    role: role.to_string(),
                    voter,
                    lag: matched.map(|x| last_log.saturating_sub(x)),
                    reachable: *id == self.config.id || h.is_some_and(|h| h.reachable()),
                    last_error: h.and_then(|h| h.last_error.clone()),
                    matched_index: matched,
                }
            })
            .collect();
        ClusterStatus {
            answered_by: self.config.id,
            leader: m.current_leader,
            term: m.current_term,
            commit_index: self.log.committed_index(),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: last_log,
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            members,
        }
    }

    // ---- membership ---------------------------------------------------------------------------

    fn leader_address(&self) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    pub(crate) fn heartbeats(&self) -> &super::reconciler::Heartbeats {
        &self.heartbeats
    }

    /// Record a heartbeat from `node` on the leader (forwarded there from a follower).
    /// Returns the leader's id.
    pub async fn heartbeat(&self, node: u64, may_forward: bool) -> Result<u64, ClusterError> {
        if self.is_leader() {
            if node == self.config.id {
                // The leader's own agent must not keep its lease on a stale leadership: confirm
                // that a quorum still follows.
                let confirmed = tokio::time::timeout(
                    Duration::from_millis(500),
                    self.raft.ensure_linearizable(),
                )
                .await;
                if !matches!(confirmed, Ok(Ok(_))) {
                    return Err(ClusterError::Unavailable(
                        "leadership not confirmed by a quorum".into(),
                    ));
                }
            }
            self.heartbeats.record(node);
            return Ok(self.config.id);
        }
        match (may_forward, self.leader_address(), self.leader()) {
            (true, Some(addr), Some(leader)) => {
                super::forward::heartbeat(&self.peers, &addr, node).await?;
                Ok(leader)
            }
            _ => Err(ClusterError::Unavailable(
                "no leader to take the heartbeat".into(),
            )),
        }
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.config.id)
    }

    /// Add node `id` at `address` as a learner, then promote it to voter while the cluster
    /// has fewer than `max_voters`. Idempotent for a node already a member at that address.
    /// Returns whether it is a voter.
    pub async fn join_member(
        &self,
        id: u64,
        address: &str,
        may_forward: bool,
    ) -> Result<(bool, String), ClusterError> {
        check_address("joining node's address", address)
            .map_err(|e| ClusterError::Invalid(e.to_string()))?;
        if !self.is_leader() {
            return match (may_forward, self.leader_address()) {
                (true, Some(addr)) => super::forward::join(&self.peers, &addr, id, address).await,
                _ => Err(ClusterError::Unavailable(
                    "no leader to take the join; retry".into(),
                )),
            };
        }
        // One membership change at a time.
        let _one_at_a_time = self.membership.lock().await;
        let (existing, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (
                membership.get_node(&id).map(|n| n.addr.clone()),
                membership.voter_ids().collect::<BTreeSet<u64>>(),
            )
        };
        match &existing {
            Some(addr) if addr != address => {
                return Err(ClusterError::Conflict(format!(
                    "node id {id} is already a member at {addr}; start the new node with another --id (or remove node {id} first)"
                )))
            }
            Some(_) if voters.contains(&id) => return Ok((true, format!("node {id} is already a voter"))),
            Some(_) => {}
            None => {
                self.raft
                    .add_learner(id, BasicNode::new(address), true)
                    .await
                    .map_err(|e| ClusterError::Unavailable(format!("adding node {id} as a learner: {e}")))?;
                tracing::info!("node {id} at {address} joined as a learner");
                self.record(format!("node {id} at {address} joined as a learner"), "node-joined", id).await;
            }
        }
        if voters.len() >= self.config.max_voters {
            return Ok((
                false,
                format!(
                    "node {id} is a learner ({} voters is the maximum)",
                    self.config.max_voters
                ),
            ));
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| ClusterError::Unavailable(format!("promoting node {id} to voter: {e}")))?;
        tracing::info!("node {id} promoted to voter");
        self.record(format!("node {id} promoted to voter"), "node-promoted", id)
            .await;
        Ok((true, format!("node {id} is a voter")))
    }

    /// Best-effort event about membership.
    async fn record(&self, message: String, kind: &str, node: u64) {
        let event = Command::RecordEvent {
            kind: kind.to_string(),
            message,
            service: None,
            node: Some(node),
        };
        if let Err(e) = self.write(event, false).await {
            tracing::debug!("recording a membership event: {e}");
        }
    }

    /// Remove node `id` from the membership and the node table.
    pub async fn remove_member(&self, id: u64, may_forward: bool) -> Result<String, ClusterError> {
        if !self.is_leader() {
            return match (may_forward, self.leader_address()) {
                (true, Some(addr)) => super::forward::remove(&self.peers, &addr, id).await,
                _ => Err(ClusterError::Unavailable(
                    "no leader to take the removal; retry".into(),
                )),
            };
        }
        let _one_at_a_time = self.membership.lock().await;
        let (present, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (
                membership.get_node(&id).is_some(),
                membership.voter_ids().collect::<BTreeSet<u64>>(),
            )
        };
        if !present {
            return Err(ClusterError::NotFound(format!(
                "node {id} is not a member of this cluster"
            )));
        }
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ClusterError::Conflict(format!(
                    "node {id} is the last voter; a cluster cannot remove its last voter"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| ClusterError::Unavailable(format!("removing node {id}: {e}")))?;
        drop(_one_at_a_time);
        if let Err(e) = self.write(Command::RemoveNode { id }, true).await {
            tracing::debug!("node table: {e}");
        }
        Ok(format!("node {id} removed"))
    }

    /// Build a snapshot of the current state and purge the log it covers.
    pub async fn compact(&self) -> Result<(u64, u64), ClusterError> {
        let applied = self.raft.metrics().borrow().last_applied;
        let fatal = |e: openraft::error::Fatal<u64>| ClusterError::Fatal(e.to_string());
        self.raft.trigger().snapshot().await.map_err(fatal)?;
        let target = applied.map(|l| l.index).unwrap_or(0);
        let m = self
            .raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.snapshot.map(|s| s.index).unwrap_or(0) >= target,
                "snapshot",
            )
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        let snap = m.snapshot.map(|s| s.index).unwrap_or(0);
        self.raft.trigger().purge_log(snap).await.map_err(fatal)?;
        let m = self
            .raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(|m| m.purged.map(|p| p.index).unwrap_or(0) >= snap, "purge")
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok((snap, m.purged.map(|p| p.index).unwrap_or(0)))
    }
}
