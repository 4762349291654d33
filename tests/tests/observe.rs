//! Seeing the cluster: the combined beacon graph over gRPC and `modectl graph`, the web view in
//! a real headless browser, with real `mode-node` processes on loopback.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mode::graph::ClusterGraph;
use mode_tests::{http_get, TestCluster};

const ELECTION: Duration = Duration::from_secs(20);

/// `db` (one instance) and `web` (three, depending on `db`): with one `web` per node, at least
/// two dependency edges cross machines.
const SPECS: &str = "name: db\nkind: ticker\nconfig: {every_ms: 200}\n---\nname: web\nkind: ticker\nconfig: {every_ms: 300}\nreplicas: 3\ndepends_on: [db]\n";

/// A 3-node cluster running [`SPECS`], every node with an HTTP side port.
async fn running_cluster() -> TestCluster {
    let c = TestCluster::start_with_http(3, &[]);
    c.wait_leader(ELECTION).await;
    c.wait_registered(3).await;
    c.apply(1, SPECS).await.expect("apply the specs");
    for (service, n) in [("db", 1), ("web", 3)] {
        c.wait_instances(1, service, Duration::from_secs(20), |i| {
            i.len() == n && i.values().all(|p| p["state"] == "running")
        })
        .await;
    }
    c
}

