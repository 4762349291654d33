//! Services on their own OS thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::service::{
    Backoff, Context, Result, Service, ServiceHandle, ServiceState, Strategy, Supervisor,
};

struct OnThread {
    seen: Arc<Mutex<Vec<String>>>,
    crash_after: Option<Duration>,
}

impl Service for OnThread {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        self.seen.lock().unwrap().push(name);
        if let Some(after) = self.crash_after.take() {
            ctx.spawn("doomed", async move {
                tokio::time::sleep(after).await;
                Err("thread work failed".into())
            });
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_its_own_thread_runs_there_and_stops_with_its_handle() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let h = ServiceHandle::on_own_thread(OnThread {
        seen: seen.clone(),
        crash_after: None,
    });
    assert_eq!(h.label(), "Thread(OnThread)");
    h.start().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["mode:OnThread"]);
    let b = h.beacon();
    assert_eq!(b.children[0].label, "OnThread");
    assert_eq!(b.children[0].state, "running");
    h.stop().await;
    assert_eq!(h.state(), ServiceState::Shutdown);
    assert_eq!(h.beacon().children[0].state, "shutdown");
    h.restart().await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_on_the_thread_reaches_the_supervisor_of_its_handle() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let h = ServiceHandle::on_own_thread(OnThread {
        seen: seen.clone(),
        crash_after: Some(Duration::from_millis(20)),
    });
    let sup = Supervisor::new(Strategy::OneForOne)
        .backoff(Backoff::none())
        .child(h.clone())
        .build();
    sup.start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while h.restart_count() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    h.wait_for_state(ServiceState::Running).await;
    let reason = h.last_crash_reason().unwrap().to_string();
    assert!(
        reason.contains("task 'doomed' failed: thread work failed"),
        "{reason}"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
    sup.stop().await;
}
