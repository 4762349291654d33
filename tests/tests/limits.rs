//! Bounded input with real `mode-node` processes: over-limit specs and commands are refused
//! (at the edge and by the state machine) naming the limit, nodes survive them and restarts,
//! an unplaceable 20,000-replica spec costs a handful of writes and does not stall failure
//! detection, large answers pass through followers, and oversized writes fail fast.

use std::time::{Duration, Instant};

use mode_tests::{Scratch, TestCluster};
use serde_json::{json, Value};

const ELECTION: Duration = Duration::from_secs(20);

async fn cluster(n: u64) -> (TestCluster, u64) {
    let c = TestCluster::start(n, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(n as usize).await;
    (c, leader)
}

/// A raw `Propose` of `command` through node `via`'s peer API: the command's result, or the
/// error.
async fn raw_write(c: &TestCluster, via: u64, command: &str) -> Result<Value, tonic::Status> {
    c.propose(via, command, "", Duration::from_secs(20))
        .await
        .map(|(result, _)| result)
}

fn assert_all_running(c: &mut TestCluster) {
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    for id in ids {
        assert_eq!(c.node(id).exited(), None, "node {id} died\n{}", c.logs());
    }
}

async fn applied_index(c: &TestCluster, id: u64) -> u64 {
    c.status(id, true)
        .await
        .map(|s| s.applied_index)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_specs_are_refused_at_the_edge_and_by_the_state_machine_and_nodes_survive() {
    let (mut c, leader) = cluster(3).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let scratch = Scratch::new("limits");
    let cases = [
        (
            "replicas.yaml",
            "name: web\nkind: ticker\nreplicas: 4294967295\n".to_string(),
            "replicas 4294967295 is over the limit of 50000",
        ),
        (
            "grace.yaml",
            "name: web\nkind: exec\nconfig: {command: /bin/true}\nstop_grace_s: 18446744073709551615\n"
                .to_string(),
            "stop_grace_s",
        ),
        (
            "config.yaml",
            format!(
                "name: web\nkind: exec\nconfig: {{command: /bin/echo, args: [\"{}\"]}}\n",
                "x".repeat(1 << 20)
            ),
            "over the limit of 65536 bytes",
        ),
        (
            "huge.yaml",
            format!(
                "name: web\nkind: exec\nconfig: {{command: /bin/echo, args: [\"{}\"]}}\n",
                "x".repeat(10 << 20)
            ),
            "over the limit of 4194304 bytes",
        ),
    ];
    for (file, text, expected) in &cases {
        let path = scratch.0.join(file);
        std::fs::write(&path, text).unwrap();
        let started = Instant::now();
        let out = c.modectl(follower, &["svc", "apply", "-f", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(expected), "{file}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{file} took {:?}",
            started.elapsed()
        );
    }
    // The peer API's raw `Propose` takes any command: the state machine refuses these on every
    // replica.
    let smuggled = [
        (
            json!({"op": "put_spec", "spec": {"name": "big", "kind": "ticker", "replicas": 4294967295u64}}),
            "replicas 4294967295 is over the limit of 50000",
        ),
        (
            json!({"op": "put_spec", "spec": {"name": "slow", "kind": "exec", "config": {"command": "/bin/sleep", "args": ["1000"]}, "stop_grace_s": 18446744073709551615u64}}),
            "stop_grace_s 18446744073709551615 s is over the limit of 3600 s",
        ),
    ];
    for (command, expected) in &smuggled {
        let result = raw_write(&c, follower, &command.to_string())
            .await
            .expect("committed (and refused by the state machine)");
        assert_eq!(result["ok"], false, "{result}");
        assert!(
            result["message"].as_str().unwrap_or("").contains(expected),
            "{result}"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_all_running(&mut c);
    // Replaying the log (on every node, with a new leader) must not crash either.
    for id in 1..=3 {
        c.node(id).kill9();
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_all_running(&mut c);
    let specs = c.read(leader, "specs", false).await.unwrap();
    assert_eq!(specs, json!([]), "nothing was stored");
    let refused: Vec<String> = c
        .events(leader)
        .await
        .iter()
        .filter(|e| e["kind"] == "command-refused")
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[0].contains("replicas 4294967295"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplaceable_20000_replica_spec_costs_a_few_writes_and_does_not_stall_failure_detection()
{
    let (mut c, leader) = cluster(3).await;
    let before = applied_index(&c, leader).await;
    c.apply(
        leader,
        "name: web\nkind: ticker\nreplicas: 20000\nconstraints: [{label: zone, equals: nowhere}]\n",
    )
    .await
    .expect("a legal spec");
    // Give the control loop time to do whatever it does with it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = applied_index(&c, leader).await;
    let unplaced: Vec<Value> = c
        .events(leader)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "unplaced")
        .collect();
    assert_eq!(
        unplaced.len(),
        1,
        "one summary, not one event per instance; the first: {:?}",
        unplaced.first()
    );
    let said = unplaced[0]["message"].as_str().unwrap_or("");
    assert!(
        said.starts_with("web: 20,000 of 20,000 instances could not be placed:"),
        "{said}"
    );
    assert!(
        after - before < 20,
        "{} entries were committed for one spec",
        after - before
    );
    // Other services are still placed promptly.
    c.apply(leader, "name: small\nkind: ticker\nreplicas: 2\n")
        .await
        .unwrap();
    c.wait_instances(leader, "small", Duration::from_secs(10), |i| {
        i.len() == 2 && i.values().all(|p| p["state"] == "running")
    })
    .await;
    // And a dead node is marked down within its heartbeat grace (1.5 s) and a little.
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    c.node(victim).kill9();
    let killed = Instant::now();
    loop {
        let nodes = c.read(leader, "nodes", true).await.unwrap_or_default();
        let down = nodes
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["id"] == victim && n["status"] == "down");
        if down {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "node {victim} not marked down within 5 s\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_pass_through_followers_and_oversized_writes_fail_fast() {
    let (c, leader) = cluster(3).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // 80 specs with 60 KB configs (each under the 64 KiB limit): a 4.8 MB state.
    for i in 0..80 {
        let command = json!({"op": "put_spec", "spec": {
            "name": format!("pad-{i}"), "kind": "ticker", "replicas": 0,
            "config": {"pad": "x".repeat(60_000)}
        }});
        let r = raw_write(&c, leader, &command.to_string()).await.unwrap();
        assert_eq!(r["ok"], true, "{r}");
    }
    // A linearizable read through a follower is forwarded to the leader: 4.8 MB comes back.
    let specs = c
        .read(follower, "specs", false)
        .await
        .expect("read via a follower");
    assert_eq!(specs.as_array().map(Vec::len), Some(80));

    // Over the write limit: refused at once, naming it.
    let started = Instant::now();
    let big = json!({"op": "record_event", "kind": "x", "message": "m".repeat(2 << 20)});
    let e = raw_write(&c, follower, &big.to_string()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("is over the limit of 1048576 bytes"),
        "{e:?}"
    );
    let huge = json!({"op": "record_event", "kind": "x", "message": "m".repeat(16 << 20)});
    let e = raw_write(&c, follower, &huge.to_string())
        .await
        .unwrap_err();
    assert!(e.message().contains("limit"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusing took {:?}",
        started.elapsed()
    );
    // Under it: stored, with the message cut to 4 KiB.
    let fits = json!({"op": "record_event", "kind": "x", "message": "m".repeat(900_000)});
    let r = raw_write(&c, follower, &fits.to_string()).await.unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let events = c.events(leader).await;
    let last = events.last().expect("an event");
    let message = last["message"].as_str().unwrap_or("");
    assert!(message.len() <= 4096, "{}", message.len());
    assert!(message.ends_with("(cut: 900000 bytes in all)"), "{message}");

    // Writes of nearly a megabyte each, eight at once: entries of a few MB (batched up to
    // 4 MiB) that take longer than a 50 ms heartbeat to replicate still commit promptly.
    let term = c.status(leader, true).await.unwrap().term;
    let started = Instant::now();
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..8 {
        let mut client = c.peer_client(leader);
        let command = json!({"op": "record_event", "kind": "x", "message": format!("{i}{}", "y".repeat(900_000))});
        writes.spawn(async move {
            mode_tests::propose(
                &mut client,
                &command.to_string(),
                "",
                Some(Duration::from_secs(30)),
            )
            .await
            .map(|(_, reply)| reply.response_json)
        });
    }
    while let Some(done) = writes.join_next().await {
        let reply = done
            .unwrap()
            .unwrap_or_else(|e| panic!("committed: {e:?}\n{}", c.log_tails(40)));
        let r: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(r["ok"], true, "{r}");
    }
    let took = started.elapsed();
    let term_after = c.status(leader, true).await.unwrap().term;
    assert!(
        took < Duration::from_secs(20),
        "8 writes of ~900 KB took {took:?} (term {term} -> {term_after})\n{}",
        c.logs()
    );
    eprintln!("8 writes of ~900 KB: {took:?}, term {term} -> {term_after}");
}
