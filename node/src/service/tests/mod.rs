//! Unit tests of the framework, deterministic on paused tokio time.

mod beacon;
mod events;
mod lifecycle;
mod panics;
mod signals;
mod supervisors;
mod tasks;
mod threads;
mod timers;

use std::sync::{Arc, Mutex};

use super::{Context, Result, Service, ServiceHandle};

/// A shared log of "Label.hook" lines.
#[derive(Clone, Default)]
pub(crate) struct Trace(Arc<Mutex<Vec<String>>>);

impl Trace {
    pub(crate) fn push(&self, line: impl Into<String>) {
        self.0.lock().unwrap().push(line.into());
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub(crate) fn count(&self, line: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|l| *l == line).count()
    }

    pub(crate) fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// A service that records every hook it runs, with optional children.
pub(crate) struct Recorder {
    pub(crate) name: String,
    pub(crate) trace: Trace,
    pub(crate) children: Vec<ServiceHandle>,
}

impl Recorder {
    pub(crate) fn handle(name: &str, trace: &Trace, children: Vec<ServiceHandle>) -> ServiceHandle {
        ServiceHandle::new(Recorder {
            name: name.to_string(),
            trace: trace.clone(),
            children,
        })
    }
}

impl Service for Recorder {
    fn label(&self) -> String {
        self.name.clone()
    }

    fn dependencies(&mut self) -> Vec<ServiceHandle> {
        std::mem::take(&mut self.children)
    }

    async fn on_first_start(&mut self, _ctx: &Context) -> Result<()> {
        self.trace.push(format!("{}.on_first_start", self.name));
        Ok(())
    }

    async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
        self.trace.push(format!("{}.on_start", self.name));
        Ok(())
    }

    async fn on_started(&mut self, _ctx: &Context) -> Result<()> {
        self.trace.push(format!("{}.on_started", self.name));
        Ok(())
    }

    async fn on_stop(&mut self, _ctx: &Context) -> Result<()> {
        self.trace.push(format!("{}.on_stop", self.name));
        Ok(())
    }

    async fn on_shutdown(&mut self, _ctx: &Context) -> Result<()> {
        self.trace.push(format!("{}.on_shutdown", self.name));
        Ok(())
    }

    async fn on_restart(&mut self, _ctx: &Context) -> Result<()> {
        self.trace.push(format!("{}.on_restart", self.name));
        Ok(())
    }
}

/// A service that runs `f` in `on_start` (to start tasks and timers in tests).
pub(crate) struct OnStart<F>(pub(crate) &'static str, pub(crate) F);

impl<F> Service for OnStart<F>
where
    F: FnMut(&Context) -> Result<()> + Send + 'static,
{
    fn label(&self) -> String {
        self.0.to_string()
    }

    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        (self.1)(ctx)
    }
}

/// Let spawned tasks run (paused-time tests advance the clock explicitly).
pub(crate) async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}
