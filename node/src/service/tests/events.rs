//! Lifecycle events: typed, timestamped, per service or per subtree.

use std::time::Duration;

use tokio::sync::broadcast::Receiver;
use tokio::time::Instant;

use super::{OnStart, Recorder, Trace};
use crate::service::{
    Backoff, Context, LifecycleEvent, LifecycleEventKind as Kind, RestartIntensity, Service,
    ServiceHandle, Strategy, Supervisor,
};

/// Every event received so far, as `(path, kind)`.
fn drain(rx: &mut Receiver<LifecycleEvent>) -> Vec<(String, Kind)> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push((e.path, e.kind));
    }
    out
}

fn of(events: &[(String, Kind)], path: &str) -> Vec<Kind> {
    events
        .iter()
        .filter(|(p, _)| p == path)
        .map(|(_, k)| k.clone())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_service_reports_its_start_crash_and_stop() {
    let trace = Trace::default();
    let s = Recorder::handle("Db", &trace, vec![]);
    let mut rx = s.subscribe();
    let t0 = Instant::now();
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.crash("disk full");
    s.stop().await;
    let events: Vec<LifecycleEvent> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    let kinds: Vec<Kind> = events.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            Kind::Starting,
            Kind::Started,
            Kind::Crashed {
                reason: "disk full".into()
            },
            Kind::Stopping,
            Kind::Stopped,
        ]
    );
    assert!(events.iter().all(|e| e.path == "Db" && e.service.same(&s)));
    assert_eq!(events[1].at - t0, Duration::ZERO);
    assert_eq!(
        events[2].at - t0,
        Duration::from_secs(3),
        "paused-clock timestamps"
    );
}

#[tokio::test(start_paused = true)]
async fn a_subtree_subscription_sees_descendants_and_a_plain_one_does_not() {
    let trace = Trace::default();
    let leaf = Recorder::handle("Leaf", &trace, vec![]);
    let mid = Recorder::handle("Mid", &trace, vec![leaf.clone()]);
    let root = Recorder::handle("Root", &trace, vec![mid.clone()]);
    let mut tree = root.subscribe_tree();
    let mut own = root.subscribe();
    let mut mid_tree = mid.subscribe_tree();
    root.start().await.unwrap();
    let events = drain(&mut tree);
    assert_eq!(
        events
            .iter()
            .filter(|(_, k)| *k == Kind::Started)
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>(),
        ["Root/Mid/Leaf", "Root/Mid", "Root"]
    );
    assert_eq!(
        of(&drain(&mut own), "Root"),
        [Kind::Starting, Kind::Started]
    );
    assert!(drain(&mut own).is_empty());
    let mid_events = drain(&mut mid_tree);
    assert!(
        mid_events.iter().all(|(p, _)| p != "Root"),
        "{mid_events:?}"
    );
    assert_eq!(mid_events.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_supervised_crash_loop_reports_restarts_with_attempt_and_backoff() {
    let trace = Trace::default();
    let flaky = Recorder::handle("Flaky", &trace, vec![]);
    let sup = Supervisor::new(Strategy::OneForOne)
        .label("Sup")
        .intensity(RestartIntensity::unlimited())
        .backoff(Backoff {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(10),
            jitter: 0.0,
            reset_after: Duration::from_secs(60),
        })
        .child(flaky.clone())
        .build();
    let mut rx = sup.subscribe_tree();
    sup.start().await.unwrap();
    let mut restarted_at = Vec::new();
    for i in 0..3 {
        flaky.crash(format!("crash {i}"));
        let crashed_at = Instant::now();
        flaky.wait_for_state(crate::ServiceState::Running).await;
        restarted_at.push(Instant::now() - crashed_at);
    }
    let events = drain(&mut rx);
    let restarts: Vec<Kind> = of(&events, "Sup/Flaky")
        .into_iter()
        .filter(|k| matches!(k, Kind::Restarting { .. }))
        .collect();
    assert_eq!(
        restarts,
        [
            Kind::Restarting {
                attempt: 1,
                backoff: Duration::ZERO
            },
            Kind::Restarting {
                attempt: 2,
                backoff: Duration::from_millis(100)
            },
            Kind::Restarting {
                attempt: 3,
                backoff: Duration::from_millis(200)
            },
        ]
    );
    assert_eq!(
        restarted_at,
        [
            Duration::ZERO,
            Duration::from_millis(100),
            Duration::from_millis(200)
        ]
    );
    // One full cycle, in order: crash, decision, stop, start.
    let cycle: Vec<Kind> = of(&events, "Sup/Flaky")
        .into_iter()
        .skip(2)
        .take(6)
        .collect();
    assert_eq!(
        cycle,
        [
            Kind::Crashed {
                reason: "crash 0".into()
            },
            Kind::Restarting {
                attempt: 1,
                backoff: Duration::ZERO
            },
            Kind::Stopping,
            Kind::Stopped,
            Kind::Starting,
            Kind::Started,
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn exceeding_the_intensity_reports_the_escalation_then_the_supervisors_crash() {
    let trace = Trace::default();
    let flaky = Recorder::handle("Flaky", &trace, vec![]);
    let sup = Supervisor::new(Strategy::OneForOne)
        .label("Sup")
        .intensity(RestartIntensity {
            max_restarts: 1,
            within: Duration::from_secs(10),
        })
        .backoff(Backoff::none())
        .child(flaky.clone())
        .build();
    let outer = Supervisor::new(Strategy::ForfeitOneForOne)
        .label("Outer")
        .child(sup.clone())
        .build();
    let mut rx = outer.subscribe_tree();
    outer.start().await.unwrap();
    flaky.crash("one");
    flaky.wait_for_state(crate::ServiceState::Running).await;
    flaky.crash("two");
    tokio::time::timeout(Duration::from_secs(60), sup.wait_until_stopped())
        .await
        .unwrap();
    let sup_events = of(&drain(&mut rx), "Outer/Sup");
    let escalated = sup_events
        .iter()
        .position(|k| matches!(k, Kind::Escalated { .. }))
        .expect("an Escalated event");
    let Kind::Escalated { reason } = &sup_events[escalated] else {
        unreachable!()
    };
    assert!(reason
        .as_str()
        .starts_with("restart intensity exceeded: child 'Flaky'"));
    assert_eq!(
        sup_events[escalated + 1],
        Kind::Crashed {
            reason: reason.clone()
        }
    );
}

struct HangsInOnStop;
impl Service for HangsInOnStop {
    async fn on_stop(&mut self, _ctx: &Context) -> crate::service::Result<()> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_cut_off_at_the_grace_period_is_reported_as_forced() {
    let hook = ServiceHandle::builder(HangsInOnStop)
        .grace_period(Duration::from_secs(2))
        .build();
    let task = ServiceHandle::builder(OnStart("Stubborn", |ctx: &Context| {
        ctx.spawn("ignores-stop", std::future::pending());
        Ok(())
    }))
    .grace_period(Duration::from_secs(2))
    .build();
    for (s, expected) in [
        (
            hook,
            "on_stop did not finish within the 2s grace period; cut off",
        ),
        (
            task,
            "aborted tasks still running after the 2s grace period: ignores-stop",
        ),
    ] {
        s.start().await.unwrap();
        let mut rx = s.subscribe();
        s.stop().await;
        let kinds: Vec<Kind> = drain(&mut rx).into_iter().map(|(_, k)| k).collect();
        assert_eq!(
            kinds,
            [
                Kind::Stopping,
                Kind::ForcedStop {
                    reason: expected.to_string()
                },
                Kind::Stopped
            ]
        );
    }
}
