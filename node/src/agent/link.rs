//! How an agent reaches the control plane: through the local [`ClusterNode`] on a server, or
//! through the peer API of any server on an agent-only node (failing over to another when the
//! one it uses stops answering). Either way it gets the same three things: its placements view,
//! heartbeats with singleton leases, and batched instance reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_proto::v1::peer_client::PeerClient;
use tonic::transport::Channel;

use super::wire::{report_to_proto, view_from_proto};
use super::{AgentTimings, KindRegistry};
use crate::model::state::{Command, InstanceReport, NodeRole};
use crate::replication::{ClusterNode, LeaseGrant, NodeView};
use crate::service::{Context, Service, ServiceHandle, Strategy, Supervisor};

/// Where the agent's placements come from and its heartbeats and reports go.
#[derive(Clone)]
pub(crate) enum Link {
    /// This server's own replica.
    Local(Arc<ClusterNode>),
    /// The servers of an agent-only node.
    Remote(Arc<Servers>),
}

impl Link {
    /// The node's placements view, kept current.
    pub(crate) fn views(
        &self,
        me: u64,
        incarnation: u64,
        timings: &AgentTimings,
    ) -> tokio::sync::watch::Receiver<Arc<NodeView>> {
        match self {
            Link::Local(node) => node.watch_placements(me, 0).0,
            Link::Remote(servers) => servers.clone().watch(me, incarnation, *timings),
        }
    }

    /// Heartbeat; the answer carries the lease, its index translated into the view's.
    pub(crate) async fn heartbeat(
        &self,
        me: u64,
        incarnation: u64,
        timings: &AgentTimings,
    ) -> Result<LeaseGrant, String> {
        match self {
            Link::Local(node) => node
                .agent_heartbeat(me, incarnation, LOCAL_HEARTBEAT_BUDGET)
                .await
                .map_err(|e| e.to_string()),
            Link::Remote(servers) => servers.heartbeat(me, incarnation, timings).await,
        }
    }

    /// Tell the leader this node is leaving (its instances stopped): it is marked down at
    /// once, as having left.
    pub(crate) async fn leave(&self, me: u64, incarnation: u64) -> Result<(), String> {
        match self {
            Link::Local(node) => node
                .leave(me, incarnation, true)
                .await
                .map_err(|e| e.to_string()),
            Link::Remote(servers) => servers.leave(me, incarnation).await,
        }
    }

    /// Send a batch of reports (one command).
    pub(crate) async fn report(
        &self,
        me: u64,
        incarnation: u64,
        reports: Vec<InstanceReport>,
    ) -> Result<(), String> {
        match self {
            Link::Local(node) => {
                let command = Command::ReportInstances {
                    node: me,
                    incarnation,
                    reports,
                };
                match node.write(command, true).await {
                    Ok(out) if out.result.ok => Ok(()),
                    Ok(out) => Err(out.result.message),
                    Err(e) => Err(e.to_string()),
                }
            }
            Link::Remote(servers) => servers.report(me, incarnation, reports).await,
        }
    }
}

/// How long a node shutting down waits for the leader to take its notice that it leaves.
pub(crate) const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A clean shutdown of the node's agent: stop its instances, then tell the leader that the
/// node leaves (bounded by [`LEAVE_TIMEOUT`]), so that it is marked down at once as having
/// left and its instances move, instead of after a missed-heartbeat grace reported as a
/// failure.
pub(crate) async fn leave_cleanly(
    link: &Link,
    me: u64,
    incarnation: u64,
    instances: &ServiceHandle,
) {
    instances.stop().await;
    match tokio::time::timeout(LEAVE_TIMEOUT, link.leave(me, incarnation)).await {
        Ok(Ok(())) => tracing::info!(
            "node {me} stopped its instances and told the leader it is leaving: it is marked down and its instances move"
        ),
        Ok(Err(e)) => tracing::warn!(
            "node {me} could not tell the leader it is leaving ({e}): it is marked down once its heartbeats are missed"
        ),
        Err(_) => tracing::warn!(
            "node {me}: the leader did not take the notice that it is leaving within {LEAVE_TIMEOUT:?}: it is marked down once its heartbeats are missed"
        ),
    }
}

/// How long a server's own agent lets its heartbeat take (no caller's deadline here): about
/// 2.5 s in all for the leader's answer and the view's catching up with it, as before
/// heartbeats had deadlines.
const LOCAL_HEARTBEAT_BUDGET: Duration = Duration::from_millis(2800);

