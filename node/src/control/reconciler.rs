//! The leader's control loop: failure detection from heartbeats, scheduling, make-before-break
//! drains, rescheduling of instances that exceeded their restart intensity, and service
//! removal with dependents stopped first. Every decision is committed through Raft and
//! recorded as an event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::model::limits::PLACE_CHUNK;
use crate::model::state::{ClusterState, Command, NodeStatus, SlotAssignment};
use crate::replication::{ClusterNode, Heartbeats};
use crate::schedule::{plan_avoiding, Assignment, Avoid};

/// How often the leader reconciles.
const PERIOD: Duration = Duration::from_millis(100);

/// Failure-detection settings.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// A node silent for longer is marked down and its instances are rescheduled.
    pub grace: Duration,
    /// How long to wait before moving an instance that exceeded its restart intensity, doubled
    /// for each further move (capped at 30 s).
    pub reschedule_backoff: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            grace: Duration::from_millis(1500),
            reschedule_backoff: Duration::from_millis(500),
        }
    }
}

/// Leader-local memory between passes.
#[derive(Default)]
struct Memory {
    leading: bool,
    /// What the last full pass saw: the count of plan-changing applies, and the applied
    /// index when plain reports matter too; planning runs again only when that moves (or
    /// while a failed instance waits out its backoff).
    planned_at: Option<(u64, u64)>,
    /// Whether the last pass saw an instance moving or a service being removed: then reports
    /// of instances running decide the next step, and any apply replans.
    reports_matter: bool,
    /// Whether the last pass left a failed instance waiting out its backoff (planning then
    /// runs again although the state did not move).
    backing_off: bool,
    /// The last "could not be placed" summary recorded per service.
    unplaced: HashMap<String, String>,
    /// The last reason recorded per instance kept on a draining node with nowhere to go.
    stuck: HashMap<(String, u32), String>,
    /// Whether a rollout is under way (its steps depend on time as well as on the state, so
    /// every pass plans).
    rolling: bool,
}

/// How long after a traced change (`svc apply`) placements still join its trace; later ones
/// (a node failing hours after the deploy) are not part of that request.
const TRACE_CONTINUES_FOR: Duration = Duration::from_secs(10);

/// Run the control loop until `stopped` resolves; acts only while this node leads.
pub async fn run(
    node: Arc<ClusterNode>,
    liveness: Liveness,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut memory = Memory::default();
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(PERIOD) => {}
        }
        if !node.is_leader() {
            memory.leading = false;
            continue;
        }
        // Read before the state is: a change after this is planned by the next pass.
        let seen = (
            node.plan_changes(),
            if memory.reports_matter {
                node.applied_index()
            } else {
                0
            },
        );
        let waiting = memory.backing_off;
        if memory.leading && memory.planned_at == Some(seen) && !waiting && !memory.rolling {
            // Nothing new to plan; only liveness can change.
            let commands = node.local_state(|s| liveness_commands(&node, s, liveness));
            commit(&node, commands).await;
            continue;
        }
        let state = node.local_state_long(ClusterState::without_events);
        memory.planned_at = Some(seen);
        if !memory.leading {
            node.heartbeats().reset(state.nodes.keys().copied());
            memory = Memory {
                leading: true,
                ..Memory::default()
            };
        }
        // Planning 1,000,000 placements takes a while: off the runtime's workers, so that
        // heartbeats and Raft are served meanwhile.
        let commands =
            crate::replication::off_worker(|| decide(&node, &state, liveness, &mut memory));
        let commands = split_traced(commands, &state, crate::replication::now_ms());
        commit_traced(&node, commands).await;
    }
}

