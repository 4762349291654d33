//! The agent: runs the instances the control plane placed on this node, each under its own
//! supervisor (restart policy from its spec), reports their states to the leader, heartbeats,
//! and holds the singleton leases the leader grants with its heartbeat answers.
//!
//! Its placements come from a [`Link`]: the local replica's view on a server, or the
//! `WatchPlacements` stream of a server on an agent-only node; heartbeats and reports go the
//! same way. The same rules fence both.
//!
//! How a singleton never runs twice, from this side: a singleton runs only while a lease
//! covers it — granted by a leader that heard from a quorum recently, counted from when the
//! heartbeat was *sent*, and valid only once the view this agent acts on reflects the
//! leader's commit index of the grant (so a node back from a partition first learns that its
//! singleton moved). A watchdog checks the lease on its own timer, whatever the agent loop is
//! doing, and kills singletons at once (SIGKILL for processes) when it runs out. Stops and
//! replacements run in the background, so a slow stop never delays the next decision.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Instrument as _;

use super::kinds::{InstanceSpec, KillSwitch, KindRegistry, LeaseDeadline};
use super::link::Link;
use crate::model::spec::ServiceSpec;
use crate::model::state::InstanceReport;
use crate::replication::NodeView;
use crate::service::{
    lock, Backoff, Context, RestartIntensity, ServiceHandle, ServiceState, Strategy, Supervisor,
};

/// Agent timings.
#[derive(Debug, Clone, Copy)]
pub struct AgentTimings {
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// How long a heartbeat waits for its answer.
    pub heartbeat_timeout: Duration,
    /// How long an agent-only node's heartbeats fail (twice at least) before it moves to
    /// another server: a server slowed by a big deploy is given time before thousands of
    /// agents move at once, each re-reading its whole view from the next one.
    pub fail_over_after: Duration,
}

impl AgentTimings {
    /// For a cluster whose heartbeat grace is `grace`: a heartbeat every sixth of it (250 ms
    /// for the default 1.5 s), so that the singleton lease (60 % of the grace) outlives two
    /// lost heartbeats, and a longer grace for a big fleet means proportionally fewer
    /// heartbeats on the servers.
    pub fn for_grace(grace: Duration) -> Self {
        AgentTimings {
            heartbeat: (grace / 6).max(Duration::from_millis(10)),
            heartbeat_timeout: (grace / 4).max(MIN_HEARTBEAT_TIMEOUT),
            fail_over_after: grace / 3,
        }
    }
}

/// The shortest wait for a heartbeat's answer (a relayed heartbeat may take a server that
/// long to answer: the leader's answer, then the node's view catching up with it).
const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);

/// How often the lease watchdog looks while a singleton runs.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(20);

/// How often it looks while none runs.
const WATCHDOG_IDLE: Duration = Duration::from_secs(1);

/// How often the agent looks at the replicated state (and its instances) without being woken,
/// while something is unsettled: an instance not running yet, a report not taken yet, a stop
/// under way, a health check.
const PERIOD: Duration = Duration::from_millis(100);

/// How often it looks while everything is settled (every instance placed here runs and the
/// cluster has taken its report): a new view or a lifecycle event wakes it at once anyway, and
/// whatever waits (a stop, a lease, a report) keeps it unsettled, so an idle fleet of
/// thousands of agents does not look at its instances 10 times a second each for nothing.
const SETTLED_PERIOD: Duration = Duration::from_secs(1);

/// After an instance's lifecycle event, how long the agent waits for more before it looks.
const EVENT_COALESCE: Duration = Duration::from_millis(10);

/// The leases this node holds (each heartbeat answer may grant one), and whether its replica
/// has caught up with the leader since it started.
pub(crate) struct Leases {
    /// `(valid until, leader's commit index at the grant)`, newest last.
    grants: Mutex<VecDeque<(Instant, u64)>>,
    /// The leader's commit index in the first heartbeat answer (`u64::MAX` before one).
    catch_up_to: AtomicU64,
    /// When the lease that covers this node ends, for the watchers of singleton processes
    /// outside this process (they kill them even if this node is frozen).
    deadline: LeaseDeadline,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            grants: Mutex::new(VecDeque::new()),
            catch_up_to: AtomicU64::new(u64::MAX),
            deadline: LeaseDeadline::default(),
        }
    }
}

