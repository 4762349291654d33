//! Placement, restarts and rescheduling with real `mode-node` processes on loopback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mode_tests::{all_running, pid_spec, wait_pid, Scratch, TestCluster};
use serde_json::Value;

const ELECTION: Duration = Duration::from_secs(20);

fn nodes_of(inst: &BTreeMap<u64, Value>) -> Vec<u64> {
    let mut v: Vec<u64> = inst.values().filter_map(|p| p["node"].as_u64()).collect();
    v.sort();
    v
}

/// `n` nodes with a leader and every node registered with its kinds; returns the leader.
async fn cluster(n: u64) -> (TestCluster, u64) {
    let c = TestCluster::start(n, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(n as usize).await;
    (c, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_three_nodes_run_one_per_node() {
    let (c, _) = cluster(3).await;
    c.apply(
        2,
        "name: web\nkind: ticker\nconfig: {every_ms: 200}\nreplicas: 3\n",
    )
    .await
    .unwrap();
    let inst = c
        .wait_instances(1, "web", Duration::from_secs(20), |i| all_running(i, 3))
        .await;
    assert_eq!(nodes_of(&inst), [1, 2, 3]);
    let out = c.modectl(3, &["svc", "get", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("running").count(), 3, "{text}");
    let out = c.modectl(3, &["svc", "get", "nope"]);
    assert_eq!(out.status.code(), Some(3), "not found");

    // A rolling restart restarts each instance once, and they all run again.
    let out = c.modectl(2, &["svc", "restart", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inst = c
        .wait_instances(1, "web", Duration::from_secs(20), |i| all_running(i, 3))
        .await;
    assert_eq!(inst.len(), 3, "{inst:?}");
    // How often each was asked to restart is internal to the placements: read them raw.
    let raw = c.read(1, "placements", true).await.unwrap();
    let restarts: Vec<&serde_json::Value> = raw["web"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, p)| &p["restart_seq"])
        .collect();
    assert!(
        restarts.len() == 3 && restarts.iter().all(|r| **r == 1),
        "{raw}"
    );

    // Scaling down removes instances; scaling up adds them back without moving the others.
    let out = c.modectl(2, &["svc", "scale", "web", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let one = c
        .wait_instances(1, "web", Duration::from_secs(20), |i| all_running(i, 1))
        .await;
    let kept = one[&0]["node"].clone();
    c.modectl(2, &["svc", "scale", "web", "3"]);
    let three = c
        .wait_instances(1, "web", Duration::from_secs(20), |i| all_running(i, 3))
        .await;
    assert_eq!(
        three[&0]["node"], kept,
        "the remaining instance did not move"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_quorum_stops_its_singleton() {
    let (mut c, leader) = cluster(3).await;
    let scratch = Scratch::new("singleton");
    let pid_file = scratch.0.join("pid");
    let spec = pid_spec("only", &pid_file, false, "singleton: true\n");
    c.apply(leader, &spec).await.unwrap();
    let inst = c
        .wait_instances(leader, "only", Duration::from_secs(20), |i| {
            all_running(i, 1)
        })
        .await;
    let host = inst[&0]["node"].as_u64().unwrap();
    let pid = wait_pid(&pid_file).await;
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(pid));
    // Cut the host off: the other two nodes die, so it has no quorum.
    for id in (1..=3).filter(|id| *id != host) {
        c.node(id).kill9();
    }
    let t0 = Instant::now();
    while alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the singleton kept running without a quorum\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        c.node(host).exited().is_none(),
        "the host itself keeps running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_has_its_instances_run_elsewhere_and_the_events_say_why() {
    let (mut c, leader) = cluster(3).await;
    c.apply(leader, "name: web\nkind: ticker\nreplicas: 3\n")
        .await
        .unwrap();
    c.wait_instances(leader, "web", Duration::from_secs(20), |i| {
        all_running(i, 3)
    })
    .await;
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    c.node(victim).kill9();
    let t0 = Instant::now();
    let inst = c
        .wait_instances(leader, "web", Duration::from_secs(15), |i| {
            all_running(i, 3) && !nodes_of(i).contains(&victim)
        })
        .await;
    // Grace period (1.5 s) plus a margin.
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert!(!nodes_of(&inst).contains(&victim));
    let events = c.events(leader).await;
    let said: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        said.iter()
            .any(|m| m.contains(&format!("node {victim} missed its heartbeats"))),
        "{said:?}"
    );
    assert!(
        said.iter()
            .any(|m| m.contains(&format!("from node {victim} (down or ineligible)"))),
        "{said:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_instance_restarts_locally_then_escalates_and_moves() {
    let (c, leader) = cluster(3).await;
    let spec = "name: flaky\nkind: crasher\nconfig: {after_ms: 300}\nreplicas: 1\nrestart: {max_restarts: 2, within_s: 30, backoff_initial_ms: 50, backoff_max_ms: 100}\n";
    c.apply(leader, spec).await.unwrap();
    let first = c
        .wait_instances(leader, "flaky", Duration::from_secs(20), |i| {
            i.get(&0).is_some_and(|p| p["node"].as_u64().is_some())
        })
        .await[&0]["node"]
        .as_u64()
        .unwrap();
    // Restarted locally (count goes up), then escalated, then moved to another node.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = c.events(leader).await;
        let moved = events
            .iter()
            .filter_map(|e| e["message"].as_str())
            .any(|m| {
                m.starts_with("flaky#0 moved from node")
                    && m.contains("after exceeding its restart intensity")
            });
        if moved {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never moved: {events:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = c.events(leader).await;
    let said: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        said.iter()
            .any(|m| m.contains("crashed (") && m.contains("restarted locally")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|m| m.contains(&format!(
            "flaky#0 on node {first} exceeded its restart intensity after 2 restarts"
        ))),
        "{said:?}"
    );
    // The first move went from the node where it failed to another one (it keeps crashing
    // there too, so later moves may go anywhere).
    let first_move = said
        .iter()
        .find(|m| m.starts_with("flaky#0 moved from node"))
        .expect("a move event");
    assert!(
        first_move.starts_with(&format!("flaky#0 moved from node {first} to node ")),
        "{first_move}"
    );
    assert!(
        !first_move.contains(&format!("to node {first} ")),
        "{first_move}"
    );
    let out = c.modectl(leader, &["svc", "get", "flaky"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("crasher: crashing as configured after 300 ms"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_starts_after_its_dependency_runs_and_stops_before_it_is_removed() {
    let (c, leader) = cluster(3).await;
    // B is listed first and depends on A.
    let specs = "- name: b\n  kind: ticker\n  depends_on: [a]\n- name: a\n  kind: ticker\n";
    c.apply(leader, specs).await.unwrap();
    let (mut a_running_at, mut b_running_at) = (None, None);
    let t0 = Instant::now();
    while a_running_at.is_none() || b_running_at.is_none() {
        let p = c.read(leader, "placements", true).await.unwrap();
        if a_running_at.is_none() && p["a"]["0"]["state"] == "running" {
            a_running_at = Some(t0.elapsed());
        }
        if b_running_at.is_none() && p["b"]["0"]["state"] == "running" {
            b_running_at = Some(t0.elapsed());
            assert!(a_running_at.is_some(), "b ran before a: {p}");
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{p}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A is needed by B: removing it is refused unless forced.
    let out = c.modectl(leader, &["svc", "rm", "a"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("service 'a' is needed by b"), "{err}");
    assert!(err.contains("--force"), "{err}");
    // Forced: B stops first, then A goes.
    let out = c.modectl(leader, &["svc", "rm", "a", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    let mut b_stopped_first = false;
    loop {
        let p = c.read(leader, "placements", true).await.unwrap();
        let specs = c.read(leader, "specs", true).await.unwrap();
        let a_exists = specs.as_array().unwrap().iter().any(|s| s["name"] == "a");
        if p["b"]["0"]["state"] != "running" && a_exists {
            b_stopped_first = true;
        }
        if !a_exists {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "a was never removed: {p}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The event log has the order whatever the polling saw: b stopped, then a was removed.
    let events = c.events(leader).await;
    let seq_of = |needle: &str| {
        events
            .iter()
            .find(|e| e["message"].as_str().is_some_and(|m| m.contains(needle)))
            .and_then(|e| e["seq"].as_u64())
    };
    let b_waiting = events
        .iter()
        .find(|e| e["kind"] == "instance-waiting" && e["service"] == "b")
        .and_then(|e| e["seq"].as_u64());
    let a_removed = seq_of("service 'a' removed");
    assert!(
        b_waiting.is_some() && a_removed.is_some() && b_waiting < a_removed,
        "b must stop before a is removed (polling saw it: {b_stopped_first}): {events:?}"
    );
    let p = c.read(leader, "placements", true).await.unwrap();
    assert_ne!(p["b"]["0"]["state"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_moves_every_instance_off_without_dropping_below_spec_minus_one() {
    let (c, leader) = cluster(3).await;
    c.apply(leader, "name: web\nkind: ticker\nreplicas: 3\n")
        .await
        .unwrap();
    c.wait_instances(leader, "web", Duration::from_secs(20), |i| {
        all_running(i, 3)
    })
    .await;
    let drained = (1..=3).find(|id| *id != leader).unwrap();
    let out = c.modectl(leader, &["node", "drain", &drained.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    let mut lowest = 3;
    loop {
        let inst = c.instances(leader, "web").await;
        let running = inst.values().filter(|p| p["state"] == "running").count();
        lowest = lowest.min(running);
        let off = inst
            .values()
            .all(|p| p["node"].as_u64() != Some(drained) && p["moving_from"].is_null());
        if off && running == 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "drain did not finish: {inst:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lowest >= 2, "running instances dropped to {lowest}");
    let out = c.modectl(leader, &["node", "ls"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("draining"));
    let out = c.modectl(leader, &["node", "undrain", &drained.to_string()]);
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_instance_killed_from_outside_is_restarted() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("exec");
    let pid_file = scratch.0.join("pid");
    c.apply(leader, &pid_spec("sleeper", &pid_file, false, ""))
        .await
        .unwrap();
    c.wait_instances(leader, "sleeper", Duration::from_secs(20), |i| {
        all_running(i, 1)
    })
    .await;
    let first = wait_pid(&pid_file).await;
    let killed = std::process::Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let inst = c
        .wait_instances(leader, "sleeper", Duration::from_secs(20), |i| {
            i.get(&0)
                .is_some_and(|p| p["restart_count"].as_u64() >= Some(1) && p["state"] == "running")
        })
        .await;
    assert!(
        inst[&0]["last_crash"]
            .as_str()
            .unwrap_or("")
            .contains("signal 9"),
        "{inst:?}"
    );
    let second = wait_pid(&pid_file).await;
    assert_ne!(first, second, "a new process runs");
    // Stop the cluster's process cleanly so the sleep is not left behind.
    c.modectl(leader, &["svc", "rm", "sleeper", "--wait"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_naming_the_problem() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("specs");
    let cases = [
        ("unknown-kind.yaml", "name: x\nkind: teleporter\n", "field 'kind': no node offers kind 'teleporter'"),
        ("bad-field.yaml", "name: x\nkind: ticker\nreplica: 3\n", "unknown field `replica`"),
        (
            "cycle.yaml",
            "- {name: a, kind: ticker, depends_on: [b]}\n- {name: b, kind: ticker, depends_on: [a]}\n",
            "dependency cycle",
        ),
        ("bad-config.yaml", "name: x\nkind: exec\nconfig: {args: [x]}\n", "field 'config'"),
    ];
    for (file, text, expected) in cases {
        let path = scratch.0.join(file);
        std::fs::write(&path, text).unwrap();
        let out = c.modectl(leader, &["svc", "apply", "-f", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(expected), "{file}: {err}");
        assert!(err.contains(file), "the message names the file: {err}");
    }
    let specs = c.read(leader, "specs", false).await.unwrap();
    assert_eq!(specs, serde_json::json!([]), "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_failed_on_the_only_node_is_started_there_again() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("refail");
    let trigger = scratch.0.join("crash");
    let spec = format!(
        "name: once\nkind: crasher\nconfig: {{crash_file: {}}}\nrestart: {{max_restarts: 1, within_s: 60, backoff_initial_ms: 10, backoff_max_ms: 10}}\n",
        trigger.display()
    );
    c.apply(leader, &spec).await.unwrap();
    c.wait_instances(leader, "once", Duration::from_secs(20), |i| {
        all_running(i, 1)
    })
    .await;
    // Two crashes exceed the intensity of 1: the instance fails, and with no other node it is
    // placed on the same node again and must start afresh.
    for _ in 0..2 {
        std::fs::write(&trigger, b"now").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while trigger.exists() {
            assert!(Instant::now() < deadline, "the crasher never took the file");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let inst = c
        .wait_instances(leader, "once", Duration::from_secs(20), |i| {
            i.get(&0)
                .is_some_and(|p| p["reschedules"].as_u64() >= Some(1) && p["state"] == "running")
        })
        .await;
    assert_eq!(inst[&0]["node"].as_u64(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_singleton_never_runs_two_copies() {
    let (c, leader) = cluster(3).await;
    let scratch = Scratch::new("single-drain");
    let pids = scratch.0.join("pids");
    let spec = pid_spec("only", &pids, true, "singleton: true\nstop_grace_s: 1\n");
    c.apply(leader, &spec).await.unwrap();
    let inst = c
        .wait_instances(leader, "only", Duration::from_secs(20), |i| {
            all_running(i, 1)
        })
        .await;
    let host = inst[&0]["node"].as_u64().unwrap();
    let live = || {
        std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
            .count()
    };
    let out = c.modectl(leader, &["node", "drain", &host.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    let mut most = 0;
    loop {
        most = most.max(live());
        let inst = c.instances(leader, "only").await;
        let moved = inst.get(&0).is_some_and(|p| {
            p["node"].as_u64() != Some(host)
                && p["state"] == "running"
                && p["moving_from"].is_null()
        });
        if moved && live() == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the singleton did not move: {inst:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(most, 1, "two copies of the singleton ran at once");
    c.modectl(leader, &["svc", "rm", "only", "--wait"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_deploy_settles_and_then_writes_nothing() {
    // 1,500 instances: each agent has 500 to report at once. Reports sent one write at a
    // time (and re-sent while they queued) once kept a settled cluster writing for minutes.
    let c = TestCluster::start(3, &["--capacity", "1000"]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    c.apply(
        leader,
        "name: many\nkind: counter\nconfig: {every_ms: 60000}\nreplicas: 1500\n",
    )
    .await
    .unwrap();
    c.wait_instances(leader, "many", Duration::from_secs(90), |i| {
        all_running(i, 1500)
    })
    .await;
    // Let reports still in flight land, then watch the log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let applied = |s: mode_proto::v1::ClusterStatusReply| s.applied_index;
    let before = applied(c.status(leader, true).await.unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = applied(c.status(leader, true).await.unwrap());
    assert!(
        after - before < 20,
        "a settled cluster committed {} entries in 3 s",
        after - before
    );
}
