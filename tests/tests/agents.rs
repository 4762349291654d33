//! Agent-only nodes (`mode-node --role agent --servers A,B,C`) with real processes: 3 servers
//! and 5 agents. Instances of a killed agent move; an agent whose server dies fails over and
//! keeps its instances; a partitioned agent's singleton stops before its replacement starts;
//! a heartbeat or report from another incarnation of a node is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_tests::probe::{self, probe_spec};
use mode_tests::proxy::Proxy;
use mode_tests::{alive, free_port, pid_spec, pids_in, Scratch, TestCluster};
use serde_json::{json, Value};

const ELECTION: Duration = Duration::from_secs(20);
const AGENTS: std::ops::RangeInclusive<u64> = 4..=8;

/// Only agent-only nodes carry this label: specs constrained to it run on agents.
const ON_AGENTS: &str = "constraints: [{label: pool, equals: agents}]\n";

/// 3 servers, then 5 agents each calling `servers(id)` (peer addresses, in order).
async fn fleet(servers: impl Fn(&TestCluster, u64) -> Vec<String>) -> (TestCluster, u64) {
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_leader(ELECTION).await;
    for id in AGENTS {
        let list = servers(&c, id).join(",");
        let args = [
            "--role",
            "agent",
            "--servers",
            &list,
            "--label",
            "pool=agents",
        ];
        c.add_node(
            id,
            free_port(),
            args.iter().map(|s| s.to_string()).collect(),
        )
        .start();
    }
    c.wait_registered(8).await;
    (c, leader)
}

fn direct(c: &TestCluster, _id: u64) -> Vec<String> {
    (1..=3).map(|s| c.nodes[&s].peer_address()).collect()
}

fn nodes_of(inst: &BTreeMap<u64, Value>) -> BTreeSet<u64> {
    inst.values().filter_map(|p| p["node"].as_u64()).collect()
}

fn running_on_agents(inst: &BTreeMap<u64, Value>, n: usize) -> bool {
    inst.len() == n
        && inst.values().all(|p| {
            p["state"] == "running" && p["node"].as_u64().is_some_and(|n| AGENTS.contains(&n))
        })
}

