//! Worker outcomes and exit codes, in process (signals are tested with real processes in the
//! mode-tests crate).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{BlockingDetector, Worker, WorkerExit};
use crate::service::{Context, Result, Service, ServiceHandle};

struct Quits {
    after: Duration,
    fail: bool,
}

impl Service for Quits {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let (after, fail) = (self.after, self.fail);
        let c = ctx.clone();
        ctx.spawn("work", async move {
            if !c.sleep(after).await {
                return Ok(());
            }
            if fail {
                return Err("lost the database".into());
            }
            c.handle().parent().expect("under the worker").stop().await;
            Ok(())
        });
        Ok(())
    }
}

fn worker(svc: ServiceHandle) -> Worker {
    Worker::new(svc).without_logging().blocking_threshold(None)
}

#[tokio::test]
async fn a_clean_stop_exits_zero() {
    let w = worker(ServiceHandle::new(Quits {
        after: Duration::from_millis(10),
        fail: false,
    }));
    let exit = w.run_async().await;
    assert_eq!(exit, WorkerExit::Stopped);
    assert_eq!(exit.code(), 0);
}

#[tokio::test]
async fn a_crash_exits_non_zero_with_the_reason() {
    let w = worker(ServiceHandle::new(Quits {
        after: Duration::from_millis(10),
        fail: true,
    }));
    let root = w.handle().clone();
    let exit = w.run_async().await;
    let WorkerExit::Crashed(reason) = &exit else {
        panic!("{exit:?}")
    };
    assert_eq!(
        reason.as_str(),
        "dependency 'Quits' crashed: task 'work' failed: lost the database"
    );
    assert_eq!(exit.code(), 1);
    assert_eq!(root.state(), crate::ServiceState::Crashed);
    assert!(root.dependencies().iter().all(|d| d.state().is_terminal()));
}

#[tokio::test]
async fn a_failed_start_exits_non_zero() {
    struct NoStart;
    impl Service for NoStart {
        async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
            Err("port 80 in use".into())
        }
    }
    let exit = worker(ServiceHandle::new(NoStart)).run_async().await;
    assert!(matches!(exit, WorkerExit::StartFailed(_)), "{exit:?}");
    assert_eq!(exit.code(), 1);
}

#[tokio::test]
async fn the_worker_is_the_root_of_the_beacon() {
    let w = worker(ServiceHandle::new(Quits {
        after: Duration::from_secs(60),
        fail: false,
    }));
    let root = w.handle().clone();
    let run = tokio::spawn(w.run_async());
    root.wait_for_state(crate::ServiceState::Running).await;
    let b = root.beacon();
    assert_eq!(b.label, "Worker");
    assert_eq!(b.children[0].label, "Quits");
    assert_eq!(root.dependencies()[0].log_prefix(), "^-Quits");
    root.stop().await;
    assert_eq!(run.await.unwrap(), WorkerExit::Stopped);
}

#[test]
fn the_blocking_detector_warns_when_the_runtime_is_blocked() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Scoped to a service that never runs: only the probe counts.
        let nothing = ServiceHandle::new(Quits {
            after: Duration::ZERO,
            fail: false,
        });
        let detector = BlockingDetector::start_scoped(Duration::from_millis(100), Some(nothing));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(detector.detections(), 0, "an idle runtime is not blocked");
        std::thread::sleep(Duration::from_millis(600));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            detector.detections(),
            1,
            "one blocked episode, reported once"
        );
    });
}

#[tokio::test]
async fn a_panic_in_on_start_exits_1_naming_the_hook_not_101() {
    struct Explodes;
    impl Service for Explodes {
        async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
            panic!("config file is empty");
        }
    }
    let exit = worker(ServiceHandle::new(Explodes)).run_async().await;
    let WorkerExit::StartFailed(e) = &exit else {
        panic!("{exit:?}")
    };
    assert!(
        e.to_string()
            .contains("on_start panicked: config file is empty"),
        "{e}"
    );
    assert_eq!(exit.code(), 1);
}

#[tokio::test]
async fn a_stop_while_starting_is_a_clean_stop() {
    struct StopsTheWorkerWhileStarting;
    impl Service for StopsTheWorkerWhileStarting {
        async fn on_start(&mut self, ctx: &Context) -> Result<()> {
            let worker = ctx.handle().parent().expect("under the worker");
            worker.stop().await;
            Ok(())
        }
    }
    let exit = worker(ServiceHandle::new(StopsTheWorkerWhileStarting))
        .run_async()
        .await;
    assert_eq!(exit, WorkerExit::Stopped);
}

/// Blocks its thread for `block` inside one poll of its task, once started.
struct Hog {
    block: Duration,
}

impl Service for Hog {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let block = self.block;
        let c = ctx.clone();
        ctx.spawn("crunch", async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::thread::sleep(block);
            c.stopped().await;
            Ok(())
        });
        Ok(())
    }
}

#[test]
fn the_blocking_detector_names_one_blocked_task_among_healthy_threads() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ticks = Arc::new(AtomicU64::new(0));
        let t = ticks.clone();
        let healthy = ServiceHandle::new(crate::service::tests::OnStart(
            "Healthy",
            move |ctx: &Context| {
                let t = t.clone();
                ctx.timer("tick", Duration::from_millis(10), move || {
                    t.fetch_add(1, Ordering::Relaxed);
                    async { Ok(()) }
                });
                Ok(())
            },
        ));
        let hog = ServiceHandle::new(Hog {
            block: Duration::from_millis(1500),
        });
        let root = ServiceHandle::new(crate::service::tests::OnStart("Root", |_: &Context| Ok(())));
        root.add_dependency(healthy);
        root.add_dependency(hog);
        let detector =
            BlockingDetector::start_scoped(Duration::from_millis(300), Some(root.clone()));
        root.start().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = ticks.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let during = ticks.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let reports = detector.reports();
        root.stop().await;
        assert!(
            during > before,
            "the other thread kept running the healthy timer while one was blocked"
        );
        assert_eq!(detector.detections(), 1, "{reports:?}");
        assert!(
            reports[0].contains("in one poll of task 'crunch' of service 'Hog'"),
            "{reports:?}"
        );
    });
}

#[test]
fn the_blocking_detector_names_a_blocked_hook() {
    struct SlowHook;
    impl Service for SlowHook {
        async fn on_started(&mut self, _ctx: &Context) -> Result<()> {
            std::thread::sleep(Duration::from_millis(900));
            Ok(())
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = ServiceHandle::new(SlowHook);
        let detector = BlockingDetector::start_scoped(Duration::from_millis(200), Some(s.clone()));
        s.start().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reports = detector.reports();
        assert_eq!(detector.detections(), 1, "{reports:?}");
        assert!(
            reports[0].contains("in one poll of on_started of service 'SlowHook'"),
            "{reports:?}"
        );
        s.stop().await;
    });
}

#[test]
fn colour_only_on_a_terminal_without_no_color() {
    use super::logging::colour_wanted;
    use std::ffi::OsStr;
    assert!(colour_wanted(true, None));
    assert!(!colour_wanted(false, None), "a pipe or a file");
    assert!(!colour_wanted(true, Some(OsStr::new("1"))));
    assert!(
        colour_wanted(true, Some(OsStr::new(""))),
        "empty NO_COLOR is unset"
    );
}