/// Heartbeats that may fail in a row before the agent moves to another server (and they must
/// have failed for [`AgentTimings::fail_over_after`]).
const FAILOVER_AFTER: u64 = 2;

/// Each failover without an answered heartbeat since doubles how long heartbeats must fail
/// before the next one, up to this many times (8 x [`AgentTimings::fail_over_after`]).
const MAX_FAILOVER_DOUBLINGS: u32 = 3;

/// How long the heartbeats to the server in use must fail before the agent moves on, after
/// `hops` failovers without an answered heartbeat: when every server is slow (a saturated
/// cluster, not a dead server), thousands of agents hopping between them at the same pace,
/// each re-registering and re-reading its whole view, kept the servers saturated for good
/// (124,513 failovers in 10 minutes with 5,000 agents). One dead server still costs one
/// window.
fn failover_window(base: Duration, hops: u32) -> Duration {
    base * 2u32.pow(hops.min(MAX_FAILOVER_DOUBLINGS))
}

/// How long a server may take to answer the connection's keep-alive ping.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How soon a broken placements watch is reopened (on the same server until the agent
/// moves): this after its first break, up to [`MAX_WATCH_RETRY_STEPS`] times this after more.
const WATCH_RETRY: Duration = Duration::from_millis(100);
const MAX_WATCH_RETRY_STEPS: u32 = 5;