fn graph_json(c: &TestCluster, via: u64, extra: &[&str]) -> (ClusterGraph, Option<i32>) {
    let mut args = vec!["graph", "-o", "json"];
    args.extend_from_slice(extra);
    let out = c.modectl(via, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let graph: ClusterGraph = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "modectl graph printed no graph ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (graph, out.status.code())
}

/// The graph once every instance is running with its tree (reports lag a little).
async fn settled_graph(c: &TestCluster, via: u64) -> ClusterGraph {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (g, code) = graph_json(c, via, &[]);
        assert_eq!(code, Some(0));
        let done = g.instance_count() == 4
            && g.nodes.iter().all(|n| {
                n.reachable
                    && n.instances
                        .iter()
                        .all(|i| i.state == "running" && i.tree.is_some())
            });
        if done {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "the graph never settled: {g:#?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_merges_every_node_and_survives_an_unreachable_one() {
    let mut c = running_cluster().await;
    let g = settled_graph(&c, 2).await;
    assert_eq!(g.answered_by, 2);
    assert_eq!(
        g.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Each instance carries its own service tree from the node that runs it: the instance's
    // supervisor, the ticker service, its timer.
    for n in &g.nodes {
        for i in &n.instances {
            let tree = i.tree.as_ref().unwrap();
            assert_eq!(tree.label, i.name());
            let inner = mode::graph::inner_service(tree).expect("the kind's service");
            assert!(
                inner.children.iter().any(|t| t.kind.as_str() == "timer"),
                "{} has no timer: {tree:#?}",
                i.name()
            );
        }
    }
    // One web per node (spread), one db: edges web@n → db@m, and some cross machines.
    let web_nodes: Vec<u64> = g
        .nodes
        .iter()
        .filter(|n| n.instances.iter().any(|i| i.service == "web"))
        .map(|n| n.id)
        .collect();
    assert_eq!(web_nodes, vec![1, 2, 3]);
    assert_eq!(g.edges.len(), 3, "{:#?}", g.edges);
    assert!(g
        .edges
        .iter()
        .all(|e| e.from_service == "web" && e.to_service == "db"));
    assert_eq!(g.edges.iter().filter(|e| e.cross_node).count(), 2);
    let web = g.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!((web.replicas, web.running), (3, 3));
    assert_eq!(web.depends_on, vec!["db".to_string()]);

    // Filters.
    let (db_only, _) = graph_json(&c, 1, &["--service", "db"]);
    assert_eq!(db_only.instance_count(), 1);
    assert!(db_only
        .nodes
        .iter()
        .flat_map(|n| &n.instances)
        .all(|i| i.service == "db"));
    let (node3, _) = graph_json(&c, 1, &["--node", "3"]);
    assert_eq!(node3.nodes.len(), 1);
    assert_eq!(node3.nodes[0].id, 3);
    let (with_daemon, _) = graph_json(&c, 1, &["--node", "2", "--daemon"]);
    let daemon = with_daemon.nodes[0].daemon.as_ref().expect("daemon tree");
    assert!(daemon.find("Raft").is_some() && daemon.find("GrpcServer").is_some());
    let out = c.modectl(1, &["graph", "--node", "42"]);
    assert_eq!(out.status.code(), Some(3), "unknown node is not found");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node 42"));
    let out = c.modectl(1, &["graph", "--service", "nope"]);
    assert_eq!(out.status.code(), Some(3));

    // Tree (plain when piped) and dot.
    let out = c.modectl(3, &["graph"]);
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(!tree.contains('\x1b'), "no colours in a pipe");
    for needle in [
        "node 1 (", "node 2 (", "node 3 (", "web#0", "web#2", "db#0", "[timer]",
    ] {
        assert!(tree.contains(needle), "{needle} missing from:\n{tree}");
    }
    assert!(
        tree.contains("web @ node"),
        "dependency edges listed:\n{tree}"
    );
    let out = c.modectl(3, &["graph", "--format", "dot"]);
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph") && dot.contains("cluster_node3"));
    assert!(dot.contains("style=\"dashed\""), "dependency edges in dot");
    let out = c.modectl(3, &["graph", "--format", "svg"]);
    let svg = String::from_utf8_lossy(&out.stdout);
    assert!(svg.contains("<svg") && svg.contains("data-instance=\"web#1\""));

    // Node 3 hangs (SIGSTOP: connections open, nothing answers): the graph still comes back
    // after the deadline, node 3 marked unreachable with the error, its instances as the
    // control plane last recorded them.
    c.node(3).signal("STOP");
    let started = Instant::now();
    let (g, code) = graph_json(&c, 1, &["--deadline-ms", "500"]);
    let waited = started.elapsed();
    c.node(3).signal("CONT");
    c.node(3).kill9();
    assert_eq!(code, Some(0));
    // The deadline, not the 15 s client timeout nor the connect timeout (bound loosely: a
    // shared machine may be slow to start modectl).
    assert!(
        waited < Duration::from_secs(5),
        "the fan-out waited {waited:?} for a hung node"
    );
    let dead = g.nodes.iter().find(|n| n.id == 3).unwrap();
    assert!(!dead.reachable);
    assert_eq!(dead.state, "unreachable");
    assert!(
        dead.error
            .as_deref()
            .is_some_and(|e| e.contains("within 500 ms")),
        "{:?}",
        dead.error
    );
    assert!(dead.instances.iter().all(|i| i.tree.is_none()));
    assert!(g.nodes.iter().filter(|n| n.id != 3).all(|n| n.reachable));
    let out = c.modectl(1, &["graph", "--deadline-ms", "500"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("node 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_watch_redraws_when_the_cluster_changes() {
    let c = running_cluster().await;
    settled_graph(&c, 1).await;
    let mut watch = Command::new(mode_tests::binary("modectl"))
        .args([
            "--endpoint",
            &c.nodes[&1].address(),
            "graph",
            "--watch",
            "--interval-ms",
            "200",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let snapshots = |rx: &std::sync::mpsc::Receiver<String>, wait: Duration| {
        let mut n = 0;
        let mut text = String::new();
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) => {
                    n += usize::from(line == "---");
                    text.push_str(&line);
                    text.push('\n');
                }
                Err(_) => break,
            }
        }
        (n, text)
    };
    // One drawing, then nothing while nothing changes (uptimes do not count).
    let (first, _) = snapshots(&rx, Duration::from_secs(3));
    assert_eq!(first, 1, "one drawing of an unchanged cluster");
    c.apply(2, "name: extra\nkind: counter\n").await.unwrap();
    let (more, text) = snapshots(&rx, Duration::from_secs(5));
    assert!(more >= 1, "a change redraws");
    assert!(text.contains("extra#0"), "{text}");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_draws_every_node_and_instance_in_a_real_browser() {
    let c = running_cluster().await;
    let g = settled_graph(&c, 1).await;
    let http = c.nodes[&2].http.unwrap();
    let (code, body) = http_get(http, "/api/graph");
    assert_eq!(code, 200);
    let api: ClusterGraph = serde_json::from_str(&body).unwrap();
    assert_eq!(api.instance_count(), 4);
    assert_eq!(http_get(http, "/api/graph?node=x").0, 400);
    assert_eq!(http_get(http, "/api/graph?node=42").0, 404);
    let (code, events) = http_get(http, "/api/events");
    assert_eq!(code, 200);
    assert!(events.contains("spec-applied"), "{events}");

    let profile = c.scratch.0.join("chromium-profile");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(mode_tests::browser::chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                &format!("--user-data-dir={}", profile.display()),
                "--virtual-time-budget=8000",
                "--dump-dom",
                &format!("http://127.0.0.1:{http}/"),
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 60 s")
    .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<svg"),
        "the page drew no SVG:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in &g.nodes {
        assert!(
            dom.contains(&format!("data-node=\"{}\"", n.id)),
            "node {} not drawn:\n{dom}",
            n.id
        );
        for i in &n.instances {
            assert!(
                dom.contains(&format!("data-instance=\"{}\"", i.name())),
                "{} not drawn:\n{dom}",
                i.name()
            );
        }
    }
    assert!(dom.contains("spec-applied"), "the event log is shown");
    assert!(
        dom.contains("3 nodes") && dom.contains("4 instances") && dom.contains("all nodes up"),
        "the summary is shown:\n{dom}"
    );
}
