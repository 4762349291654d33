//! Services on a dedicated OS thread with their own tokio runtime (mode's `ServiceThread`),
//! controlled through an ordinary handle.

use tokio::sync::oneshot;

use super::beacon::NodeKind;
use super::guarded::panic_message;
use super::{Context, CrashReason, Result, Service, ServiceHandle};

/// Runs `inner` on its own thread. Build it with [`ServiceHandle::on_own_thread`].
struct ThreadService {
    inner: ServiceHandle,
    running: Option<RunningThread>,
}

struct RunningThread {
    stop: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

impl ServiceHandle {
    /// Run `service` on a dedicated OS thread with a single-threaded tokio runtime, for work
    /// that must not share the main runtime (blocking libraries, CPU-heavy loops).
    ///
    /// The returned handle starts, stops, restarts and observes it like any other; a crash on
    /// the thread crashes the handle's service and escalates as usual. When it stops, the
    /// thread's runtime is shut down, so nothing it spawned outlives it.
    pub fn on_own_thread<S: Service>(service: S) -> ServiceHandle {
        let inner = ServiceHandle::new(service);
        let label = format!("Thread({})", inner.label());
        let outer = ServiceHandle::builder(ThreadService {
            inner: inner.clone(),
            running: None,
        })
        .label(label)
        .kind(NodeKind::Thread)
        .build();
        outer.add_mirrored(&inner);
        inner.attach_to(&outer);
        outer
    }
}

impl Service for ThreadService {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let (started_tx, started_rx) = oneshot::channel::<std::result::Result<(), CrashReason>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let inner = self.inner.clone();
        if inner.state().is_terminal() {
            inner.reset_for_thread();
        }
        let name = format!("mode:{}", inner.label());
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(CrashReason::new(format!(
                        "could not create the thread's runtime: {e}"
                    ))));
                    return;
                }
            };
            rt.block_on(async move {
                if let Err(e) = inner.start().await {
                    let reason = e.reason().cloned().unwrap_or_else(|| e.to_string().into());
                    let _ = started_tx.send(Err(reason));
                    return;
                }
                let _ = started_tx.send(Ok(()));
                tokio::select! {
                    _ = stop_rx => {}
                    // A crash escalates to the handle's service by itself (it is the parent).
                    _ = inner.wait_until_stopped() => {}
                }
                inner.stop().await;
            });
            // Dropping the runtime cancels anything still spawned on it.
            drop(rt);
            let _ = done_tx.send(());
        })?;
        self.running = Some(RunningThread {
            stop: stop_tx,
            done: done_rx,
            thread,
        });
        match started_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(format!("on its thread: {reason}").into()),
            Err(_) => {
                let why = match self.running.take() {
                    Some(t) => join(t.thread).await.err(),
                    None => None,
                };
                Err(format!(
                    "the thread of '{}' exited during start{}",
                    ctx.label(),
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                )
                .into())
            }
        }
    }

    async fn on_stop(&mut self, ctx: &Context) -> Result<()> {
        if let Some(t) = self.running.take() {
            let _ = t.stop.send(());
            let _ = t.done.await;
            if let Err(why) = join(t.thread).await {
                return Err(format!("the thread of '{}' {why}", ctx.label()).into());
            }
        }
        Ok(())
    }
}

/// Join the service's thread without blocking the runtime; `Err` says how it ended badly.
async fn join(thread: std::thread::JoinHandle<()>) -> std::result::Result<(), String> {
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(panic)) => Err(format!("panicked: {}", panic_message(panic))),
        Err(e) => Err(format!("could not be joined: {e}")),
    }
}
