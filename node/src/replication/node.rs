//! `ClusterNode`: this node's member of the control plane — open the data directory, run
//! Raft, bootstrap or join, and serve writes (forwarded to the leader), linearizable or stale
//! reads, status and membership changes in domain terms.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mode_proto::v1::peer_client::PeerClient;
use mode_proto::v1::{ClusterStatusRequest, JoinRequest};
use openraft::error::{CheckIsLeaderError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use super::network::{describe_status, Network, Peers};
use super::proposer::{Proposer, Rejected};
use super::store::{self, DataDirError, LogStore, StateMachineStore};
use super::types::Raft;
use crate::model::state::{Command, CommandResult, Proposal, QueryError};

/// How long a write waits for a leader before reporting the cluster unavailable.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC metadata key marking a request forwarded by another node (never forwarded again).
pub const FORWARDED: &str = "x-mode-forwarded";

/// The gRPC metadata key carrying a write's request id (deduplicated by the state machine).
pub const REQUEST_ID: &str = "x-mode-request-id";

/// The longest request id accepted.
pub const MAX_REQUEST_ID: usize = 128;

/// A singleton lease granted by the leader with a heartbeat's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseGrant {
    /// The leader that answered.
    pub leader: u64,
    /// How long the lease lasts, counted from when the heartbeat was sent; zero: not granted.
    pub lease: Duration,
    /// The leader's commit index at the grant: placements are acted on only once the local
    /// replica has applied this much.
    pub index: u64,
}

/// When the leader last heard from a quorum, from openraft's metrics (which say how long ago,
/// each time they are published). Kept as an instant so that metrics that stop being
/// published make the quorum look older, never fresher.
#[derive(Default)]
struct QuorumClock {
    acked: std::sync::Mutex<Option<Instant>>,
    /// The term and start of the last heartbeat round a client's write or read confirmed
    /// leadership with (openraft's metrics may show it later than the caller needs it).
    confirmed: std::sync::Mutex<Option<(u64, Instant)>>,
    /// One confirmation round at a time: thousands of agents' writes arriving while the
    /// leader has not heard from a quorum for a moment must not each send a heartbeat round
    /// to every follower (that storm itself kept the leader from hearing from its quorum).
    confirming: tokio::sync::Mutex<()>,
}

impl QuorumClock {
    /// Since a quorum last acknowledged this leader in `term`.
    fn age(&self, term: u64) -> Option<Duration> {
        let acked = *crate::service::lock(&self.acked);
        let confirmed = crate::service::lock(&self.confirmed)
            .filter(|(t, _)| *t == term)
            .map(|(_, at)| at);
        acked.max(confirmed).map(|t| t.elapsed())
    }

    fn confirmed_at(&self, term: u64, at: Instant) {
        let mut c = crate::service::lock(&self.confirmed);
        if c.is_none_or(|(t, old)| t != term || old < at) {
            *c = Some((term, at));
        }
    }

