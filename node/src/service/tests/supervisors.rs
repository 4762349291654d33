//! Supervisor strategies, restart intensity and escalation, backoff.

use std::time::Duration;

use super::{settle, Recorder, Trace};
use crate::service::{
    Backoff, RestartIntensity, ServiceHandle, ServiceState, Strategy, Supervisor,
};

/// mode's functional fixture: a supervisor over Y (with child X) and Z.
struct Fixture {
    trace: Trace,
    sup: ServiceHandle,
    x: ServiceHandle,
    y: ServiceHandle,
    z: ServiceHandle,
}

async fn fixture(strategy: Strategy) -> Fixture {
    let trace = Trace::default();
    let x = Recorder::handle("X", &trace, vec![]);
    let y = Recorder::handle("Y", &trace, vec![x.clone()]);
    let z = Recorder::handle("Z", &trace, vec![]);
    let sup = Supervisor::new(strategy)
        .backoff(Backoff::none())
        .child(y.clone())
        .child(z.clone())
        .build();
    sup.start().await.unwrap();
    Fixture {
        trace,
        sup,
        x,
        y,
        z,
    }
}

impl Fixture {
    fn starts(&self, name: &str) -> usize {
        self.trace.count(&format!("{name}.on_start"))
    }
    fn stops(&self, name: &str) -> usize {
        self.trace.count(&format!("{name}.on_stop"))
    }
}

