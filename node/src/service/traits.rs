//! The `Service` trait users implement, and its object-safe twin the framework drives.

use std::future::Future;
use std::pin::Pin;

use super::{Context, Result, ServiceHandle};

/// A future the framework can store and drive without knowing its type.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A long-running component with lifecycle hooks, mirroring Python mode's `Service`.
///
/// Every hook is optional. Hooks run in this order:
///
/// * start: `on_first_start` (first start only, never again after a restart) → `on_start` →
///   the dependencies start, one at a time in declaration order → `on_started`;
/// * stop: `on_stop` → the service's own tasks are joined (aborted after the grace period) →
///   the dependencies stop in reverse order → `on_shutdown`;
/// * restart: the stop hooks → `on_restart` → the start hooks (without `on_first_start`).
///
/// Background tasks, futures and timers are started from a hook through the [`Context`]; the
/// ones started in `on_start` therefore run again after each restart.
///
/// ```
/// use std::time::Duration;
/// use mode::service::{Context, Result, Service, ServiceHandle};
///
/// struct Ticker;
///
/// impl Service for Ticker {
///     async fn on_start(&mut self, ctx: &Context) -> Result<()> {
///         ctx.timer("tick", Duration::from_secs(1), || async {
///             println!("tick");
///             Ok(())
///         });
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let ticker = ServiceHandle::new(Ticker);
/// ticker.start().await.unwrap();
/// ticker.stop().await;
/// # }
/// ```
pub trait Service: Send + 'static {
    /// The name shown in logs, the beacon and errors. Defaults to the type's name.
    fn label(&self) -> String {
        short_type_name::<Self>().to_string()
    }

    /// Children declared at construction (mode's `on_init_dependencies`). Called once, before
    /// the first start; they start before this service reaches `on_started`.
    fn dependencies(&mut self) -> Vec<ServiceHandle> {
        Vec::new()
    }

    /// Runs before `on_start`, on the first start only.
    fn on_first_start(&mut self, _ctx: &Context) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Runs on every start, before the dependencies start. Start tasks and timers here.
    fn on_start(&mut self, _ctx: &Context) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Runs once the dependencies are running.
    fn on_started(&mut self, _ctx: &Context) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Runs first when stopping; bounded by the grace period.
    fn on_stop(&mut self, _ctx: &Context) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Runs last when stopping, after tasks and dependencies have stopped.
    fn on_shutdown(&mut self, _ctx: &Context) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Runs between the stop and the start of a restart.
    fn on_restart(&mut self, _ctx: &Context) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// The hooks, by name, for the object-safe dispatch below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    FirstStart,
    Start,
    Started,
    Stop,
    Shutdown,
    Restart,
}

impl Hook {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Hook::FirstStart => "on_first_start",
            Hook::Start => "on_start",
            Hook::Started => "on_started",
            Hook::Stop => "on_stop",
            Hook::Shutdown => "on_shutdown",
            Hook::Restart => "on_restart",
        }
    }
}

/// `Service` with boxed futures so that the framework can hold any service behind one type.
pub(crate) trait DynService: Send {
    fn dependencies(&mut self) -> Vec<ServiceHandle>;
    fn call<'a>(&'a mut self, hook: Hook, ctx: &'a Context) -> BoxFuture<'a, Result<()>>;
}

impl<S: Service> DynService for S {
    fn dependencies(&mut self) -> Vec<ServiceHandle> {
        Service::dependencies(self)
    }

    fn call<'a>(&'a mut self, hook: Hook, ctx: &'a Context) -> BoxFuture<'a, Result<()>> {
        match hook {
            Hook::FirstStart => Box::pin(self.on_first_start(ctx)),
            Hook::Start => Box::pin(self.on_start(ctx)),
            Hook::Started => Box::pin(self.on_started(ctx)),
            Hook::Stop => Box::pin(self.on_stop(ctx)),
            Hook::Shutdown => Box::pin(self.on_shutdown(ctx)),
            Hook::Restart => Box::pin(self.on_restart(ctx)),
        }
    }
}

/// `my_crate::module::Type<Args>` → `Type`.
pub(crate) fn short_type_name<T: ?Sized>() -> &'static str {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}