/// The servers an agent-only node talks to (their peer addresses), and the one in use.
pub struct Servers {
    addresses: Vec<String>,
    channels: Vec<Channel>,
    current: AtomicUsize,
    /// Bumped on each failover: the watch stream reconnects.
    generation: tokio::sync::watch::Sender<u64>,
    failures: AtomicU64,
    /// Failovers since a heartbeat was last answered.
    hops: std::sync::atomic::AtomicU32,
    /// Since when the heartbeats to the server in use fail (None: the last one was answered).
    failing_since: std::sync::Mutex<Option<Instant>>,
    /// When a server last granted this node a lease (its readiness).
    last_lease: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Servers {
    /// Reach the cluster through these servers' peer addresses (HOST:PORT), the first first.
    /// Over TLS with `tls` when given.
    pub fn new(
        addresses: Vec<String>,
        tls: Option<crate::security::tls::ClientTls>,
    ) -> Result<Arc<Servers>, String> {
        if addresses.is_empty() {
            return Err("an agent needs --servers: the peer addresses of the cluster's servers (HOST:PORT, comma-separated)".into());
        }
        let mut channels = Vec::new();
        for a in &addresses {
            crate::replication::check_address("--servers address", a).map_err(|e| e.to_string())?;
            let channel = crate::security::tls::channel(a, tls.clone(), |e| {
                e.connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    // The heartbeats judge whether a server is gone (their deadlines, then the
                    // failover window); a loaded server late to answer a ping must not lose
                    // the connection, and every call and watch on it, before that.
                    .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
            })
            .map_err(|e| format!("--servers address '{a}': {e}"))?;
            channels.push(channel);
        }
        Ok(Arc::new(Servers {
            addresses,
            channels,
            current: AtomicUsize::new(0),
            generation: tokio::sync::watch::channel(0).0,
            failures: AtomicU64::new(0),
            hops: std::sync::atomic::AtomicU32::new(0),
            failing_since: std::sync::Mutex::new(None),
            last_lease: std::sync::Mutex::new(None),
        }))
    }

    fn client(&self) -> (usize, PeerClient<Channel>) {
        let i = self.current.load(Ordering::Acquire) % self.channels.len();
        (
            i,
            PeerClient::new(self.channels[i].clone())
                .max_decoding_message_size(crate::model::limits::MAX_ANSWER_BYTES),
        )
    }

    /// The server in use did not answer: move to the next one (once per failure of `from`).
    fn fail_over(&self, from: usize, why: &str) {
        let next = (from + 1) % self.channels.len();
        if self
            .current
            .compare_exchange(from, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(
                "server {} does not answer ({why}): moving to {}",
                self.addresses[from],
                self.addresses[next]
            );
            self.failures.store(0, Ordering::Release);
            self.hops.fetch_add(1, Ordering::AcqRel);
            *crate::service::lock(&self.failing_since) = None;
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// How long ago a server last granted this node a lease (None: never).
    pub fn since_last_lease(&self) -> Option<Duration> {
        crate::service::lock(&self.last_lease).map(|t| t.elapsed())
    }

    /// The address in use now.
    pub fn current(&self) -> &str {
        &self.addresses[self.current.load(Ordering::Acquire) % self.addresses.len()]
    }

    /// Register the node through any server, retrying (and moving on) until one accepts, or
    /// until a server refuses it for good (e.g. another --heartbeat-grace).
    pub(crate) async fn register(&self, request: pb::RegisterRequest) -> Result<String, String> {
        let mut delay = Duration::from_millis(100);
        loop {
            let (i, mut client) = self.client();
            let mut req = tonic::Request::new(request.clone());
            req.set_timeout(Duration::from_secs(3));
            match client.register(req).await {
                Ok(reply) => return Ok(reply.into_inner().message),
                Err(s)
                    if s.code() == tonic::Code::FailedPrecondition
                        || s.code() == tonic::Code::InvalidArgument =>
                {
                    return Err(s.message().to_string())
                }
                Err(s) => {
                    let why = crate::replication::describe_status(&self.addresses[i], &s);
                    tracing::warn!("registering this node: {why}; retrying");
                    self.fail_over(i, &why);
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn heartbeat(
        &self,
        me: u64,
        incarnation: u64,
        timings: &AgentTimings,
    ) -> Result<LeaseGrant, String> {
        let (i, mut client) = self.client();
        let mut req = tonic::Request::new(pb::HeartbeatRequest {
            node: me,
            incarnation,
            leaving: false,
        });
        let timeout = timings.heartbeat_timeout;
        req.set_timeout(timeout);
        // A client-side deadline too: the header bounds the server's work, not a call stuck
        // on its way (the lease must not wait for TCP's keep-alive to notice).
        let answer = tokio::time::timeout(timeout, client.heartbeat(req))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                )))
            });
        match answer {
            Ok(r) => {
                self.answered();
                let r = r.into_inner();
                Ok(LeaseGrant {
                    leader: r.leader,
                    lease: Duration::from_millis(r.lease_ms),
                    index: r.lease_index,
                })
            }
            // A refusal of this node is not the server's fault.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(s.message().to_string()),
            Err(s) => {
                let why = crate::replication::describe_status(&self.addresses[i], &s);
                self.failed(i, &why, timings);
                Err(why)
            }
        }
    }

    /// A heartbeat was answered: the server in use is fine, and so is this node's lease.
    fn answered(&self) {
        self.failures.store(0, Ordering::Release);
        self.hops.store(0, Ordering::Release);
        *crate::service::lock(&self.failing_since) = None;
        *crate::service::lock(&self.last_lease) = Some(std::time::Instant::now());
    }

    /// A heartbeat to server `i` failed: move on once they have failed twice in a row and for
    /// the failover window ([`failover_window`]). A broken placements watch is judged the same
    /// way, on its own count (see [`Servers::watch`]): one that moved the agent at once, past
    /// the window and its backoff, made thousands of agents hop together when a loaded server
    /// dropped connections.
    fn failed(&self, i: usize, why: &str, timings: &AgentTimings) {
        let failing_for = crate::service::lock(&self.failing_since)
            .get_or_insert_with(Instant::now)
            .elapsed();
        let window = failover_window(timings.fail_over_after, self.hops.load(Ordering::Acquire));
        if self.failures.fetch_add(1, Ordering::AcqRel) + 1 >= FAILOVER_AFTER
            && failing_for >= window
        {
            self.fail_over(i, why);
        }
    }

    async fn leave(&self, me: u64, incarnation: u64) -> Result<(), String> {
        let (i, mut client) = self.client();
        let mut req = tonic::Request::new(pb::HeartbeatRequest {
            node: me,
            incarnation,
            leaving: true,
        });
        req.set_timeout(LEAVE_TIMEOUT);
        client
            .heartbeat(req)
            .await
            .map(drop)
            .map_err(|s| crate::replication::describe_status(&self.addresses[i], &s))
    }

    async fn report(
        &self,
        me: u64,
        incarnation: u64,
        reports: Vec<InstanceReport>,
    ) -> Result<(), String> {
        let (i, mut client) = self.client();
        let request = pb::ReportInstancesRequest {
            node: me,
            incarnation,
            reports: reports.iter().map(report_to_proto).collect(),
        };
        client
            .report_instances(request)
            .await
            .map(|_| ())
            .map_err(|s| crate::replication::describe_status(&self.addresses[i], &s))
    }

    /// Keep a view from the server in use, resuming after a failover from the last index.
    fn watch(
        self: Arc<Self>,
        me: u64,
        incarnation: u64,
        timings: AgentTimings,
    ) -> tokio::sync::watch::Receiver<Arc<NodeView>> {
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(NodeView::default()));
        tokio::spawn(async move {
            let mut generation = self.generation.subscribe();
            // Since when and how many times in a row the watch broke on the server in use
            // without delivering anything (answered heartbeats do not clear it: a server may
            // answer them and still fail every watch).
            let mut broken: Option<(Instant, u32)> = None;
            loop {
                if tx.is_closed() {
                    return;
                }
                let mut delivered = false;
                let after = tx.borrow().index;
                let (i, mut client) = self.client();
                generation.borrow_and_update();
                let request = pb::WatchPlacementsRequest {
                    node: me,
                    incarnation,
                    after_index: after,
                };
                let why = match client.watch_placements(request).await {
                    Ok(stream) => {
                        tracing::info!(
                            "watching this node's placements through {} (after index {after})",
                            self.addresses[i]
                        );
                        let mut stream = stream.into_inner();
                        loop {
                            tokio::select! {
                                _ = generation.changed() => break "moved to another server".to_string(),
                                _ = tx.closed() => return,
                                m = stream.message() => match m {
                                    Ok(Some(update)) => {
                                        delivered = true;
                                        tx.send_replace(Arc::new(view_from_proto(&update)));
                                    }
                                    Ok(None) => break "the stream ended".to_string(),
                                    Err(s) => break crate::replication::describe_status(&self.addresses[i], &s),
                                },
                            }
                        }
                    }
                    Err(s) => crate::replication::describe_status(&self.addresses[i], &s),
                };
                tracing::info!("watching placements through {}: {why}", self.addresses[i]);
                if delivered || self.current.load(Ordering::Acquire) % self.channels.len() != i {
                    // It worked for a while, or the agent moved: a fresh start.
                    broken = None;
                }
                let mut retry = WATCH_RETRY;
                if self.current.load(Ordering::Acquire) % self.channels.len() == i {
                    let (since, times) = broken.get_or_insert_with(|| (Instant::now(), 0));
                    *times += 1;
                    let window =
                        failover_window(timings.fail_over_after, self.hops.load(Ordering::Acquire));
                    if u64::from(*times) >= FAILOVER_AFTER && since.elapsed() >= window {
                        self.fail_over(i, &why);
                        broken = None;
                    } else {
                        // Each reopening costs the server the node's whole view.
                        retry = WATCH_RETRY * (*times).min(MAX_WATCH_RETRY_STEPS);
                    }
                }
                tokio::time::sleep(retry).await;
            }
        });
        rx
    }
}

/// The RegisterRequest of an agent-only node.
pub(crate) fn register_request(
    me: u64,
    address: String,
    labels: BTreeMap<String, String>,
    capacity: u64,
    kinds: Vec<String>,
    incarnation: u64,
    heartbeat_grace: Duration,
) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node: me,
        address,
        api_address: String::new(),
        labels: labels.into_iter().collect(),
        capacity,
        kinds,
        incarnation,
        heartbeat_grace_ms: heartbeat_grace.as_millis() as u64,
        role: NodeRole::Agent.as_str().to_string(),
    }
}