#[tokio::test(start_paused = true)]
async fn one_for_one_restarts_only_the_crashed_child_at_once() {
    let f = fixture(Strategy::OneForOne).await;
    f.z.crash("boom");
    let t0 = tokio::time::Instant::now();
    f.z.wait_for_state(ServiceState::Running).await;
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "no polling interval before the restart"
    );
    assert_eq!((f.stops("Z"), f.starts("Z")), (1, 2));
    assert_eq!((f.stops("Y"), f.starts("Y")), (0, 1));
    assert_eq!((f.stops("X"), f.starts("X")), (0, 1));
    assert_eq!(f.z.restart_count(), 1);
    assert_eq!(f.z.last_crash_reason().unwrap().as_str(), "boom");
    f.sup.stop().await;
    assert_eq!((f.stops("Z"), f.stops("Y")), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn one_for_all_restarts_every_child() {
    let f = fixture(Strategy::OneForAll).await;
    f.z.crash("boom");
    f.z.wait_for_state(ServiceState::Running).await;
    settle().await;
    for name in ["X", "Y", "Z"] {
        assert_eq!((f.stops(name), f.starts(name)), (1, 2), "{name}");
    }
    assert_eq!(f.y.state(), ServiceState::Running);
    assert_eq!(f.x.state(), ServiceState::Running);
    f.sup.stop().await;
    for name in ["X", "Y", "Z"] {
        assert_eq!(f.stops(name), 2, "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_restarts_the_crashed_child_and_those_declared_after_it() {
    let trace = Trace::default();
    let a = Recorder::handle("A", &trace, vec![]);
    let b = Recorder::handle("B", &trace, vec![]);
    let c = Recorder::handle("C", &trace, vec![]);
    let sup = Supervisor::new(Strategy::RestForOne)
        .backoff(Backoff::none())
        .children([a.clone(), b.clone(), c.clone()])
        .build();
    sup.start().await.unwrap();
    b.crash("boom");
    b.wait_for_state(ServiceState::Running).await;
    c.wait_for_state(ServiceState::Running).await;
    assert_eq!(trace.count("A.on_start"), 1);
    assert_eq!(trace.count("B.on_start"), 2);
    assert_eq!(trace.count("C.on_start"), 2);
    let lines = trace.lines();
    let c_stop = lines.iter().position(|l| l == "C.on_stop").unwrap();
    let b_start = lines.iter().rposition(|l| l == "B.on_start").unwrap();
    let c_start = lines.iter().rposition(|l| l == "C.on_start").unwrap();
    assert!(c_stop < b_start && b_start < c_start);
}

#[tokio::test(start_paused = true)]
async fn forfeit_one_for_one_stops_the_crashed_child_and_never_restarts_it() {
    let f = fixture(Strategy::ForfeitOneForOne).await;
    f.z.crash("boom");
    f.z.wait_until_stopped().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!((f.stops("Z"), f.starts("Z")), (1, 1));
    assert_eq!(f.z.state(), ServiceState::Crashed);
    assert_eq!((f.stops("Y"), f.starts("Y")), (0, 1));
    f.sup.stop().await;
    assert_eq!((f.stops("Y"), f.stops("Z")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn forfeit_one_for_all_stops_every_child_and_restarts_none() {
    let f = fixture(Strategy::ForfeitOneForAll).await;
    f.z.crash("boom");
    tokio::time::sleep(Duration::from_secs(10)).await;
    for name in ["X", "Y", "Z"] {
        assert_eq!((f.stops(name), f.starts(name)), (1, 1), "{name}");
    }
    assert_eq!(f.y.state(), ServiceState::Shutdown);
}

#[tokio::test(start_paused = true)]
async fn exceeding_the_restart_intensity_escalates_exactly_once() {
    let trace = Trace::default();
    let flaky = Recorder::handle("Flaky", &trace, vec![]);
    let inner = Supervisor::new(Strategy::OneForOne)
        .label("Inner")
        .intensity(RestartIntensity {
            max_restarts: 3,
            within: Duration::from_secs(10),
        })
        .backoff(Backoff::none())
        .child(flaky.clone())
        .build();
    let outer = Supervisor::new(Strategy::ForfeitOneForOne)
        .label("Outer")
        .child(inner.clone())
        .build();
    outer.start().await.unwrap();
    for i in 0..3 {
        flaky.crash(format!("crash {i}"));
        flaky.wait_for_state(ServiceState::Running).await;
    }
    assert_eq!(flaky.restart_count(), 3);
    flaky.crash("crash 3");
    inner.wait_until_stopped().await;
    settle().await;
    let reason = inner.last_crash_reason().unwrap().to_string();
    assert!(reason.contains("restart intensity exceeded"), "{reason}");
    assert!(reason.contains("child 'Flaky'"), "{reason}");
    assert!(
        reason.contains("after 3 restarts within 10s (limit 3)"),
        "{reason}"
    );
    assert!(reason.contains("last reason: crash 3"), "{reason}");
    assert_eq!(inner.state(), ServiceState::Crashed);
    assert_eq!(flaky.restart_count(), 3, "no fourth restart");
    // The outer supervisor heard of it once: inner never restarted, outer still runs.
    assert_eq!(inner.restart_count(), 0);
    assert_eq!(outer.state(), ServiceState::Running);
}

#[tokio::test(start_paused = true)]
async fn intensity_counts_restarts_within_a_sliding_window() {
    let trace = Trace::default();
    let flaky = Recorder::handle("Flaky", &trace, vec![]);
    let sup = Supervisor::new(Strategy::OneForOne)
        .intensity(RestartIntensity {
            max_restarts: 2,
            within: Duration::from_secs(10),
        })
        .backoff(Backoff::none())
        .child(flaky.clone())
        .build();
    sup.start().await.unwrap();
    for _ in 0..6 {
        flaky.crash("again");
        flaky.wait_for_state(ServiceState::Running).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    assert_eq!(
        sup.state(),
        ServiceState::Running,
        "2 restarts per 10 s never exceeded"
    );
    assert_eq!(flaky.restart_count(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_crash_in_a_grandchild_reaches_the_nearest_supervisor() {
    let trace = Trace::default();
    let grandchild = Recorder::handle("Grandchild", &trace, vec![]);
    let child = Recorder::handle("Child", &trace, vec![grandchild.clone()]);
    let sibling = Recorder::handle("Sibling", &trace, vec![]);
    let near = Supervisor::new(Strategy::OneForOne)
        .label("Near")
        .backoff(Backoff::none())
        .children([child.clone(), sibling.clone()])
        .build();
    let far = Supervisor::new(Strategy::OneForOne)
        .label("Far")
        .backoff(Backoff::none())
        .child(near.clone())
        .build();
    far.start().await.unwrap();
    grandchild.crash("segfault");
    child.wait_for_state(ServiceState::Running).await;
    grandchild.wait_for_state(ServiceState::Running).await;
    assert_eq!(
        child.restart_count(),
        1,
        "the child subtree was restarted by Near"
    );
    assert_eq!(
        child.last_crash_reason().unwrap().as_str(),
        "dependency 'Grandchild' crashed: segfault"
    );
    assert_eq!(near.restart_count(), 0, "Far never heard of it");
    assert_eq!(near.state(), ServiceState::Running);
    assert_eq!(trace.count("Sibling.on_start"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_looping_child_backs_off_exponentially_and_resets_after_a_healthy_period() {
    let trace = Trace::default();
    let flaky = Recorder::handle("Flaky", &trace, vec![]);
    let backoff = Backoff {
        initial: Duration::from_millis(100),
        multiplier: 2.0,
        max: Duration::from_secs(10),
        jitter: 0.0,
        reset_after: Duration::from_secs(5),
    };
    let sup = Supervisor::new(Strategy::OneForOne)
        .intensity(RestartIntensity::unlimited())
        .backoff(backoff)
        .child(flaky.clone())
        .build();
    sup.start().await.unwrap();
    let mut delays = Vec::new();
    for _ in 0..4 {
        let t0 = tokio::time::Instant::now();
        flaky.crash("loop");
        flaky.wait_for_state(ServiceState::Running).await;
        delays.push(t0.elapsed().as_millis());
    }
    assert_eq!(delays, [0, 100, 200, 400]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t0 = tokio::time::Instant::now();
    flaky.crash("after a healthy period");
    flaky.wait_for_state(ServiceState::Running).await;
    assert_eq!(t0.elapsed(), Duration::ZERO, "the streak was reset");
}

#[test]
fn backoff_delay_is_capped_and_jittered_within_bounds() {
    let b = Backoff::default();
    assert_eq!(b.delay(1, 0.5), Duration::ZERO);
    assert_eq!(b.delay(2, 0.5), Duration::from_millis(100));
    assert_eq!(b.delay(3, 0.5), Duration::from_millis(200));
    assert_eq!(b.delay(40, 0.5), Duration::from_secs(10));
    assert_eq!(b.delay(2, 0.0), Duration::from_millis(80));
    assert!(b.delay(2, 0.999) <= Duration::from_millis(120));
    assert_eq!(Backoff::none().delay(9, 0.3), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_task_crashes_only_its_own_service() {
    use super::OnStart;
    use crate::service::Context;
    let trace = Trace::default();
    let calm = Recorder::handle("Calm", &trace, vec![]);
    let panicky = ServiceHandle::new(OnStart("Panicky", |ctx: &Context| {
        ctx.spawn("explode", async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("kaboom");
        });
        Ok(())
    }));
    let sup = Supervisor::new(Strategy::OneForOne)
        .intensity(RestartIntensity::unlimited())
        .backoff(Backoff::none())
        .children([calm.clone(), panicky.clone()])
        .build();
    sup.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    settle().await;
    assert!(panicky.restart_count() >= 1);
    assert_eq!(
        panicky.last_crash_reason().unwrap().as_str(),
        "task 'explode' panicked: kaboom"
    );
    assert_eq!(calm.state(), ServiceState::Running);
    assert_eq!(trace.count("Calm.on_start"), 1);
    assert_eq!(sup.state(), ServiceState::Running);
}
