//! The agent: runs the instances the control plane placed on this node, each under its own
//! supervisor (restart policy from its spec), reports their states to the leader, heartbeats,
//! and stops singletons when cut off from the leader for longer than its lease.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument as _;

use super::kinds::{InstanceSpec, KindRegistry};
use crate::cluster::spec::ServiceSpec;
use crate::cluster::state::{ClusterState, Command};
use crate::cluster::{ClusterError, ClusterNode};
use crate::service::{
    Backoff, Context, RestartIntensity, ServiceHandle, ServiceState, Strategy, Supervisor,
};

/// Agent timings.
#[derive(Debug, Clone, Copy)]
pub struct AgentTimings {
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Without a heartbeat acknowledged for this long, singleton instances stop (shorter than
    /// the leader's grace period, so a singleton never runs twice).
    pub lease: Duration,
}

impl Default for AgentTimings {
    fn default() -> Self {
        AgentTimings {
            heartbeat: Duration::from_millis(250),
            lease: Duration::from_millis(1000),
        }
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
    fingerprint: String,
    restart_seq: u64,
    reported: Option<(String, u32)>,
    reported_at: Instant,
}

/// What the agent wants the leader to know about one instance.
fn observe(local: &Local) -> (String, u32, Option<String>) {
    let restarts = local.inner.restart_count();
    let last = local.inner.last_crash_reason().map(|r| r.to_string());
    let state = match (local.wrapper.state(), local.inner.state()) {
        (ServiceState::Crashed, _) => {
            let why = local
                .wrapper
                .crash_reason()
                .map(|r| r.to_string())
                .or(last.clone());
            return ("failed".to_string(), restarts, why);
        }
        (_, ServiceState::Running) => "running",
        (_, ServiceState::Crashed) => "crashed",
        (_, ServiceState::Init | ServiceState::Starting) => "starting",
        _ => "stopped",
    };
    (state.to_string(), restarts, last)
}

fn fingerprint(spec: &ServiceSpec) -> String {
    serde_json::json!([spec.kind, spec.config, spec.restart, spec.stop_grace_s]).to_string()
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

/// Reports sent together at most (one Raft entry each batch, at most a few hundred KB).
const MAX_REPORTS_AT_ONCE: usize = 1024;

/// What a queued report is about: a newer one with the same key replaces it.
fn report_key(report: &Command) -> Option<(&'static str, String, u32)> {
    match report {
        Command::ReportInstance { service, slot, .. }
        | Command::ReleaseMove { service, slot, .. } => Some((report.op(), service.clone(), *slot)),
        _ => None,
    }
}

/// Whether every service `spec` depends on runs somewhere and is not being removed.
fn dependencies_ready(state: &ClusterState, spec: &ServiceSpec) -> bool {
    spec.depends_on.iter().all(|d| {
        !state.deleting.contains(d)
            && state
                .placements
                .get(d)
                .is_some_and(|slots| slots.values().any(|p| p.state == "running"))
    })
}

/// Run the agent until the context stops. `instances` is the node's (forfeit) supervisor the
/// instances are added to.
pub async fn run(
    ctx: Context,
    node: Arc<ClusterNode>,
    kinds: KindRegistry,
    instances: ServiceHandle,
    timings: AgentTimings,
) {
    let me = node.id();
    let last_ack = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    {
        let (node, last_ack, c) = (node.clone(), last_ack.clone(), ctx.clone());
        ctx.spawn("heartbeat", async move {
            loop {
                // The lease counts from when the heartbeat was sent, not when it was answered.
                let sent = started.elapsed().as_millis() as u64 + 1;
                if node.heartbeat(me, true).await.is_ok() {
                    last_ack.fetch_max(sent, Ordering::Relaxed);
                }
                if !c.sleep(timings.heartbeat).await {
                    return Ok(());
                }
            }
        });
    }
    // Reports go through Raft; without a quorum they wait, so they are sent from their own
    // task and never hold up the loop (which must stop singletons when the lease runs out).
    let (report_tx, mut report_rx) = tokio::sync::mpsc::unbounded_channel::<Command>();
    {
        let (node, c) = (node.clone(), ctx.clone());
        ctx.spawn("report", async move {
            while let Some(Some(first)) = c.wait(report_rx.recv()).await {
                // Whatever queued up meanwhile goes at once: the leader commits concurrent
                // writes as one Raft entry. A newer report of an instance replaces an older
                // one still queued (thousands of instances must not snowball re-sent reports).
                let mut pending: BTreeMap<(&'static str, String, u32), Command> = BTreeMap::new();
                let mut others = Vec::new();
                let mut next = Some(first);
                while let Some(r) = next.take() {
                    match report_key(&r) {
                        Some(key) => {
                            pending.insert(key, r);
                        }
                        None => others.push(r),
                    }
                    if pending.len() + others.len() < MAX_REPORTS_AT_ONCE {
                        next = report_rx.try_recv().ok();
                    }
                }
                let mut writes = tokio::task::JoinSet::new();
                for report in pending.into_values().chain(others) {
                    let node = node.clone();
                    writes.spawn(async move {
                        tokio::time::timeout(Duration::from_secs(2), node.write(report, true)).await
                    });
                }
                while let Some(done) = writes.join_next().await {
                    match done {
                        Ok(Ok(Ok(_)) | Ok(Err(ClusterError::Invalid(_)))) => {}
                        Ok(Ok(Err(e))) => tracing::debug!("reporting an instance: {e}"),
                        Ok(Err(_)) => tracing::debug!("reporting an instance: no answer within 2s"),
                        Err(e) => tracing::debug!("reporting an instance: {e}"),
                    }
                }
            }
            Ok(())
        });
    }
    let mut local: HashMap<(String, u32), Local> = HashMap::new();
    // When a "waiting" report was last sent per instance (re-sent while the state disagrees).
    let mut waiting_sent: HashMap<(String, u32), Instant> = HashMap::new();
    let mut cached: Option<(u64, Arc<ClusterState>)> = None;
    loop {
        if !ctx.sleep(Duration::from_millis(100)).await {
            break;
        }
        let acked = last_ack.load(Ordering::Relaxed);
        let leased = acked > 0
            && started.elapsed().as_millis() as u64 <= acked + timings.lease.as_millis() as u64;
        // A fresh copy only when the replicated state moved (10k placements are not copied
        // ten times a second for nothing).
        let applied = node.applied_index();
        if cached.as_ref().is_none_or(|(at, _)| *at != applied) {
            cached = Some((
                applied,
                Arc::new(node.local_state(ClusterState::without_events)),
            ));
        }
        let state = match &cached {
            Some((_, s)) => s.clone(),
            None => continue,
        };
        let mut reports = Vec::new();

        // What should run here: placed here, or moving away from here (kept until it runs
        // on its new node).
        let mut desired: BTreeMap<(String, u32), (&ServiceSpec, u64)> = BTreeMap::new();
        let mut release = Vec::new();
        for (service, slots) in &state.placements {
            let Some(spec) = state.specs.get(service) else {
                continue;
            };
            for (slot, p) in slots {
                let key = (service.clone(), *slot);
                if spec.singleton && p.moving_from == Some(me) {
                    // A singleton leaves before it arrives elsewhere: stop it, then release it.
                    release.push(key);
                } else if spec.singleton && p.node == me && p.moving_from.is_some() {
                    // Not ours to start until the old node released it.
                } else if p.node == me || p.moving_from == Some(me) {
                    desired.insert(key, (spec, p.restart_seq));
                }
            }
        }

        // Stop what should not run: unplaced, waiting for a dependency, or a singleton without
        // a lease.
        let keys: Vec<(String, u32)> = local.keys().cloned().collect();
        for key in keys {
            let keep = desired.get(&key).is_some_and(|(spec, _)| {
                dependencies_ready(&state, spec) && (!spec.singleton || leased)
            });
            if !keep {
                if let Some(l) = local.remove(&key) {
                    tracing::info!("stopping {}#{}", key.0, key.1);
                    instances.remove_dependency(&l.wrapper).await;
                    if let Some((spec, _)) = desired.get(&key) {
                        let why = if spec.singleton && !leased {
                            "lease lost"
                        } else {
                            "waiting for a dependency"
                        };
                        tracing::info!("{}#{} stopped: {why}", key.0, key.1);
                        reports.push((
                            key.clone(),
                            "waiting".to_string(),
                            l.inner.restart_count(),
                            None,
                        ));
                    }
                }
            }
        }

        for (service, slot) in release {
            if let Some(l) = local.remove(&(service.clone(), slot)) {
                instances.remove_dependency(&l.wrapper).await;
            }
            let _ = report_tx.send(Command::ReleaseMove {
                service,
                slot,
                node: me,
            });
        }

        // An instance stopped for its dependencies must not look running: re-send the report
        // (at most once a second) until the state shows it.
        for (key, (spec, _)) in &desired {
            let gated = !dependencies_ready(&state, spec) || (spec.singleton && !leased);
            let shown_running = state
                .placements
                .get(&key.0)
                .and_then(|s| s.get(&key.1))
                .filter(|p| p.node == me && p.state == "running");
            if let (true, false, Some(p)) = (gated, local.contains_key(key), shown_running) {
                let due = waiting_sent
                    .get(key)
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(1));
                if due {
                    waiting_sent.insert(key.clone(), Instant::now());
                    reports.push((key.clone(), "waiting".to_string(), p.restart_count, None));
                }
            }
        }
        waiting_sent.retain(|k, _| desired.contains_key(k));

        // Start or refresh what should run.
        for (key, (spec, restart_seq)) in &desired {
            if !dependencies_ready(&state, spec) || (spec.singleton && !leased) {
                continue;
            }
            if let Some(l) = local.get_mut(key) {
                if l.fingerprint != fingerprint(spec) || l.restart_seq != *restart_seq {
                    // New config, or a restart was asked for: replace the instance.
                    let old = local.remove(key).map(|l| l.wrapper);
                    if let Some(old) = old {
                        instances.remove_dependency(&old).await;
                    }
                } else {
                    continue;
                }
            }
            let instance = InstanceSpec {
                service: spec.name.clone(),
                slot: key.1,
                node: me,
                config: spec.config.clone(),
                grace: spec.stop_grace(),
            };
            let inner = match kinds.create(&spec.kind, &instance) {
                Ok(h) => h,
                Err(e) => {
                    reports.push((
                        key.clone(),
                        "failed".to_string(),
                        0,
                        Some(format!("cannot create: {e}")),
                    ));
                    continue;
                }
            };
            let wrapper = instance_supervisor(spec, key.1, inner.clone());
            instances.add_dependency(wrapper.clone());
            tracing::info!("starting {}", instance.label());
            let span = tracing::info_span!(
                target: crate::telemetry::TARGET,
                "agent",
                otel.name = "agent.start_instance",
                instance = %instance.label(),
                kind = %spec.kind,
                node = me,
                error = tracing::field::Empty,
            );
            let trace = state
                .placements
                .get(&key.0)
                .and_then(|s| s.get(&key.1))
                .and_then(|p| p.trace.as_deref());
            crate::telemetry::set_parent(&span, trace);
            // Called inside the span, so that the lifecycle spans nest under it.
            let started = async { wrapper.start().await }
                .instrument(span.clone())
                .await;
            if let Err(e) = started {
                tracing::warn!("{} failed to start: {e}", instance.label());
                span.record("error", tracing::field::display(&e));
            }
            local.insert(
                key.clone(),
                Local {
                    wrapper,
                    inner,
                    fingerprint: fingerprint(spec),
                    restart_seq: *restart_seq,
                    reported: None,
                    reported_at: Instant::now(),
                },
            );
        }

        // Report changes (only for instances placed here; a moving-away copy stays quiet).
        for (key, l) in local.iter_mut() {
            let placed_here = state
                .placements
                .get(&key.0)
                .and_then(|s| s.get(&key.1))
                .is_some_and(|p| p.node == me);
            let (st, restarts, last) = observe(l);
            let current = Some((st.clone(), restarts));
            let remote = state.placements.get(&key.0).and_then(|s| s.get(&key.1));
            let stale = remote.is_some_and(|p| p.state != st || p.restart_count != restarts);
            // Re-send a report the state does not show yet, at most once a second.
            let resend = stale && l.reported_at.elapsed() > Duration::from_secs(1);
            if placed_here && (l.reported != current || resend) {
                l.reported = current;
                l.reported_at = Instant::now();
                reports.push((key.clone(), st, restarts, last));
            }
        }
        for ((service, slot), st, restart_count, last_crash) in reports {
            let report = Command::ReportInstance {
                service,
                slot,
                node: me,
                state: st,
                restart_count,
                last_crash,
            };
            let _ = report_tx.send(report);
        }
    }
    for (_, l) in local.drain() {
        instances.remove_dependency(&l.wrapper).await;
    }
}