/// The incarnation of an agent-only node's data directory (made at random the first time): a
/// wiped agent is a new incarnation of its node, and its heartbeats are refused.
pub fn agent_incarnation(dir: &std::path::Path, id: u64) -> Result<u64, String> {
    let path = dir.join("agent.json");
    let problem =
        |e: &dyn std::fmt::Display| format!("agent data directory {}: {e}", dir.display());
    if let Ok(text) = std::fs::read_to_string(&path) {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| problem(&e))?;
        let owner = v["node_id"].as_u64().unwrap_or(0);
        if owner != id {
            return Err(problem(&format!(
                "it belongs to node {owner}, not {id}: give each node its own --data-dir"
            )));
        }
        return v["incarnation"]
            .as_u64()
            .filter(|i| *i != 0)
            .ok_or_else(|| problem(&"agent.json has no incarnation: move the directory away"));
    }
    std::fs::create_dir_all(dir).map_err(|e| problem(&e))?;
    let incarnation = crate::replication::random_u64();
    let text = serde_json::json!({"node_id": id, "incarnation": incarnation}).to_string();
    let tmp = dir.join("agent.json.tmp");
    std::fs::write(&tmp, text).map_err(|e| problem(&e))?;
    std::fs::rename(&tmp, &path).map_err(|e| problem(&e))?;
    Ok(incarnation)
}

