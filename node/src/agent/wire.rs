//! Wire forms of what agents and servers exchange on the peer API: placements views and
//! instance reports. Specs and instances convert as the public API converts them
//! ([`crate::api::convert`]).

use mode_proto::v1 as pb;

use crate::api::convert;
use crate::model::state::{InstanceReport, Placement};
use crate::replication::{NodeView, ViewService};

/// The fields of a placement an agent acts on.
fn instance_from_proto(i: &pb::Instance) -> Placement {
    let mut p = Placement::on(i.node);
    p.state = i.state.clone();
    p.restart_count = i.restart_count;
    p.last_crash = (!i.last_crash.is_empty()).then(|| i.last_crash.clone());
    p.moving_from = (i.moving_from != 0).then_some(i.moving_from);
    p.reschedules = i.reschedules;
    p.epoch = i.epoch;
    p.generation = i.generation;
    p.healthy = convert::health_from_word(&i.health);
    p
}

pub(crate) fn report_to_proto(r: &InstanceReport) -> pb::InstanceReport {
    pb::InstanceReport {
        service: r.service.clone(),
        slot: r.slot,
        state: r.state.clone(),
        restart_count: r.restart_count,
        last_crash: r.last_crash.clone().unwrap_or_default(),
        epoch: r.epoch,
        r#move: r.move_.clone(),
        health: convert::health_word(r.healthy).to_string(),
        retry_at_ms: r.retry_at_ms.unwrap_or(0),
    }
}

pub(crate) fn report_from_proto(r: &pb::InstanceReport) -> InstanceReport {
    InstanceReport {
        service: r.service.clone(),
        slot: r.slot,
        state: r.state.clone(),
        restart_count: r.restart_count,
        last_crash: (!r.last_crash.is_empty()).then(|| r.last_crash.clone()),
        epoch: r.epoch,
        healthy: convert::health_from_word(&r.health),
        retry_at_ms: (r.retry_at_ms != 0).then_some(r.retry_at_ms),
        move_: r.r#move.clone(),
    }
}

/// A view as a server sends it.
pub(crate) fn view_to_proto(v: &NodeView, server: u64) -> pb::PlacementsUpdate {
    pb::PlacementsUpdate {
        index: v.index,
        server,
        services: v
            .services
            .iter()
            .map(|(name, s)| pb::AgentService {
                spec: Some(convert::spec_to_proto(&s.spec)),
                deleting: s.deleting,
                here: s
                    .here
                    .iter()
                    .map(|(slot, p)| convert::instance_to_proto(name, *slot, p))
                    .collect(),
                running: u32::from(s.running),
                versions: s.versions.values().map(convert::spec_to_proto).collect(),
            })
            .collect(),
    }
}

pub(crate) fn view_from_proto(u: &pb::PlacementsUpdate) -> NodeView {
    NodeView {
        index: u.index,
        services: u
            .services
            .iter()
            .filter_map(|s| {
                let sent = s.spec.clone()?;
                let generation = sent.generation;
                let mut spec = convert::spec_from_proto(sent).ok()?;
                // The generation is output only for clients; the agent picks versions by it.
                spec.generation = generation;
                let here = s
                    .here
                    .iter()
                    .map(|i| (i.slot, instance_from_proto(i)))
                    .collect();
                let versions = s
                    .versions
                    .iter()
                    .filter_map(|v| {
                        let generation = v.generation;
                        let mut spec = convert::spec_from_proto(v.clone()).ok()?;
                        spec.generation = generation;
                        Some((generation, spec))
                    })
                    .collect();
                Some((
                    spec.name.clone(),
                    ViewService {
                        spec,
                        versions,
                        deleting: s.deleting,
                        here,
                        running: s.running > 0,
                    },
                ))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::ServiceSpec;
    use std::collections::BTreeMap;

    #[test]
    fn views_and_reports_round_trip_through_the_wire() {
        let mut spec = ServiceSpec::new("web", "exec");
        spec.config = serde_json::json!({"cmd": ["sh", "-c", "x"], "n": 3});
        spec.singleton = true;
        spec.depends_on = vec!["db".into()];
        spec.generation = 5;
        // Agents run the instances: they get the secret values.
        spec.secrets.insert(
            "DB_PASSWORD".into(),
            crate::model::secret::Secret::new("hunter2"),
        );
        let mut old = spec.clone();
        old.generation = 4;
        old.config = serde_json::json!({"cmd": ["sh", "-c", "old"]});
        let mut p = Placement::on(4);
        p.state = "running".into();
        p.restart_count = 2;
        p.moving_from = Some(3);
        p.epoch = 17;
        p.generation = 4;
        p.healthy = Some(false);
        let view = NodeView {
            index: 42,
            services: BTreeMap::from([(
                "web".to_string(),
                ViewService {
                    spec: spec.clone(),
                    versions: BTreeMap::from([(4, old.clone())]),
                    deleting: true,
                    here: BTreeMap::from([(1, p)]),
                    running: true,
                },
            )]),
        };
        let back = view_from_proto(&view_to_proto(&view, 1));
        assert_eq!(back.index, 42);
        let web = &back.services["web"];
        assert_eq!(web.spec, spec);
        assert!(web.deleting && web.running);
        // An agent-only node runs each instance's version, picked by generation.
        assert_eq!(web.versions[&4], old);
        assert_eq!(
            (web.here[&1].generation, web.here[&1].healthy),
            (4, Some(false))
        );
        let here = &web.here[&1];
        assert_eq!(
            (
                here.node,
                here.state.as_str(),
                here.moving_from,
                here.epoch,
                here.restart_count
            ),
            (4, "running", Some(3), 17, 2)
        );
        let report = InstanceReport {
            service: "web".into(),
            slot: 1,
            state: String::new(),
            restart_count: 0,
            last_crash: None,
            epoch: 0,
            healthy: None,
            retry_at_ms: None,
            move_: "release".into(),
        };
        assert_eq!(report_from_proto(&report_to_proto(&report)), report);
        let healthy = InstanceReport {
            healthy: Some(true),
            move_: String::new(),
            state: "running".into(),
            ..report
        };
        assert_eq!(report_from_proto(&report_to_proto(&healthy)), healthy);
    }
}