    fn watch(self: Arc<Self>, raft: Raft) {
        tokio::spawn(async move {
            let mut metrics = raft.metrics();
            loop {
                let acked = {
                    let m = metrics.borrow_and_update();
                    match (m.state, m.millis_since_quorum_ack) {
                        (ServerState::Leader, Some(ms)) => {
                            Instant::now().checked_sub(Duration::from_millis(ms))
                        }
                        _ => None,
                    }
                };
                *crate::service::lock(&self.acked) = acked;
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A fresh request id: this node's id, the time and a random part.
pub(crate) fn new_request_id(node: u64) -> String {
    format!("n{node}-{:x}-{:x}", now_ms(), store::random_u64())
}

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
    /// Join an existing cluster through the first of these that answers (a node listed in
    /// no `--peers`, started with `--join-if-new`: a StatefulSet scaled past its first size).
    pub join_seeds: Vec<String>,
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
    /// The singleton lease the leader grants with each heartbeat answer (see
    /// [`ClusterConfig::check_timings`]).
    pub lease: Duration,
    /// A node whose data directory is new comes back as a new learner, replacing the member
    /// of the same id whose data was lost.
    pub rejoin: bool,
    /// How long an AppendEntries carrying entries may take (a large entry, a slow fsync);
    /// openraft's own timeout is one heartbeat, which is kept for heartbeats.
    pub replication_timeout: Duration,
    /// TLS for calls to other nodes (None: plaintext).
    pub tls: Option<crate::security::tls::ClientTls>,
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
            join_seeds: Vec::new(),
            data_dir: data_dir.into(),
            max_voters: 5,
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(120), Duration::from_millis(240)),
            snapshot_every: 10_000,
            lease: Duration::from_millis(900),
            rejoin: false,
            replication_timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    /// Whether this node joins a cluster (rather than bootstrapping one with its peers).
    pub fn joins(&self) -> bool {
        self.join.is_some() || !self.join_seeds.is_empty()
    }

    /// Check that a singleton lease cannot outlive the moment a rival leader may move its
    /// instance. A lease of `L` is granted by a leader that heard from a quorum at most `Q`
    /// (the check-quorum window: the maximum election timeout, `E`) ago, and counts from
    /// the heartbeat's sending. A rival cannot be elected before `E` after that quorum heard
    /// from the old leader (followers refuse votes for `E`), and marks the node down only
    /// after a full heartbeat grace `G` of its own. So `L + Q < E + G`, i.e. `L < G`, with a
    /// margin `M` for killing the processes: `L + M <= G`.
    pub fn check_timings(&self, grace: Duration) -> Result<(), String> {
        const MARGIN: Duration = Duration::from_millis(300);
        let (_, emax) = self.election_timeout;
        if self.lease.is_zero() {
            return Err("the singleton lease must be longer than zero".into());
        }
        if self.lease + self.election_timeout.1 + MARGIN > emax + grace {
            return Err(format!(
                "a singleton lease of {:?} does not fit in the heartbeat grace of {grace:?}: it must be at most the grace minus {MARGIN:?} (a longer --heartbeat-grace gives a longer lease)",
                self.lease
            ));
        }
        Ok(())
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
    heartbeats: super::heartbeats::Heartbeats,
    counters: super::metrics::Counters,
    incarnation: u64,
    quorum: Arc<QuorumClock>,
    /// Why peers refuse to talk to this node as the member it claims to be (its data
    /// directory was wiped), once one has said so.
    refused: Refusal,
    contact: super::election::LeaderContact,
    snapshot_chunks: Arc<super::raft_server::SnapshotChunks>,
    /// The last applied log index, published each time it changes (watchers wake on applies
    /// only, not on every Raft metrics update).
    applied: tokio::sync::watch::Receiver<u64>,
    relay: Arc<HeartbeatRelay>,
}

/// Why a heartbeat or report of `node` from data directory `incarnation` is refused, if it is:
/// the node table knows another incarnation (a duplicate id, or a wiped data directory).
fn incarnation_conflict(
    directory: &super::store::NodeDirectory,
    node: u64,
    incarnation: u64,
) -> Option<String> {
    match directory.incarnation(node) {
        k if k != 0 && incarnation != 0 && k != incarnation => Some(format!(
            "node {node} is registered with data-directory incarnation {k:016x}, but this comes from {incarnation:016x}: another node uses id {node}, or its data directory was wiped (give it a new --id, or remove the old node with `modectl node rm {node}`)"
        )),
        _ => None,
    }
}

/// How long a heartbeat relayed to the leader waits for its answer, when the caller gives no
/// deadline.
const RELAY_WAIT: Duration = Duration::from_millis(1500);

/// Agents' heartbeats waiting to be relayed to the leader.
#[derive(Default)]
struct HeartbeatRelay {
    #[allow(clippy::type_complexity)]
    queue: std::sync::Mutex<
        Vec<(
            u64,
            u64,
            tokio::sync::oneshot::Sender<Result<LeaseGrant, ClusterError>>,
        )>,
    >,
    wake: tokio::sync::Notify,
}

/// Publish the applied index from Raft's metrics (which change for many other reasons).
fn watch_applied(raft: &Raft) -> tokio::sync::watch::Receiver<u64> {
    let mut metrics = raft.metrics();
    let first = metrics.borrow().last_applied.map_or(0, |l| l.index);
    let (tx, rx) = tokio::sync::watch::channel(first);
    tokio::spawn(async move {
        loop {
            let applied = metrics
                .borrow_and_update()
                .last_applied
                .map_or(0, |l| l.index);
            tx.send_if_modified(|v| std::mem::replace(v, applied) != applied);
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

/// Why this node is refused by its peers (shared with the Raft transport).
pub(crate) type Refusal = Arc<std::sync::Mutex<Option<String>>>;

/// The wall clock in ms since the Unix epoch (the clock events and reports are stamped with).
pub fn now_ms() -> u64 {
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
                        "--peers has no entry for this node (--id {}); list every member, this one included (or, for a node added after them, give --join-if-new)",
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
        let incarnation = recovered.incarnation;
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
            // Elections are driven by `election::drive`, after a pre-vote.
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Config(e.to_string()))?;
        let peers = Arc::new(Peers::new(config.tls.clone()));
        let refused: Refusal = Default::default();
        let network = Network {
            my_id: config.id,
            incarnation,
            peers: peers.clone(),
            sm: sm.clone(),
            refused: refused.clone(),
            replication_timeout: config.replication_timeout,
        };
        let network_for_elections = network.clone();
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            network,
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        let quorum = Arc::new(QuorumClock::default());
        quorum.clone().watch(raft.clone());
        let contact = super::election::LeaderContact::default();
        {
            let reader = sm.clone();
            tokio::spawn(
                sm.views
                    .clone()
                    .run_sender(move |f| reader.read(|a| f(&a.state))),
            );
        }
        super::election::drive(
            raft.clone(),
            network_for_elections,
            contact.clone(),
            config.election_timeout,
        );
        let applied = watch_applied(&raft);
        let relay = Arc::new(HeartbeatRelay::default());
        let node = Arc::new(ClusterNode {
            relay: relay.clone(),
            applied,
            config,
            proposer: Proposer::start(raft.clone()),
            heartbeats: Default::default(),
            counters: Default::default(),
            raft,
            log,
            sm,
            peers,
            membership: tokio::sync::Mutex::new(()),
            incarnation,
            quorum,
            refused,
            contact,
            snapshot_chunks: Default::default(),
        });
        ClusterNode::relay_heartbeats(Arc::downgrade(&node), relay);
        Ok(node)
    }

    /// This data directory's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// How long ago a quorum last acknowledged this node's leadership; `None` unless it
    /// leads (and has heard from a quorum since it was elected).
    pub fn quorum_age(&self) -> Option<Duration> {
        if !self.is_leader() {
            return None;
        }
        self.quorum.age(self.raft.metrics().borrow().current_term)
    }

    /// After this long without hearing from a quorum, a leader stops serving clients and
    /// granting leases: a rival may be elected once the followers' leader lease (the maximum
    /// election timeout) has run out.
    pub fn check_quorum_window(&self) -> Duration {
        self.config.election_timeout.1
    }

    /// Whether this node leads and heard from a quorum within the check-quorum window.
    fn leads_with_quorum(&self) -> bool {
        self.quorum_age()
            .is_some_and(|age| age <= self.check_quorum_window())
    }

    /// Check-quorum for clients: a leader that has not heard from a quorum within the window
    /// confirms once (a heartbeat round, bounded) before it takes a write; `Err` says why not.
    async fn confirm_quorum(&self) -> Result<(), String> {
        if self.leads_with_quorum() {
            return Ok(());
        }
        let window = self.check_quorum_window();
        // A heartbeat round through Raft, or the peers' keep-alive answers: behind megabytes
        // of entries in flight, Raft's own round can take longer than the window while the
        // keep-alives still show a quorum following this leader.
        let heard_again = async {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if self.leads_with_quorum() {
                    return;
                }
            }
        };
        let term = self.raft.metrics().borrow().current_term;
        let confirmed = tokio::time::timeout(window, async {
            // One round at a time; the other callers wait for its outcome (or the keep-alives).
            let Ok(_round) = self.quorum.confirming.try_lock() else {
                heard_again.await;
                return true;
            };
            let started = Instant::now();
            tokio::select! {
                r = self.raft.ensure_linearizable() => {
                    if r.is_ok() {
                        self.quorum.confirmed_at(term, started);
                    }
                    r.is_ok()
                }
                () = heard_again => true,
            }
        })
        .await;
        match confirmed {
            Ok(true) => Ok(()),
            _ => Err(format!(
                "node {} leads term {} but has not heard from a quorum for {} ms",
                self.config.id,
                self.raft.metrics().borrow().current_term,
                self.quorum
                    .age(term)
                    .map_or("ever".to_string(), |a| a.as_millis().to_string())
            )),
        }
    }

    /// Whether a majority of the voters this node knows refused to vote for it because it is
    /// not a member (it was removed but never learnt it).
    pub fn removed_by_peers(&self) -> bool {
        let voters: BTreeSet<u64> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let refused = self.peers.refused_membership();
        !voters.is_empty() && refused.intersection(&voters).count() * 2 > voters.len()
    }

    /// Why peers refuse this node, if one did.
    pub fn refusal(&self) -> Option<String> {
        crate::service::lock(&self.refused).clone()
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
            me: self.config.id,
            incarnation: self.incarnation,
            sm: self.sm.clone(),
            refused: self.refused.clone(),
            pre_voter: super::election::PreVoter {
                raft: self.raft.clone(),
                contact: self.contact.clone(),
                lease: self.config.election_timeout.1,
            },
            snapshot_chunks: self.snapshot_chunks.clone(),
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
        let me = self.config.id;
        let is_member = |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
            m.membership_config.membership().get_node(&me).is_some()
        };
        let mut member = is_member(&self.raft.metrics().borrow());
        if initialized && !member && self.config.join.is_none() {
            // A fresh member of a static cluster is initialized by the first entries the
            // leader sends it, a moment before its metrics show their membership: give
            // them that moment before calling it removed.
            member = self
                .raft
                .wait(Some(Duration::from_secs(2)))
                .metrics(is_member, "this node in the membership")
                .await
                .is_ok();
        }
        if initialized && !member && self.config.join.is_none() {
            return Err(ClusterError::Conflict(format!(
                "node {} is not a member of the cluster recorded in its data directory: it was removed. Move the data directory away and start it with --join to add it again",
                self.config.id
            )));
        }
        if let Some(via) = self.config.join.clone() {
            if !initialized {
                self.join_via(&via, timeout).await?;
            }
        } else if !initialized && (self.config.rejoin || !self.config.join_seeds.is_empty()) {
            // A member whose data was lost comes back through any other member; a new node
            // joins through any of its seeds.
            let others: Vec<String> = if self.config.join_seeds.is_empty() {
                self.config
                    .peers
                    .iter()
                    .filter(|(id, _)| **id != self.config.id)
                    .map(|(_, a)| a.clone())
                    .collect()
            } else {
                self.config.join_seeds.clone()
            };
            let Some(first) = others.first() else {
                return Err(ClusterError::Config(
                    "--rejoin needs --peers (the other members) or --join".into(),
                ));
            };
            let each = timeout / others.len().max(1) as u32;
            let mut joined = Err(ClusterError::Unavailable(format!(
                "no member at {first} answered"
            )));
            for via in &others {
                joined = self.join_via(via, each).await;
                if joined.is_ok() || matches!(joined, Err(ClusterError::Conflict(_))) {
                    break;
                }
            }
            joined?;
            // Refusals seen before the member was replaced are over.
            crate::service::lock(&self.refused).take();
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
        let deadline = Instant::now() + timeout;
        let waited = loop {
            // With --rejoin the refusal is what the rejoin repairs: keep waiting.
            if let Some(why) = self.refusal().filter(|_| !self.config.rejoin) {
                return Err(ClusterError::Conflict(why));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let step = left.min(Duration::from_millis(200));
            let w = self
                .raft
                .wait(Some(step))
                .metrics(|m| m.current_leader.is_some(), "a leader")
                .await;
            if w.is_ok() || left <= step {
                break w;
            }
        };
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
            let mut client = PeerClient::new(channel);
            let req = ClusterStatusRequest { local: true };
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_secs(1), client.member_status(req)).await
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
            let mut client = PeerClient::new(channel);
            let req = JoinRequest {
                id: self.config.id,
                address: self.config.advertise.clone(),
                incarnation: self.incarnation,
                rejoin: self.config.rejoin,
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
        self.write_request(command, may_forward, None, None).await
    }

    /// [`ClusterNode::write`] of a client request: the state machine applies a request id
    /// once, whoever retries or forwards it. Without an id (and unless already forwarded),
    /// this node makes one, so its own forwarding retries cannot apply it twice.
    pub async fn write_request(
        &self,
        command: Command,
        may_forward: bool,
        request_id: Option<String>,
        by: Option<String>,
    ) -> Result<WriteOutcome, ClusterError> {
        if let Some(id) = &request_id {
            if id.len() > MAX_REQUEST_ID {
                return Err(ClusterError::Invalid(format!(
                    "request id is {} bytes; the limit is {MAX_REQUEST_ID}",
                    id.len()
                )));
            }
        }
        let request_id = match request_id {
            Some(id) => Some(id),
            None if may_forward => Some(new_request_id(self.config.id)),
            None => None,
        };
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
            request_id,
            by,
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
        // Whether some node may have taken the write (then a failure's outcome is unknown).
        let mut maybe_taken = false;
        let mut last_problem;
        loop {
            if self.is_leader() {
                if let Err(why) = self.confirm_quorum().await {
                    // Check-quorum: a leader cut off from its quorum does not take writes (a
                    // rival may lead already); it fails fast instead of waiting.
                    return Err(ClusterError::Unavailable(unknown_or_not_made(
                        maybe_taken,
                        &why,
                    )));
                }
                maybe_taken = true;
                let committed = tokio::select! {
                    committed = self.proposer.propose(proposal.clone()) => committed,
                    why = self.quorum_lost() => {
                        return Err(ClusterError::Unavailable(format!(
                            "outcome unknown: {why} while committing the write; it may still be applied if this node regains its quorum. Check the state (e.g. `modectl svc get`), or retry: a retry with the same request id applies once"
                        )));
                    }
                };
                match committed {
                    Ok((result, log_index)) => {
                        self.counters.proposal_done(started.elapsed());
                        return Ok(WriteOutcome {
                            result,
                            log_index,
                            leader: self.config.id,
                        });
                    }
                    Err(Rejected::NotLeader) => {
                        last_problem = format!("node {} lost its leadership", self.config.id);
                    }
                    Err(Rejected::Invalid(e)) => return Err(ClusterError::Invalid(e)),
                    Err(Rejected::Fatal(e)) => return Err(ClusterError::Fatal(e)),
                }
            } else if !may_forward {
                return Err(ClusterError::Unavailable(format!(
                    "node {} is not the leader",
                    self.config.id
                )));
            } else if let Some((leader, addr)) = self.leader_with_address() {
                match super::forward::write(&self.peers, &addr, &proposal).await {
                    Ok(mut out) => {
                        out.leader = leader;
                        return Ok(out);
                    }
                    Err(super::forward::Forwarded::NotSent(e)) => {
                        tracing::debug!("forwarding to node {leader}: {e}");
                        last_problem = e;
                    }
                    Err(super::forward::Forwarded::MaybeSent(e)) => {
                        tracing::debug!("forwarding to node {leader}: {e}");
                        maybe_taken = true;
                        last_problem = e;
                    }
                    Err(super::forward::Forwarded::Answer(e)) => return Err(e),
                }
            } else {
                last_problem = format!("node {} knows no leader", self.config.id);
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Unavailable(unknown_or_not_made(
                    maybe_taken,
                    &format!(
                        "no leader accepted the write within {WRITE_TIMEOUT:?} ({last_problem}); is a quorum of nodes up?"
                    ),
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Resolves once this node, leading, has not heard from a quorum for the check-quorum
    /// window (or no longer leads); says which.
    async fn quorum_lost(&self) -> String {
        loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if !self.is_leader() {
                return format!("node {} lost its leadership", self.config.id);
            }
            if !self.leads_with_quorum() {
                if let Err(why) = self.confirm_quorum().await {
                    return why;
                }
            }
        }
    }

    /// The leader and its address, when known and not this node.
    fn leader_with_address(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let leader = m.current_leader.filter(|l| *l != self.config.id)?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| (leader, n.addr.clone()))
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

    /// Whether node `id` is a member (voter or learner) of the Raft group as this node sees it.
    pub fn is_raft_member(&self, id: u64) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some()
    }

    /// Ready to serve: a member of a cluster with a leader, and caught up with the commit index.
    pub fn readiness(&self) -> Result<(), String> {
        let m = self.raft.metrics().borrow().clone();
        if let Err(e) = &m.running_state {
            return Err(format!("Raft stopped on this node: {e}"));
        }
        if let Some(why) = self.refusal() {
            return Err(why);
        }
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

    /// This node's Raft metrics in Prometheus text format (`/metrics` adds the cluster's state,
    /// the process and the gRPC servers: [`crate::api::metrics`]).
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
            "The Raft term this node is in.",
            "gauge",
            m.current_term as f64,
        );
        gauge(
            "mode_raft_leader",
            "Id of the leader this node follows (0: it knows none).",
            "gauge",
            m.current_leader.unwrap_or(0) as f64,
        );
        gauge(
            "mode_raft_is_leader",
            "1 if this node is the Raft leader, else 0.",
            "gauge",
            f64::from(u8::from(m.current_leader == Some(id))),
        );
        gauge(
            "mode_raft_commit_index",
            "Highest Raft log index this node knows to be committed.",
            "gauge",
            self.log.committed_index() as f64,
        );
        gauge(
            "mode_raft_applied_index",
            "Highest Raft log index this node has applied to its state.",
            "gauge",
            m.last_applied.map(|x| x.index).unwrap_or(0) as f64,
        );
        gauge(
            "mode_raft_last_log_index",
            "Index of the last entry in this node's Raft log.",
            "gauge",
            m.last_log_index.unwrap_or(0) as f64,
        );
        gauge(
            "mode_raft_leader_changes_total",
            "Changes of Raft leader this node has seen since it started.",
            "counter",
            self.counters.leader_changes.load(Ordering::Relaxed) as f64,
        );
        gauge(
            "mode_raft_proposals_total",
            "Writes (Raft proposals) this node proposed as leader and saw committed, since it started.",
            "counter",
            self.counters.proposals.load(Ordering::Relaxed) as f64,
        );
        let _ = writeln!(out, "# HELP mode_raft_proposal_duration_seconds Seconds from a write's arrival at the leader to its commit.\n# TYPE mode_raft_proposal_duration_seconds histogram");
        self.counters
            .latency_histogram("mode_raft_proposal_duration_seconds", &l, &mut out);
        if m.current_leader == Some(id) {
            let _ = writeln!(out, "# HELP mode_heartbeat_age_seconds Seconds since the leader last heard from each member node (peer), on the leader only.\n# TYPE mode_heartbeat_age_seconds gauge");
            // Only current members: a removed node's series goes with it.
            let members: std::collections::BTreeSet<u64> =
                self.local_state(|s| s.nodes.keys().copied().collect());
            for (peer, age) in self
                .heartbeats
                .ages()
                .into_iter()
                .filter(|(peer, _)| members.contains(peer))
            {
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

    /// Counts the applied entries that may change the leader's placement plan: the control
    /// loop plans again only when it moves (a deploy's thousands of instance reports do not
    /// make it re-plan a million placements each time).
    pub fn plan_changes(&self) -> u64 {
        self.sm.views.plan_changes()
    }

    /// The applied log index as it changes: `changed()` wakes after each apply (cheap for
    /// many watchers: nothing else wakes them).
    pub fn applied_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.clone()
    }

    /// A read barrier: once it returns, the local replica reflects every write committed
    /// before it was called (linearizable reads from any server). The leader confirms its
    /// leadership with a quorum; a follower asks the leader for its applied index and waits
    /// until it has applied as much. With `stale`, returns at once. Returns the local applied
    /// index.
    pub async fn read_barrier(&self, stale: bool) -> Result<u64, ClusterError> {
        if stale {
            return Ok(self.applied_index());
        }
        let (_, index) = self.read("index", false, true).await?;
        if self.applied_index() >= index {
            return Ok(self.applied_index());
        }
        self.raft
            .wait(Some(WRITE_TIMEOUT))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| {
                ClusterError::Unavailable(format!(
                    "node {} did not catch up with the leader's applied index {index} within {WRITE_TIMEOUT:?}: {e}; retry, or ask another server",
                    self.config.id
                ))
            })?;
        Ok(self.applied_index())
    }

    /// Read the local replicated state directly (no Raft round trip).
    #[track_caller]
    pub fn local_state<T>(&self, f: impl FnOnce(&crate::model::state::ClusterState) -> T) -> T {
        self.sm.read(|a| f(&a.state))
    }

    /// [`ClusterNode::local_state`] for a reader that may hold the state long (a copy of all
    /// of it): off the runtime's workers, so that heartbeats and Raft keep being served.
    pub fn local_state_long<T>(
        &self,
        f: impl FnOnce(&crate::model::state::ClusterState) -> T,
    ) -> T {
        self.sm.read_long(|a| f(&a.state))
    }

    // ---- status -------------------------------------------------------------------------------

    /// The cluster's status. Unless `local`, a follower asks the leader (which knows every
    /// member's lag), falling back to its own view when the leader does not answer.
    pub async fn status(&self, local: bool, may_forward: bool) -> ClusterStatus {
        let leader_addr = self.leader_with_address().map(|(_, addr)| addr);
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
                let h = health.get(id);
                let reachable = *id == self.config.id || h.is_some_and(|h| h.reachable());
                let role = if Some(*id) == m.current_leader {
                    "leader"
                } else if !reachable
                    && (m.current_leader == Some(self.config.id)
                        || h.is_some_and(|h| h.last_error.is_some()))
                {
                    // The leader (which calls every member) or a failed call says it does
                    // not answer: say so, not the role it last had.
                    "unreachable"
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
                MemberStatus {
                    id: *id,
                    address: node.addr.clone(),
                    role: role.to_string(),
                    voter,
                    lag: matched.map(|x| last_log.saturating_sub(x)),
                    reachable,
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

    pub(crate) fn heartbeats(&self) -> &super::heartbeats::Heartbeats {
        &self.heartbeats
    }

    /// Watch the placements view of `node` kept by this replica (see
    /// [`super::views::Views::watch`]); `after`: the index of a view the watcher has. Returns
    /// the receiver and whether its first value is unchanged since `after`.
    pub fn watch_placements(
        &self,
        node: u64,
        after: u64,
    ) -> (
        tokio::sync::watch::Receiver<Arc<super::views::NodeView>>,
        bool,
    ) {
        self.sm.read(|a| self.sm.views.watch(&a.state, node, after))
    }

    /// How many nodes watch their placements on this server.
    pub fn placement_watchers(&self) -> usize {
        self.sm.views.watchers()
    }

    /// A heartbeat from the agent of `node` (this server's own, or an agent-only node that
    /// watches its placements here): [`ClusterNode::heartbeat`] through the leader, with the
    /// grant's index translated into the index of the view this server publishes to `node`
    /// (no lease when this replica, or the node's view here, has not caught up with the grant
    /// within a second).
    ///
    /// It answers within `budget` (the caller's deadline): the leader's answer may take 90 %
    /// of it, the view's catching up (at most a second) what remains of that (a heartbeat
    /// answered late is cancelled, counted as the server's failure, and thousands of agents
    /// move at once; one answered in time without a lease is not).
    pub async fn agent_heartbeat(
        &self,
        node: u64,
        incarnation: u64,
        budget: Duration,
    ) -> Result<LeaseGrant, ClusterError> {
        let started = std::time::Instant::now();
        let usable = budget - budget / 10;
        let mut grant = self
            .heartbeat_within(node, incarnation, true, usable)
            .await?;
        let view_wait = usable.saturating_sub(started.elapsed());
        match self
            .sm
            .views
            .wait_view_index(node, grant.index, view_wait.min(Duration::from_secs(1)))
            .await
        {
            Some(index) => grant.index = index,
            // This replica (or the node's view here) is behind the grant: no lease this
            // time, and an index no view reaches, so the answer neither grants nor counts
            // as the first answer. The server itself answered: no reason to fail over.
            None => {
                grant.lease = Duration::ZERO;
                grant.index = u64::MAX;
            }
        }
        Ok(grant)
    }

    /// Refuse a heartbeat or report of `node` from another incarnation than the node table's
    /// (a duplicate id, or a node whose data directory was wiped).
    pub fn check_incarnation(&self, node: u64, incarnation: u64) -> Result<(), ClusterError> {
        incarnation_conflict(&self.sm.directory(), node, incarnation)
            .map_or(Ok(()), |why| Err(ClusterError::Conflict(why)))
    }

    /// Record a heartbeat from `node` (data directory `incarnation`, 0: unknown) on the leader
    /// (forwarded there from a follower), and grant it a singleton lease if this leader heard
    /// from a quorum recently enough and has committed in its term (so its commit index covers
    /// every committed placement).
    pub async fn heartbeat(
        &self,
        node: u64,
        incarnation: u64,
        may_forward: bool,
    ) -> Result<LeaseGrant, ClusterError> {
        self.heartbeat_within(node, incarnation, may_forward, RELAY_WAIT)
            .await
    }

    /// [`ClusterNode::heartbeat`], waiting at most `wait` for a relayed answer.
    async fn heartbeat_within(
        &self,
        node: u64,
        incarnation: u64,
        may_forward: bool,
        wait: Duration,
    ) -> Result<LeaseGrant, ClusterError> {
        self.check_incarnation(node, incarnation)?;
        if self.is_leader() {
            self.take_heartbeat(node, incarnation)?;
            return Ok(self.lease_grant());
        }
        if !may_forward {
            return Err(ClusterError::Unavailable(
                "this server is not the leader: it takes no relayed heartbeat".into(),
            ));
        }
        // Relayed with the others that arrive meanwhile: one call to the leader for all.
        let (tx, rx) = tokio::sync::oneshot::channel();
        crate::service::lock(&self.relay.queue).push((node, incarnation, tx));
        self.relay.wake.notify_one();
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(answer)) => answer,
            _ => Err(ClusterError::Unavailable(format!(
                "the leader did not answer the relayed heartbeat within {wait:?}"
            ))),
        }
    }

    /// On the leader: record a heartbeat of `node` for the failure detector, unless it comes
    /// from another incarnation than the node table's.
    pub(crate) fn take_heartbeat(&self, node: u64, incarnation: u64) -> Result<(), ClusterError> {
        self.check_incarnation(node, incarnation)?;
        self.heartbeats.record(node);
        Ok(())
    }

    /// On the leader: [`ClusterNode::take_heartbeat`] for a relayed batch `(node,
    /// incarnation)`, checked against the node directory (never behind an apply). The
    /// refused ones: node -> why.
    pub(crate) fn take_heartbeats(&self, beats: &[(u64, u64)]) -> HashMap<u64, String> {
        let directory = self.sm.directory();
        let refused: HashMap<u64, String> = beats
            .iter()
            .filter_map(|(n, i)| incarnation_conflict(&directory, *n, *i).map(|why| (*n, why)))
            .collect();
        self.heartbeats.record_all(
            beats
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| !refused.contains_key(n)),
        );
        refused
    }

    /// `node` (data directory `incarnation`) is shutting down cleanly and has stopped its
    /// instances: the leader marks it down at once as having left (its instances move; no
    /// missed-heartbeat failure is reported), forwarded there from a follower.
    pub async fn leave(
        &self,
        node: u64,
        incarnation: u64,
        may_forward: bool,
    ) -> Result<(), ClusterError> {
        self.check_incarnation(node, incarnation)?;
        if !self.is_leader() {
            return match (may_forward, self.leader_with_address()) {
                (true, Some((_, addr))) => {
                    super::forward::leave(&self.peers, &addr, node, incarnation).await
                }
                _ => Err(ClusterError::Unavailable(
                    "no leader to take the notice that the node is leaving".into(),
                )),
            };
        }
        self.heartbeats.leave(node);
        self.peers.note_left(node);
        let up = self.local_state(|s| {
            s.nodes
                .get(&node)
                .is_some_and(|n| n.status != crate::model::state::NodeStatus::Down)
        });
        let mut outcome = Ok(());
        if up {
            tracing::info!("node {node} is leaving (a clean shutdown): marking it down");
            for command in Command::node_left(node) {
                if let Err(e) = self.write(command, false).await {
                    outcome = Err(e);
                    break;
                }
            }
        }
        self.heartbeats.leave_committed(node);
        outcome
    }

    /// On the leader: the singleton lease it grants now, if it heard from a quorum recently
    /// enough and has committed in its term (so its commit index covers every committed
    /// placement).
    pub(crate) fn lease_grant(&self) -> LeaseGrant {
        let term = self.raft.metrics().borrow().current_term;
        let committed = self.log.committed();
        let in_term = committed.is_some_and(|c| c.leader_id.term == term);
        let lease = if in_term && self.leads_with_quorum() {
            self.config.lease
        } else {
            Duration::ZERO
        };
        LeaseGrant {
            leader: self.config.id,
            lease,
            index: committed.map_or(0, |c| c.index),
        }
    }

    /// Relay the queued heartbeats to the leader, batched, until the node is dropped.
    fn relay_heartbeats(node: std::sync::Weak<ClusterNode>, relay: Arc<HeartbeatRelay>) {
        tokio::spawn(async move {
            loop {
                relay.wake.notified().await;
                // Whatever else arrives meanwhile goes in the same call.
                tokio::time::sleep(Duration::from_millis(10)).await;
                let Some(node) = node.upgrade() else { return };
                let batch = std::mem::take(&mut *crate::service::lock(&relay.queue));
                if batch.is_empty() {
                    continue;
                }
                let beats: Vec<(u64, u64)> = batch.iter().map(|(n, i, _)| (*n, *i)).collect();
                let answer = match node.leader_with_address() {
                    _ if node.is_leader() => Ok((node.lease_grant(), node.take_heartbeats(&beats))),
                    Some((_, addr)) => {
                        super::forward::relay_heartbeats(&node.peers, &addr, &beats).await
                    }
                    None => Err(ClusterError::Unavailable(
                        "no leader to take the heartbeat".into(),
                    )),
                };
                for (n, _, tx) in batch {
                    let _ = tx.send(match &answer {
                        Ok((_, refused)) if refused.contains_key(&n) => {
                            Err(ClusterError::Conflict(refused[&n].clone()))
                        }
                        Ok((grant, _)) => Ok(*grant),
                        Err(e) => Err(ClusterError::Unavailable(e.to_string())),
                    });
                }
            }
        });
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
        incarnation: u64,
        rejoin: bool,
        may_forward: bool,
    ) -> Result<(bool, String), ClusterError> {
        check_address("joining node's address", address)
            .map_err(|e| ClusterError::Invalid(e.to_string()))?;
        if !self.is_leader() {
            return match (may_forward, self.leader_with_address()) {
                (true, Some((_, addr))) => {
                    super::forward::join(&self.peers, &addr, id, address, incarnation, rejoin).await
                }
                _ => Err(ClusterError::Unavailable(
                    "no leader to take the join; retry".into(),
                )),
            };
        }
        // One membership change at a time.
        let _one_at_a_time = self.membership.lock().await;
        let existing_address = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone());
        if let Some(addr) = existing_address.filter(|a| a != address && !rejoin) {
            return Err(already_member_at(id, &addr));
        }
        let known = self.local_state(|s| s.nodes.get(&id).map_or(0, |n| n.incarnation));
        let same_directory = known == 0 || incarnation == 0 || known == incarnation;
        if !same_directory && !rejoin {
            return Err(ClusterError::Conflict(format!(
                "node id {id} is a member whose data directory has incarnation {known:016x}, but the joining node's has {incarnation:016x}: its data was lost. Start it with --rejoin to replace the member, or use another --id"
            )));
        }
        if !same_directory && rejoin {
            // The member it was can never vote again: remove it (membership and node table)
            // before the new data directory joins as a learner.
            self.remove_member_locked(id).await?;
            tracing::warn!(
                "node {id} rejoins with a new data directory ({incarnation:016x}); the member it replaced ({known:016x}) was removed"
            );
            self.record(
                format!("node {id} rejoined with a new data directory; the member whose data was lost was removed"),
                "node-rejoined",
                id,
            )
            .await;
        }
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
            Some(addr) if addr != address => return Err(already_member_at(id, addr)),
            Some(_) if voters.contains(&id) => {
                return Ok((true, format!("node {id} is already a voter")))
            }
            Some(_) => {}
            None => {
                self.raft
                    .add_learner(id, BasicNode::new(address), true)
                    .await
                    .map_err(|e| {
                        ClusterError::Unavailable(format!("adding node {id} as a learner: {e}"))
                    })?;
                tracing::info!("node {id} at {address} joined as a learner");
                self.record(
                    format!("node {id} at {address} joined as a learner"),
                    "node-joined",
                    id,
                )
                .await;
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
            return match (may_forward, self.leader_with_address()) {
                (true, Some((_, addr))) => super::forward::remove(&self.peers, &addr, id).await,
                _ => Err(ClusterError::Unavailable(
                    "no leader to take the removal; retry".into(),
                )),
            };
        }
        let _one_at_a_time = self.membership.lock().await;
        self.remove_member_locked(id).await?;
        Ok(format!("node {id} removed"))
    }

    /// [`ClusterNode::remove_member`] with the membership lock held.
    async fn remove_member_locked(&self, id: u64) -> Result<(), ClusterError> {
        let (present, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (
                membership.get_node(&id).is_some(),
                membership.voter_ids().collect::<BTreeSet<u64>>(),
            )
        };
        let in_table = self.local_state(|s| s.nodes.contains_key(&id));
        if !present && !in_table {
            return Err(ClusterError::NotFound(format!(
                "node {id} is not a member of this cluster"
            )));
        }
        if present {
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
        }
        if let Err(e) = self.write(Command::RemoveNode { id }, true).await {
            tracing::debug!("node table: {e}");
        }
        Ok(())
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

/// A join under an id that another address holds.
fn already_member_at(id: u64, addr: &str) -> ClusterError {
    ClusterError::Conflict(format!(
        "node id {id} is already a member at {addr}; start the new node with another --id (or remove node {id} first)"
    ))
}

/// The message of a failed write: whether it may still be applied.
fn unknown_or_not_made(maybe_taken: bool, why: &str) -> String {
    if maybe_taken {
        format!("outcome unknown: {why}; the write may still be applied. Check the state (e.g. `modectl svc get`), or retry: a retry with the same request id applies once")
    } else {
        format!("{why}; the write was not made")
    }
}