/// The agent of an agent-only node: registers through the servers, then runs its instances.
pub(crate) struct RemoteAgent {
    pub(crate) servers: Arc<Servers>,
    pub(crate) register: pb::RegisterRequest,
    pub(crate) kinds: KindRegistry,
    pub(crate) instances: ServiceHandle,
    pub(crate) incarnation: u64,
    /// Set once the servers accepted the registration (the node's readiness).
    pub(crate) registered: Arc<std::sync::atomic::AtomicBool>,
}

impl Service for RemoteAgent {
    async fn on_start(&mut self, ctx: &Context) -> crate::service::Result<()> {
        let (servers, register) = (self.servers.clone(), self.register.clone());
        let (kinds, instances, incarnation) =
            (self.kinds.clone(), self.instances.clone(), self.incarnation);
        let me = register.node;
        let timings = AgentTimings::for_grace(Duration::from_millis(register.heartbeat_grace_ms));
        let (c, registered) = (ctx.clone(), self.registered.clone());
        ctx.spawn("register", async move {
            match c.wait(servers.register(register)).await {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(msg)) => tracing::info!("{msg} (through {})", servers.current()),
            }
            registered.store(true, std::sync::atomic::Ordering::Release);
            let link = Link::Remote(servers);
            super::run(c, link, me, incarnation, kinds, instances, timings).await;
            Ok(())
        });
        Ok(())
    }

    async fn on_shutdown(&mut self, _ctx: &Context) -> crate::service::Result<()> {
        if self.registered.load(std::sync::atomic::Ordering::Acquire) {
            let link = Link::Remote(self.servers.clone());
            leave_cleanly(&link, self.register.node, self.incarnation, &self.instances).await;
        }
        Ok(())
    }
}

/// What an agent-only node embedded in another process is (see [`run_remote`]).
pub struct RemoteAgentConfig {
    /// Its node id.
    pub id: u64,
    /// The servers' peer addresses.
    pub servers: Vec<String>,
    /// The peer address it registers (an embedded agent serves no beacon: the graph shows
    /// it unreachable).
    pub advertise: String,
    /// Labels for placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Capacity units.
    pub capacity: u64,
    /// The kinds it runs.
    pub kinds: KindRegistry,
    /// The cluster's --heartbeat-grace.
    pub heartbeat_grace: Duration,
}

/// An agent-only node running inside this process.
pub struct EmbeddedAgent {
    root: ServiceHandle,
    instances: ServiceHandle,
}

impl EmbeddedAgent {
    /// How many of its instances run now.
    pub fn running_instances(&self) -> usize {
        self.instances
            .dependencies()
            .iter()
            .filter(|i| i.state() == crate::service::ServiceState::Running)
            .count()
    }

    /// Stop its instances and the agent.
    pub async fn stop(&self) {
        self.root.stop().await;
    }
}

