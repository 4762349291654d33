//! Rollouts: the versions of each service the replicated state keeps (its history, with how
//! each one rolled out), and the pure decision of a rolling update's next step — which
//! instances to replace now, and when the rollout has succeeded or failed.
//!
//! An instance carries the generation of the spec it runs ([`Placement::generation`]). A new
//! version whose runtime part ([`ServiceSpec::runtime`]) is unchanged adopts the instances as
//! they are; otherwise the leader's control loop replaces them a few at a time
//! ([`step`]), never leaving more than `update.max_unavailable` instances unavailable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::spec::ServiceSpec;
use crate::model::state::Placement;

/// How many versions of a service the state keeps (older ones are dropped).
pub const MAX_VERSIONS: usize = 10;

/// How a version's rollout went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutStatus {
    /// Its instances are being replaced (or started) and waited for.
    Rolling,
    /// Every instance ran it and was available.
    Succeeded,
    /// A new instance failed, or the deadline passed.
    Failed,
    /// It failed and the service went back to the last good version automatically.
    Reverted,
    /// Another version was stored before it finished.
    Superseded,
}

impl RolloutStatus {
    /// `rolling`, `succeeded`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Rolling => "rolling",
            RolloutStatus::Succeeded => "succeeded",
            RolloutStatus::Failed => "failed",
            RolloutStatus::Reverted => "reverted",
            RolloutStatus::Superseded => "superseded",
        }
    }
}

/// One stored version of a service, with how its rollout went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecVersion {
    /// The spec as stored (its `generation` is the version's number).
    pub spec: ServiceSpec,
    /// When it was stored (proposer's clock, ms since the epoch).
    pub applied_at_ms: u64,
    /// What the change was, for people (`created`, `changed: config`, `rollback to 3`).
    pub change: String,
    /// How its rollout went.
    pub status: RolloutStatus,
    /// Why it failed or was reverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the rollout finished (any way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// While rolling: why some of its instances cannot be placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unplaced: Option<String>,
    /// It is the automatic revert of this failed generation (a revert is never reverted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_of: Option<u64>,
}

/// The next step of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now (instances starting, or settling for `min_healthy_ms`).
    Wait,
    /// Replace these instances (slots) with the new version now.
    Replace(Vec<u32>),
    /// Every instance runs the new version and is available.
    Succeeded,
    /// The rollout failed, for this reason.
    Failed(String),
}

/// Whether instance `p` counts as available for `spec` at `now_ms`: it runs, its health
/// check (if the spec has one) passes, and, when it runs `spec`'s generation, it has run for
/// `update.min_healthy_ms`.
pub fn available(spec: &ServiceSpec, p: &Placement, now_ms: u64) -> bool {
    if p.state != "running" || p.healthy == Some(false) {
        return false;
    }
    if p.generation != spec.generation {
        return true;
    }
    if spec.health.is_some() && p.healthy != Some(true) {
        return false;
    }
    p.running_since_ms
        .is_some_and(|since| now_ms >= since.saturating_add(spec.update.min_healthy_ms))
}

/// A rollout's progress: instances wanted, running the new version, and available with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Instances wanted.
    pub wanted: u32,
    /// Placed instances that run (or are set to run) the new version.
    pub updated: u32,
    /// Of those, the available ones.
    pub available: u32,
    /// Available instances of any version.
    pub available_any: u32,
}

/// The progress of `spec`'s rollout over its `placements`.
pub fn progress(
    spec: &ServiceSpec,
    placements: &BTreeMap<u32, Placement>,
    now_ms: u64,
) -> Progress {
    let wanted = spec.instances();
    let mut out = Progress {
        wanted,
        ..Progress::default()
    };
    for (_, p) in placements.range(..wanted) {
        let ok = available(spec, p, now_ms);
        if p.generation == spec.generation {
            out.updated += 1;
            out.available += u32::from(ok);
        }
        out.available_any += u32::from(ok);
    }
    out
}