impl Leases {
    fn grant(&self, until: Instant, index: u64) {
        let mut grants = lock(&self.grants);
        grants.push_back((until, index));
        while grants.len() > 16 {
            grants.pop_front();
        }
    }

    fn answered(&self, index: u64) {
        let _ =
            self.catch_up_to
                .compare_exchange(u64::MAX, index, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether some grant covers now and its index is applied here. (Each grant stands on its
    /// own: a newer one whose index is not applied yet does not void an older one.)
    fn valid(&self, applied: u64) -> bool {
        let now = Instant::now();
        let mut grants = lock(&self.grants);
        grants.retain(|(until, _)| *until > now);
        let until = grants
            .iter()
            .filter(|(_, index)| *index <= applied)
            .map(|(until, _)| *until)
            .max();
        self.deadline.set(until);
        until.is_some()
    }

    /// Whether the replica has applied what the leader had committed when it first answered
    /// (a restarted node starts nothing before that).
    fn caught_up(&self, applied: u64) -> bool {
        applied >= self.catch_up_to.load(Ordering::Acquire)
    }
}

/// One running instance.
struct Local {
    /// The instance's supervisor (restarts the kind's service by the spec's policy).
    wrapper: ServiceHandle,
    /// The kind's service inside it.
    inner: ServiceHandle,
    /// What the instance was built from (kind, config, restart policy, grace): a change
    /// replaces it; other spec changes (replicas, placement rules) do not.
    fingerprint: Arc<str>,
    restart_seq: u64,
    /// The fencing token it was started with.
    epoch: u64,
    kill: KillSwitch,
    /// Its health check, when the spec has one.
    health: Option<super::health::Health>,
    reported: Option<(&'static str, u32, Option<bool>)>,
    /// What the last report look saw of it (state, restarts, health), while it is placed
    /// here: what [`still`] compares with.
    seen: Option<(&'static str, u32, Option<bool>)>,
    reported_at: Instant,
}

/// What the agent wants the leader to know about one instance: its state and restarts (the
/// crash reason, which allocates, only when a report is sent: [`crash_of`]). Called for
/// every instance on every look, so it allocates nothing.
fn observe(local: &Local) -> (&'static str, u32) {
    let restarts = local.inner.restart_count();
    let state = match (local.wrapper.state(), local.inner.state()) {
        (ServiceState::Crashed, _) => "failed",
        (_, ServiceState::Running) => "running",
        (_, ServiceState::Crashed) => "crashed",
        (_, ServiceState::Init | ServiceState::Starting) => "starting",
        _ => "stopped",
    };
    (state, restarts)
}

/// [`observe`], with the instance's health: the spec's check, or else what an in-process
/// service says of itself (only while running).
fn observe_health(local: &Local) -> (&'static str, u32, Option<bool>) {
    let (st, restarts) = observe(local);
    let healthy = match &local.health {
        Some(h) => h.verdict(),
        None => local.inner.health(),
    }
    .filter(|_| st == "running");
    (st, restarts, healthy)
}

/// Why an instance observed in `state` last crashed (its supervisor's reason when it gave up).
fn crash_of(local: &Local, state: &str) -> Option<String> {
    let last = || local.inner.last_crash_reason().map(|r| r.to_string());
    if state == "failed" {
        local
            .wrapper
            .crash_reason()
            .map(|r| r.to_string())
            .or_else(last)
    } else {
        last()
    }
}

/// What an instance is built from (kind, config, restart policy, grace, health, secrets), as
/// text: a change replaces the instance.
fn fingerprint(spec: &ServiceSpec) -> Arc<str> {
    spec.runtime().to_string().into()
}

/// [`fingerprint`]s of the specs of one view, each computed once per look (hundreds of
/// instances share a spec; serializing it for each, every look, was most of an idle agent's
/// CPU).
#[derive(Default)]
struct Prints(HashMap<usize, Arc<str>>);

impl Prints {
    fn of(&mut self, spec: &ServiceSpec) -> Arc<str> {
        // Keyed by address: every spec looked up lives in the one view of this look.
        self.0
            .entry(spec as *const ServiceSpec as usize)
            .or_insert_with(|| fingerprint(spec))
            .clone()
    }
}

fn instance_supervisor(spec: &ServiceSpec, slot: u32, inner: ServiceHandle) -> ServiceHandle {
    let policy = spec.restart;
    Supervisor::new(Strategy::OneForOne)
        .label(format!("{}#{slot}", spec.name))
        .intensity(RestartIntensity {
            max_restarts: policy.max_restarts,
            within: policy.within(),
        })
        .backoff(Backoff {
            initial: policy.backoff_initial(),
            max: policy.backoff_max(),
            ..Backoff::default()
        })
        .child(inner)
        .build()
}

/// Reports sent together at most (one command, one Raft entry, at most a few hundred KB).
const MAX_REPORTS_AT_ONCE: usize = 1024;

/// What a queued report is about: a newer one with the same key replaces it.
fn report_key(report: &InstanceReport) -> (String, String, u32) {
    (report.move_.clone(), report.service.clone(), report.slot)
}

/// Whether every service `spec` depends on runs somewhere and is not being removed. Only an
/// instance's *start* waits for this (like systemd's ordering): a running instance is not
/// stopped because a dependency restarts or moves.
fn dependencies_ready(view: &NodeView, spec: &ServiceSpec) -> bool {
    spec.depends_on.iter().all(|d| {
        view.services
            .get(d)
            .is_some_and(|s| !s.deleting && s.running)
    })
}

fn is_deleting(view: &NodeView, service: &str) -> bool {
    view.services.get(service).is_some_and(|s| s.deleting)
}

fn plain_report(
    key: &Key,
    state: &str,
    restarts: u32,
    crash: Option<String>,
    epoch: u64,
) -> InstanceReport {
    InstanceReport {
        service: key.0.clone(),
        slot: key.1,
        state: state.to_string(),
        restart_count: restarts,
        last_crash: crash,
        epoch,
        healthy: None,
        retry_at_ms: None,
        move_: String::new(),
    }
}

fn release_report(key: &Key) -> InstanceReport {
    InstanceReport {
        service: key.0.clone(),
        slot: key.1,
        state: String::new(),
        restart_count: 0,
        last_crash: None,
        epoch: 0,
        healthy: None,
        retry_at_ms: None,
        move_: "release".into(),
    }
}

type Key = (String, u32);

/// The last plain report of each instance the cluster has taken (committed): state, restarts,
/// the fencing token it was about and the health verdict. The agent compares with this, not with its view (a
/// node's view leaves its own reports out, so that reports do not resend whole views).
type Acked = Arc<Mutex<HashMap<Key, AckedReport>>>;

/// State, restarts, fencing token and health verdict of an acknowledged report.
type AckedReport = (String, u32, u64, Option<bool>);

/// What this node should run of one placement.
struct Desired<'a> {
    spec: &'a ServiceSpec,
    restart_seq: u64,
    epoch: u64,
}

/// The instances of this node, and the ones being stopped in the background.
struct Instances {
    me: u64,
    supervisor: ServiceHandle,
    local: HashMap<Key, Local>,
    /// Stops in progress; an instance is not started again before its old copy has stopped.
    stopping: HashMap<Key, tokio::task::JoinHandle<()>>,
    /// The kill switches of running singletons (the watchdog fires them).
    singletons: Arc<Mutex<HashMap<Key, KillSwitch>>>,
    /// Wakes the watchdog when a singleton starts (it looks rarely while none runs).
    singleton_started: Arc<tokio::sync::Notify>,
    report_tx: tokio::sync::mpsc::UnboundedSender<InstanceReport>,
    acked: Acked,
    /// The index of the view the agent acts on (leases are checked against it).
    acting: Arc<AtomicU64>,
    /// When a report about an instance not running here was last sent (rate limit).
    quiet_sent: HashMap<Key, Instant>,
    /// Instances whose service could not be built, with what they were built from: not
    /// retried (nor reported again) until the placement or the spec changes.
    unbuildable: HashMap<Key, (Arc<str>, u64, u64)>,
}

impl Instances {
    /// Stop `key` in the background; `kill` first kills it at once; `then` is sent once it
    /// has stopped.
    fn begin_stop(&mut self, key: Key, l: Local, kill: bool, then: Option<InstanceReport>) {
        if kill {
            l.kill.fire();
        }
        lock(&self.singletons).remove(&key);
        let (supervisor, report_tx) = (self.supervisor.clone(), self.report_tx.clone());
        let label = format!("{}#{}", key.0, key.1);
        let previous = self.stopping.remove(&key);
        let stop = tokio::spawn(async move {
            if kill {
                // Kinds that run processes have SIGKILLed them on the kill switch; give them
                // a moment to do so, then abort whatever runs in-process (no grace period).
                tokio::time::sleep(Duration::from_millis(50)).await;
                l.wrapper.abort().await;
            }
            if let Some(p) = previous {
                let _ = p.await;
            }
            supervisor.remove_dependency(&l.wrapper).await;
            tracing::info!("{label} stopped");
            if let Some(c) = then {
                let _ = report_tx.send(c);
            }
        });
        self.stopping.insert(key, stop);
    }

    /// Send `report` about an instance that does not run here, at most once a second.
    fn quiet_report(&mut self, key: &Key, report: InstanceReport) {
        let due = self
            .quiet_sent
            .get(key)
            .is_none_or(|t| t.elapsed() > Duration::from_secs(1));
        if due {
            self.quiet_sent.insert(key.clone(), Instant::now());
            let _ = self.report_tx.send(report);
        }
    }

    fn report(&self, key: &Key, state: &str, restarts: u32, crash: Option<String>, epoch: u64) {
        let _ = self
            .report_tx
            .send(plain_report(key, state, restarts, crash, epoch));
    }
}

/// Run the agent of node `me` (data directory `incarnation`) until the context stops.
/// `instances` is the node's (forfeit) supervisor the instances are added to.
pub(crate) async fn run(
    ctx: Context,
    link: Link,
    me: u64,
    incarnation: u64,
    kinds: KindRegistry,
    instances: ServiceHandle,
    timings: AgentTimings,
) {
    let leases = Arc::new(Leases::default());
    let acting = Arc::new(AtomicU64::new(0));
    let mut views = link.views(me, incarnation, &timings);
    {
        let (link, leases, c) = (link.clone(), leases.clone(), ctx.clone());
        ctx.spawn("heartbeat", async move {
            loop {
                // The lease counts from when the heartbeat was sent, not when it was answered.
                let sent = Instant::now();
                if let Ok(grant) = link.heartbeat(me, incarnation, &timings).await {
                    leases.answered(grant.index);
                    if !grant.lease.is_zero() {
                        leases.grant(sent + grant.lease, grant.index);
                    }
                }
                if !c.sleep(timings.heartbeat).await {
                    return Ok(());
                }
            }
        });
    }
    let singletons: Arc<Mutex<HashMap<Key, KillSwitch>>> = Default::default();
    let singleton_started = Arc::new(tokio::sync::Notify::new());
    // The watchdog killed something: the loop replaces it (even if a lease is back by then).
    let killed = Arc::new(tokio::sync::Notify::new());
    {
        // The watchdog: independent of the loop below (which may be busy starting instances),
        // it kills every singleton as soon as no lease covers it.
        let (acting, leases, singletons, started, killed, c) = (
            acting.clone(),
            leases.clone(),
            singletons.clone(),
            singleton_started.clone(),
            killed.clone(),
            ctx.clone(),
        );
        ctx.spawn("lease-watchdog", async move {
            loop {
                // Every WATCHDOG_PERIOD while a singleton runs; while none does, rarely (a
                // fleet of agents must not wake 50 times a second for nothing), and at once
                // when one starts.
                let period = if lock(&singletons).is_empty() {
                    WATCHDOG_IDLE
                } else {
                    WATCHDOG_PERIOD
                };
                tokio::select! {
                    alive = c.sleep(period) => if !alive { break },
                    () = started.notified() => {}
                }
                if leases.valid(acting.load(Ordering::Acquire)) {
                    continue;
                }
                let mut fired = false;
                for (key, kill) in lock(&singletons).iter() {
                    if !kill.is_fired() {
                        tracing::warn!(
                            "{}#{}: this node holds no lease for its singleton (no leader with a quorum has answered its heartbeats in time): killing it",
                            key.0,
                            key.1
                        );
                        kill.fire();
                        fired = true;
                    }
                }
                if fired {
                    killed.notify_one();
                }
            }
            Ok(())
        });
    }
    // Reports go through Raft; without a quorum they wait, so they are sent from their own
    // task and never hold up the loop.
    let (report_tx, mut report_rx) = tokio::sync::mpsc::unbounded_channel::<InstanceReport>();
    let acked: Acked = Default::default();
    {
        let (link, c, acked) = (link.clone(), ctx.clone(), acked.clone());
        ctx.spawn("report", async move {
            while let Some(Some(first)) = c.wait(report_rx.recv()).await {
                // Whatever queued up meanwhile goes at once, as one command. A newer report of
                // an instance replaces an older one still queued (thousands of instances must
                // not snowball re-sent reports).
                let mut pending: BTreeMap<(String, String, u32), InstanceReport> = BTreeMap::new();
                let mut next = Some(first);
                while let Some(r) = next.take() {
                    pending.insert(report_key(&r), r);
                    if pending.len() < MAX_REPORTS_AT_ONCE {
                        next = report_rx.try_recv().ok();
                    }
                }
                let batch: Vec<InstanceReport> = pending.into_values().collect();
                let n = batch.len();
                let plain: Vec<(Key, AckedReport)> = batch
                    .iter()
                    .filter(|r| r.move_.is_empty())
                    .map(|r| {
                        (
                            (r.service.clone(), r.slot),
                            (r.state.clone(), r.restart_count, r.epoch, r.healthy),
                        )
                    })
                    .collect();
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    link.report(me, incarnation, batch),
                )
                .await
                {
                    Ok(Ok(())) => lock(&acked).extend(plain),
                    Ok(Err(e)) => tracing::debug!("reporting {n} instance(s): {e}"),
                    Err(_) => tracing::debug!("reporting {n} instance(s): no answer within 2s"),
                }
            }
            Ok(())
        });
    }
    let mut agent = Instances {
        me,
        acting: acting.clone(),
        supervisor: instances,
        local: HashMap::new(),
        stopping: HashMap::new(),
        singletons,
        singleton_started,
        report_tx,
        acked,
        quiet_sent: HashMap::new(),
        unbuildable: HashMap::new(),
    };
    let mut said_waiting_for_catch_up = false;
    let mut period = PERIOD;
    // What the last pass that found everything settled looked at: view index, lease, caught up.
    let mut settled_on: Option<(u64, bool, bool)> = None;
    // The instances' lifecycle events (a start, a crash, a restart, a stop) wake the loop at
    // once, so their reports go out without waiting for the next look at the state.
    let mut events = Some(agent.supervisor.subscribe_tree());
    loop {
        let next_event = async {
            match events.as_mut() {
                // An event, or some missed (lagged): look. Closed: stop listening.
                Some(rx) => !matches!(
                    rx.recv().await,
                    Err(tokio::sync::broadcast::error::RecvError::Closed)
                ),
                None => std::future::pending().await,
            }
        };
        let mut timer = false;
        let woken = tokio::select! {
            alive = ctx.sleep(period) => {
                if !alive {
                    break;
                }
                timer = true;
                None
            }
            open = next_event => Some(open),
            // A new view: act at once.
            _ = views.changed() => None,
            // The watchdog killed a singleton: replace it once a lease covers it again.
            () = killed.notified() => None,
        };
        match woken {
            Some(true) => {
                // Whatever else happens meanwhile is seen by the same pass.
                if !ctx.sleep(EVENT_COALESCE).await {
                    break;
                }
                if let Some(rx) = events.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
            }
            Some(false) => events = None,
            None => {}
        }
        agent.stopping.retain(|_, stop| !stop.is_finished());
        let state: Arc<NodeView> = views.borrow_and_update().clone();
        acting.store(state.index, Ordering::Release);
        let leased = leases.valid(state.index);
        let caught_up = leases.caught_up(state.index);
        let looked_at = (state.index, leased, caught_up);
        let settled = if timer && settled_on == Some(looked_at) {
            // Nothing changed since a settled pass but time: only see whether the instances
            // still run (a fleet of idle agents does this for every instance every second).
            still(&agent) || report_changes(&mut agent, &state)
        } else {
            pass(&mut agent, &kinds, &state, &leases, leased, caught_up).await
        };
        settled_on = settled.then_some(looked_at);
        period = if settled { SETTLED_PERIOD } else { PERIOD };
        if !caught_up && !said_waiting_for_catch_up && !state.services.is_empty() {
            said_waiting_for_catch_up = true;
            tracing::info!(
                "starting no instance before this node's view of its placements has caught up with the leader"
            );
        }
    }
    let keys: Vec<Key> = agent.local.keys().cloned().collect();
    for key in keys {
        if let Some(l) = agent.local.remove(&key) {
            agent.begin_stop(key, l, false, None);
        }
    }
    for (_, stop) in agent.stopping.drain() {
        let _ = stop.await;
    }
}

/// One pass of the agent over the replicated state. Whether everything is settled: every
/// instance that should run here runs, untouched by a health check, and its state is taken.
async fn pass(
    agent: &mut Instances,
    kinds: &KindRegistry,
    state: &NodeView,
    leases: &Leases,
    leased: bool,
    caught_up: bool,
) -> bool {
    let me = agent.me;
    let mut prints = Prints::default();
    // Quiet reports repeat while their reason lasts; a reason gone is forgotten.
    agent
        .quiet_sent
        .retain(|_, sent| sent.elapsed() < Duration::from_secs(2));
    // What should run here: placed here, or moving away from here (kept until it runs on
    // its new node).
    let mut desired: BTreeMap<Key, Desired<'_>> = BTreeMap::new();
    let mut release = Vec::new();
    for (service, vs) in &state.services {
        for (slot, p) in &vs.here {
            // The version this instance is set to run (an older one during a rollout).
            let spec = vs.versions.get(&p.generation).unwrap_or(&vs.spec);
            let key = (service.clone(), *slot);
            if spec.singleton && p.moving_from == Some(me) {
                // A singleton leaves before it arrives elsewhere: stop it, then release it.
                release.push(key);
            } else if spec.singleton && p.node == me && p.moving_from.is_some() {
                // Not ours to start until the old node released it.
            } else if p.node == me || p.moving_from == Some(me) {
                desired.insert(
                    key,
                    Desired {
                        spec,
                        restart_seq: p.restart_seq,
                        epoch: p.epoch,
                    },
                );
            }
        }
    }
    agent
        .unbuildable
        .retain(|k, (f, seq, epoch)| match desired.get(k) {
            Some(d) => *f == prints.of(d.spec) && *seq == d.restart_seq && *epoch == d.epoch,
            None => false,
        });

    // Stop what should not run here any more, or is a singleton without a lease (killed at
    // once: its replacement may start elsewhere as soon as the lease would have run out).
    let keys: Vec<Key> = agent.local.keys().cloned().collect();
    for key in keys {
        // Killed by the watchdog: dead whether or not a lease is back by now (a lease gap
        // shorter than this loop's period is seen only here). Replaced by a new copy.
        let killed = agent.local.get(&key).is_some_and(|l| l.kill.is_fired());
        let (keep, kill) = match desired.get(&key) {
            None => (false, false),
            Some(d) if d.spec.singleton && (!leased || killed) => (false, true),
            // A dependency being removed: its dependents stop first (an operator's
            // decision; a dependency that merely restarts or moves stops nothing).
            Some(d) if d.spec.depends_on.iter().any(|x| is_deleting(state, x)) => (false, false),
            Some(_) => (true, false),
        };
        if keep {
            continue;
        }
        if let Some(l) = agent.local.remove(&key) {
            let restarts = l.inner.restart_count();
            let epoch = l.epoch;
            agent.begin_stop(key.clone(), l, kill, None);
            if kill {
                tracing::info!("{}#{} stopped: lease lost", key.0, key.1);
            }
            if desired.contains_key(&key) {
                agent.report(&key, "waiting", restarts, None, epoch);
            }
        }
    }

    for key in release {
        let release = release_report(&key);
        match agent.local.remove(&key) {
            Some(l) => agent.begin_stop(key, l, false, Some(release)),
            None if !agent.stopping.contains_key(&key) => agent.quiet_report(&key, release),
            None => {}
        }
    }

    // Start or replace what should run.
    for (key, d) in &desired {
        let spec = d.spec;
        if let Some(l) = agent.local.get(key) {
            if l.fingerprint == prints.of(spec)
                && l.restart_seq == d.restart_seq
                && l.epoch == d.epoch
            {
                continue;
            }
            // New config, a restart was asked for, or a new assignment: replace it (the new
            // copy starts once the old one has stopped).
            if let Some(l) = agent.local.remove(key) {
                agent.begin_stop(key.clone(), l, false, None);
            }
            continue;
        }
        if !caught_up || (spec.singleton && !leased) || agent.stopping.contains_key(key) {
            continue;
        }
        if agent.unbuildable.contains_key(key) {
            continue;
        }
        let placement = state.services.get(&key.0).and_then(|s| s.here.get(&key.1));
        if !dependencies_ready(state, spec) {
            // Not started until its dependencies run; say so (once, not every pass).
            let said = lock(&agent.acked)
                .get(key)
                .filter(|(_, _, epoch, _)| *epoch == d.epoch)
                .map(|(st, restarts, _, _)| (st == "waiting", *restarts));
            if placement.is_some_and(|p| p.node == me) && said.is_none_or(|(waiting, _)| !waiting) {
                let report = plain_report(
                    key,
                    "waiting",
                    said.map_or(0, |(_, restarts)| restarts),
                    None,
                    d.epoch,
                );
                agent.quiet_report(key, report);
            }
            continue;
        }
        let kill = KillSwitch::default();
        let instance = InstanceSpec {
            service: spec.name.clone(),
            slot: key.1,
            node: me,
            config: spec.config.clone(),
            secrets: spec.secrets.clone(),
            grace: spec.stop_grace(),
            fencing_token: d.epoch,
            kill: kill.clone(),
            lease: spec.singleton.then(|| leases.deadline.clone()),
        };
        let built = kinds.create(&spec.kind, &instance).and_then(|inner| {
            let check = spec.health.as_deref().map(|c| kinds.health_check(c));
            Ok((inner, check.transpose()?))
        });
        let (inner, check) = match built {
            Ok(built) => built,
            Err(e) => {
                agent
                    .unbuildable
                    .insert(key.clone(), (prints.of(spec), d.restart_seq, d.epoch));
                agent.report(
                    key,
                    "failed",
                    0,
                    Some(format!("cannot create: {e}")),
                    d.epoch,
                );
                continue;
            }
        };
        let health = check.map(|check| {
            let env = vec![
                ("MODE_SERVICE".to_string(), spec.name.clone()),
                ("MODE_SLOT".to_string(), key.1.to_string()),
                ("MODE_NODE_ID".to_string(), me.to_string()),
                ("PATH".to_string(), super::kinds::BASE_PATH.to_string()),
            ];
            super::health::Health::start(check, key.1, env, inner.clone())
        });
        let wrapper = instance_supervisor(spec, key.1, inner.clone());
        agent.supervisor.add_dependency(wrapper.clone());
        tracing::info!("starting {} (fencing token {})", instance.label(), d.epoch);
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "agent",
            otel.name = "agent.start_instance",
            instance = %instance.label(),
            kind = %spec.kind,
            node = me,
            error = tracing::field::Empty,
        );
        crate::telemetry::set_parent(&span, placement.and_then(|p| p.trace.as_deref()));
        // Called inside the span, so that the lifecycle spans nest under it.
        let started = async { wrapper.start().await }
            .instrument(span.clone())
            .await;
        if let Err(e) = started {
            tracing::warn!("{} failed to start: {e}", instance.label());
            span.record("error", tracing::field::display(&e));
        }
        if spec.singleton {
            lock(&agent.singletons).insert(key.clone(), kill.clone());
            agent.singleton_started.notify_one();
            // The lease may have run out while it started: the watchdog only sees it now.
            if !leases.valid(agent.acting.load(Ordering::Acquire)) {
                kill.fire();
            }
        }
        agent.local.insert(
            key.clone(),
            Local {
                wrapper,
                inner,
                fingerprint: prints.of(spec),
                restart_seq: d.restart_seq,
                epoch: d.epoch,
                kill,
                health,
                reported: None,
                seen: None,
                reported_at: Instant::now(),
            },
        );
    }

    // Report changes (only for instances placed here; a moving-away copy stays quiet).
    let settled = agent.stopping.is_empty()
        && agent.quiet_sent.is_empty()
        && desired.len() == agent.local.len()
        && desired.keys().all(|k| agent.local.contains_key(k));
    lock(&agent.acked).retain(|key, _| agent.local.contains_key(key) || desired.contains_key(key));
    report_changes(agent, state) && settled
}

/// Whether every instance placed here is as the last report look saw it (atomics only: the
/// look of a settled agent whose view, lease and catch-up have not changed).
fn still(agent: &Instances) -> bool {
    agent
        .local
        .values()
        .all(|l| l.seen.is_none_or(|seen| seen == observe_health(l)))
}

/// Report what changed in the instances running here since their last report (only for
/// instances placed here: a moving-away copy stays quiet). Whether every one is running,
/// untouched by a health check, and its state is taken.
///
/// Alone, this is the agent's periodic look while nothing else changed (same view, lease and
/// catch-up as a settled pass): it allocates only for a report it sends.
fn report_changes(agent: &mut Instances, state: &NodeView) -> bool {
    let me = agent.me;
    let mut settled = true;
    let mut reports = Vec::new();
    let acked = lock(&agent.acked);
    for (key, l) in agent.local.iter_mut() {
        let placed_here = state
            .services
            .get(&key.0)
            .and_then(|s| s.here.get(&key.1))
            .is_some_and(|p| p.node == me && p.epoch == l.epoch);
        l.seen = None;
        if !placed_here {
            continue;
        }
        let (st, restarts, healthy) = observe_health(l);
        settled &= st == "running" && l.health.is_none();
        // A crash is reported once its supervisor has said when it restarts it (at once, or
        // on the next look).
        let retry_at_ms = l.inner.next_restart_ms();
        if st == "crashed" && retry_at_ms.is_none() {
            continue;
        }
        let current = Some((st, restarts, healthy));
        l.seen = current;
        let stale = !acked.get(key).is_some_and(|(s, r, e, h)| {
            s == st && *r == restarts && *e == l.epoch && *h == healthy
        });
        // Re-send a report the state does not show yet, at most once a second; an identical
        // one the state shows is never sent again.
        settled &= !stale;
        let resend = stale && l.reported_at.elapsed() > Duration::from_secs(1);
        if (l.reported != current && stale) || resend {
            l.reported = current;
            l.reported_at = Instant::now();
            let mut report = plain_report(key, st, restarts, crash_of(l, st), l.epoch);
            report.healthy = healthy;
            report.retry_at_ms = retry_at_ms.filter(|_| st == "crashed");
            reports.push(report);
        }
    }
    drop(acked);
    for report in reports {
        let _ = agent.report_tx.send(report);
    }
    settled
}
