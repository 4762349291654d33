//! Panics in hooks: caught like panics in tasks, named in the crash reason, the state machine
//! consistent afterwards, and counted against the right supervisor.

use std::time::Duration;

use super::{Recorder, Trace};
use crate::service::{
    Backoff, Context, RestartIntensity, Result, Service, ServiceError, ServiceHandle, ServiceState,
    Strategy, Supervisor,
};

/// Records its hooks like [`Recorder`] and panics in the hook named `panic_in`, from the
/// `from_run`-th start on (1 = the first).
struct Panicky {
    trace: Trace,
    panic_in: &'static str,
    from_run: u32,
    run: u32,
}

impl Panicky {
    fn handle(trace: &Trace, panic_in: &'static str, from_run: u32) -> ServiceHandle {
        ServiceHandle::new(Panicky {
            trace: trace.clone(),
            panic_in,
            from_run,
            run: 0,
        })
    }

    fn hook(&self, name: &str) {
        self.trace.push(format!("Panicky.{name}"));
        if name == self.panic_in && self.run >= self.from_run {
            panic!("{name} exploded on run {}", self.run);
        }
    }
}

impl Service for Panicky {
    fn dependencies(&mut self) -> Vec<ServiceHandle> {
        if self.panic_in == "dependencies" {
            panic!("cannot build the dependencies");
        }
        Vec::new()
    }

    async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
        self.run += 1;
        self.hook("on_start");
        Ok(())
    }

    async fn on_started(&mut self, _ctx: &Context) -> Result<()> {
        self.hook("on_started");
        Ok(())
    }

    async fn on_stop(&mut self, _ctx: &Context) -> Result<()> {
        // An await first: the panic must be caught whichever poll it comes from.
        tokio::task::yield_now().await;
        self.hook("on_stop");
        Ok(())
    }

    async fn on_shutdown(&mut self, _ctx: &Context) -> Result<()> {
        self.hook("on_shutdown");
        Ok(())
    }

    async fn on_restart(&mut self, _ctx: &Context) -> Result<()> {
        self.hook("on_restart");
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_a_start_hook_fails_the_start_naming_the_hook_and_leaves_it_crashed() {
    for hook in ["on_start", "on_started"] {
        let trace = Trace::default();
        let s = Panicky::handle(&trace, hook, 1);
        let err = s.start().await.unwrap_err();
        let ServiceError::StartFailed { service, reason } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(service, "Panicky");
        assert_eq!(
            reason.as_str(),
            format!("{hook} panicked: {hook} exploded on run 1")
        );
        assert_eq!(s.state(), ServiceState::Crashed, "not left starting");
        // What the start had begun was stopped again, once.
        assert_eq!(trace.count("Panicky.on_stop"), 1);
        s.stop().await;
        assert_eq!(trace.count("Panicky.on_stop"), 1);
        assert_eq!(s.state(), ServiceState::Crashed);
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_dependencies_fails_the_start() {
    let trace = Trace::default();
    let s = Panicky::handle(&trace, "dependencies", 1);
    let err = s.start().await.unwrap_err();
    assert_eq!(
        err.reason().unwrap().as_str(),
        "dependencies panicked: cannot build the dependencies"
    );
    assert_eq!(s.state(), ServiceState::Crashed);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_a_stop_hook_is_a_forced_stop_that_ends_in_shutdown_and_happens_once() {
    for hook in ["on_stop", "on_shutdown"] {
        let trace = Trace::default();
        let child = Recorder::handle("Child", &trace, vec![]);
        let s = Panicky::handle(&trace, hook, 1);
        s.add_dependency(child.clone());
        s.start().await.unwrap();
        let mut events = s.subscribe();
        s.stop().await;
        assert_eq!(
            s.state(),
            ServiceState::Shutdown,
            "{hook}: not left stopping"
        );
        assert!(s.was_forced(), "{hook}");
        assert_eq!(
            child.state(),
            ServiceState::Shutdown,
            "{hook}: the stop went on"
        );
        assert_eq!(trace.count("Panicky.on_shutdown"), 1, "{hook}");
        let mut forced = Vec::new();
        while let Ok(e) = events.try_recv() {
            if let crate::service::LifecycleEventKind::ForcedStop { reason } = e.kind {
                forced.push(reason);
            }
        }
        assert_eq!(
            forced,
            [format!("{hook} panicked: {hook} exploded on run 1")]
        );
        s.stop().await;
        assert_eq!(trace.count(&format!("Panicky.{hook}")), 1, "no second run");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_on_restart_fails_the_restart_naming_the_hook() {
    let trace = Trace::default();
    let s = Panicky::handle(&trace, "on_restart", 1);
    s.start().await.unwrap();
    let err = s.restart().await.unwrap_err();
    assert_eq!(
        err.reason().unwrap().as_str(),
        "on_restart panicked: on_restart exploded on run 1"
    );
    assert_eq!(s.state(), ServiceState::Crashed);
}

#[tokio::test(start_paused = true)]
async fn a_child_panicking_in_on_start_counts_against_its_supervisors_restart_intensity() {
    let trace = Trace::default();
    // Starts once, then panics in every restart's on_start.
    let flaky = Panicky::handle(&trace, "on_start", 2);
    let inner = Supervisor::new(Strategy::OneForOne)
        .label("Inner")
        .intensity(RestartIntensity {
            max_restarts: 2,
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
    flaky.crash("first crash");
    tokio::time::timeout(Duration::from_secs(60), inner.wait_until_stopped())
        .await
        .expect("the supervisor gave up on the child");
    let reason = inner.last_crash_reason().unwrap().to_string();
    assert!(
        reason.starts_with("restart intensity exceeded: child 'Panicky'"),
        "blamed on the child, not on the supervisor's task: {reason}"
    );
    assert!(
        reason.contains("last reason: on_start panicked: on_start exploded on run 3"),
        "{reason}"
    );
    assert_eq!(flaky.state(), ServiceState::Crashed, "not left starting");
    assert_eq!(
        trace.count("Panicky.on_start"),
        3,
        "one start, two restarts"
    );
    assert_eq!(outer.state(), ServiceState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_on_start_on_its_own_thread_fails_the_start_naming_the_hook() {
    let trace = Trace::default();
    let s = ServiceHandle::on_own_thread(Panicky {
        trace: trace.clone(),
        panic_in: "on_start",
        from_run: 1,
        run: 0,
    });
    let err = s.start().await.unwrap_err();
    let reason = err.reason().unwrap().to_string();
    assert!(
        reason.contains("on_start panicked: on_start exploded on run 1"),
        "{reason}"
    );
    assert_eq!(s.state(), ServiceState::Crashed);
    s.stop().await;
    assert_eq!(s.state(), ServiceState::Crashed);
}
