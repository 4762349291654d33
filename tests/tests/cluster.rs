//! The replicated control plane with real `mode-node` processes on loopback.

use std::time::{Duration, Instant};

use mode_tests::{free_port, http_get, Scratch, TestCluster};

const ELECTION: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_and_a_write_through_a_follower_is_readable_on_all() {
    let c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let reply = c
        .put_spec(follower, "web")
        .await
        .expect("write through a follower");
    // The follower forwarded the write to the leader, which stored it.
    assert_eq!(reply.changes.len(), 1, "{reply:?}");
    assert_eq!(reply.changes[0].action, "created", "{reply:?}");
    assert_eq!(reply.changes[0].generation, 1, "{reply:?}");
    assert!(reply.log_index > 0, "{reply:?}");
    // Linearizable reads on every node see it at once; each node's own state has it too.
    for id in 1..=3 {
        let spec = c
            .read(id, "spec:web", false)
            .await
            .expect("linearizable read");
        assert_eq!(spec["kind"], "ticker");
        c.wait_specs(id, 1, Duration::from_secs(5)).await;
    }
    let missing = c.read(follower, "spec:nope", false).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // The registered nodes are in the replicated node table.
    let nodes = c.read(follower, "nodes", false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut nodes = nodes;
    while nodes.as_array().map(|a| a.len()) != Some(3) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        nodes = c.read(follower, "nodes", false).await.unwrap();
    }
    assert_eq!(nodes.as_array().unwrap().len(), 3, "{nodes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_and_writes_succeed_again() {
    let mut c = TestCluster::start(3, &[]);
    let old = c.wait_leader(ELECTION).await;
    c.put_spec(old, "before").await.unwrap();
    c.node(old).kill9();
    let survivor = (1..=3).find(|id| *id != old).unwrap();
    let t0 = Instant::now();
    let reply = loop {
        match c.put_spec(survivor, "after").await {
            Ok(r) => break r,
            Err(e) => assert!(
                t0.elapsed() < ELECTION,
                "no write accepted after the kill: {e}\n{}",
                c.logs()
            ),
        }
    };
    assert_eq!(reply.changes[0].action, "created", "{reply:?}");
    let status = c.status(survivor, false).await.unwrap();
    assert!(status.has_leader);
    assert_ne!(status.leader, old);
    let dead = status.members.iter().find(|m| m.id == old).unwrap();
    assert!(!dead.reachable, "{dead:?}");
    assert!(!dead.last_error.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_catches_up_and_a_full_restart_keeps_every_acknowledged_write() {
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..30 {
        c.put_spec(leader, &format!("a{i}")).await.unwrap();
    }
    // Kill the leader itself: the hardest case for durability of acknowledged writes.
    c.node(leader).kill9();
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    for i in 0..30 {
        loop {
            if c.put_spec(survivor, &format!("b{i}")).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    c.node(leader).start();
    c.wait_specs(leader, 60, Duration::from_secs(20)).await;

    for id in 1..=3 {
        c.node(id).kill9();
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    let leader = c.wait_leader(ELECTION).await;
    let specs = c.read(leader, "specs", false).await.unwrap();
    assert_eq!(
        specs.as_array().unwrap().len(),
        60,
        "every acknowledged write survived"
    );
    for id in 1..=3 {
        c.wait_specs(id, 60, Duration::from_secs(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_behind_receives_a_snapshot() {
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    let lagger = (1..=3).find(|id| *id != leader).unwrap();
    c.node(lagger).kill9();
    for i in 0..120 {
        c.put_spec(leader, &format!("s{i}")).await.unwrap();
    }
    // Compact on both running nodes so no one still has the entries the lagger needs.
    for id in (1..=3).filter(|id| *id != lagger) {
        let mut client = c.client(id).await;
        let r = client
            .compact(mode_proto::v1::CompactRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(r.purged_index >= 120, "purged up to {}", r.purged_index);
    }
    c.node(lagger).start();
    c.wait_specs(lagger, 120, Duration::from_secs(30)).await;
    let local = c.status(lagger, true).await.unwrap();
    assert!(
        local.snapshot_index >= 120,
        "the lagger installed a snapshot: {local:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_as_a_learner_then_becomes_a_voter() {
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    let via = c.nodes[&((leader % 3) + 1)].peer_address();
    let port = free_port();
    c.add_node(4, port, vec!["--join".into(), via]).start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.status(leader, false).await.unwrap();
        if s.members.iter().any(|m| m.id == 4 && m.voter) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never became a voter: {s:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The events record both steps, in order (the promotion event lands just after the
    // membership change, so wait for it).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = c.read(leader, "events", false).await.unwrap();
        let messages: Vec<String> = events
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["message"].as_str().map(str::to_string))
            .collect();
        let learner = messages
            .iter()
            .position(|m| m.contains("node 4") && m.contains("joined as a learner"));
        let voter = messages
            .iter()
            .position(|m| m == "node 4 promoted to voter");
        if let (Some(l), Some(v)) = (learner, voter) {
            assert!(l < v, "{messages:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{messages:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new voter takes writes (forwarded) and has the state.
    c.put_spec(4, "from-4").await.unwrap();
    c.wait_specs(4, 1, Duration::from_secs(10)).await;
    // Restarting it with the same flags is idempotent.
    c.node(4).kill9();
    c.node(4).start();
    c.put_spec(leader, "again").await.unwrap();
    c.wait_specs(4, 2, Duration::from_secs(20)).await;
    // modectl node rm of a live node asks for --force, saying what would happen; with it,
    // the node leaves the membership.
    let out = c.modectl(leader, &["node", "rm", "4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("node 4 was not removed: node 4 is up") && err.contains("--force"),
        "{err}"
    );
    let out = c.modectl(leader, &["node", "rm", "4", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = c.status(leader, false).await.unwrap();
    assert!(s.members.iter().all(|m| m.id != 4), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_already_in_use_cannot_join() {
    let c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    let via = c.nodes[&leader].peer_address();
    let port = free_port();
    // Id 2 exists at another address.
    let scratch = Scratch::new("clash");
    let out = std::process::Command::new(mode_tests::binary("mode-node"))
        .args([
            "--id",
            "2",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--join",
            &via,
        ])
        .arg("--data-dir")
        .arg(scratch.0.join("d"))
        .args(["--bootstrap-timeout", "10s"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("node id 2 is already a member at"), "{err}");
}

/// sha-free fingerprint of every file in a directory: names, sizes and contents.
fn fingerprint(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn run_node(args: &[&str], data_dir: &std::path::Path) -> (Option<i32>, String) {
    let port = free_port();
    let out = std::process::Command::new(mode_tests::binary("mode-node"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--bootstrap-timeout",
            "5s",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_data_directory_is_refused_and_left_untouched() {
    let mut c = TestCluster::start(1, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.put_spec(leader, "precious").await.unwrap();
    c.node(1).kill9();
    let dir = c.nodes[&1].data_dir.clone();
    let db = dir.join("raft.redb");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().take(64) {
        *b = 0xAB;
    }
    std::fs::write(&db, &bytes).unwrap();
    let before = fingerprint(&dir);
    let (code, err) = run_node(&["--id", "1"], &dir);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("data directory {} is corrupt", dir.display())),
        "{err}"
    );
    assert!(err.contains("Nothing was changed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(fingerprint(&dir), before, "the files were not modified");
}

#[test]
fn a_data_directory_of_another_node_or_with_foreign_files_is_refused() {
    let scratch = Scratch::new("foreign");
    let foreign = scratch.0.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("photos.zip"), b"not mode's").unwrap();
    let (code, err) = run_node(&["--id", "1"], &foreign);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is not a mode data directory (it contains photos.zip)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(foreign.join("photos.zip")).unwrap(),
        b"not mode's"
    );

    // A directory created by node 1, then started as node 2.
    let owned = scratch.0.join("owned");
    std::fs::create_dir_all(&owned).unwrap();
    std::fs::write(owned.join("mode-node.json"), br#"{"format":1,"node_id":1}"#).unwrap();
    std::fs::write(owned.join("raft.redb"), b"").unwrap();
    let before = fingerprint(&owned);
    let (code, err) = run_node(&["--id", "2"], &owned);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("belongs to node 1, but this node was started with --id 2"),
        "{err}"
    );
    assert_eq!(fingerprint(&owned), before);
}

#[test]
fn bad_flags_and_unreachable_peers_exit_non_zero_with_a_clear_error() {
    let scratch = Scratch::new("flags");
    let d = scratch.0.join("d");
    let (code, err) = run_node(&["--id", "1", "--peers", "1=127.0.0.1:notaport"], &d);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not host:port"), "{err}");

    let (code, err) = run_node(&["--id", "3", "--peers", "1=127.0.0.1:1,2=127.0.0.1:2"], &d);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--peers has no entry for this node (--id 3)"),
        "{err}"
    );

    // Peers that never answer: no quorum, a clear error naming them, exit 1.
    let (p2, p3) = (free_port(), free_port());
    let p1 = free_port();
    let peers = format!("1=127.0.0.1:{p1},2=127.0.0.1:{p2},3=127.0.0.1:{p3}");
    let out = std::process::Command::new(mode_tests::binary("mode-node"))
        .args([
            "--id",
            "1",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--peer-listen",
            &format!("127.0.0.1:{p1}"),
            "--peers",
            &peers,
            "--bootstrap-timeout",
            "2s",
        ])
        .arg("--data-dir")
        .arg(scratch.0.join("lonely"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no leader was elected within 2s"), "{err}");
    assert!(
        err.contains(&format!("node 2: 127.0.0.1:{p2} is unreachable")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_another_protocol_version_is_refused_by_name() {
    let c = TestCluster::start(1, &[]);
    c.wait_leader(ELECTION).await;
    let err = c
        .peer_client(1)
        .vote(mode_proto::v1::RaftRequest {
            protocol: 99,
            from: 7,
            payload: b"{}".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("node 7 speaks mode protocol 99, this node speaks 1"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modectl_shows_cluster_status_as_a_table_and_as_json() {
    let c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let out = c.modectl(follower, &["cluster", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("leader: node {leader}")), "{text}");
    assert!(
        text.contains("ROLE") && text.contains("LAG") && text.contains("REACHABLE"),
        "{text}"
    );
    let out = c.modectl(follower, &["-o", "json", "cluster", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    assert_eq!(v["leader"], leader);
    assert_eq!(
        v["answered_by"], leader,
        "asked the leader, which knows every lag"
    );
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(
        members
            .iter()
            .all(|m| m["lag"].is_u64() && m["reachable"] == true),
        "{v}"
    );
    assert!(v["commit_index"].as_u64().unwrap() >= 1);
    let out = c.modectl(follower, &["-o", "json", "cluster", "status", "--local"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["answered_by"], follower);
    let out = c.modectl(follower, &["node", "rm", "42"]);
    assert_eq!(out.status.code(), Some(3), "not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_serves_health_readiness_and_metrics() {
    let http = free_port();
    let addr = format!("127.0.0.1:{http}");
    let c = TestCluster::start(1, &["--http-listen", &addr]);
    let leader = c.wait_leader(ELECTION).await;
    c.put_spec(leader, "web").await.unwrap();
    assert_eq!(http_get(http, "/healthz"), (200, "ok\n".to_string()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(http, "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready: {:?}",
            http_get(http, "/readyz")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, metrics) = http_get(http, "/metrics");
    assert_eq!(code, 200);
    for line in [
        "mode_raft_term{node=\"1\"} 1",
        "mode_raft_leader{node=\"1\"} 1",
        "mode_raft_is_leader{node=\"1\"} 1",
        "# TYPE mode_raft_proposal_duration_seconds histogram",
        "mode_raft_leader_changes_total{node=\"1\"} 1",
        "mode_nodes{status=\"up\"} 1",
        "mode_heartbeat_age_seconds{node=\"1\",peer=\"1\"}",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    let proposals = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mode_raft_proposals_total{node=\"1\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(proposals >= 1.0, "{metrics}");
    assert_eq!(http_get(http, "/nope").0, 404);

    // A node that is not (yet) a member of a cluster is alive but not ready.
    let lonely_http = free_port();
    let scratch = Scratch::new("notready");
    let (p1, p2) = (free_port(), free_port());
    let mut child = std::process::Command::new(mode_tests::binary("mode-node"))
        .args([
            "--id",
            "2",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--peer-listen", &format!("127.0.0.1:{p2}")])
        .args(["--peers", &format!("1=127.0.0.1:{p1},2=127.0.0.1:{p2}")])
        .args(["--http-listen", &format!("127.0.0.1:{lonely_http}")])
        .arg("--data-dir")
        .arg(scratch.0.join("d"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", lonely_http)) {
            drop(s);
            break http_get(lonely_http, "/readyz");
        }
        assert!(Instant::now() < deadline, "the HTTP port never opened");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready.0, 503, "{ready:?}");
    assert!(ready.1.starts_with("not ready:"), "{ready:?}");
}
