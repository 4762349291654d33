//! Status that does not lie: `svc get` says when an instance is crash-looping or backing off
//! (and when it is tried next), which instances could not be placed and why, when the last
//! crash was and of which generation; `--events` shows the service's recent events; `-o
//! wide` and `-o yaml` carry the same; `cluster status` calls a member it cannot reach
//! unreachable.

use std::time::{Duration, Instant};

use mode_tests::{Scratch, TestCluster};
use serde_json::Value;

const ELECTION: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn get_json(c: &TestCluster, via: u64, name: &str) -> Value {
    let out = c.modectl(via, &["-o", "json", "svc", "get", name]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("svc get -o json")
}

/// Poll `svc get -o json` until `ok` holds (or fail with the last answer after 30 s).
async fn until(c: &TestCluster, via: u64, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get_json(c, via, name);
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svc_get_says_crash_loop_backing_off_and_unplaced_with_what_each_waits_for() {
    let c = TestCluster::start(1, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(1).await;
    let scratch = Scratch::new("status");
    let spec = scratch.0.join("specs.yaml");
    std::fs::write(
        &spec,
        r#"name: nowhere
kind: ticker
replicas: 3
constraints: [{label: zone, equals: mars}]
---
name: crashy
kind: exec
config:
  command: /bin/sh
  args: ["-c", "echo boom >&2; sleep 0.3; exit 3"]
restart: {max_restarts: 50, within_s: 60, backoff_initial_ms: 1500, backoff_max_ms: 3000}
---
name: gives-up
kind: exec
config:
  command: /bin/sh
  args: ["-c", "exit 4"]
restart: {max_restarts: 1, within_s: 60, backoff_initial_ms: 10, backoff_max_ms: 10}
"#,
    )
    .unwrap();
    let out = c.modectl(leader, &["svc", "apply", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Unplaced: three rows and the scheduler's reason, in the table and in JSON.
    let v = get_json(&c, leader, "nowhere");
    assert_eq!(v["unplaced"], 3, "{v:#}");
    assert!(
        v["unplaced_reason"].as_str().unwrap().contains("zone=mars"),
        "{v:#}"
    );
    let out = c.modectl(leader, &["svc", "get", "nowhere"]);
    let table = text(&out.stdout);
    assert_eq!(table.matches(" unplaced ").count(), 3, "{table}");
    assert!(
        table.contains("unplaced: 3 of 3 instances could not be placed: ")
            && table.contains("zone=mars"),
        "{table}"
    );

    // Crash-looping on its node, waiting out a backoff: when it is tried next.
    let now = mode::replication::now_ms();
    let v = until(&c, leader, "crashy", |v| {
        v["instances"][0]["status"] == "crash-loop" && v["instances"][0]["next_attempt_ms"] != 0
    })
    .await;
    let i = &v["instances"][0];
    let next = i["next_attempt_ms"].as_u64().unwrap();
    assert!(next > now && next < now + 60_000, "{i:#}");
    assert!(
        i["waiting_for"]
            .as_str()
            .unwrap()
            .starts_with("its node to restart it in "),
        "{i:#}"
    );
    assert_eq!(i["last_crash_generation"], 1, "{i:#}");
    assert!(i["last_crash_ms"].as_u64().unwrap() >= now, "{i:#}");
    let out = c.modectl(leader, &["svc", "get", "crashy", "--events"]);
    let table = text(&out.stdout);
    assert!(
        table.contains("crash-loop")
            && table.contains("ago, generation 1: ")
            && table.contains("crashy#0 waits for its node to restart it")
            && table.contains("events (the last 10):")
            && table.contains("instance-restarted"),
        "{table}"
    );
    let out = c.modectl(leader, &["-o", "wide", "svc", "get", "crashy"]);
    let wide = text(&out.stdout);
    assert!(
        wide.contains("EPOCH")
            && wide.contains("WAITING FOR")
            && wide.contains("last stderr line: boom"),
        "{wide}"
    );
    let out = c.modectl(leader, &["-o", "yaml", "svc", "get", "crashy"]);
    let yaml: Value = serde_norway::from_slice(&out.stdout).expect("svc get -o yaml is YAML");
    assert_eq!(yaml["spec"]["name"], "crashy", "{yaml:#}");
    assert!(yaml["instances"][0]["status"].is_string(), "{yaml:#}");
    // -o wide on the lists too: what cannot be placed and why, what each node runs, who
    // changed what.
    let out = c.modectl(leader, &["-o", "wide", "svc", "ls"]);
    let wide = text(&out.stdout);
    let nowhere = wide
        .lines()
        .find(|l| l.starts_with("nowhere "))
        .unwrap_or_default();
    assert!(
        wide.contains("UNPLACED") && nowhere.contains("3: ") && nowhere.contains("zone=mars"),
        "{wide}"
    );
    let out = c.modectl(leader, &["-o", "wide", "node", "ls"]);
    let wide = text(&out.stdout);
    assert!(
        wide.contains("INSTANCES")
            && wide.contains("KINDS")
            && wide.contains("exec")
            && wide.contains("ticker"),
        "{wide}"
    );
    let out = c.modectl(leader, &["-o", "wide", "events", "--service", "crashy"]);
    let wide = text(&out.stdout);
    let applied = wide
        .lines()
        .find(|l| l.contains("spec-applied"))
        .unwrap_or_default();
    assert!(
        wide.contains("SERVICE") && wide.contains("BY") && applied.contains(" crashy "),
        "{wide}"
    );

    // Over its restart intensity: backing off before it moves, with when.
    let v = until(&c, leader, "gives-up", |v| {
        v["instances"][0]["status"] == "backing-off"
    })
    .await;
    let i = &v["instances"][0];
    assert!(i["next_attempt_ms"].as_u64().unwrap() > 0, "{i:#}");
    assert!(
        i["waiting_for"]
            .as_str()
            .unwrap()
            .contains("moves to another node in"),
        "{i:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_calls_a_member_it_cannot_reach_unreachable() {
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    c.node(victim).kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = c.modectl(leader, &["-o", "json", "cluster", "status"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
        let m = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == victim)
            .cloned()
            .unwrap();
        if m["role"] == "unreachable" {
            assert_eq!(m["reachable"], false, "{v:#}");
            break;
        }
        assert!(Instant::now() < deadline, "still {m:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = c.modectl(leader, &["cluster", "status"]);
    let table = text(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("{victim} ")))
        .unwrap_or_default();
    assert!(row.contains("unreachable"), "{table}");
}
