//! The cluster's promises under ordinary faults, with real `mode-node` processes on loopback:
//! a wiped node never acts as the member it was, a leader cut off from its quorum fails writes
//! fast, a singleton dies with its lease whatever else its node is doing, removed nodes stop,
//! a full disk stops its node, failing instances back off in the replicated state, drains and
//! dependencies do not cause outages.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mode_tests::{alive, all_running, pid_spec, pids_in, wait_pid, Scratch, TestCluster};
use serde_json::Value;

const ELECTION: Duration = Duration::from_secs(20);

async fn cluster(n: u64) -> (TestCluster, u64) {
    let c = TestCluster::start(n, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(n as usize).await;
    (c, leader)
}

/// Wait for `done` to hold, polling every 50 ms; panics with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_is_refused_and_comes_back_only_as_a_new_learner() {
    let (mut c, leader) = cluster(3).await;
    c.apply(leader, "name: kept\nkind: ticker\n").await.unwrap();
    // Node 1 (the lowest id, the one that initializes a fresh cluster) loses its data.
    c.node(1).kill9();
    let dir = c.nodes[&1].data_dir.clone();
    std::fs::remove_dir_all(&dir).unwrap();
    let logs_before = c.nodes[&1].logs().len();
    c.node(1).start();
    let exited = eventually(
        Duration::from_secs(20),
        "the wiped node kept running",
        || c.node(1).exited().is_some(),
    )
    .await;
    let logs = c.nodes[&1].logs()[logs_before..].to_string();
    assert_eq!(c.node(1).exited(), Some(Some(1)), "{logs}");
    assert!(logs.contains("wiped or replaced"), "{logs}");
    assert!(
        logs.contains("--rejoin"),
        "the message names the fix: {logs}"
    );
    assert!(exited < Duration::from_secs(15));
    // The other two keep the write and a leader.
    let leader = c.wait_leader(ELECTION).await;
    assert_ne!(leader, 1);
    let specs = c.read(leader, "specs", false).await.unwrap();
    assert!(specs.to_string().contains("\"kept\""), "{specs}");

    // With --rejoin it comes back as a new member, and catches up.
    c.node(1).push_args(&["--rejoin"]);
    c.node(1).start();
    let t0 = Instant::now();
    loop {
        let s = c.status(leader, false).await;
        let one = s
            .as_ref()
            .ok()
            .and_then(|s| s.members.iter().find(|m| m.id == 1).cloned());
        if one.is_some_and(|m| m.voter && m.lag == 0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "node 1 did not rejoin: {s:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let specs = c.read(1, "specs", true).await.unwrap();
    assert!(specs.to_string().contains("\"kept\""), "{specs}");
    let events = c.events(leader).await;
    assert!(
        events.iter().any(|e| e["kind"] == "node-rejoined"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_quorum_fails_writes_fast_saying_so() {
    let (mut c, leader) = cluster(3).await;
    for id in (1..=3).filter(|id| *id != leader) {
        c.node(id).kill9();
    }
    let scratch = Scratch::new("cq");
    let file = scratch.0.join("w.yaml");
    std::fs::write(&file, "name: late\nkind: ticker\n").unwrap();
    let t0 = Instant::now();
    let out = c.modectl(leader, &["svc", "apply", "-f", file.to_str().unwrap()]);
    let took = t0.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("has not heard from a quorum")
            && (err.contains("was not made") || err.contains("outcome unknown")),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_with_the_same_request_id_applies_once() {
    let (c, leader) = cluster(3).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let command = r#"{"op":"record_event","kind":"probe","message":"once"}"#;
    for via in [follower, leader, follower] {
        let (result, _) = c
            .propose(via, command, "test-retry-1", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(result["ok"], true, "{result}");
    }
    let events = c.events(leader).await;
    let n = events.iter().filter(|e| e["kind"] == "probe").count();
    assert_eq!(n, 1, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_singleton_dies_with_its_lease_even_while_its_node_is_busy_stopping_others() {
    let (mut c, leader) = cluster(3).await;
    let scratch = Scratch::new("busy");
    let pid_file = scratch.0.join("single");
    c.apply(
        leader,
        &pid_spec("single", &pid_file, false, "singleton: true\n"),
    )
    .await
    .unwrap();
    // Nine instances (three per node) that ignore SIGTERM: each takes its whole grace to stop.
    let stubborn = "name: stubborn\nkind: exec\nreplicas: 9\nstop_grace_s: 10\nconfig:\n  command: /bin/sh\n  args: [\"-c\", \"trap '' TERM; while true; do sleep 1; done\"]\n";
    c.apply(leader, stubborn).await.unwrap();
    let inst = c
        .wait_instances(leader, "single", Duration::from_secs(20), |i| {
            all_running(i, 1)
        })
        .await;
    c.wait_instances(leader, "stubborn", Duration::from_secs(30), |i| {
        all_running(i, 9)
    })
    .await;
    let host = inst[&0]["node"].as_u64().unwrap();
    let pid = wait_pid(&pid_file).await;
    // Stop the stubborn ones (a busy agent), then cut the host off from any quorum.
    let out = c.modectl(leader, &["svc", "rm", "stubborn"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t0 = Instant::now();
    loop {
        let specs = c.read(host, "specs", true).await.unwrap();
        if !specs.to_string().contains("\"stubborn\"") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never purged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in (1..=3).filter(|id| *id != host) {
        c.node(id).kill9();
    }
    // The lease (0.9 s) runs out and the singleton is killed at once, not 30 s later when
    // the stops are done.
    let took = eventually(
        Duration::from_secs(5),
        "the singleton outlived its lease while its node was stopping other instances",
        || !alive(pid),
    )
    .await;
    assert!(c.node(host).exited().is_none(), "the host keeps running");
    eprintln!("singleton killed {took:?} after the quorum was lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_stops_its_instances_and_exits_saying_so() {
    let (mut c, leader) = cluster(4).await;
    let scratch = Scratch::new("rm");
    let pid_file = scratch.0.join("pids");
    c.apply(leader, &pid_spec("web", &pid_file, true, "replicas: 4\n"))
        .await
        .unwrap();
    let inst = c
        .wait_instances(leader, "web", Duration::from_secs(20), |i| {
            all_running(i, 4)
        })
        .await;
    let victim = (1..=4).rev().find(|id| *id != leader).unwrap();
    assert!(inst.values().any(|p| p["node"] == victim));
    eventually(Duration::from_secs(10), "four pids", || {
        pids_in(&pid_file).len() >= 4
    })
    .await;
    let out = c.modectl(leader, &["node", "rm", &victim.to_string(), "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t0 = Instant::now();
    while c.node(victim).exited().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the removed node kept running\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = c.nodes[&victim].logs();
    assert!(logs.contains("was removed from the cluster"), "{logs}");
    // Its instance moved; exactly four processes run, none of them the removed node's.
    c.wait_instances(leader, "web", Duration::from_secs(20), |i| {
        all_running(i, 4) && i.values().all(|p| p["node"] != victim)
    })
    .await;
    let live = || pids_in(&pid_file).into_iter().filter(|p| alive(*p)).count();
    eventually(
        Duration::from_secs(10),
        "more processes than replicas",
        || live() == 4,
    )
    .await;
    let term = c.status(leader, false).await.unwrap().term;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.status(leader, false).await.unwrap().term,
        term,
        "nobody campaigns"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_instance_backs_off_in_the_replicated_state_across_leader_changes() {
    let (mut c, leader) = cluster(3).await;
    c.apply(
        leader,
        "name: typo\nkind: exec\nrestart: {max_restarts: 1, within_s: 10}\nconfig: {command: /usr/bin/python9}\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A new leader must not start the backoff over.
    c.node(leader).kill9();
    let alive_node = (1..=3).find(|id| *id != leader).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let leader = alive_node;
    let p = c.read(leader, "placements", false).await.unwrap();
    let reschedules = p["typo"]["0"]["reschedules"].as_u64().unwrap_or(0);
    // 0.5 s doubling: 0.5 + 1 + 2 + 4 = 7.5 s for four moves; bursts did ~20 in 10 s.
    assert!(
        (1..=5).contains(&reschedules),
        "{reschedules} reschedules in 10 s: {p}"
    );
    let failed_events = c
        .events(leader)
        .await
        .iter()
        .filter(|e| e["kind"] == "instance-failed")
        .count();
    assert!(failed_events <= 8, "{failed_events} failure events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_whose_instance_can_go_nowhere_else_is_refused_then_keeps_it() {
    let (c, leader) = cluster(3).await;
    // Each instance takes a whole node's capacity: none can move.
    c.apply(leader, "name: big\nkind: ticker\nreplicas: 3\ncost: 100\n")
        .await
        .unwrap();
    let inst = c
        .wait_instances(leader, "big", Duration::from_secs(20), |i| {
            all_running(i, 3)
        })
        .await;
    let target = (1..=3).find(|id| *id != leader).unwrap();
    let slot = *inst.iter().find(|(_, p)| p["node"] == target).unwrap().0;
    let out = c.modectl(leader, &["node", "drain", &target.to_string()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("big#{slot}")) && err.contains("--force"),
        "{err}"
    );
    let nodes = c.read(leader, "nodes", false).await.unwrap();
    assert!(
        !nodes.to_string().contains(r#""status":"draining""#),
        "{nodes}"
    );
    // Forced: the node drains, the instance stays running there.
    let out = c.modectl(leader, &["node", "drain", &target.to_string(), "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stay on node"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let inst = c.instances(leader, "big").await;
    assert_eq!(inst[&slot]["node"], target, "{inst:?}");
    assert_eq!(inst[&slot]["state"], "running", "{inst:?}");
    let events = c.events(leader).await;
    assert!(
        events.iter().any(|e| e["kind"] == "drain-stuck"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_a_dependency_does_not_stop_its_running_dependents() {
    let (c, leader) = cluster(3).await;
    let scratch = Scratch::new("deps");
    let web_pids = scratch.0.join("web");
    // db takes its whole 2 s grace to stop: a restart leaves it not running for a while.
    let mut specs = String::from(
        "- name: db\n  kind: exec\n  stop_grace_s: 2\n  config:\n    command: /bin/sh\n    args: [\"-c\", \"trap '' TERM; while true; do sleep 1; done\"]\n",
    );
    specs.push_str("- ");
    specs.push_str(
        &pid_spec("web", &web_pids, true, "depends_on: [db]\nreplicas: 2\n").replace('\n', "\n  "),
    );
    c.apply(leader, specs.trim_end()).await.unwrap();
    c.wait_instances(leader, "web", Duration::from_secs(20), |i| {
        all_running(i, 2)
    })
    .await;
    eventually(Duration::from_secs(10), "two web pids", || {
        pids_in(&web_pids).len() >= 2
    })
    .await;
    let before = pids_in(&web_pids);
    let out = c.modectl(leader, &["svc", "restart", "db"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Watch web through db's restart: it never stops.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let web: BTreeMap<u64, Value> = c.instances(leader, "web").await;
        assert!(all_running(&web, 2), "web stopped with db: {web:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pids_in(&web_pids), before, "web was restarted");
    assert!(before.iter().all(|p| alive(*p)));
}

/// A tmpfs mounted over a directory for the test's lifetime (root only).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a tmpfs on {} failed: this test needs root (it fills a small disk)",
            dir.display()
        );
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_fills_up_stops_its_instances_and_exits() {
    let (mut c, leader) = cluster(3).await;
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let scratch = Scratch::new("full");
    // Each instance writes its pid to a file named after its node.
    let by_node = |id: u64| scratch.0.join(format!("pid.{id}"));
    let spec = format!(
        "name: web\nkind: exec\nreplicas: 3\nconfig:\n  command: /bin/sh\n  args: [\"-c\", \"echo $$ >> {}/pid.$MODE_NODE_ID; exec sleep 1000\"]\n",
        scratch.0.display()
    );
    c.apply(leader, &spec).await.unwrap();
    c.wait_instances(leader, "web", Duration::from_secs(20), |i| {
        all_running(i, 3)
    })
    .await;
    // Move the victim's data onto a small disk.
    c.node(victim).kill9();
    let dir = c.nodes[&victim].data_dir.clone();
    let saved = scratch.0.join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    copy_dir(&dir, &saved);
    let _disk = SmallDisk::mount(&dir, "256m");
    copy_dir(&saved, &dir);
    let started_before = pids_in(&by_node(victim)).len();
    c.node(victim).start();
    eventually(
        Duration::from_secs(30),
        "the restarted node runs an instance",
        || pids_in(&by_node(victim)).len() > started_before,
    )
    .await;
    let pid = *pids_in(&by_node(victim)).last().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(alive(pid));
    assert!(
        c.node(victim).exited().is_none(),
        "{}",
        c.nodes[&victim].logs()
    );
    // Fill the disk, then write until the victim's storage fails.
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", dir.join("fill").display()))
        .stderr(std::process::Stdio::null())
        .status();
    let big = "x".repeat(200_000);
    let t0 = Instant::now();
    let mut i = 0;
    while c.node(victim).exited().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the node with a full disk kept running\n{}",
            c.logs()
        );
        let event = format!(r#"{{"op":"record_event","kind":"fill","message":"{i}{big}"}}"#);
        let _ = c.write_command(leader, &event).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = c.nodes[&victim].logs();
    assert_ne!(c.node(victim).exited(), Some(Some(0)), "{logs}");
    assert!(logs.contains("Raft stopped on this node"), "{logs}");
    assert!(logs.contains("No space left on device"), "{logs}");
    // Its instance stopped with it, and runs elsewhere; the others carry on.
    eventually(
        Duration::from_secs(5),
        "the instance outlived its node",
        || !alive(pid),
    )
    .await;
    c.wait_instances(leader, "web", Duration::from_secs(20), |i| {
        all_running(i, 3) && i.values().all(|p| p["node"] != victim)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nodes_singleton_dies_with_its_lease_before_it_runs_elsewhere() {
    let (mut c, leader) = cluster(3).await;
    let scratch = Scratch::new("frozen");
    let pid_file = scratch.0.join("pids");
    c.apply(
        leader,
        &pid_spec("single", &pid_file, true, "singleton: true\n"),
    )
    .await
    .unwrap();
    let inst = c
        .wait_instances(leader, "single", Duration::from_secs(20), |i| {
            all_running(i, 1)
        })
        .await;
    let host = inst[&0]["node"].as_u64().unwrap();
    let first = wait_pid(&pid_file).await;
    // Freeze the host: its agent cannot act, but its keeper sees the lease run out.
    c.node(host).signal("STOP");
    let t0 = Instant::now();
    let mut died_at = None;
    let mut replaced_while_alive = false;
    while t0.elapsed() < Duration::from_secs(8) {
        let alive_now = alive(first);
        if !alive_now && died_at.is_none() {
            died_at = Some(t0.elapsed());
        }
        let replaced = pids_in(&pid_file).len() > 1;
        if replaced && alive(first) {
            replaced_while_alive = true;
        }
        if replaced && died_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.node(host).signal("CONT");
    let died_at = died_at.unwrap_or_else(|| {
        panic!(
            "the frozen node's singleton kept running for 8 s\n{}",
            c.logs()
        )
    });
    assert!(!replaced_while_alive, "the singleton ran twice");
    assert!(
        died_at < Duration::from_secs(3),
        "died {died_at:?} after the freeze"
    );
    // It runs elsewhere, once.
    let other = (1..=3).find(|id| *id != host).unwrap();
    c.wait_instances(other, "single", Duration::from_secs(20), |i| {
        all_running(i, 1) && i[&0]["node"] != host
    })
    .await;
    let live: Vec<u32> = pids_in(&pid_file)
        .into_iter()
        .filter(|p| alive(*p))
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
}
