//! Typed signals (the observer pattern of mode's `Signal`/`SyncSignal`): receivers connect,
//! optionally for one sender only, and stay connected until their [`Connection`] is dropped.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

use super::handle::lock;
use super::traits::BoxFuture;

type SyncFn<S, T> = Arc<dyn Fn(&S, &T) + Send + Sync>;
type AsyncFn<S, T> = Arc<dyn Fn(S, T) -> BoxFuture<'static, ()> + Send + Sync>;

enum Receiver<S, T> {
    Sync(SyncFn<S, T>),
    Async(AsyncFn<S, T>),
}

impl<S, T> Clone for Receiver<S, T> {
    fn clone(&self) -> Self {
        match self {
            Receiver::Sync(f) => Receiver::Sync(f.clone()),
            Receiver::Async(f) => Receiver::Async(f.clone()),
        }
    }
}

struct Entry<S, T> {
    only_from: Option<S>,
    receiver: Receiver<S, T>,
}

struct Receivers<S, T> {
    next_id: u64,
    /// Ordered by connection: receivers are called in the order they connected (mode used
    /// set order, i.e. unspecified).
    entries: BTreeMap<u64, Entry<S, T>>,
}

/// A signal that senders of type `S` emit with a value of type `T`.
///
/// ```
/// use mode::service::Signal;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let on_order: Signal<&'static str, u32> = Signal::new();
/// let conn = on_order.connect(|shop, qty| println!("{shop} sold {qty}"));
/// on_order.send(&"north", &3).await; // prints
/// drop(conn);                        // disconnects
/// on_order.send(&"north", &4).await; // prints nothing
/// # }
/// ```
pub struct Signal<S, T> {
    inner: Arc<Mutex<Receivers<S, T>>>,
}

impl<S, T> Clone for Signal<S, T> {
    fn clone(&self) -> Self {
        Signal {
            inner: self.inner.clone(),
        }
    }
}

impl<S, T> Default for Signal<S, T>
where
    S: PartialEq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps a receiver connected; dropping it disconnects the receiver.
#[must_use = "dropping the connection disconnects the receiver at once"]
pub struct Connection {
    disconnect: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Connection {
    /// Keep the receiver connected for the signal's whole life.
    pub fn forever(mut self) {
        self.disconnect = None;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(d) = self.disconnect.take() {
            d();
        }
    }
}

impl<S, T> Signal<S, T>
where
    S: PartialEq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// A signal with no receivers.
    pub fn new() -> Self {
        Signal {
            inner: Arc::new(Mutex::new(Receivers {
                next_id: 0,
                entries: BTreeMap::new(),
            })),
        }
    }

    fn add(&self, only_from: Option<S>, receiver: Receiver<S, T>) -> Connection {
        let id = {
            let mut r = lock(&self.inner);
            let id = r.next_id;
            r.next_id += 1;
            r.entries.insert(
                id,
                Entry {
                    only_from,
                    receiver,
                },
            );
            id
        };
        let weak: Weak<Mutex<Receivers<S, T>>> = Arc::downgrade(&self.inner);
        Connection {
            disconnect: Some(Box::new(move || {
                if let Some(inner) = weak.upgrade() {
                    lock(&inner).entries.remove(&id);
                }
            })),
        }
    }

    /// Connect a synchronous receiver for every sender.
    pub fn connect(&self, f: impl Fn(&S, &T) + Send + Sync + 'static) -> Connection {
        self.add(None, Receiver::Sync(Arc::new(f)))
    }

    /// Connect a synchronous receiver for one sender only.
    pub fn connect_from(
        &self,
        sender: S,
        f: impl Fn(&S, &T) + Send + Sync + 'static,
    ) -> Connection {
        self.add(Some(sender), Receiver::Sync(Arc::new(f)))
    }

    /// Connect an async receiver for every sender.
    pub fn connect_async<F, Fut>(&self, f: F) -> Connection
    where
        F: Fn(S, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.add(
            None,
            Receiver::Async(Arc::new(move |s, t| Box::pin(f(s, t)))),
        )
    }

    /// Connect an async receiver for one sender only.
    pub fn connect_async_from<F, Fut>(&self, sender: S, f: F) -> Connection
    where
        F: Fn(S, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.add(
            Some(sender),
            Receiver::Async(Arc::new(move |s, t| Box::pin(f(s, t)))),
        )
    }

    /// Number of connected receivers.
    pub fn receiver_count(&self) -> usize {
        lock(&self.inner).entries.len()
    }

    fn receivers_for(&self, sender: &S) -> Vec<Receiver<S, T>> {
        lock(&self.inner)
            .entries
            .values()
            .filter(|e| e.only_from.as_ref().is_none_or(|only| only == sender))
            .map(|e| e.receiver.clone())
            .collect()
    }

    /// Call every receiver for `sender`, in connection order, awaiting async ones one after
    /// another. Returns how many were called.
    pub async fn send(&self, sender: &S, value: &T) -> usize {
        let receivers = self.receivers_for(sender);
        for r in &receivers {
            match r {
                Receiver::Sync(f) => f(sender, value),
                Receiver::Async(f) => f(sender.clone(), value.clone()).await,
            }
        }
        receivers.len()
    }

    /// Send without awaiting: synchronous receivers run now, async ones are spawned on the
    /// current tokio runtime (and skipped, with a warning, outside of one).
    pub fn send_sync(&self, sender: &S, value: &T) -> usize {
        let receivers = self.receivers_for(sender);
        for r in &receivers {
            match r {
                Receiver::Sync(f) => f(sender, value),
                Receiver::Async(f) => match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(f(sender.clone(), value.clone()));
                    }
                    Err(_) => {
                        tracing::warn!("signal: async receiver skipped outside a tokio runtime")
                    }
                },
            }
        }
        receivers.len()
    }

    /// A view of this signal that always sends as `sender` (mode's `with_default_sender`);
    /// it shares the receivers.
    pub fn with_sender(&self, sender: S) -> BoundSignal<S, T> {
        BoundSignal {
            signal: self.clone(),
            sender,
        }
    }
}

/// A signal bound to one sender.
pub struct BoundSignal<S, T> {
    signal: Signal<S, T>,
    sender: S,
}

impl<S, T> BoundSignal<S, T>
where
    S: PartialEq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Send `value` as the bound sender.
    pub async fn send(&self, value: &T) -> usize {
        self.signal.send(&self.sender, value).await
    }

    /// Send without awaiting (see [`Signal::send_sync`]).
    pub fn send_sync(&self, value: &T) -> usize {
        self.signal.send_sync(&self.sender, value)
    }

    /// The bound sender.
    pub fn sender(&self) -> &S {
        &self.sender
    }
}