/// Wait for `done`, polling every 50 ms; panics with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_run_instances_and_a_killed_agents_instances_move_to_the_others() {
    let (mut c, leader) = fleet(direct).await;
    // However many agents joined, the Raft group is the 3 servers.
    let status = c.status(leader, false).await.unwrap();
    let members: Vec<u64> = status.members.iter().map(|m| m.id).collect();
    assert_eq!(members, [1, 2, 3], "{status:?}");
    assert_eq!(status.agents, 5, "{status:?}");
    // modectl names each node's role.
    let out = c.modectl(leader, &["node", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("agent"))
            .count(),
        5,
        "{text}"
    );
    let scratch = Scratch::new("agents-kill");
    let pids = scratch.0.join("pids");
    c.apply(
        leader,
        &pid_spec("web", &pids, true, &format!("replicas: 5\n{ON_AGENTS}")),
    )
    .await
    .unwrap();
    let inst = c
        .wait_instances(leader, "web", Duration::from_secs(30), |i| {
            running_on_agents(i, 5)
        })
        .await;
    let victim = inst[&0]["node"].as_u64().unwrap();
    let victims_slots: Vec<u64> = inst
        .iter()
        .filter(|(_, p)| p["node"] == victim)
        .map(|(s, _)| *s)
        .collect();
    c.node(victim).kill9();
    let after = c
        .wait_instances(leader, "web", Duration::from_secs(30), |i| {
            running_on_agents(i, 5) && !nodes_of(i).contains(&victim)
        })
        .await;
    for slot in victims_slots {
        assert_ne!(after[&slot]["node"], victim);
    }
    // The graph fans out to agents too: their beacons answer on their peer listener.
    let beacon = c
        .peer_client(1)
        .node_beacon(pb::NodeBeaconRequest::default())
        .await;
    assert!(beacon.is_ok(), "{beacon:?}");
    let mut agent =
        mode_tests::peer_client(&c.nodes[&after[&0]["node"].as_u64().unwrap()].peer_address());
    let report = agent
        .node_beacon(pb::NodeBeaconRequest::default())
        .await
        .unwrap()
        .into_inner();
    let report: Value = serde_json::from_slice(&report.report_json).unwrap();
    assert!(
        report.to_string().contains("web#"),
        "an agent's beacon shows its instances: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_server_dies_fails_over_and_keeps_its_instances_running() {
    // Every agent calls the same follower first.
    let first = std::sync::OnceLock::new();
    let (mut c, leader) = {
        let mut c = TestCluster::start(3, &[]);
        let leader = c.wait_leader(ELECTION).await;
        let follower = (1..=3).find(|s| *s != leader).unwrap();
        first.set(follower).unwrap();
        for id in AGENTS {
            let mut order = vec![c.nodes[&follower].peer_address()];
            order.extend(
                (1..=3)
                    .filter(|s| *s != follower)
                    .map(|s| c.nodes[&s].peer_address()),
            );
            let list = order.join(",");
            let args = [
                "--role",
                "agent",
                "--servers",
                &list,
                "--label",
                "pool=agents",
            ];
            c.add_node(
                id,
                free_port(),
                args.iter().map(|s| s.to_string()).collect(),
            )
            .start();
        }
        c.wait_registered(8).await;
        (c, leader)
    };
    let follower = *first.get().unwrap();
    let scratch = Scratch::new("agents-failover");
    let pids = scratch.0.join("pids");
    c.apply(
        leader,
        &pid_spec("web", &pids, true, &format!("replicas: 5\n{ON_AGENTS}")),
    )
    .await
    .unwrap();
    let before = c
        .wait_instances(leader, "web", Duration::from_secs(30), |i| {
            running_on_agents(i, 5)
        })
        .await;
    eventually(
        Duration::from_secs(10),
        "every instance wrote its pid",
        || pids_in(&pids).len() == 5,
    )
    .await;
    let started = pids_in(&pids);
    let logs_before: BTreeMap<u64, usize> = AGENTS.map(|a| (a, c.nodes[&a].logs().len())).collect();
    c.node(follower).kill9();
    // Every agent notices and moves on to another server.
    eventually(
        Duration::from_secs(20),
        "an agent did not fail over",
        || {
            AGENTS
                .clone()
                .all(|a| c.nodes[&a].logs()[logs_before[&a]..].contains("moving to"))
        },
    )
    .await;
    // ... and goes on heartbeating through it: the leader still sees every agent up, and a
    // new placement reaches them through the new server.
    c.apply(
        leader,
        &format!("name: more\nkind: ticker\nreplicas: 5\n{ON_AGENTS}"),
    )
    .await
    .unwrap();
    c.wait_instances(leader, "more", Duration::from_secs(30), |i| {
        running_on_agents(i, 5)
    })
    .await;
    // The instances were never restarted: the same processes, the same placements.
    let after = c.instances(leader, "web").await;
    assert_eq!(pids_in(&pids), started, "no instance was started again");
    assert!(started.iter().all(|p| alive(*p)), "{started:?}");
    for (slot, p) in &before {
        assert_eq!(after[slot]["node"], p["node"], "slot {slot} moved");
        assert_eq!(
            after[slot]["epoch"], p["epoch"],
            "slot {slot} was reassigned"
        );
        assert_eq!(after[slot]["state"], "running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_agents_singleton_stops_before_its_replacement_starts() {
    // Each agent reaches the servers only through proxies the test cuts.
    let proxies: std::sync::Mutex<BTreeMap<u64, Vec<Proxy>>> = Default::default();
    let (c, leader) = fleet(|c, id| {
        let ps: Vec<Proxy> = (1..=3)
            .map(|s| Proxy::start(&c.nodes[&s].peer_address()))
            .collect();
        let list = ps.iter().map(Proxy::address).collect();
        proxies.lock().unwrap().insert(id, ps);
        list
    })
    .await;
    let proxies = proxies.into_inner().unwrap();
    let scratch = Scratch::new("agents-partition");
    let file = scratch.0.join("probe");
    let on_agents = json!({"constraints": [{"label": "pool", "equals": "agents"}]});
    c.apply(leader, &probe_spec("single", &file, on_agents))
        .await
        .unwrap();
    let inst = c
        .wait_instances(leader, "single", Duration::from_secs(30), |i| {
            running_on_agents(i, 1)
        })
        .await;
    let host = inst[&0]["node"].as_u64().unwrap();
    eventually(Duration::from_secs(10), "the probe wrote nothing", || {
        probe::live(&file).len() == 1
    })
    .await;
    for p in &proxies[&host] {
        p.cut();
    }
    // The replacement runs on another agent ...
    c.wait_instances(leader, "single", Duration::from_secs(30), |i| {
        running_on_agents(i, 1) && !nodes_of(i).contains(&host)
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the replacement never wrote",
        || probe::runs(&file).len() >= 2,
    )
    .await;
    // ... and never overlapped with the cut-off copy, which stopped on its own.
    let runs = probe::runs(&file);
    let overlaps = probe::overlaps(&runs, probe::PROBE_EVERY_MS);
    assert!(
        overlaps.is_empty(),
        "two copies ran at once: {overlaps:?}\n{}",
        probe::describe(&runs)
    );
    for p in &proxies[&host] {
        p.heal();
    }
    // Back in touch, the old host is up again and learns the singleton moved: exactly one
    // copy runs, at every look.
    let t0 = Instant::now();
    loop {
        let nodes = c.read(leader, "nodes", false).await.unwrap();
        let up = nodes
            .as_array()
            .is_some_and(|ns| ns.iter().any(|n| n["id"] == host && n["status"] == "up"));
        if up {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "host {host} never came back: {nodes}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..40 {
        let live = probe::live(&file);
        assert!(
            live.len() <= 1,
            "{live:?}: {}",
            probe::describe(&probe::runs(&file))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        probe::live(&file).len(),
        1,
        "{}",
        probe::describe(&probe::runs(&file))
    );
    let runs = probe::runs(&file);
    assert!(
        probe::overlaps(&runs, probe::PROBE_EVERY_MS).is_empty(),
        "{}",
        probe::describe(&runs)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_incarnations_heartbeats_and_reports_are_refused_and_agents_refuse_raft() {
    let (mut c, _leader) = fleet(direct).await;
    let agent = *AGENTS.start();
    let mut server = c.peer_client(1);
    let hb = server
        .heartbeat(pb::HeartbeatRequest {
            node: agent,
            incarnation: 0x1234,
            leaving: false,
        })
        .await
        .unwrap_err();
    assert_eq!(hb.code(), tonic::Code::FailedPrecondition, "{hb:?}");
    assert!(hb.message().contains("incarnation"), "{hb:?}");
    let report = server
        .report_instances(pb::ReportInstancesRequest {
            node: agent,
            incarnation: 0x1234,
            reports: vec![pb::InstanceReport {
                service: "x".into(),
                state: "running".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(report.code(), tonic::Code::FailedPrecondition, "{report:?}");
    let watch = match server
        .watch_placements(pb::WatchPlacementsRequest {
            node: agent,
            incarnation: 0x1234,
            after_index: 0,
        })
        .await
    {
        Ok(_) => panic!("a watch from another incarnation was accepted"),
        Err(e) => e,
    };
    assert_eq!(watch.code(), tonic::Code::FailedPrecondition, "{watch:?}");
    // The real agent is unaffected.
    assert!(c.nodes[&agent].logs().contains("registered"));

    // An agent-only node takes no part in Raft, and says so.
    let mut to_agent = mode_tests::peer_client(&c.nodes[&agent].peer_address());
    let vote = to_agent.vote(pb::RaftRequest::default()).await.unwrap_err();
    assert_eq!(vote.code(), tonic::Code::FailedPrecondition, "{vote:?}");
    assert!(vote.message().contains("agent-only"), "{vote:?}");

    // An agent with another heartbeat grace is refused at registration, and exits saying so.
    let list = (1..=3)
        .map(|s| c.nodes[&s].peer_address())
        .collect::<Vec<_>>()
        .join(",");
    let args = [
        "--role",
        "agent",
        "--servers",
        &list,
        "--heartbeat-grace",
        "3s",
    ];
    c.add_node(9, free_port(), args.iter().map(|s| s.to_string()).collect())
        .start();
    eventually(
        Duration::from_secs(20),
        "the odd agent kept running",
        || c.node(9).exited().is_some(),
    )
    .await;
    let logs = c.nodes[&9].logs();
    assert_ne!(c.node(9).exited(), Some(Some(0)), "{logs}");
    assert!(logs.contains("--heartbeat-grace 1500ms"), "{logs}");
}
