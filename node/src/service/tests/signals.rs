//! Signals: connect, disconnect by drop, per-sender filtering, async and sync send.

use std::sync::{Arc, Mutex};

use crate::service::Signal;

type Log = Arc<Mutex<Vec<String>>>;

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

#[tokio::test]
async fn receivers_are_called_in_connection_order_with_sender_and_value() {
    let sig: Signal<u32, String> = Signal::new();
    let l = log();
    let (a, b) = (l.clone(), l.clone());
    let _c1 = sig.connect(move |s, v| a.lock().unwrap().push(format!("first {s} {v}")));
    let _c2 = sig.connect(move |s, v| b.lock().unwrap().push(format!("second {s} {v}")));
    assert_eq!(sig.send(&303, &"sorry not sorry".to_string()).await, 2);
    assert_eq!(
        *l.lock().unwrap(),
        ["first 303 sorry not sorry", "second 303 sorry not sorry"]
    );
}

#[tokio::test]
async fn dropping_the_connection_disconnects_and_forever_keeps_it() {
    let sig: Signal<u32, u32> = Signal::new();
    let l = log();
    let a = l.clone();
    let conn = sig.connect(move |_, v| a.lock().unwrap().push(v.to_string()));
    sig.send(&1, &1).await;
    drop(conn);
    assert_eq!(sig.send(&1, &2).await, 0);
    let b = l.clone();
    sig.connect(move |_, v| b.lock().unwrap().push(v.to_string()))
        .forever();
    sig.send(&1, &3).await;
    assert_eq!(*l.lock().unwrap(), ["1", "3"]);
    assert_eq!(sig.receiver_count(), 1);
}

#[tokio::test]
async fn receivers_connected_for_one_sender_only_hear_that_sender() {
    let sig: Signal<&'static str, u32> = Signal::new();
    let l = log();
    let (a, b) = (l.clone(), l.clone());
    let _c1 = sig.connect_from("north", move |s, v| {
        a.lock().unwrap().push(format!("{s}:{v}"))
    });
    let _c2 = sig.connect(move |s, v| b.lock().unwrap().push(format!("any {s}:{v}")));
    sig.send(&"south", &1).await;
    sig.send(&"north", &2).await;
    assert_eq!(
        *l.lock().unwrap(),
        ["any south:1", "north:2", "any north:2"]
    );
}

#[tokio::test]
async fn async_receivers_are_awaited_by_send_and_spawned_by_send_sync() {
    let sig: Signal<u8, u8> = Signal::new();
    let l = log();
    let a = l.clone();
    let _c = sig.connect_async(move |s, v| {
        let a = a.clone();
        async move {
            tokio::task::yield_now().await;
            a.lock().unwrap().push(format!("{s}/{v}"));
        }
    });
    sig.send(&1, &2).await;
    assert_eq!(*l.lock().unwrap(), ["1/2"]);
    assert_eq!(sig.send_sync(&3, &4), 1);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(*l.lock().unwrap(), ["1/2", "3/4"]);
}

#[tokio::test]
async fn a_bound_signal_sends_as_its_sender_and_shares_receivers() {
    let sig: Signal<u32, &'static str> = Signal::new();
    let l = log();
    let a = l.clone();
    let _c = sig.connect_from(42, move |s, v| a.lock().unwrap().push(format!("{s} {v}")));
    let bound = sig.with_sender(42);
    assert_eq!(*bound.sender(), 42);
    bound.send(&"hello").await;
    assert_eq!(bound.send_sync(&"sync"), 1);
    assert_eq!(*l.lock().unwrap(), ["42 hello", "42 sync"]);
}
