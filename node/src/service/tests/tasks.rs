//! Tasks and futures: errors and panics crash their service, futures are awaited on stop,
//! restarts respawn tasks, stale contexts stop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{settle, OnStart};
use crate::service::{Context, ServiceHandle, ServiceState};

#[tokio::test(start_paused = true)]
async fn a_task_returning_an_error_crashes_its_service_with_a_reason_naming_the_task() {
    let s = ServiceHandle::new(OnStart("Fetcher", |ctx: &Context| {
        ctx.spawn("poll-feed", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err("feed returned 503".into())
        });
        Ok(())
    }));
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.state(), ServiceState::Crashed);
    assert_eq!(
        s.crash_reason().unwrap().as_str(),
        "task 'poll-feed' failed: feed returned 503"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_task_crashes_its_service_and_keeps_the_panic_message() {
    let s = ServiceHandle::new(OnStart("Parser", |ctx: &Context| {
        ctx.spawn("parse", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("index out of bounds: 7");
        });
        Ok(())
    }));
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    settle().await;
    assert_eq!(s.state(), ServiceState::Crashed);
    assert_eq!(
        s.crash_reason().unwrap().as_str(),
        "task 'parse' panicked: index out of bounds: 7"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_failing_during_start_fails_the_start() {
    struct Eager;
    impl crate::service::Service for Eager {
        async fn on_start(&mut self, ctx: &Context) -> crate::service::Result<()> {
            ctx.spawn("fails-now", async { Err("bad config".into()) });
            Ok(())
        }
        async fn on_started(&mut self, _ctx: &Context) -> crate::service::Result<()> {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(())
        }
    }
    let s = ServiceHandle::new(Eager);
    let err = s.start().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("task 'fails-now' failed: bad config"),
        "{err}"
    );
    assert_eq!(s.state(), ServiceState::Crashed);
}

#[tokio::test(start_paused = true)]
async fn futures_added_with_add_future_are_awaited_on_stop() {
    let finished = Arc::new(AtomicUsize::new(0));
    let f = finished.clone();
    let s = ServiceHandle::new(OnStart("Flusher", move |ctx: &Context| {
        let f = f.clone();
        ctx.add_future(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        Ok(())
    }));
    s.start().await.unwrap();
    s.stop().await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "the future ran to completion"
    );
    assert!(!s.was_forced());
}

#[tokio::test(start_paused = true)]
async fn restart_respawns_tasks_and_old_contexts_report_should_stop() {
    let spawned = Arc::new(AtomicUsize::new(0));
    let contexts = Arc::new(std::sync::Mutex::new(Vec::<Context>::new()));
    let (sp, cx) = (spawned.clone(), contexts.clone());
    let s = ServiceHandle::new(OnStart("Respawn", move |ctx: &Context| {
        sp.fetch_add(1, Ordering::SeqCst);
        cx.lock().unwrap().push(ctx.clone());
        let c = ctx.clone();
        ctx.spawn("loop", async move {
            c.stopped().await;
            Ok(())
        });
        Ok(())
    }));
    s.start().await.unwrap();
    s.restart().await.unwrap();
    assert_eq!(spawned.load(Ordering::SeqCst), 2);
    let ctxs = contexts.lock().unwrap().clone();
    assert!(ctxs[0].should_stop(), "the first run's context is stale");
    assert!(!ctxs[1].should_stop());
    assert_eq!(s.beacon().children.len(), 1, "one live task, not two");
}

#[tokio::test(start_paused = true)]
async fn wait_returns_none_when_the_service_stops_first() {
    let s = ServiceHandle::new(OnStart("Waiter", |_ctx: &Context| Ok(())));
    s.start().await.unwrap();
    let ctx = Context::new(s.clone(), s.generation());
    let quick = ctx.wait(async { 7 }).await;
    assert_eq!(quick, Some(7));
    let s2 = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s2.stop().await;
    });
    let slow = ctx
        .wait(tokio::time::sleep(Duration::from_secs(3600)))
        .await;
    assert!(slow.is_none());
}