/// Split placement decisions about services whose latest change was traced into one
/// decision per service, each tagged with the trace it continues.
fn split_traced(
    commands: Vec<Command>,
    state: &ClusterState,
    now_ms: u64,
) -> Vec<(Command, Option<String>)> {
    let live = |service: &str| -> Option<String> {
        let t = state.traces.get(service)?;
        let age = Duration::from_millis(now_ms.saturating_sub(t.at_ms));
        (age < TRACE_CONTINUES_FOR).then(|| t.context.clone())
    };
    let mut out = Vec::with_capacity(commands.len());
    for command in commands {
        let Command::Place { assign, unassign } = command else {
            out.push((command, None));
            continue;
        };
        let mut plain = (Vec::new(), Vec::new());
        let mut traced: BTreeMap<String, (String, Vec<SlotAssignment>, Vec<SlotAssignment>)> =
            BTreeMap::new();
        for (list, a) in assign
            .into_iter()
            .map(|a| (0, a))
            .chain(unassign.into_iter().map(|a| (1, a)))
        {
            let target = match live(&a.service) {
                Some(t) => {
                    let e = traced
                        .entry(a.service.clone())
                        .or_insert_with(|| (t, Vec::new(), Vec::new()));
                    if list == 0 {
                        &mut e.1
                    } else {
                        &mut e.2
                    }
                }
                None => {
                    if list == 0 {
                        &mut plain.0
                    } else {
                        &mut plain.1
                    }
                }
            };
            target.push(a);
        }
        for (_, (trace, assign, unassign)) in traced {
            out.push((Command::Place { assign, unassign }, Some(trace)));
        }
        if !plain.0.is_empty() || !plain.1.is_empty() {
            out.push((
                Command::Place {
                    assign: plain.0,
                    unassign: plain.1,
                },
                None,
            ));
        }
    }
    out
}

/// Commit decisions in order, each placement decision under a `placement.decide` span (in the
/// trace of the change it carries out, when it has one).
///
/// They are proposed all at once, in order, so that the leader's batcher commits them together
/// (one Raft entry for most passes) and in this order; one after the other they cost one round
/// trip each, and a big pass held up node-down detection for many seconds. (Each write queues
/// its proposal when first polled.)
async fn commit_traced(node: &ClusterNode, commands: Vec<(Command, Option<String>)>) {
    use tracing::Instrument as _;
    type Write<'a> = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), crate::replication::ClusterError>>
                + Send
                + 'a,
        >,
    >;
    let mut writes: Vec<Write<'_>> = Vec::with_capacity(commands.len());
    for (command, trace) in commands {
        let written: Write<'_> = match &command {
            Command::Place { assign, unassign } => {
                let span = tracing::info_span!(
                    target: crate::telemetry::TARGET,
                    "placement",
                    otel.name = "placement.decide",
                    assigned = assign.len(),
                    unassigned = unassign.len(),
                    assign = %describe_slots(assign),
                    unassign = %describe_slots(unassign),
                );
                crate::telemetry::set_parent(&span, trace.as_deref());
                Box::pin(async move { node.write(command, false).instrument(span).await.map(drop) })
            }
            _ => Box::pin(async move { node.write(command, false).await.map(drop) }),
        };
        writes.push(written);
    }
    for written in all_in_order(writes).await {
        if let Err(e) = written {
            tracing::debug!("control loop: {e}");
        }
    }
}

