//! `/metrics` of real `mode-node` processes, parsed with a strict Prometheus text parser
//! ([`mode_tests::prom`]): service and node labels, the build and process families, gRPC
//! request counts, restarts that never go down across a move, and the series of a removed node
//! or a deleted service gone.

use std::path::Path;
use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_tests::prom::Exposition;
use mode_tests::{http_get, Scratch, TestCluster};

const ELECTION: Duration = Duration::from_secs(20);

/// `/metrics` of node `id`, parsed (a parse error fails the test, naming the line).
fn scrape(c: &TestCluster, id: u64) -> Exposition {
    let http = c.nodes[&id].http.expect("an HTTP side port");
    let (code, text) = http_get(http, "/metrics");
    assert_eq!(code, 200, "{text}");
    Exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Scrape node `id` until `ready` holds (up to 30 s); returns that scrape.
async fn scrape_until(
    c: &TestCluster,
    id: u64,
    what: &str,
    mut ready: impl FnMut(&Exposition) -> bool,
) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = scrape(c, id);
        if ready(&e) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what} in /metrics: {:#?}\n{}",
            e.samples,
            c.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn grpc_calls(e: &Exposition, method: &str, code: &str) -> f64 {
    e.value(
        "mode_grpc_server_requests_total",
        &[("method", method), ("code", code)],
    )
    .unwrap_or(0.0)
}

/// Whether any series of any family carries label `key` = `value`.
fn any_series_with(e: &Exposition, key: &str, value: &str) -> bool {
    e.samples
        .iter()
        .any(|s| s.labels.get(key).map(String::as_str) == Some(value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_carry_build_process_and_grpc_families() {
    let c = TestCluster::start_with_http(1, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(1).await;
    c.apply(
        leader,
        "name: web\nkind: ticker\nconfig: {every_ms: 200}\nreplicas: 2\n",
    )
    .await
    .unwrap();
    c.wait_instances(leader, "web", Duration::from_secs(20), |i| {
        mode_tests::all_running(i, 2)
    })
    .await;

    let e = scrape_until(&c, leader, "web running and rolled out", |e| {
        e.value(
            "mode_instances",
            &[("service", "web"), ("node", "1"), ("state", "running")],
        ) == Some(2.0)
            && e.value(
                "mode_service_rollout_status",
                &[("service", "web"), ("status", "succeeded")],
            ) == Some(1.0)
    })
    .await;
    // Every family says what it counts; counters are named *_total.
    for (name, family) in &e.families {
        assert!(
            family.help.len() > 10,
            "{name} has no useful help: {family:?}"
        );
        assert_eq!(
            family.kind == "counter",
            name.ends_with("_total"),
            "{name} is a {}",
            family.kind
        );
    }
    assert!(e.families["mode_raft_proposals_total"]
        .help
        .contains("proposals"));
    assert_eq!(
        e.value(
            "mode_instances_health",
            &[("service", "web"), ("node", "1"), ("health", "unknown")]
        ),
        Some(2.0)
    );
    assert_eq!(
        e.value("mode_service_instances_desired", &[("service", "web")]),
        Some(2.0)
    );
    assert_eq!(
        e.value("mode_service_restarts_total", &[("service", "web")]),
        Some(0.0)
    );
    assert_eq!(
        e.value("mode_node_status", &[("node", "1"), ("status", "up")]),
        Some(1.0)
    );
    let build: Vec<_> = e.select("mode_build_info", &[]).collect();
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0].value, 1.0);
    assert_eq!(build[0].labels["role"], "server");
    assert_eq!(build[0].labels["version"], env!("CARGO_PKG_VERSION"));
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    ] {
        let v = e.value(name, &[]).unwrap_or_else(|| panic!("no {name}"));
        assert!(v > 0.0, "{name} {v}");
    }
    let started = e.value("process_start_time_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 600.0 && started <= now + 1.0,
        "started at {started}, now {now}"
    );

    // gRPC calls are counted by method and code once answered.
    const GET: &str = "mode.v1.Control/GetService";
    let (ok, missing) = (grpc_calls(&e, GET, "OK"), grpc_calls(&e, GET, "NotFound"));
    let mut client = c.client(leader).await;
    for _ in 0..3 {
        client
            .get_service(pb::GetServiceRequest {
                name: "web".into(),
                stale: true,
            })
            .await
            .unwrap();
    }
    let e404 = client
        .get_service(pb::GetServiceRequest {
            name: "nope".into(),
            stale: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e404.code(), tonic::Code::NotFound);
    let e = scrape(&c, leader);
    assert_eq!(grpc_calls(&e, GET, "OK"), ok + 3.0);
    assert_eq!(grpc_calls(&e, GET, "NotFound"), missing + 1.0);
    let timed = e
        .value(
            "mode_grpc_server_request_duration_seconds_count",
            &[("method", GET)],
        )
        .unwrap();
    assert!(timed >= ok + 4.0, "{timed}");
    let methods: Vec<&str> = e
        .select("mode_grpc_server_requests_total", &[])
        .map(|s| s.labels["method"].as_str())
        .collect();
    assert!(
        methods
            .iter()
            .all(|m| *m == "other" || m.contains(".v1") || m.contains(".v1alpha")),
        "{methods:?}"
    );
}

/// The crasher's spec: crashes whenever `trigger` appears, restarted locally (not escalated).
fn crasher(trigger: &Path) -> String {
    format!(
        "name: flaky\nkind: crasher\nconfig: {{crash_file: {}}}\nrestart: {{max_restarts: 50, within_s: 60, backoff_initial_ms: 10, backoff_max_ms: 10}}\n",
        trigger.display()
    )
}

/// Make the crasher crash once: the file appears, and it takes it.
async fn crash_once(trigger: &Path) {
    std::fs::write(trigger, b"now").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while trigger.exists() {
        assert!(Instant::now() < deadline, "the crasher never took the file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `flaky#0` as node `via` sees it.
async fn flaky(c: &TestCluster, via: u64) -> (pb::Service, pb::Instance) {
    let service = c
        .client(via)
        .await
        .get_service(pb::GetServiceRequest {
            name: "flaky".into(),
            stale: false,
        })
        .await
        .unwrap()
        .into_inner();
    let instance = service.instances[0].clone();
    (service, instance)
}

/// Scrape `e`'s `mode_service_restarts_total` of `flaky`, checking it is not below `last`
/// (and making it the new `last`).
fn restarts_not_down(e: &Exposition, last: &mut f64) -> f64 {
    let total = e
        .value("mode_service_restarts_total", &[("service", "flaky")])
        .expect("flaky's mode_service_restarts_total");
    assert!(
        total >= *last,
        "mode_service_restarts_total went down from {last} to {total}"
    );
    *last = total;
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_never_go_down_across_a_move_and_removed_series_disappear() {
    let mut c = TestCluster::start_with_http(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    // Node 3 is removed at the end: nothing runs there, and calls go through node 1.
    let out = c.modectl(leader, &["node", "drain", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via = 1;
    let scratch = Scratch::new("metrics-restarts");
    let trigger = scratch.0.join("crash");
    c.apply(via, &crasher(&trigger)).await.unwrap();
    let inst = c
        .wait_instances(via, "flaky", Duration::from_secs(20), |i| {
            mode_tests::all_running(i, 1)
        })
        .await;
    let host = inst[&0]["node"].as_u64().unwrap();
    assert_ne!(host, 3);

    // A deleted service's series go.
    c.apply(via, "name: gone\nkind: ticker\nconfig: {every_ms: 200}\n")
        .await
        .unwrap();
    scrape_until(&c, via, "gone's instance", |e| {
        e.select("mode_instances", &[("service", "gone")])
            .next()
            .is_some()
    })
    .await;
    let out = c.modectl(via, &["svc", "rm", "gone", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    scrape_until(&c, via, "no series of the deleted service", |e| {
        !any_series_with(e, "service", "gone")
    })
    .await;

    // Restarts are counted when the node reports them...
    let mut last = 0.0;
    for _ in 0..2 {
        crash_once(&trigger).await;
    }
    c.wait_instances(via, "flaky", Duration::from_secs(20), |i| {
        i[&0]["restart_count"].as_u64() >= Some(2) && i[&0]["state"] == "running"
    })
    .await;
    let (service, before) = flaky(&c, via).await;
    assert!(before.restarts_total >= 2, "{before:?}");
    assert!(service.restarts_total >= u64::from(before.restarts_total));
    let e = scrape_until(&c, via, "flaky's restarts", |e| {
        e.value("mode_service_restarts_total", &[("service", "flaky")]) >= Some(2.0)
    })
    .await;
    restarts_not_down(&e, &mut last);

    // ...and kept when the instance moves: drain its node.
    let out = c.modectl(via, &["node", "drain", &host.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved = loop {
        restarts_not_down(&scrape(&c, via), &mut last);
        let (_, now) = flaky(&c, via).await;
        assert!(
            now.restarts_total >= before.restarts_total,
            "the instance's restarts_total went down across the move: {before:?} -> {now:?}"
        );
        if now.node != host && now.moving_from == 0 && now.state == "running" {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "never moved: {now:?}\n{}",
            c.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        moved.restart_count, 0,
        "a fresh run on the new node: {moved:?}"
    );
    assert_eq!(moved.restarts_total, before.restarts_total, "{moved:?}");
    // A crash on the new node adds to what it had.
    crash_once(&trigger).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (service, now) = flaky(&c, via).await;
        if now.restart_count >= 1 {
            assert_eq!(now.node, moved.node, "{now:?}");
            assert_eq!(
                now.restarts_total,
                before.restarts_total + now.restart_count
            );
            assert!(service.restarts_total > u64::from(before.restarts_total));
            break;
        }
        assert!(Instant::now() < deadline, "never restarted: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = last;
    let e = scrape_until(&c, via, "the restart on the new node", |e| {
        e.value("mode_service_restarts_total", &[("service", "flaky")]) > Some(seen)
    })
    .await;
    restarts_not_down(&e, &mut last);

    // The peer API's calls are counted too (Raft, heartbeats, reports).
    assert!(
        e.select("mode_grpc_server_requests_total", &[("code", "OK")])
            .any(|s| s.labels["method"].starts_with("mode.v1.Peer/")),
        "{:?}",
        e.select("mode_grpc_server_requests_total", &[])
            .collect::<Vec<_>>()
    );

    // A removed node's series go.
    assert!(any_series_with(&e, "node", "3"));
    c.node(3).kill9();
    scrape_until(&c, via, "node 3 down", |e| {
        e.value("mode_node_status", &[("node", "3"), ("status", "down")]) == Some(1.0)
    })
    .await;
    let out = c.modectl(via, &["node", "rm", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in [1, 2] {
        let e = scrape_until(&c, id, "no series of node 3", |e| {
            !any_series_with(e, "node", "3") && !any_series_with(e, "peer", "3")
        })
        .await;
        restarts_not_down(&e, &mut last);
    }
}
