//! Worker outcomes and exit codes, in process (signals are tested with real processes in the
//! mode-tests crate).

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
        let detector = BlockingDetector::start(Duration::from_millis(100));
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