/// Run `futures` together, each first polled in order; their outputs in the same order.
async fn all_in_order<T>(
    mut futures: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>,
) -> Vec<T> {
    let mut out: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

async fn commit(node: &ClusterNode, commands: Vec<Command>) {
    commit_traced(node, commands.into_iter().map(|c| (c, None)).collect()).await;
}

/// `web#0@2,web#1@3`, the first 20 of them (a span attribute, not a report).
fn describe_slots(slots: &[SlotAssignment]) -> String {
    const SHOWN: usize = 20;
    let mut out = slots
        .iter()
        .take(SHOWN)
        .map(|a| format!("{}#{}@{}", a.service, a.slot, a.node))
        .collect::<Vec<_>>()
        .join(",");
    if slots.len() > SHOWN {
        out.push_str(&format!(",… {} more", slots.len() - SHOWN));
    }
    out
}

/// Mark silent nodes down (and nodes that said they were leaving, if the notice's own call
/// did not), and nodes heard again up.
fn liveness_commands(node: &ClusterNode, state: &ClusterState, liveness: Liveness) -> Vec<Command> {
    liveness_of(node.heartbeats(), state, liveness)
}

fn liveness_of(heartbeats: &Heartbeats, state: &ClusterState, liveness: Liveness) -> Vec<Command> {
    let mut commands = Vec::new();
    for (id, info) in &state.nodes {
        let up = matches!(info.status, NodeStatus::Up | NodeStatus::Draining);
        match heartbeats.left(*id) {
            // Being committed by the call that took the notice.
            Some(left) if left.committing => continue,
            Some(_) if up => {
                commands.extend(Command::node_left(*id));
                continue;
            }
            // Down for having left: not back until heard again.
            Some(_) => continue,
            None => {}
        }
        if up {
            if heartbeats.age(*id) > liveness.grace {
                commands.push(Command::SetNodeStatus {
                    id: *id,
                    status: NodeStatus::Down,
                });
                commands.push(event(
                    "node-down",
                    format!("node {id} missed its heartbeats for over {:?}; marked down, its instances move", liveness.grace),
                    None,
                    Some(*id),
                ));
            }
        } else if heartbeats
            .heard(*id)
            .is_some_and(|age| age <= liveness.grace)
        {
            let status = if info.draining {
                NodeStatus::Draining
            } else {
                NodeStatus::Up
            };
            commands.push(Command::SetNodeStatus { id: *id, status });
        }
    }

    commands
}

/// The commands one pass wants committed, in order.
fn decide(
    node: &ClusterNode,
    state: &ClusterState,
    liveness: Liveness,
    memory: &mut Memory,
) -> Vec<Command> {
    // 1. Failure detection.
    let mut commands = liveness_commands(node, state, liveness);

    // 2. Removal: once no dependent runs, the service's instances go.
    for name in &state.deleting {
        let dependents_running = state.specs.values().any(|s| {
            s.depends_on.iter().any(|d| d == name)
                && state
                    .placements
                    .get(&s.name)
                    .is_some_and(|slots| slots.values().any(|p| p.state == "running"))
        });
        if !dependents_running {
            commands.push(Command::PurgeSpec { name: name.clone() });
        }
    }

    // 3. Drains finish when the new instance runs (or, for a singleton, when the old node has
    // released it — see `ReleaseMove` — or is down).
    memory.reports_matter = !state.deleting.is_empty();
    for (service, slots) in &state.placements {
        let singleton = state.specs.get(service).is_some_and(|s| s.singleton);
        for (slot, p) in slots {
            let old_down = p
                .moving_from
                .and_then(|o| state.nodes.get(&o))
                .is_none_or(|n| n.status == NodeStatus::Down);
            memory.reports_matter |= p.moving_from.is_some();
            if p.moving_from.is_some() && ((!singleton && p.state == "running") || old_down) {
                commands.push(Command::FinishMove {
                    service: service.clone(),
                    slot: *slot,
                });
            }
        }
    }

    // 4. Scheduling.
    let nodes = state.node_views();
    // Services being removed are left alone: their instances go when they are purged.
    let specs = state.spec_views();
    let mut avoid = Avoid::new();
    let mut current = Vec::new();
    let mut failed_now = BTreeSet::new();
    let now_ms = crate::replication::now_ms();
    memory.backing_off = false;
    for (service, slots) in &state.placements {
        if state.deleting.contains(service) {
            continue;
        }
        for (slot, p) in slots {
            let key = (service.clone(), *slot);
            if !p.avoid.is_empty() {
                avoid.insert(key.clone(), p.avoid.iter().copied().collect());
            }
            if p.state == "failed" {
                // The backoff lives in the replicated placement (when it failed, how often it
                // was moved), so a new leader keeps it instead of starting over.
                if now_ms >= p.failed_at_ms.unwrap_or(0) + reschedule_wait(liveness, p.reschedules)
                {
                    failed_now.insert(key);
                    continue; // not current: the plan places it again, elsewhere if it can
                }
                memory.backing_off = true;
            }
            current.push(Assignment {
                service: service.clone(),
                slot: *slot,
                node: p.node,
            });
        }
    }
    let plan = plan_avoiding(&nodes, &specs, &current, &avoid);

    let draining: BTreeSet<u64> = state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Draining)
        .map(|n| n.id)
        .collect();
    let from: BTreeMap<(String, u32), u64> = plan
        .unassign
        .iter()
        .map(|a| ((a.service.clone(), a.slot), a.node))
        .collect();
    let mut assign = Vec::new();
    let mut unassign = Vec::new();
    let mut notes: Vec<(String, Option<u64>, String)> = Vec::new();
    for a in &plan.assign {
        let key = (a.service.clone(), a.slot);
        let old = from.get(&key).copied().or_else(|| {
            failed_now
                .contains(&key)
                .then(|| {
                    state
                        .placements
                        .get(&a.service)
                        .and_then(|s| s.get(&a.slot))
                        .map(|p| p.node)
                })
                .flatten()
        });
        // Draining: the old node keeps it until the new one runs (make before break); a
        // singleton instead waits on the new node until the old one has stopped it.
        let moving_from = old.filter(|o| draining.contains(o) && *o != a.node);
        let message = match old {
            Some(o) if o == a.node => format!(
                "{}#{} restarted on node {} after exceeding its restart intensity",
                a.service, a.slot, a.node
            ),
            Some(o) if draining.contains(&o) => format!(
                "{}#{} moving from draining node {o} to node {}",
                a.service, a.slot, a.node
            ),
            Some(o) if failed_now.contains(&key) => {
                format!(
                    "{}#{} moved from node {o} to node {} after exceeding its restart intensity",
                    a.service, a.slot, a.node
                )
            }
            Some(o) => format!(
                "{}#{} moved from node {o} (down or ineligible) to node {}",
                a.service, a.slot, a.node
            ),
            None => format!("{}#{} placed on node {}", a.service, a.slot, a.node),
        };
        notes.push((a.service.clone(), Some(a.node), message));
        assign.push(SlotAssignment {
            service: a.service.clone(),
            slot: a.slot,
            node: a.node,
            moving_from,
        });
    }
    let reassigned: BTreeSet<(String, u32)> = plan
        .assign
        .iter()
        .map(|a| (a.service.clone(), a.slot))
        .collect();
    let unplaced_reasons: BTreeMap<(String, u32), &str> = plan
        .unplaced
        .iter()
        .map(|u| ((u.service.clone(), u.slot), u.reason.as_str()))
        .collect();
    for a in &plan.unassign {
        let key = (a.service.clone(), a.slot);
        if reassigned.contains(&key) {
            continue; // replaced by the assignment above
        }
        if draining.contains(&a.node) {
            if let Some(reason) = unplaced_reasons.get(&key) {
                // Nowhere to go: a drain keeps it where it runs rather than cause an outage.
                if memory.stuck.get(&key).map(String::as_str) != Some(*reason) {
                    memory.stuck.insert(key.clone(), reason.to_string());
                    commands.push(event(
                        "drain-stuck",
                        format!(
                            "{}#{} stays on draining node {}: it cannot run elsewhere ({reason})",
                            a.service, a.slot, a.node
                        ),
                        Some(a.service.clone()),
                        Some(a.node),
                    ));
                }
                continue;
            }
        }
        notes.push((
            a.service.clone(),
            Some(a.node),
            format!("{}#{} removed from node {}", a.service, a.slot, a.node),
        ));
        unassign.push(SlotAssignment {
            service: a.service.clone(),
            slot: a.slot,
            node: a.node,
            moving_from: None,
        });
    }
    // The decision first (in pieces a write can hold), then the events that describe it.
    commands.extend(place_in_chunks(assign, unassign));
    // One summary per service, and only when it changed: 20,000 unplaceable instances are one
    // event, not 20,000 writes.
    // Instances kept on a draining node were said above.
    let unplaced: Vec<_> = plan
        .unplaced
        .iter()
        .filter(|u| {
            !state
                .placements
                .get(&u.service)
                .and_then(|s| s.get(&u.slot))
                .is_some_and(|p| draining.contains(&p.node))
        })
        .cloned()
        .collect();
    memory.stuck.retain(|k, _| unplaced_reasons.contains_key(k));
    let summaries = unplaced_summaries(state, &unplaced);
    memory
        .unplaced
        .retain(|service, _| summaries.contains_key(service));
    // 5. Rollouts (after the placements above, and leaving alone what they move).
    let moving: BTreeSet<(String, u32)> = reassigned
        .iter()
        .cloned()
        .chain(state.placements.iter().flat_map(|(s, slots)| {
            slots
                .iter()
                .filter(|(_, p)| p.moving_from.is_some())
                .map(|(n, _)| (s.clone(), *n))
        }))
        .collect();
    memory.rolling = false;
    commands.extend(rollout_commands(
        state,
        &summaries,
        &moving,
        now_ms,
        &mut memory.rolling,
    ));
    for (service, summary) in summaries {
        if memory.unplaced.get(&service) != Some(&summary) {
            memory.unplaced.insert(service.clone(), summary.clone());
            commands.push(event("unplaced", summary, Some(service), None));
        }
    }
    // One event per decision, or per service when a pass decides a lot (a large deploy).
    if notes.len() <= MAX_DETAILED_EVENTS {
        for (service, node, message) in notes {
            commands.push(event("placement", message, Some(service), node));
        }
    } else {
        let mut per_service: BTreeMap<String, usize> = BTreeMap::new();
        for (service, _, _) in &notes {
            *per_service.entry(service.clone()).or_default() += 1;
        }
        for (service, n) in per_service {
            commands.push(event(
                "placement",
                format!("{service}: {n} instances placed, moved or removed in one pass"),
                Some(service),
                None,
            ));
        }
    }
    commands
}