/// The next step of rolling `spec` (stored as `version`) out over `placements` at `now_ms`.
pub fn step(
    spec: &ServiceSpec,
    version: &SpecVersion,
    placements: &BTreeMap<u32, Placement>,
    now_ms: u64,
) -> Step {
    let target = spec.generation;
    let wanted = spec.instances();
    let current = placements.range(..wanted);
    if let Some((slot, p)) = placements
        .iter()
        .find(|(_, p)| p.generation == target && p.state == "failed")
    {
        return Step::Failed(format!(
            "{}#{slot} failed on node {}: {}",
            spec.name,
            p.node,
            p.last_crash.as_deref().unwrap_or("unknown reason")
        ));
    }
    let progress = progress(spec, placements, now_ms);
    if progress.available == wanted {
        return Step::Succeeded;
    }
    let deadline = version
        .applied_at_ms
        .saturating_add(spec.update.deadline_s.saturating_mul(1000));
    if now_ms >= deadline {
        let unhealthy = placements
            .iter()
            .find(|(_, p)| p.generation == target && p.healthy == Some(false))
            .map(|(slot, p)| format!(" ({}#{slot} on node {} is unhealthy)", spec.name, p.node))
            .unwrap_or_default();
        return Step::Failed(format!(
            "not done within its deadline of {}s: {} of {wanted} instances run generation {target} and are available{unhealthy}",
            spec.update.deadline_s, progress.available
        ));
    }
    let outdated: Vec<(u32, bool)> = current
        .filter(|(_, p)| p.generation != target)
        .map(|(slot, p)| (*slot, available(spec, p, now_ms)))
        .collect();
    let unavailable = wanted - progress.available_any;
    let budget = spec
        .update
        .max_unavailable
        .of(wanted)
        .saturating_sub(unavailable) as usize;
    // Replacing an instance that is unavailable anyway costs nothing; the others take from
    // the budget.
    let mut replace: Vec<u32> = outdated
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(slot, _)| *slot)
        .collect();
    replace.extend(
        outdated
            .iter()
            .filter(|(_, ok)| *ok)
            .take(budget)
            .map(|(slot, _)| *slot),
    );
    if replace.is_empty() {
        Step::Wait
    } else {
        Step::Replace(replace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::Amount;

    fn spec(replicas: u32, generation: u64, max_unavailable: Amount) -> ServiceSpec {
        let mut s = ServiceSpec::new("web", "exec");
        s.replicas = replicas;
        s.generation = generation;
        s.update.max_unavailable = max_unavailable;
        s.update.min_healthy_ms = 1000;
        s.update.deadline_s = 60;
        s
    }

    fn version(spec: &ServiceSpec, at: u64) -> SpecVersion {
        SpecVersion {
            spec: spec.clone(),
            applied_at_ms: at,
            change: "changed: config".into(),
            status: RolloutStatus::Rolling,
            reason: None,
            finished_at_ms: None,
            unplaced: None,
            revert_of: None,
        }
    }

    fn running(generation: u64, since: u64) -> Placement {
        let mut p = Placement::on(1);
        p.generation = generation;
        p.state = "running".into();
        p.running_since_ms = Some(since);
        p
    }

    #[test]
    fn a_config_change_replaces_at_most_max_unavailable_at_a_time() {
        let s = spec(3, 2, Amount::Count(1));
        let v = version(&s, 10_000);
        let mut placements: BTreeMap<u32, Placement> = (0..3).map(|i| (i, running(1, 0))).collect();
        assert_eq!(step(&s, &v, &placements, 10_000), Step::Replace(vec![0]));
        // Slot 0 replaced, starting: nothing more may go.
        let mut new = Placement::on(1);
        new.generation = 2;
        placements.insert(0, new);
        assert_eq!(step(&s, &v, &placements, 10_100), Step::Wait);
        // Running, but not for min_healthy_ms yet.
        placements.insert(0, running(2, 10_500));
        assert_eq!(step(&s, &v, &placements, 11_000), Step::Wait);
        // Settled: the next one.
        assert_eq!(step(&s, &v, &placements, 11_500), Step::Replace(vec![1]));
        placements.insert(1, running(2, 11_600));
        placements.insert(2, running(2, 11_600));
        assert_eq!(step(&s, &v, &placements, 12_600), Step::Succeeded);
    }

    #[test]
    fn a_percentage_is_of_the_wanted_instances_and_at_least_one() {
        assert_eq!(Amount::Percent(10).of(300), 30);
        assert_eq!(Amount::Percent(10).of(5), 1);
        assert_eq!(Amount::Count(0).of(5), 1);
        let s = spec(20, 2, Amount::Percent(10));
        let placements: BTreeMap<u32, Placement> = (0..20).map(|i| (i, running(1, 0))).collect();
        assert_eq!(
            step(&s, &version(&s, 0), &placements, 0),
            Step::Replace(vec![0, 1])
        );
    }

    #[test]
    fn unavailable_old_instances_are_replaced_without_taking_from_the_budget() {
        let s = spec(3, 2, Amount::Count(1));
        let mut placements: BTreeMap<u32, Placement> = (0..3).map(|i| (i, running(1, 0))).collect();
        if let Some(p) = placements.get_mut(&2) {
            p.state = "crashed".into();
        }
        // The crashed one uses the whole budget of one already: it alone is replaced.
        assert_eq!(
            step(&s, &version(&s, 0), &placements, 0),
            Step::Replace(vec![2])
        );
    }

    #[test]
    fn a_failed_new_instance_or_the_deadline_fails_the_rollout() {
        let s = spec(2, 2, Amount::Count(1));
        let v = version(&s, 0);
        let mut placements: BTreeMap<u32, Placement> = (0..2).map(|i| (i, running(1, 0))).collect();
        let mut bad = Placement::on(3);
        bad.generation = 2;
        bad.state = "failed".into();
        bad.last_crash = Some("cannot run /usr/bin/python9".into());
        placements.insert(0, bad);
        assert_eq!(
            step(&s, &v, &placements, 1),
            Step::Failed("web#0 failed on node 3: cannot run /usr/bin/python9".into())
        );
        let mut unhealthy = running(2, 0);
        unhealthy.healthy = Some(false);
        placements.insert(0, unhealthy);
        assert_eq!(step(&s, &v, &placements, 59_999), Step::Wait);
        let Step::Failed(why) = step(&s, &v, &placements, 60_000) else {
            panic!("the deadline passed")
        };
        assert!(why.contains("deadline of 60s"), "{why}");
        assert!(why.contains("web#0 on node 1 is unhealthy"), "{why}");
    }

    #[test]
    fn with_a_health_check_a_new_instance_counts_only_once_healthy() {
        let mut s = spec(1, 2, Amount::Count(1));
        s.health = Some(Box::new(crate::model::spec::HealthCheck {
            probe: crate::model::spec::Probe::Tcp { port: 80 },
            port_plus_slot: false,
            interval_ms: 100,
            timeout_ms: 100,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        }));
        let mut p = running(2, 0);
        assert!(!available(&s, &p, 5_000));
        p.healthy = Some(true);
        assert!(available(&s, &p, 5_000));
        // An old instance without a verdict counts; an unhealthy one never does.
        let mut old = running(1, 0);
        assert!(available(&s, &old, 0));
        old.healthy = Some(false);
        assert!(!available(&s, &old, 0));
    }
}
