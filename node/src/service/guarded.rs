//! Everything the framework polls on a service's behalf (its hooks and its tasks) is polled
//! through [`Guarded`]: a panic becomes an error carrying the panic message, and each thread
//! records what it is polling, so that the blocking detector and a stuck shutdown can name the
//! service and the hook or task.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context as TaskCx, Poll};

use super::handle::lock;
use super::task::TaskInfo;
use super::traits::{BoxFuture, Hook};
use super::ServiceHandle;

/// What a thread is polling: a hook or a task of a service.
#[derive(Clone)]
pub(crate) enum Site {
    Hook(ServiceHandle, Hook),
    Task(ServiceHandle, Arc<TaskInfo>),
}

impl Site {
    /// The service whose hook or task it is.
    pub(crate) fn service(&self) -> &ServiceHandle {
        match self {
            Site::Hook(service, _) | Site::Task(service, _) => service,
        }
    }

    /// `on_start of service 'Db'`, `task 'poll' of service 'Db'`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Site::Hook(service, hook) => {
                format!("{} of service '{}'", hook.name(), service.label())
            }
            Site::Task(service, task) => format!(
                "{} '{}' of service '{}'",
                task.kind.noun(),
                task.name,
                service.label()
            ),
        }
    }
}

/// One thread's record of what it polls (see [`polling_threads`]).
pub(crate) struct ThreadSlot {
    /// The thread's name and id, e.g. `tokio-runtime-worker (ThreadId(7))`.
    pub(crate) thread: String,
    /// Bumped when a poll starts and when it ends: unchanged while one poll runs.
    polls: AtomicU64,
    current: Mutex<Option<Site>>,
}

impl ThreadSlot {
    /// The poll counter and what is being polled now, if anything.
    pub(crate) fn sample(&self) -> (u64, Option<Site>) {
        let current = lock(&self.current).clone();
        (self.polls.load(Ordering::Acquire), current)
    }
}

static SLOTS: Mutex<Vec<Weak<ThreadSlot>>> = Mutex::new(Vec::new());

thread_local! {
    static SLOT: Arc<ThreadSlot> = register_thread();
}

fn register_thread() -> Arc<ThreadSlot> {
    let me = std::thread::current();
    let slot = Arc::new(ThreadSlot {
        thread: format!("{} ({:?})", me.name().unwrap_or("unnamed"), me.id()),
        polls: AtomicU64::new(0),
        current: Mutex::new(None),
    });
    let mut slots = lock(&SLOTS);
    slots.retain(|s| s.strong_count() > 0);
    slots.push(Arc::downgrade(&slot));
    slot
}

/// Every live thread that has polled a hook or task of a service.
pub(crate) fn polling_threads() -> Vec<Arc<ThreadSlot>> {
    lock(&SLOTS).iter().filter_map(Weak::upgrade).collect()
}

/// A hook's or task's future, polled with panic protection and recorded in the thread's slot.
pub(crate) struct Guarded<'a, T> {
    fut: BoxFuture<'a, T>,
    site: Site,
}

impl<'a, T> Guarded<'a, T> {
    pub(crate) fn new(site: Site, fut: BoxFuture<'a, T>) -> Self {
        Guarded { fut, site }
    }
}

impl<T> Future for Guarded<'_, T> {
    /// `Err` carries the panic message.
    type Output = Result<T, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut poll_inner = || catch_unwind(AssertUnwindSafe(|| this.fut.as_mut().poll(cx)));
        let outcome = SLOT
            .try_with(|slot| {
                slot.polls.fetch_add(1, Ordering::Release);
                // Nested polls (a hook run by a supervisor's task) restore the outer site.
                let outer = lock(&slot.current).replace(this.site.clone());
                let outcome = poll_inner();
                *lock(&slot.current) = outer;
                slot.polls.fetch_add(1, Ordering::Release);
                outcome
            })
            // The thread is exiting and its slot is gone: poll without recording.
            .unwrap_or_else(|_| poll_inner());
        match outcome {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(payload) => Poll::Ready(Err(panic_message(payload))),
        }
    }
}

pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}