/// The next step of every rollout under way: instances to replace, rollouts that ended (or
/// are reverted), and why instances of a rolling version cannot be placed. Sets `rolling`
/// when one is under way.
fn rollout_commands(
    state: &ClusterState,
    unplaced: &BTreeMap<String, String>,
    moving: &BTreeSet<(String, u32)>,
    now_ms: u64,
    rolling: &mut bool,
) -> Vec<Command> {
    use crate::model::rollout::{self, RolloutStatus, Step};
    let mut commands = Vec::new();
    let empty = BTreeMap::new();
    for (name, spec) in &state.specs {
        if state.deleting.contains(name) {
            continue;
        }
        let Some(version) = state.current_version(name) else {
            continue;
        };
        if version.status != RolloutStatus::Rolling {
            continue;
        }
        *rolling = true;
        let generation = spec.generation;
        let note = unplaced.get(name).cloned();
        if version.unplaced != note {
            commands.push(Command::NoteUnplaced {
                service: name.clone(),
                generation,
                unplaced: note,
            });
        }
        let placed = state.placements.get(name).unwrap_or(&empty);
        match rollout::step(spec, version, placed, now_ms) {
            Step::Wait => {}
            Step::Replace(slots) => {
                let slots: Vec<u32> = slots
                    .into_iter()
                    .filter(|n| !moving.contains(&(name.clone(), *n)))
                    .collect();
                for chunk in slots.chunks(PLACE_CHUNK) {
                    commands.push(Command::RollInstances {
                        service: name.clone(),
                        generation,
                        slots: chunk.to_vec(),
                    });
                }
            }
            Step::Succeeded => commands.push(Command::FinishRollout {
                service: name.clone(),
                generation,
                failed: None,
            }),
            Step::Failed(why) => {
                let good = state.versions.get(name).and_then(|vs| {
                    vs.iter().rev().find(|v| {
                        v.spec.generation < generation && v.status == RolloutStatus::Succeeded
                    })
                });
                match good {
                    Some(good) if spec.update.auto_revert && version.revert_of.is_none() => {
                        commands.push(Command::RollbackSpec {
                            name: name.clone(),
                            to_generation: good.spec.generation,
                            expected_generation: generation,
                            revert_of: Some(generation),
                            reason: Some(why),
                        })
                    }
                    None if spec.update.auto_revert && version.revert_of.is_none() => commands
                        .push(Command::FinishRollout {
                            service: name.clone(),
                            generation,
                            failed: Some(format!(
                                "{why} (not reverted: no earlier version rolled out completely)"
                            )),
                        }),
                    _ => commands.push(Command::FinishRollout {
                        service: name.clone(),
                        generation,
                        failed: Some(why),
                    }),
                }
            }
        }
    }
    commands
}

