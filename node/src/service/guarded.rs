//! Everything the framework polls on a service's behalf (its hooks and its tasks) is polled
//! through [`Guarded`]: a panic becomes an error carrying the panic message, and, while a
//! blocking detector runs, each thread records what it is polling so that the detector can
//! name the service and the hook or task stuck on a thread.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
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
    /// Bumped when a poll starts: unchanged while one poll runs.
    polls: AtomicU64,
    /// The site of the poll running now (inside the `Guarded` being polled), or null.
    current: AtomicPtr<Site>,
    /// Watchdogs reading `current`'s target: a poll that ends waits for them.
    readers: AtomicUsize,
}

impl ThreadSlot {
    /// The poll counter and what is being polled now, if anything.
    pub(crate) fn sample(&self) -> (u64, Option<Site>) {
        self.readers.fetch_add(1, Ordering::SeqCst);
        let site = self.current.load(Ordering::SeqCst);
        // SAFETY: a non-null `current` points at the site inside the `Guarded` being polled
        // on this slot's thread. That poll resets `current` and then waits until `readers` is
        // zero before it returns, so the site cannot be moved or dropped before `readers` is
        // decremented below (all four accesses are SeqCst: if this load saw the pointer, the
        // reset comes after it, and the poll's later load of `readers` sees the increment).
        let site = unsafe { site.as_ref() }.cloned();
        self.readers.fetch_sub(1, Ordering::SeqCst);
        (self.polls.load(Ordering::Acquire), site)
    }
}

static SLOTS: Mutex<Vec<Weak<ThreadSlot>>> = Mutex::new(Vec::new());

/// Running blocking detectors: while there are none, polls are not recorded.
static WATCHERS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: Arc<ThreadSlot> = register_thread();
}

fn register_thread() -> Arc<ThreadSlot> {
    let me = std::thread::current();
    let slot = Arc::new(ThreadSlot {
        thread: format!("{} ({:?})", me.name().unwrap_or("unnamed"), me.id()),
        polls: AtomicU64::new(0),
        current: AtomicPtr::new(std::ptr::null_mut()),
        readers: AtomicUsize::new(0),
    });
    let mut slots = lock(&SLOTS);
    slots.retain(|s| s.strong_count() > 0);
    slots.push(Arc::downgrade(&slot));
    slot
}

/// Every live thread that has polled a hook or task of a service while a watcher ran.
pub(crate) fn polling_threads() -> Vec<Arc<ThreadSlot>> {
    lock(&SLOTS).iter().filter_map(Weak::upgrade).collect()
}

/// Record what threads poll while the returned guard lives (one per blocking detector).
pub(crate) fn watch_polls() -> WatchGuard {
    WATCHERS.fetch_add(1, Ordering::SeqCst);
    WatchGuard(())
}

/// Keeps polls recorded; see [`watch_polls`].
pub(crate) struct WatchGuard(());

impl Drop for WatchGuard {
    fn drop(&mut self) {
        WATCHERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A hook's or task's future, polled with panic protection and, while a blocking detector
/// runs, recorded in its thread's slot.
pub(crate) struct Guarded<'a, T> {
    fut: BoxFuture<'a, T>,
    site: SiteOf<'a>,
}

/// What a site is built from on the first recorded poll: most polls are never recorded, and
/// a task's future lives as long as the task, so it stays small.
struct SiteOf<'a> {
    service: &'a ServiceHandle,
    what: What<'a>,
    built: Option<Box<Site>>,
}

enum What<'a> {
    Hook(Hook),
    Task(&'a Arc<TaskInfo>),
}

impl SiteOf<'_> {
    fn get(&mut self) -> &Site {
        let (service, what) = (self.service, &self.what);
        self.built.get_or_insert_with(|| {
            Box::new(match what {
                What::Hook(hook) => Site::Hook(service.clone(), *hook),
                What::Task(task) => Site::Task(service.clone(), Arc::clone(task)),
            })
        })
    }
}

impl<'a, T> Guarded<'a, T> {
    pub(crate) fn task(
        service: &'a ServiceHandle,
        task: &'a Arc<TaskInfo>,
        fut: BoxFuture<'a, T>,
    ) -> Self {
        Guarded {
            fut,
            site: SiteOf {
                service,
                what: What::Task(task),
                built: None,
            },
        }
    }

    pub(crate) fn hook(service: &'a ServiceHandle, hook: Hook, fut: BoxFuture<'a, T>) -> Self {
        Guarded {
            fut,
            site: SiteOf {
                service,
                what: What::Hook(hook),
                built: None,
            },
        }
    }
}

impl<T> Future for Guarded<'_, T> {
    /// `Err` carries the panic message.
    type Output = Result<T, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let fut = &mut this.fut;
        let mut poll_inner = || catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx)));
        let outcome = if WATCHERS.load(Ordering::Relaxed) == 0 {
            poll_inner()
        } else {
            let site: *const Site = this.site.get();
            SLOT.try_with(|slot| {
                slot.polls.fetch_add(1, Ordering::Release);
                // Nested polls (a hook run by a supervisor's task) restore the outer site.
                let outer = slot.current.swap(site.cast_mut(), Ordering::SeqCst);
                let outcome = poll_inner();
                slot.current.store(outer, Ordering::SeqCst);
                // A watchdog that saw our site is cloning it: wait (nanoseconds) before the
                // site may go away.
                let mut spins = 0u32;
                while slot.readers.load(Ordering::SeqCst) != 0 {
                    spins += 1;
                    if spins < 100 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
                outcome
            })
            // The thread is exiting and its slot is gone: poll without recording.
            .unwrap_or_else(|_| poll_inner())
        };
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
