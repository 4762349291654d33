//! The beacon tree and its renderings.

use std::time::Duration;

use super::{OnStart, Recorder, Trace};
use crate::service::{BeaconNode, Context, NodeKind, ServiceHandle, Strategy, Supervisor};

async fn sample() -> ServiceHandle {
    let trace = Trace::default();
    let cache = ServiceHandle::new(OnStart("UserCache", |ctx: &Context| {
        ctx.timer("remove_expired", Duration::from_secs(1), || async {
            Ok(())
        });
        let c = ctx.clone();
        ctx.spawn("listen", async move {
            c.stopped().await;
            Ok(())
        });
        Ok(())
    }));
    let leaf1 = Recorder::handle("Leaf", &trace, vec![]);
    let leaf2 = Recorder::handle("Leaf", &trace, vec![]);
    let sup = Supervisor::new(Strategy::OneForOne)
        .children([leaf1, leaf2])
        .build();
    let app = Recorder::handle("App", &trace, vec![cache, sup]);
    app.start().await.unwrap();
    app
}

#[tokio::test(start_paused = true)]
async fn the_beacon_has_every_service_task_and_timer_with_state() {
    let app = sample().await;
    let b = app.beacon();
    assert_eq!(b.count(), 8, "{}", b.render_tree());
    let cache = b.find("UserCache").unwrap();
    assert_eq!(cache.state, "running");
    let timer = cache
        .children
        .iter()
        .find(|c| c.kind == NodeKind::Timer)
        .unwrap();
    assert_eq!(timer.label, "remove_expired");
    assert!(cache
        .children
        .iter()
        .any(|c| c.kind == NodeKind::Task && c.label == "listen"));
    let sup = b.find("OneForOneSupervisor").unwrap();
    assert_eq!(sup.kind, NodeKind::Supervisor);
    assert!(b.uptime_s.is_some());
}

#[tokio::test(start_paused = true)]
async fn the_beacon_carries_crash_reason_and_restart_count() {
    let trace = Trace::default();
    let s = Recorder::handle("S", &trace, vec![]);
    s.start().await.unwrap();
    s.restart().await.unwrap();
    s.crash("out of memory");
    let b = s.beacon();
    assert_eq!(b.state, "crashed");
    assert_eq!(b.restart_count, 1);
    assert_eq!(b.crash_reason.as_deref(), Some("out of memory"));
    assert!(b.render_tree().contains("crashed: out of memory"));
}

#[tokio::test(start_paused = true)]
async fn the_beacon_renders_as_a_tree_json_and_dot() {
    let app = sample().await;
    let b = app.beacon();
    let tree = b.render_tree();
    assert!(tree.starts_with("App [service] running"), "{tree}");
    assert!(tree.contains("├── UserCache [service] running"), "{tree}");
    assert!(tree.contains("remove_expired [timer] running"), "{tree}");
    assert!(
        tree.contains("└── OneForOneSupervisor [supervisor] running"),
        "{tree}"
    );

    let back: BeaconNode = serde_json::from_str(&b.to_json()).unwrap();
    assert_eq!(back, b);

    let dot = b.to_dot();
    assert!(dot.starts_with("digraph beacon {"));
    // Two services labelled Leaf stay two nodes (mode merged them), and edges are not repeated.
    assert_eq!(
        dot.matches("label=\"Leaf\\nservice running\"").count(),
        2,
        "{dot}"
    );
    let edges = dot.lines().filter(|l| l.contains("->")).count();
    assert_eq!(edges, b.count() - 1);
    assert!(dot.contains("fillcolor=\"palegreen\""));
}