/// When a failed instance moves to another node (ms since the epoch): when it failed plus
/// its backoff.
pub fn reschedule_at(p: &crate::model::state::Placement) -> u64 {
    p.failed_at_ms.unwrap_or(0) + reschedule_wait(Liveness::default(), p.reschedules)
}

/// How long an instance that exceeded its restart intensity waits before it is moved: the
/// backoff doubles with each move, up to 30 s.
fn reschedule_wait(liveness: Liveness, reschedules: u32) -> u64 {
    let wait = liveness.reschedule_backoff * 2u32.saturating_pow(reschedules.min(6));
    wait.min(Duration::from_secs(30)).as_millis() as u64
}

/// Above this many decisions in one pass, events summarise per service.
const MAX_DETAILED_EVENTS: usize = 50;

/// `Place` commands of at most [`PLACE_CHUNK`] instances each (assigned and unassigned), in
/// order: a 50,000-instance deploy is ten writes of a few hundred KB, each under the write
/// limit.
fn place_in_chunks(
    mut assign: Vec<SlotAssignment>,
    mut unassign: Vec<SlotAssignment>,
) -> Vec<Command> {
    // By node: a chunk then touches few nodes' placement views (a deploy spread over 5,000
    // nodes would otherwise change every view with every chunk, and each view is rebuilt and
    // sent again each time).
    let by_node = |a: &SlotAssignment, b: &SlotAssignment| {
        (a.node, &a.service, a.slot).cmp(&(b.node, &b.service, b.slot))
    };
    assign.sort_by(by_node);
    unassign.sort_by(by_node);
    let mut out = Vec::new();
    let mut assign = assign.into_iter().peekable();
    let mut unassign = unassign.into_iter().peekable();
    while assign.peek().is_some() || unassign.peek().is_some() {
        out.push(Command::Place {
            assign: assign.by_ref().take(PLACE_CHUNK).collect(),
            unassign: unassign.by_ref().take(PLACE_CHUNK).collect(),
        });
    }
    out
}

