//! Guardrails: what would strand instances or cannot be placed asks for `--force` and says
//! what would happen; a node that shuts down cleanly is not reported as a failure.

use std::time::{Duration, Instant};

use mode_tests::TestCluster;
use serde_json::Value;

const ELECTION: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The node table as `modectl node ls -o json` prints it, by id.
fn node_status(c: &TestCluster, via: u64, id: u64) -> String {
    let out = c.modectl(via, &["-o", "json", "node", "ls"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("node ls json");
    v.as_array()
        .or_else(|| v["nodes"].as_array())
        .into_iter()
        .flatten()
        .find(|n| n["id"] == id)
        .map(|n| n["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_past_capacity_and_removing_a_live_node_or_a_singletons_only_home_need_force() {
    let mut c = TestCluster::start_each(3, &["--capacity", "4"], |id| {
        vec!["--label".to_string(), format!("n={id}")]
    });
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    let home = (1..=3).find(|id| *id != leader).unwrap();
    let via = (1..=3).find(|id| *id != leader && *id != home).unwrap();

    // 3 nodes × 4 units: 12 instances fit, 50 do not (38 of the 48 new ones).
    c.apply(via, "name: web\nkind: ticker\nreplicas: 2\n")
        .await
        .expect("apply web");
    let out = c.modectl(via, &["svc", "scale", "web", "50"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("'web' was not scaled to 50: 38 of the 48 new instances could not be placed")
            && err.contains("modectl svc scale web 50 --force"),
        "{err}"
    );
    let out = c.modectl(via, &["-o", "json", "svc", "get", "web"]);
    let web: Value = serde_json::from_slice(&out.stdout).expect("svc get json");
    assert_eq!(web["spec"]["replicas"], 2, "{web}");
    // Within capacity it needs nothing; past it, --force does it.
    let out = c.modectl(via, &["svc", "scale", "web", "10"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = c.modectl(via, &["svc", "scale", "web", "50", "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = c.modectl(via, &["svc", "scale", "web", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A singleton that can only run on `home`.
    c.apply(
        via,
        &format!(
            "name: pinned\nkind: ticker\nsingleton: true\nconstraints: [{{label: n, equals: \"{home}\"}}]\n"
        ),
    )
    .await
    .expect("apply pinned");
    c.wait_instances(via, "pinned", Duration::from_secs(20), |i| {
        i.get(&0)
            .is_some_and(|p| p["state"] == "running" && p["node"] == home)
    })
    .await;
    let h = home.to_string();
    let out = c.modectl(via, &["node", "rm", &h]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("node {home} was not removed: node {home} is up"))
            && err.contains("pinned#0")
            && err.contains("could run on no other node")
            && err.contains(&format!("modectl node rm {home} --force")),
        "{err}"
    );
    // Down, it still strands the singleton: still refused, no longer for being up.
    c.node(home).kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node_status(&c, via, home) != "down" {
        assert!(Instant::now() < deadline, "node {home} never marked down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = c.modectl(via, &["node", "rm", &h]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pinned#0") && !err.contains("is up"), "{err}");
    let out = c.modectl(via, &["node", "rm", &h, "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        node_status(&c, via, home).is_empty(),
        "node {home} still listed"
    );
}

/// Poll `cond` every 50 ms for up to `timeout`; how long it took.
async fn within(timeout: Duration, what: &str, c: &TestCluster, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "{what} within {timeout:?}\n{}",
            c.log_tails(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_cleanly_is_marked_as_left_at_once_not_as_failed() {
    // A long grace: a node marked down well within it was marked on its notice.
    let grace = ["--heartbeat-grace", "10s"];
    let mut c = TestCluster::start(3, &grace);
    let leader = c.wait_leader(ELECTION).await;
    c.add_agent(4, grace.iter().map(|s| s.to_string()).collect())
        .start();
    c.wait_registered(4).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let watcher = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    eprintln!("leader {leader}, stopping {follower}, watching through {watcher}");
    c.apply(watcher, "name: web\nkind: ticker\nreplicas: 12\n")
        .await
        .expect("apply web");
    c.wait_instances(watcher, "web", Duration::from_secs(20), |i| {
        mode_tests::all_running(i, 12)
            && [4, follower]
                .iter()
                .all(|n| i.values().any(|p| p["node"] == *n))
    })
    .await;

    // An agent-only node, then a server that is not the leader.
    for gone in [4, follower] {
        let t0 = Instant::now();
        c.node(gone).signal("TERM");
        while c.node(gone).exited().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(8),
                "node {gone} did not exit on SIGTERM\n{}",
                c.log_tails(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            c.node(gone).exited(),
            Some(Some(0)),
            "{}",
            c.node(gone).logs()
        );
        within(
            Duration::from_secs(5),
            "the node is marked down on its notice",
            &c,
            || node_status(&c, watcher, gone) == "down",
        )
        .await;
        let inst = c
            .wait_instances(watcher, "web", Duration::from_secs(5), |i| {
                mode_tests::all_running(i, 12) && i.values().all(|p| p["node"] != gone)
            })
            .await;
        eprintln!(
            "node {gone}: down and its instances moved {:?} after SIGTERM (grace 10 s); {} instances",
            t0.elapsed(),
            inst.len()
        );
    }
    let events = c.events(watcher).await;
    for gone in [4, follower] {
        let about = |kind: &str| {
            events
                .iter()
                .filter(|e| e["kind"] == kind && e["node"] == gone)
                .count()
        };
        assert_eq!(about("node-left"), 1, "node {gone}: {events:?}");
        assert_eq!(about("node-down"), 0, "node {gone}: {events:?}");
    }
    // The others log it as a departure: no failure, no warning about the left node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = [leader, watcher]
        .map(|id| {
            let log = c.node(id).logs();
            log.lines()
                .map(|l| format!("node {id}: {l}\n"))
                .collect::<String>()
        })
        .join("");
    assert!(!logs.contains("missed its heartbeats"), "{logs}");
    assert!(logs.contains("is leaving (a clean shutdown)"), "{logs}");
    let alarms: Vec<&str> = logs
        .lines()
        .filter(|l| {
            // openraft's own line for a linearizable read while any voter is down.
            !l.contains("timeout while confirming leadership for read request")
                && (l.contains(" WARN ") || l.contains(" ERROR "))
                && [4, follower].iter().any(|n| {
                    l.contains(&format!("peer {n}:"))
                        || l.contains(&format!("target={n}"))
                        || l.contains(&format!("node {n}"))
                })
        })
        .collect();
    assert!(alarms.is_empty(), "{alarms:#?}");

    // Left is not gone: started again, it is up again.
    c.node(4).start();
    within(Duration::from_secs(15), "the agent is up again", &c, || {
        node_status(&c, watcher, 4) == "up"
    })
    .await;
}