/// Start an agent-only node in this process (benchmarks of many agents): the same agent,
/// connections and lease rules as `mode-node --role agent`, with a fresh incarnation and no
/// peer listener.
///
/// ```no_run
/// # async fn f() -> Result<(), String> {
/// use mode::agent::{run_remote, KindRegistry, RemoteAgentConfig};
/// let agent = run_remote(RemoteAgentConfig {
///     id: 100,
///     servers: vec!["127.0.0.1:7071".into()],
///     advertise: "127.0.0.1:1".into(),
///     labels: Default::default(),
///     capacity: 100,
///     kinds: KindRegistry::stock(),
///     heartbeat_grace: std::time::Duration::from_millis(1500),
/// })
/// .await?;
/// agent.stop().await;
/// # Ok(()) }
/// ```
pub async fn run_remote(config: RemoteAgentConfig) -> Result<EmbeddedAgent, String> {
    let servers = Servers::new(config.servers, None)?;
    let incarnation = crate::replication::random_u64();
    let instances = Supervisor::new(Strategy::ForfeitOneForOne)
        .label("Instances")
        .build();
    let register = register_request(
        config.id,
        config.advertise,
        config.labels,
        config.capacity,
        config.kinds.names(),
        incarnation,
        config.heartbeat_grace,
    );
    let agent = ServiceHandle::builder(RemoteAgent {
        servers,
        register,
        kinds: config.kinds,
        instances: instances.clone(),
        incarnation,
        registered: Default::default(),
    })
    .label("Agent")
    .build();
    let root = Supervisor::new(Strategy::OneForOne)
        .label(format!("agent-{}", config.id))
        .child(instances.clone())
        .child(agent)
        .build();
    root.start().await.map_err(|e| e.to_string())?;
    Ok(EmbeddedAgent { root, instances })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing listens on these (port 1 and 2 of loopback refuse at once).
    fn two_dead_servers() -> Arc<Servers> {
        Servers::new(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()], None).expect("servers")
    }

    #[tokio::test]
    async fn an_agent_moves_to_another_server_only_after_failing_for_a_while() {
        // A big fleet's grace (10 s): heartbeats failing for less than a third of it do not
        // move the agent, however many fail.
        let patient = AgentTimings::for_grace(Duration::from_secs(10));
        assert_eq!(patient.fail_over_after, Duration::from_secs(10) / 3);
        assert_eq!(patient.heartbeat_timeout, Duration::from_millis(2500));
        let servers = two_dead_servers();
        for _ in 0..4 {
            assert!(servers.heartbeat(7, 1, &patient).await.is_err());
        }
        assert_eq!(servers.current(), "127.0.0.1:1");
        // The default grace: two failures in a row are enough (as before).
        let quick = AgentTimings::for_grace(Duration::from_millis(1500));
        assert_eq!(quick.heartbeat_timeout, Duration::from_millis(1500));
        let servers = two_dead_servers();
        assert!(servers.heartbeat(7, 1, &quick).await.is_err());
        assert_eq!(servers.current(), "127.0.0.1:1");
        tokio::time::sleep(quick.fail_over_after).await;
        assert!(servers.heartbeat(7, 1, &quick).await.is_err());
        assert_eq!(servers.current(), "127.0.0.1:2");
        // No server answered since: the next move waits twice as long (every server may be
        // slow rather than dead; hopping would only add load).
        assert!(servers.heartbeat(7, 1, &quick).await.is_err());
        tokio::time::sleep(quick.fail_over_after).await;
        assert!(servers.heartbeat(7, 1, &quick).await.is_err());
        assert_eq!(
            servers.current(),
            "127.0.0.1:2",
            "moved again after one window"
        );
        tokio::time::sleep(quick.fail_over_after).await;
        assert!(servers.heartbeat(7, 1, &quick).await.is_err());
        assert_eq!(servers.current(), "127.0.0.1:1", "moved after two windows");
    }

    #[tokio::test]
    async fn a_broken_watch_moves_the_agent_only_after_the_failover_window() {
        // The default grace: a failover window of 0.5 s. The watch fails every 100 ms.
        let quick = AgentTimings::for_grace(Duration::from_millis(1500));
        let servers = two_dead_servers();
        let _views = servers.clone().watch(7, 1, quick);
        tokio::time::sleep(quick.fail_over_after / 2).await;
        assert_eq!(
            servers.current(),
            "127.0.0.1:1",
            "moved after a few broken watches, before the window"
        );
        tokio::time::sleep(quick.fail_over_after * 2).await;
        assert_eq!(servers.current(), "127.0.0.1:2", "moved after the window");
    }

    #[tokio::test]
    async fn a_watch_that_keeps_breaking_moves_the_agent_even_while_heartbeats_are_answered() {
        let quick = AgentTimings::for_grace(Duration::from_millis(1500));
        let servers = two_dead_servers();
        let _views = servers.clone().watch(7, 1, quick);
        // Heartbeats answered every 50 ms (what an answered heartbeat records).
        let t0 = Instant::now();
        while t0.elapsed() < quick.fail_over_after * 3 {
            servers.answered();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Both servers fail it here, so it may have moved back already: count the moves.
        let moves = *servers.generation.borrow();
        assert!(
            moves >= 1,
            "a server that fails every watch kept the agent on a frozen view"
        );
    }

    #[test]
    fn each_failover_without_an_answer_doubles_the_next_window_up_to_eight_times() {
        let base = Duration::from_secs(3);
        let windows: Vec<u64> = (0..6)
            .map(|hops| failover_window(base, hops).as_secs())
            .collect();
        assert_eq!(windows, [3, 6, 12, 24, 24, 24]);
    }
}