/// Per service with unplaced instances: `web: 19,998 of 20,000 instances could not be placed:
/// <the most common reason>` (and how many had other reasons).
fn unplaced_summaries(
    state: &ClusterState,
    unplaced: &[crate::schedule::Unplaced],
) -> BTreeMap<String, String> {
    crate::schedule::count_unplaced(unplaced)
        .into_iter()
        .map(|(service, reasons)| {
            let count: usize = reasons.values().sum();
            let wanted = state
                .specs
                .get(service)
                .map_or(count as u64, |s| u64::from(s.instances()));
            let (reason, most) = crate::schedule::most_common(&reasons);
            let mut summary = format!(
                "{service}: {} of {} instance{} could not be placed: {reason}",
                thousands(count as u64),
                thousands(wanted),
                if wanted == 1 { "" } else { "s" },
            );
            if count > most {
                summary.push_str(&format!(
                    " ({} for other reasons)",
                    thousands((count - most) as u64)
                ));
            }
            (service.to_string(), summary)
        })
        .collect()
}

/// `19998` as `19,998`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn event(kind: &str, message: String, service: Option<String>, node: Option<u64>) -> Command {
    Command::RecordEvent {
        kind: kind.to_string(),
        message,
        service,
        node,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::TraceMark;
    use crate::service::lock;

    fn three_nodes(statuses: [&str; 3]) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, status) in statuses.iter().enumerate() {
            let id = i as u64 + 1;
            let info = serde_json::from_value(serde_json::json!({
                "id": id, "address": format!("127.0.0.1:{id}"), "status": status
            }))
            .unwrap();
            s.nodes.insert(id, info);
        }
        s
    }

    fn kinds(commands: &[Command]) -> Vec<String> {
        commands
            .iter()
            .map(|c| match c {
                Command::SetNodeStatus { id, status } => format!("{id} {}", status.as_str()),
                Command::RecordEvent { kind, node, .. } => format!("{} {kind}", node.unwrap()),
                other => other.op().to_string(),
            })
            .collect()
    }

    #[test]
    fn a_node_that_left_goes_down_as_left_and_a_new_leader_does_not_bring_down_nodes_up() {
        let liveness = Liveness::default();
        let h = Heartbeats::default();
        let s = three_nodes(["up", "up", "down"]);
        // A new leader: every node gets a grace period; node 3, down, stays down until heard.
        h.reset(s.nodes.keys().copied());
        assert!(liveness_of(&h, &s, liveness).is_empty());
        h.record(3);
        assert_eq!(kinds(&liveness_of(&h, &s, liveness)), ["3 up"]);
        // Node 2 says it leaves: its own call commits; if that failed, the loop does.
        h.leave(2);
        assert!(liveness_of(&h, &s, liveness)
            .iter()
            .all(|c| !kinds(std::slice::from_ref(c))[0].starts_with('2')));
        h.leave_committed(2);
        let left = kinds(&liveness_of(&h, &s, liveness));
        assert!(
            left.contains(&"2 down".to_string()) && left.contains(&"2 node-left".to_string()),
            "{left:?}"
        );
        // Once down it stays down, heartbeats on their way or not.
        let s = three_nodes(["up", "down", "up"]);
        h.record(2);
        assert!(liveness_of(&h, &s, liveness).is_empty());
    }

    fn slot(service: &str, slot: u32) -> SlotAssignment {
        SlotAssignment {
            service: service.into(),
            slot,
            node: 1,
            moving_from: None,
        }
    }

    #[test]
    fn placements_of_a_recently_traced_service_are_split_out_with_its_trace() {
        let mut state = ClusterState::default();
        let mark = |at_ms| TraceMark {
            context: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            at_ms,
        };
        state.traces.insert("fresh".into(), mark(100_000));
        state.traces.insert("stale".into(), mark(1_000));
        let place = Command::Place {
            assign: vec![slot("fresh", 0), slot("stale", 0), slot("plain", 0)],
            unassign: vec![slot("fresh", 1)],
        };
        let event = Command::RecordEvent {
            kind: "placement".into(),
            message: "m".into(),
            service: None,
            node: None,
        };
        let out = split_traced(vec![place, event.clone()], &state, 105_000);
        assert_eq!(out.len(), 3);
        let Command::Place { assign, unassign } = &out[0].0 else {
            panic!("a placement first")
        };
        assert_eq!(out[0].1.as_deref(), Some(mark(0).context.as_str()));
        assert_eq!((assign.len(), unassign.len()), (1, 1));
        assert!(assign.iter().chain(unassign).all(|a| a.service == "fresh"));
        // An old trace is not continued; the rest stay one decision, before the event.
        let Command::Place { assign, .. } = &out[1].0 else {
            panic!("then the untraced placements")
        };
        assert_eq!(out[1].1, None);
        assert_eq!(
            assign
                .iter()
                .map(|a| a.service.as_str())
                .collect::<Vec<_>>(),
            ["stale", "plain"]
        );
        assert_eq!(out[2], (event, None));
    }

    #[test]
    fn unplaced_instances_are_one_summary_per_service() {
        let mut state = ClusterState::default();
        let mut web = crate::model::spec::ServiceSpec::new("web", "exec");
        web.replicas = 20_000;
        state.specs.insert("web".into(), web);
        let u = |service: &str, slot, reason: &str| crate::schedule::Unplaced {
            service: service.into(),
            slot,
            reason: reason.into(),
        };
        let mut unplaced: Vec<_> = (2..20_000)
            .map(|i| u("web", i, "3 lack capacity"))
            .collect();
        unplaced.push(u("web", 0, "no node offers kind 'exec'"));
        unplaced.push(u("db", 0, "no node offers kind 'pg'"));
        let summaries = unplaced_summaries(&state, &unplaced);
        assert_eq!(summaries.len(), 2);
        assert_eq!(
            summaries["web"],
            "web: 19,999 of 20,000 instances could not be placed: 3 lack capacity (1 for other reasons)"
        );
        assert_eq!(
            summaries["db"],
            "db: 1 of 1 instance could not be placed: no node offers kind 'pg'"
        );
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }

    #[test]
    fn big_decisions_are_cut_into_writes_that_fit() {
        let many = |n: u32| (0..n).map(|i| slot("web", i)).collect::<Vec<_>>();
        let chunks = place_in_chunks(many(12_000), many(3));
        assert_eq!(chunks.len(), 3);
        for c in &chunks {
            assert_eq!(crate::model::limits::check_command(c), Ok(()));
            let bytes = crate::model::limits::json_len(c);
            assert!(bytes < crate::model::limits::MAX_WRITE_BYTES, "{bytes}");
        }
        let Command::Place { assign, unassign } = &chunks[2] else {
            panic!("placements")
        };
        assert_eq!((assign.len(), unassign.len()), (2_000, 0));
        assert!(place_in_chunks(vec![], vec![]).is_empty());
        // Cut by node: spread over 10 nodes, each chunk of a 10,000-slot decision holds the
        // slots of 5 nodes, not a part of every node's.
        let spread: Vec<SlotAssignment> = (0..10_000u32)
            .map(|i| SlotAssignment {
                node: u64::from(i % 10),
                ..slot("web", i)
            })
            .collect();
        for c in place_in_chunks(spread, vec![]) {
            let Command::Place { assign, .. } = c else {
                panic!("placements")
            };
            let nodes: BTreeSet<u64> = assign.iter().map(|a| a.node).collect();
            assert_eq!(nodes.len(), 5, "{nodes:?}");
        }
    }

    #[tokio::test]
    async fn writes_are_started_in_order_and_answered_in_order() {
        let started = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let futures = (0..5u64)
            .map(|i| {
                let started = started.clone();
                Box::pin(async move {
                    lock(&started).push(i);
                    // Later ones finish first.
                    tokio::time::sleep(Duration::from_millis(50 - 10 * i)).await;
                    i
                })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = u64> + Send>>
            })
            .collect();
        assert_eq!(all_in_order(futures).await, [0, 1, 2, 3, 4]);
        assert_eq!(*lock(&started), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn slot_lists_in_spans_are_capped() {
        let many: Vec<SlotAssignment> = (0..25).map(|i| slot("web", i)).collect();
        let text = describe_slots(&many);
        assert!(text.starts_with("web#0@1,web#1@1"));
        assert!(text.ends_with(",… 5 more"));
    }
}
