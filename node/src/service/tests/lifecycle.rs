//! Hook order, states, dependencies, stop ordering and grace periods.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{settle, OnStart, Recorder, Trace};
use crate::service::{Context, Result, Service, ServiceError, ServiceHandle, ServiceState};

#[tokio::test(start_paused = true)]
async fn new_service_is_init_then_running_and_second_start_is_refused() {
    let trace = Trace::default();
    let svc = Recorder::handle("S", &trace, vec![]);
    assert_eq!(svc.state(), ServiceState::Init);
    assert!(svc.maybe_start().await.unwrap());
    assert_eq!(svc.state(), ServiceState::Running);
    assert!(!svc.maybe_start().await.unwrap());
    assert!(matches!(
        svc.start().await,
        Err(ServiceError::NotStartable { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn stop_runs_on_stop_and_on_shutdown_and_ends_in_shutdown() {
    let trace = Trace::default();
    let svc = Recorder::handle("S", &trace, vec![]);
    svc.start().await.unwrap();
    trace.clear();
    svc.stop().await;
    assert_eq!(trace.lines(), ["S.on_stop", "S.on_shutdown"]);
    assert_eq!(svc.state(), ServiceState::Shutdown);
    assert!(svc.should_stop());
}

#[tokio::test(start_paused = true)]
async fn hook_order_on_start_stop_and_restart_matches_mode() {
    let trace = Trace::default();
    let a = Recorder::handle("A", &trace, vec![]);
    let b = Recorder::handle("B", &trace, vec![]);
    let p = Recorder::handle("P", &trace, vec![a, b]);

    p.start().await.unwrap();
    assert_eq!(
        trace.lines(),
        [
            "P.on_first_start",
            "P.on_start",
            "A.on_first_start",
            "A.on_start",
            "A.on_started",
            "B.on_first_start",
            "B.on_start",
            "B.on_started",
            "P.on_started"
        ]
    );
    trace.clear();
    p.restart().await.unwrap();
    assert_eq!(
        trace.lines(),
        [
            "P.on_stop",
            "B.on_stop",
            "B.on_shutdown",
            "A.on_stop",
            "A.on_shutdown",
            "P.on_shutdown",
            "P.on_restart",
            "P.on_start",
            "A.on_start",
            "A.on_started",
            "B.on_start",
            "B.on_started",
            "P.on_started"
        ]
    );
    assert_eq!(p.restart_count(), 1);
    trace.clear();
    p.stop().await;
    assert_eq!(
        trace.lines(),
        [
            "P.on_stop",
            "B.on_stop",
            "B.on_shutdown",
            "A.on_stop",
            "A.on_shutdown",
            "P.on_shutdown"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn on_first_start_runs_once_across_restarts() {
    let trace = Trace::default();
    let s = Recorder::handle("S", &trace, vec![]);
    s.start().await.unwrap();
    for _ in 0..3 {
        s.restart().await.unwrap();
    }
    assert_eq!(trace.count("S.on_first_start"), 1);
    assert_eq!(trace.count("S.on_start"), 4);
    assert_eq!(s.restart_count(), 3);
}

struct FailingStart;
impl Service for FailingStart {
    async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
        Err("database unreachable".into())
    }
}

#[tokio::test(start_paused = true)]
async fn error_in_on_start_leaves_the_service_crashed_not_running() {
    let s = ServiceHandle::new(FailingStart);
    let err = s.start().await.unwrap_err();
    assert_eq!(s.state(), ServiceState::Crashed);
    let reason = s.crash_reason().unwrap();
    assert!(
        reason
            .as_str()
            .contains("on_start failed: database unreachable"),
        "{reason}"
    );
    assert!(err.to_string().contains("database unreachable"));
}

#[tokio::test(start_paused = true)]
async fn a_child_failing_to_start_fails_the_parent_with_the_childs_reason() {
    let trace = Trace::default();
    let ok = Recorder::handle("Ok", &trace, vec![]);
    let bad = ServiceHandle::new(FailingStart);
    let parent = Recorder::handle("Parent", &trace, vec![ok.clone(), bad]);
    let err = parent.start().await.unwrap_err();
    let reason = err.reason().unwrap().to_string();
    assert!(
        reason.contains("dependency 'FailingStart' failed to start"),
        "{reason}"
    );
    assert!(reason.contains("database unreachable"), "{reason}");
    assert_eq!(parent.state(), ServiceState::Crashed);
    // What had started is stopped again, and the parent never reached on_started.
    assert_eq!(ok.state(), ServiceState::Shutdown);
    assert_eq!(trace.count("Parent.on_started"), 0);
    assert_eq!(trace.count("Parent.on_shutdown"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_chain_of_100_stops_dependents_before_their_dependencies() {
    let trace = Trace::default();
    let mut node = Recorder::handle("S0", &trace, vec![]);
    for i in 1..100 {
        node = Recorder::handle(&format!("S{i}"), &trace, vec![node]);
    }
    node.start().await.unwrap();
    let started: Vec<String> = trace
        .lines()
        .into_iter()
        .filter(|l| l.ends_with(".on_started"))
        .collect();
    let expected: Vec<String> = (0..100).map(|i| format!("S{i}.on_started")).collect();
    assert_eq!(
        started, expected,
        "dependencies are running before their dependents"
    );
    trace.clear();
    node.stop().await;
    let stopped: Vec<String> = trace
        .lines()
        .into_iter()
        .filter(|l| l.ends_with(".on_stop"))
        .collect();
    let expected: Vec<String> = (0..100).rev().map(|i| format!("S{i}.on_stop")).collect();
    assert_eq!(stopped, expected);
    let shut: Vec<String> = trace
        .lines()
        .into_iter()
        .filter(|l| l.ends_with(".on_shutdown"))
        .collect();
    let expected: Vec<String> = (0..100).map(|i| format!("S{i}.on_shutdown")).collect();
    assert_eq!(
        shut, expected,
        "a dependency shuts down before the dependent's on_shutdown"
    );
}

struct HungStop;
impl Service for HungStop {
    async fn on_stop(&mut self, _ctx: &Context) -> Result<()> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_on_stop_is_cut_off_at_the_grace_period() {
    let s = ServiceHandle::builder(HungStop)
        .grace_period(Duration::from_secs(3))
        .build();
    s.start().await.unwrap();
    let t0 = tokio::time::Instant::now();
    s.stop().await;
    let took = t0.elapsed();
    assert_eq!(s.state(), ServiceState::Shutdown);
    assert!(s.was_forced());
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

struct DropFlag(Arc<AtomicUsize>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_ignoring_stop_is_aborted_after_the_grace_period_and_nothing_outlives_the_stop() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let d = dropped.clone();
    let s = ServiceHandle::builder(OnStart("Stubborn", move |ctx: &Context| {
        let flag = DropFlag(d.clone());
        ctx.spawn("ignores-stop", async move {
            let _flag = flag;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(())
    }))
    .grace_period(Duration::from_secs(2))
    .build();
    s.start().await.unwrap();
    settle().await;
    let t0 = tokio::time::Instant::now();
    s.stop().await;
    assert!(t0.elapsed() >= Duration::from_secs(2));
    assert!(s.was_forced());
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the task was dropped by the time stop returned"
    );
    assert!(s.beacon().children.is_empty());
}

#[tokio::test(start_paused = true)]
async fn cooperative_tasks_finish_without_forcing() {
    let s = ServiceHandle::new(OnStart("Polite", |ctx: &Context| {
        let c = ctx.clone();
        ctx.spawn("loop", async move {
            while !c.should_stop() {
                c.sleep(Duration::from_secs(60)).await;
            }
            Ok(())
        });
        Ok(())
    }));
    s.start().await.unwrap();
    settle().await;
    let t0 = tokio::time::Instant::now();
    s.stop().await;
    assert_eq!(t0.elapsed(), Duration::ZERO, "sleep woke at once on stop");
    assert!(!s.was_forced());
}

#[tokio::test(start_paused = true)]
async fn sleep_wakes_on_crash_as_well_as_stop() {
    let woke = Arc::new(AtomicUsize::new(0));
    let w = woke.clone();
    let s = ServiceHandle::new(OnStart("Sleeper", move |ctx: &Context| {
        let c = ctx.clone();
        let w = w.clone();
        ctx.spawn("sleeper", async move {
            let full = c.sleep(Duration::from_secs(3600)).await;
            assert!(!full);
            w.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        Ok(())
    }));
    s.start().await.unwrap();
    settle().await;
    assert!(s.crash("boom"));
    settle().await;
    assert_eq!(woke.load(Ordering::SeqCst), 1);
    assert_eq!(s.state(), ServiceState::Crashed);
}

#[tokio::test(start_paused = true)]
async fn stop_before_start_ends_in_shutdown_and_start_is_refused() {
    let trace = Trace::default();
    let s = Recorder::handle("S", &trace, vec![]);
    s.stop().await;
    assert_eq!(s.state(), ServiceState::Shutdown);
    assert!(s.start().await.is_err());
    assert!(trace.lines().is_empty());
}

#[tokio::test(start_paused = true)]
async fn stop_is_idempotent() {
    let trace = Trace::default();
    let s = Recorder::handle("S", &trace, vec![]);
    s.start().await.unwrap();
    s.stop().await;
    s.stop().await;
    assert_eq!(trace.count("S.on_stop"), 1);
}

#[tokio::test(start_paused = true)]
async fn crash_on_a_crashed_service_is_a_no_op() {
    let trace = Trace::default();
    let s = Recorder::handle("S", &trace, vec![]);
    s.start().await.unwrap();
    assert!(s.crash("first"));
    assert!(!s.crash("second"));
    assert_eq!(s.crash_reason().unwrap().as_str(), "first");
}

#[tokio::test(start_paused = true)]
async fn a_crash_without_a_supervisor_escalates_to_the_parent_chain() {
    let trace = Trace::default();
    let leaf = Recorder::handle("Leaf", &trace, vec![]);
    let sibling = Recorder::handle("Sibling", &trace, vec![]);
    let mid = Recorder::handle("Mid", &trace, vec![leaf.clone()]);
    let root = Recorder::handle("Root", &trace, vec![mid.clone(), sibling.clone()]);
    root.start().await.unwrap();
    leaf.crash("disk full");
    assert_eq!(leaf.state(), ServiceState::Crashed);
    assert_eq!(
        mid.crash_reason().unwrap().as_str(),
        "dependency 'Leaf' crashed: disk full"
    );
    assert_eq!(
        root.crash_reason().unwrap().as_str(),
        "dependency 'Mid' crashed: dependency 'Leaf' crashed: disk full"
    );
    // Unlike mode, the sibling is not marked crashed; it is stopped with its parent.
    assert_eq!(sibling.state(), ServiceState::Running);
    root.stop().await;
    assert_eq!(sibling.state(), ServiceState::Shutdown);
    assert_eq!(root.state(), ServiceState::Crashed);
}

#[tokio::test(start_paused = true)]
async fn runtime_dependencies_start_at_once_and_are_not_duplicated_by_restarts() {
    let trace = Trace::default();
    let t = trace.clone();
    struct App(Trace);
    impl Service for App {
        async fn on_start(&mut self, ctx: &Context) -> Result<()> {
            let cache = Recorder::handle("Cache", &self.0, vec![]);
            let cache = ctx.add_runtime_dependency(cache).await?;
            assert_eq!(cache.state(), ServiceState::Running);
            Ok(())
        }
    }
    let app = ServiceHandle::new(App(t));
    app.start().await.unwrap();
    for _ in 0..3 {
        app.restart().await.unwrap();
    }
    assert_eq!(
        app.dependencies().len(),
        1,
        "one runtime dependency, not one per restart"
    );
    assert_eq!(trace.count("Cache.on_start"), 4);
    assert_eq!(trace.count("Cache.on_stop"), 3);
    app.stop().await;
    assert_eq!(trace.count("Cache.on_stop"), 4);
    assert!(app.dependencies().is_empty());
}

#[tokio::test(start_paused = true)]
async fn add_dependency_after_start_starts_with_the_next_start() {
    let trace = Trace::default();
    let p = Recorder::handle("P", &trace, vec![]);
    p.start().await.unwrap();
    let late = p.add_dependency(Recorder::handle("Late", &trace, vec![]));
    assert_eq!(late.state(), ServiceState::Init);
    p.restart().await.unwrap();
    assert_eq!(late.state(), ServiceState::Running);
}

#[tokio::test(start_paused = true)]
async fn remove_dependency_stops_and_forgets_the_child() {
    let trace = Trace::default();
    let c = Recorder::handle("C", &trace, vec![]);
    let p = Recorder::handle("P", &trace, vec![c.clone()]);
    p.start().await.unwrap();
    p.remove_dependency(&c).await;
    assert_eq!(c.state(), ServiceState::Shutdown);
    assert!(p.dependencies().is_empty());
    assert!(c.parent().is_none());
    assert!(p.beacon().find("C").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_service_can_stop_itself_from_its_own_task() {
    let s = ServiceHandle::new(OnStart("SelfStopper", |ctx: &Context| {
        let c = ctx.clone();
        ctx.spawn("quit", async move {
            c.handle().stop().await;
            Ok(())
        });
        Ok(())
    }));
    s.start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), s.wait_until_stopped())
        .await
        .unwrap();
    assert_eq!(s.state(), ServiceState::Shutdown);
    assert!(!s.was_forced());
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_a_slow_start_interrupts_it() {
    struct SlowStart;
    impl Service for SlowStart {
        async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
    }
    let s = ServiceHandle::new(SlowStart);
    let s2 = s.clone();
    let starting = tokio::spawn(async move { s2.start().await });
    settle().await;
    assert_eq!(s.state(), ServiceState::Starting);
    s.stop().await;
    let cut_short = starting.await.unwrap();
    assert_eq!(
        cut_short,
        Err(ServiceError::StartCancelled {
            service: "SlowStart".to_string()
        }),
        "a start cut short is not reported as a success"
    );
    assert_eq!(s.state(), ServiceState::Shutdown);
}

#[tokio::test(start_paused = true)]
async fn a_runtime_dependency_offered_to_a_stopped_service_is_an_error_and_not_started() {
    let kept: Arc<std::sync::Mutex<Option<Context>>> = Arc::default();
    let k = kept.clone();
    let parent = ServiceHandle::new(OnStart("Parent", move |ctx: &Context| {
        *k.lock().unwrap() = Some(ctx.clone());
        Ok(())
    }));
    parent.start().await.unwrap();
    parent.stop().await;
    let ctx = kept.lock().unwrap().clone().unwrap();
    let trace = Trace::default();
    let child = Recorder::handle("Late", &trace, vec![]);
    let err = ctx.add_runtime_dependency(child.clone()).await.unwrap_err();
    assert_eq!(
        err,
        ServiceError::NotRunning {
            service: "Parent".to_string(),
            child: "Late".to_string(),
            state: ServiceState::Shutdown,
        }
    );
    assert!(
        err.to_string().contains("its run has ended or is ending"),
        "{err}"
    );
    assert_eq!(child.state(), ServiceState::Init, "not started");
    assert!(parent.dependencies().is_empty(), "not added");
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_leaves_a_running_service_running_detached() {
    let ticks = Arc::new(AtomicUsize::new(0));
    let t = ticks.clone();
    let s = ServiceHandle::new(OnStart("Detached", move |ctx: &Context| {
        let t = t.clone();
        ctx.timer("tick", Duration::from_secs(1), move || {
            t.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        });
        Ok(())
    }));
    s.start().await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        ticks.load(Ordering::SeqCst),
        3,
        "still running, as documented"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stop_on_drop_guard_stops_its_service_when_dropped() {
    let trace = Trace::default();
    let s = Recorder::handle("Scoped", &trace, vec![]);
    let observer = s.clone();
    {
        let guard = s.stop_on_drop();
        guard.start().await.unwrap();
        assert_eq!(guard.state(), ServiceState::Running);
    }
    tokio::time::timeout(Duration::from_secs(1), observer.wait_until_stopped())
        .await
        .unwrap();
    assert_eq!(observer.state(), ServiceState::Shutdown);
    assert_eq!(trace.count("Scoped.on_stop"), 1);
    assert_eq!(trace.count("Scoped.on_shutdown"), 1);

    let kept = Recorder::handle("Kept", &trace, vec![]).stop_on_drop();
    kept.start().await.unwrap();
    let handle = kept.disarm();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.state(), ServiceState::Running, "disarmed");
}

struct SlowStop(Duration);
impl Service for SlowStop {
    async fn on_stop(&mut self, _ctx: &Context) -> Result<()> {
        tokio::time::sleep(self.0).await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_called_outside_any_task_runs_to_its_end_when_the_caller_stops_waiting() {
    // The test's body runs in `block_on`, outside any task.
    let s = ServiceHandle::new(SlowStop(Duration::from_secs(5)));
    s.start().await.unwrap();
    let gave_up = tokio::time::timeout(Duration::from_secs(1), s.stop()).await;
    assert!(gave_up.is_err());
    assert_eq!(s.state(), ServiceState::Stopping);
    tokio::time::timeout(Duration::from_secs(60), s.wait_until_stopped())
        .await
        .expect("the stop went on without its caller");
    assert_eq!(s.state(), ServiceState::Shutdown);
}

#[tokio::test(start_paused = true)]
async fn a_service_stuck_stopping_says_what_it_waits_for() {
    let hung = ServiceHandle::builder(HungStop)
        .label("Hung")
        .grace_period(Duration::from_secs(10))
        .build();
    let stubborn = ServiceHandle::builder(OnStart("Stubborn", |ctx: &Context| {
        ctx.spawn("ignores-stop", async {
            std::future::pending::<()>().await;
            Ok(())
        });
        Ok(())
    }))
    .grace_period(Duration::from_secs(10))
    .build();
    let trace = Trace::default();
    let root = Recorder::handle("Root", &trace, vec![stubborn.clone(), hung.clone()]);
    root.start().await.unwrap();
    let r = root.clone();
    let stopping = tokio::spawn(async move { r.stop().await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        root.stuck_stopping(),
        ["Root/Hung: in on_stop (grace period 10s)"]
    );
    assert_eq!(
        root.beacon().find("Hung").unwrap().detail.as_deref(),
        Some("in on_stop")
    );
    // Hung's on_stop is cut off at 10 s; then Stubborn waits for its task.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        root.stuck_stopping(),
        ["Root/Stubborn: waiting for its tasks 'ignores-stop' (grace period 10s)"]
    );
    stopping.await.unwrap();
    assert!(root.stuck_stopping().is_empty());
    assert_eq!(
        root.beacon().find("Hung").unwrap().detail.as_deref(),
        Some("last stop was forced")
    );
}

#[tokio::test(start_paused = true)]
async fn log_prefix_has_one_dash_per_ancestor() {
    let trace = Trace::default();
    let leaf = Recorder::handle("Webserver", &trace, vec![]);
    let app = Recorder::handle("AppService", &trace, vec![leaf.clone()]);
    let worker = Recorder::handle("Worker", &trace, vec![app.clone()]);
    worker.start().await.unwrap();
    assert_eq!(worker.log_prefix(), "^Worker");
    assert_eq!(app.log_prefix(), "^-AppService");
    assert_eq!(leaf.log_prefix(), "^--Webserver");
}

/// A service whose task ignores stop requests (it never checks `should_stop`).
struct Stubborn;

impl Service for Stubborn {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        ctx.spawn("ignores-stop", async {
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn abort_stops_a_service_and_its_children_without_their_grace_period() {
    let child = ServiceHandle::builder(Stubborn)
        .label("child")
        .grace_period(Duration::from_secs(30))
        .build();
    let parent = ServiceHandle::builder(Stubborn)
        .label("parent")
        .grace_period(Duration::from_secs(30))
        .build();
    parent.add_dependency(child.clone());
    parent.start().await.unwrap();
    let t0 = tokio::time::Instant::now();
    parent.abort().await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(parent.state(), ServiceState::Shutdown);
    assert_eq!(child.state(), ServiceState::Shutdown);
    assert!(parent.was_forced() && child.was_forced());
    // The abort is one stop: the next run's stop has its grace period again.
    parent.restart().await.unwrap();
    let t0 = tokio::time::Instant::now();
    parent.stop().await;
    assert!(
        t0.elapsed() >= Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
}
