//! Entry points of the fuzz targets (`fuzz/`, run with `cargo fuzz`) and of the test that
//! replays their corpora (`fuzz/corpus/<target>/`): each takes bytes that a client, a peer or
//! the data directory could hand a node, runs them through the node's own decoders and checks,
//! and applies what would be committed to a small cluster state. Whatever the bytes, none may
//! panic, hang or allocate without bound. Not an API: the targets and the test are its only
//! callers.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use mode_proto::v1 as pb;
use prost::Message;

use crate::agent::KindRegistry;
use crate::api::convert;
use crate::graph::{GraphContext, GraphFilter};
use crate::model::spec::ServiceSpec;
use crate::model::state::{ClusterState, Command, NodeStatus, Proposal};
use crate::replication::fuzz::Follower;

/// A fuzz target's entry point: takes any bytes.
pub type EntryPoint = fn(&[u8]);

/// The fuzz targets by name (`fuzz/fuzz_targets/<name>.rs`), each with its entry point.
pub const TARGETS: &[(&str, EntryPoint)] = &[
    ("spec_text", spec_text),
    ("control_request", control_request),
    ("peer_request", peer_request),
    ("peer_reply", peer_reply),
    ("raft_message", raft_message),
    ("command", command),
    ("snapshot", snapshot),
    ("stored_log", stored_log),
];

/// The proposer's clock for every command applied here (the state machine takes it as given).
const NOW_MS: u64 = 1_700_000_000_000;

/// The stock kinds, as every node has them.
fn kinds() -> &'static KindRegistry {
    static KINDS: OnceLock<KindRegistry> = OnceLock::new();
    KINDS.get_or_init(KindRegistry::stock)
}

/// The commands that build [`small_state`], as a peer would propose them (also seeds).
fn small_state_commands() -> Vec<Command> {
    let commands = serde_json::json!([
        {"op": "register_node", "id": 1, "address": "10.0.0.1:7071", "api_address": "10.0.0.1:7070",
         "labels": {"zone": "a", "disk": "ssd"}, "capacity": 8, "incarnation": 11,
         "heartbeat_grace_ms": 3000, "kinds": ["exec", "ticker", "counter", "crasher", "webapp"]},
        {"op": "register_node", "id": 2, "address": "10.0.0.2:7071", "api_address": "10.0.0.2:7070",
         "labels": {"zone": "b"}, "capacity": 4, "incarnation": 12, "heartbeat_grace_ms": 3000,
         "kinds": ["exec", "ticker", "counter"]},
        {"op": "register_node", "id": 3, "address": "10.0.0.3:7071", "role": "agent",
         "labels": {"zone": "a"}, "capacity": 2, "incarnation": 13, "heartbeat_grace_ms": 3000,
         "kinds": ["ticker", "counter"]},
        {"op": "apply_specs", "specs": [
            {"name": "db", "kind": "counter", "singleton": true, "replicas": 1},
            {"name": "web", "kind": "ticker", "replicas": 3, "config": {"every_ms": 100},
             "depends_on": ["db"], "spread": "zone", "constraints": [{"label": "zone", "in": ["a", "b"]}],
             "update": {"max_unavailable": "50%", "auto_revert": true},
             "health": {"tcp": {"port": 8080}, "port_plus_slot": true}},
            {"name": "batch", "kind": "exec", "replicas": 2, "anti_affinity": ["db"],
             "config": {"command": "/bin/sleep", "args": ["1000"]}}
        ]},
        {"op": "place", "assign": [
            {"service": "db", "slot": 0, "node": 3},
            {"service": "web", "slot": 0, "node": 1},
            {"service": "web", "slot": 1, "node": 2},
            {"service": "web", "slot": 2, "node": 1},
            {"service": "batch", "slot": 0, "node": 2}
        ]},
        {"op": "report_instances", "node": 1, "incarnation": 11, "reports": [
            {"service": "web", "slot": 0, "state": "running", "epoch": 0, "healthy": true},
            {"service": "web", "slot": 2, "state": "crashed", "restart_count": 2, "last_crash": "exit 1"}
        ]},
        {"op": "report_instance", "service": "db", "slot": 0, "node": 3, "state": "running"},
        {"op": "apply_specs", "specs": [
            {"name": "web", "kind": "ticker", "replicas": 3, "config": {"every_ms": 200},
             "depends_on": ["db"], "spread": "zone", "update": {"max_unavailable": 1}}
        ], "expected": {"web": 1}},
        {"op": "set_node_status", "id": 2, "status": "draining"},
        {"op": "record_event", "kind": "note", "message": "a small state for fuzzing", "node": 1}
    ]);
    serde_json::from_value(commands).expect("the small state's commands are valid")
}

/// A small cluster: three nodes (one agent-only, one draining), three services with
/// dependencies and a rollout under way, instances placed and reported.
pub fn small_state() -> ClusterState {
    static STATE: OnceLock<ClusterState> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let mut state = ClusterState::default();
            for (i, command) in small_state_commands().into_iter().enumerate() {
                let result = state.apply_at(&proposal(command), i as u64 + 1);
                debug_assert!(result.ok, "{}", result.message);
            }
            state
        })
        .clone()
}

fn proposal(command: Command) -> Proposal {
    Proposal {
        at_ms: NOW_MS,
        command,
        trace: None,
        request_id: None,
        by: None,
    }
}

/// Commit `commands` on `follower` (one entry each), as the leader would propose them.
fn commit(follower: &mut Follower, commands: impl IntoIterator<Item = Command>) {
    for command in commands {
        follower.apply_proposals(vec![proposal(command)]);
    }
}

/// What every read of a service answers, for each service named in `names`.
fn read_services<'a>(state: &ClusterState, names: impl IntoIterator<Item = &'a String>) {
    for name in names {
        // As a viewer reads it (secret values hidden) and as an operator does.
        for caller in [
            crate::security::Caller::Node(1),
            crate::security::Caller::anonymous(),
        ] {
            let _ = convert::service_to_proto(state, name, 1, NOW_MS, &caller, None, true);
        }
    }
}

/// Specs checked by the server (`checked_specs`): a dry run's plan, then the commit.
fn apply_checked(
    follower: &mut Follower,
    specs: Vec<ServiceSpec>,
    expected: BTreeMap<String, u64>,
) {
    let state = follower.state();
    if let Ok(changes) = state.plan_apply(&specs, &expected) {
        let _: Vec<_> = changes.iter().map(convert::change_to_proto).collect();
        let plan = state.plan_placements(&specs);
        let _: Vec<_> = plan.iter().map(convert::planned_to_proto).collect();
    }
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    commit(follower, [Command::ApplySpecs { specs, expected }]);
    read_services(follower.state(), &names);
}

// ---------------------------------------------------------------- targets

/// A spec file's text (YAML or JSON), as `modectl svc apply` sends it: parsed, validated,
/// its configs checked by the stock kinds, planned and applied.
pub fn spec_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(specs) = crate::api::checked_specs("fuzz.yaml", Vec::new(), text.to_string(), kinds())
    {
        let mut follower = Follower::new(small_state());
        apply_checked(&mut follower, specs, BTreeMap::new());
        follower.send_views();
    }
}

/// A request of the public API (`mode.v1.Control`): the first byte picks the RPC, the rest is
/// its message. Decoded, converted and checked as the server does, and what it would commit
/// applied to the small state.
pub fn control_request(data: &[u8]) {
    let Some((&rpc, body)) = data.split_first() else {
        return;
    };
    let mut follower = Follower::new(small_state());
    // The write handlers move the request's fields into the command as they are.
    match rpc % 20 {
        0 => {
            let Ok(r) = pb::ApplyServicesRequest::decode(body) else {
                return;
            };
            let expected: BTreeMap<String, u64> = r.expected_generations.into_iter().collect();
            if let Ok(specs) = crate::api::checked_specs(&r.file, r.specs, r.text, kinds()) {
                apply_checked(&mut follower, specs, expected);
            }
        }
        1 => {
            let Ok(r) = pb::ScaleServiceRequest::decode(body) else {
                return;
            };
            let name = r.name.clone();
            commit(
                &mut follower,
                [Command::ScaleSpec {
                    name: r.name,
                    replicas: r.replicas,
                    expected_generation: r.expected_generation,
                }],
            );
            read_services(follower.state(), [&name]);
        }
        2 => {
            let Ok(r) = pb::DeleteServiceRequest::decode(body) else {
                return;
            };
            commit(
                &mut follower,
                [Command::DeleteSpec {
                    name: r.name,
                    force: r.force,
                }],
            );
        }
        3 => {
            let Ok(r) = pb::RestartServiceRequest::decode(body) else {
                return;
            };
            let slots: Vec<u32> = match r.slot {
                Some(slot) => vec![slot],
                None => follower
                    .state()
                    .placements
                    .get(&r.name)
                    .map(|s| s.keys().copied().collect())
                    .unwrap_or_default(),
            };
            commit(
                &mut follower,
                slots.into_iter().map(|slot| Command::RestartInstance {
                    service: r.name.clone(),
                    slot,
                }),
            );
        }
        4 => {
            let Ok(r) = pb::RollbackServiceRequest::decode(body) else {
                return;
            };
            commit(
                &mut follower,
                [Command::RollbackSpec {
                    name: r.name,
                    to_generation: r.to_generation,
                    expected_generation: r.expected_generation,
                    revert_of: None,
                    reason: None,
                }],
            );
        }
        5 => {
            let Ok(r) = pb::DrainNodeRequest::decode(body) else {
                return;
            };
            if let Ok(blockers) = follower.state().drain_blockers(r.id) {
                let _ = blockers.to_string();
            }
            commit(
                &mut follower,
                [Command::SetNodeStatus {
                    id: r.id,
                    status: NodeStatus::Draining,
                }],
            );
        }
        6 => {
            let Ok(r) = pb::UndrainNodeRequest::decode(body) else {
                return;
            };
            commit(
                &mut follower,
                [Command::SetNodeStatus {
                    id: r.id,
                    status: NodeStatus::Up,
                }],
            );
        }
        7 => {
            let Ok(r) = pb::RemoveNodeRequest::decode(body) else {
                return;
            };
            commit(&mut follower, [Command::RemoveNode { id: r.id }]);
        }
        8 => {
            if let Ok(r) = pb::GetServiceRequest::decode(body) {
                read_services(follower.state(), [&r.name]);
            }
        }
        9 => {
            if let Ok(r) = pb::WatchServiceRequest::decode(body) {
                read_services(follower.state(), [&r.name]);
            }
        }
        10 => {
            let Ok(r) = pb::GraphRequest::decode(body) else {
                return;
            };
            let filter = GraphFilter::from_request(r.service, r.node, r.daemon);
            graph(follower.state(), &filter, BTreeMap::new());
        }
        11 => drop(pb::ListEventsRequest::decode(body)),
        12 => drop(pb::WatchEventsRequest::decode(body)),
        13 => drop(pb::ServiceHistoryRequest::decode(body)),
        14 => drop(pb::ListServicesRequest::decode(body)),
        15 => drop(pb::ListNodesRequest::decode(body)),
        16 => drop(pb::ClusterStatusRequest::decode(body)),
        17 => drop(pb::CompactRequest::decode(body)),
        18 => {
            let Ok(r) = pb::LogsRequest::decode(body) else {
                return;
            };
            if crate::api::LogAsk::new(r.previous, r.follow, r.tail, r.since_ms).is_ok() {
                let _ = crate::api::log_sources(follower.state(), kinds(), &r.service, r.slot);
            }
        }
        _ => drop(pb::ListKindsRequest::decode(body)),
    }
    follower.send_views();
}

/// The combined graph of `state` with the nodes' `reports`, as a client receives and draws it.
fn graph(
    state: &ClusterState,
    filter: &GraphFilter,
    reports: BTreeMap<u64, Result<crate::graph::NodeReport, String>>,
) {
    let ctx = GraphContext {
        answered_by: 1,
        leader: Some(1),
        term: 2,
        applied_index: 3,
        members: BTreeMap::from([(1, "10.0.0.1:7071".to_string())]),
    };
    let mut g = crate::graph::skeleton(state, &ctx, filter);
    g.attach(reports, filter);
    let back = convert::graph_from_proto(&convert::graph_to_proto(&g));
    let _ = back.render_tree(crate::graph::Palette::Plain);
    let _ = back.to_dot();
    let _ = crate::graph::svg::render(&back);
}

/// A request of the peer API (`mode.v1.Peer`) that a server or agent-only node sends: the
/// first byte picks the RPC, the rest is its message. Decoded and checked as the server does,
/// and what it would commit applied to the small state.
pub fn peer_request(data: &[u8]) {
    let Some((&rpc, body)) = data.split_first() else {
        return;
    };
    let mut follower = Follower::new(small_state());
    match rpc % 16 {
        0..=3 => {
            if let Ok(r) = pb::RaftRequest::decode(body) {
                let _ = follower.take_request(rpc, &r);
            }
        }
        4 => {
            let Ok(r) = pb::ProposeRequest::decode(body) else {
                return;
            };
            if let Ok(command) = crate::api::command_from_json(&r.command_json) {
                commit(&mut follower, [command]);
            }
        }
        5 => {
            let Ok(r) = pb::RegisterRequest::decode(body) else {
                return;
            };
            if let Ok(command) = crate::api::register_command(r) {
                commit(&mut follower, [command]);
            }
        }
        6 => {
            let Ok(r) = pb::ReportInstancesRequest::decode(body) else {
                return;
            };
            if let Ok(command) = crate::api::reports_command(&r) {
                commit(&mut follower, [command]);
            }
        }
        7 => {
            if let Ok(r) = pb::QueryRequest::decode(body) {
                if let Ok(v) = follower.state().query(&r.query) {
                    let _ = v.to_string();
                }
            }
        }
        8 => {
            let Ok(r) = pb::JoinRequest::decode(body) else {
                return;
            };
            let _ = crate::replication::check_address("the node's peer address", &r.address);
        }
        9 => {
            let Ok(r) = pb::NodeBeaconRequest::decode(body) else {
                return;
            };
            let filter = GraphFilter::from_request(r.service, 0, r.daemon);
            graph(follower.state(), &filter, BTreeMap::new());
        }
        10 => drop(pb::HeartbeatRequest::decode(body)),
        11 => drop(pb::RelayHeartbeatsRequest::decode(body)),
        12 => drop(pb::WatchPlacementsRequest::decode(body)),
        13 => drop(pb::RemoveNodeRequest::decode(body)),
        14 => {
            let Ok(r) = pb::InstanceLogsRequest::decode(body) else {
                return;
            };
            // As the node asked reads its own output (empty here).
            if let Ok(ask) = crate::api::LogAsk::new(r.previous, r.follow, r.tail, r.since_ms) {
                let log = crate::agent::output::OutputLog::default();
                let _ = crate::api::kept_logs(&log, 1, &r.service, &r.slots, ask);
            }
        }
        _ => drop(pb::ClusterStatusRequest::decode(body)),
    }
    follower.send_views();
}

/// An answer a node decodes from another: the first byte picks which, the rest is the
/// message. An agent's placements update, a node's beacon (merged into the graph and drawn),
/// a forwarded write's or read's answer, a member's status, a Raft answer.
pub fn peer_reply(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            if let Ok(u) = pb::PlacementsUpdate::decode(body) {
                let view = crate::agent::view_from_proto(&u);
                let _ = crate::agent::view_to_proto(&view, 1);
            }
        }
        1 => {
            let Ok(r) = pb::NodeBeaconReply::decode(body) else {
                return;
            };
            let _ = crate::api::report_from_reply::<crate::graph::RawTree>(&r, r.node, "peer");
            let report = crate::api::report_from_reply(&r, r.node, "peer");
            let filter = GraphFilter::from_request(String::new(), 0, true);
            graph(&small_state(), &filter, BTreeMap::from([(r.node, report)]));
        }
        2 => {
            // As a forwarding node decodes them (`replication::forward`).
            if let Ok(r) = pb::ProposeReply::decode(body) {
                let _ =
                    serde_json::from_str::<crate::model::state::CommandResult>(&r.response_json);
            }
        }
        3 => {
            if let Ok(r) = pb::QueryReply::decode(body) {
                let _ = serde_json::from_str::<serde_json::Value>(&r.result_json);
            }
        }
        4 => {
            if let Ok(r) = pb::ClusterStatusReply::decode(body) {
                let _ = crate::replication::status_from_proto(r);
            }
        }
        // A line of another node's instance output, relayed as it came.
        9 => drop(pb::LogLine::decode(body)),
        _ => {
            if let Ok(r) = pb::RaftReply::decode(body) {
                let _ = crate::replication::fuzz::take_reply(which, &r);
            }
        }
    }
}

/// Raft messages as a follower receives them, one per line: a byte picking the RPC (0 vote,
/// 1 append entries, 2 install snapshot, 3 pre-vote), then its JSON payload. Entries are
/// applied as if committed; snapshot chunks are received and installed.
pub fn raft_message(data: &[u8]) {
    let mut follower = Follower::new(small_state());
    for line in data.split(|b| *b == b'\n') {
        let Some((&method, payload)) = line.split_first() else {
            continue;
        };
        let req = pb::RaftRequest {
            protocol: mode_proto::PROTOCOL_VERSION,
            from: 2,
            payload: payload.to_vec(),
            incarnation: 12,
            to: 1,
            to_incarnation: 11,
        };
        let _ = follower.take_request(method, &req);
    }
    follower.send_views();
}

/// `Propose` commands (`command_json`), one per line, committed one after another on the
/// small state.
pub fn command(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut follower = Follower::new(small_state());
    let commands = text
        .lines()
        .filter_map(|line| crate::api::command_from_json(line).ok());
    commit(&mut follower, commands);
    follower.send_views();
}

/// A snapshot's data, as a follower installs it or a server reads it back at start; then the
/// reads the servers serve from it and the scheduler's plan over it.
pub fn snapshot(data: &[u8]) {
    let Some(state) = crate::replication::fuzz::snapshot(data) else {
        return;
    };
    read_services(&state, state.specs.keys().take(16));
    let _ = convert::kinds_to_proto(&state);
    let _ = convert::instances_per_node(&state);
    for query in ["nodes", "specs", "placements", "events", "all"] {
        let _ = state.query(query).map(|v| v.to_string());
    }
    let filter = GraphFilter::from_request(String::new(), 0, false);
    graph(&state, &filter, BTreeMap::new());
    let _ = state.plan_placements(&[]);
    // And the state machine goes on from it.
    let mut follower = Follower::new(state);
    commit(&mut follower, small_state_commands());
    follower.send_views();
}

/// Values as read back from the data directory, one per line: a byte picking what (0 a log
/// entry, applied as at start; 1 the vote; 2 the committed log id; 3 the purged log id; 4 a
/// snapshot's metadata), then its stored bytes.
pub fn stored_log(data: &[u8]) {
    let mut follower = Follower::new(small_state());
    for line in data.split(|b| *b == b'\n') {
        if let Some((&what, bytes)) = line.split_first() {
            let _ = crate::replication::fuzz::stored(what, bytes, &mut follower);
        }
    }
    follower.send_views();
}

// ---------------------------------------------------------------- seeds

/// The YAML examples of the README and of the spec module's docs, and a few more specs.
fn seed_spec_texts() -> Vec<String> {
    let docs = [
        include_str!("../../README.md").to_string(),
        include_str!("model/spec.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n"),
    ];
    let mut texts: Vec<String> = docs
        .iter()
        .flat_map(|doc| doc.split("```yaml\n").skip(1))
        .filter_map(|block| block.split_once("```").map(|(yaml, _)| yaml.to_string()))
        .collect();
    texts.extend(
        [
            "name: web\nkind: ticker\nconfig: {every_ms: 100}\nreplicas: 2\n",
            "- {name: db, kind: counter, singleton: true}\n- {name: web, kind: webapp, depends_on: [db], health: {tcp: {port: 8080}, port_plus_slot: true}}\n",
            "name: a\nkind: exec\nconfig: {command: /bin/true}\n---\nname: b\nkind: crasher\nrestart: {max_restarts: 1, within_s: 5}\nupdate: {max_unavailable: \"25%\", auto_revert: true}\n",
            r#"{"name": "job", "kind": "exec", "config": {"command": "/bin/sh", "args": ["-c", "exit 0"], "env": {"A": "1"}}, "health": {"command": ["/bin/test", "-f", "/tmp/ok"]}, "constraints": [{"label": "zone", "equals": "a"}], "anti_affinity": ["db"], "cost": 3, "stop_grace_s": 30}"#,
            r#"[{"name": "x", "kind": "ticker", "replicas": 0}, {"name": "y", "kind": "counter", "replicas": 50000, "spread": "zone"}]"#,
        ]
        .map(String::from),
    );
    texts
}

/// The commands of the seeds: the small state's, then one of each other kind.
fn seed_commands() -> Vec<Command> {
    let mut commands = small_state_commands();
    let more = serde_json::json!([
        {"op": "put_spec", "spec": {"name": "cron", "kind": "ticker", "replicas": 1}},
        {"op": "scale_spec", "name": "web", "replicas": 5, "expected_generation": 2},
        {"op": "roll_instances", "service": "web", "generation": 2, "slots": [0, 1]},
        {"op": "note_unplaced", "service": "web", "generation": 2, "unplaced": "no node with zone=c"},
        {"op": "finish_rollout", "service": "web", "generation": 2, "failed": "deadline passed"},
        {"op": "rollback_spec", "name": "web", "to_generation": 1, "revert_of": 2, "reason": "failed"},
        {"op": "restart_instance", "service": "web", "slot": 1},
        {"op": "place", "assign": [{"service": "web", "slot": 1, "node": 1, "moving_from": 2}],
         "unassign": [{"service": "batch", "slot": 0, "node": 2}]},
        {"op": "release_move", "service": "web", "slot": 1, "node": 2},
        {"op": "finish_move", "service": "web", "slot": 1},
        {"op": "report_instances", "node": 2, "incarnation": 12, "reports": [
            {"service": "web", "slot": 1, "state": "stopped", "move": "release"},
            {"service": "web", "slot": 1, "state": "running", "move": "finish", "healthy": false}]},
        {"op": "delete_spec", "name": "db", "force": true},
        {"op": "purge_spec", "name": "db"},
        {"op": "set_node_status", "id": 3, "status": "down"},
        {"op": "remove_node", "id": 3}
    ]);
    commands
        .extend(serde_json::from_value::<Vec<Command>>(more).expect("the seed commands are valid"));
    commands
}

fn encode(rpc: u8, message: &impl Message) -> Vec<u8> {
    let mut out = vec![rpc];
    out.extend(message.encode_to_vec());
    out
}

fn lines(items: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
    items.into_iter().collect::<Vec<_>>().join(&b'\n')
}

/// Valid inputs for every target, by target: the seeds of the corpora (`fuzz/corpus/`,
/// written by the ignored test `write_seeds`; the fuzzer grows the corpora from them).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::replication::fuzz as raft;
    let state = small_state();
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let texts = seed_spec_texts();
    for text in &texts {
        out.push(("spec_text", text.clone().into_bytes()));
    }

    // Control requests.
    let typed: Vec<pb::ServiceSpec> = state.specs.values().map(convert::spec_to_proto).collect();
    let control = [
        encode(
            0,
            &pb::ApplyServicesRequest {
                specs: typed.clone(),
                // One entry: a map's order on the wire changes from run to run.
                expected_generations: [("web".to_string(), 2)].into(),
                dry_run: true,
                ..Default::default()
            },
        ),
        encode(
            0,
            &pb::ApplyServicesRequest {
                text: texts[texts.len() - 3].clone(),
                file: "svc.yaml".into(),
                request_id: "r1".into(),
                ..Default::default()
            },
        ),
        encode(
            1,
            &pb::ScaleServiceRequest {
                name: "web".into(),
                replicas: 5,
                expected_generation: 2,
                ..Default::default()
            },
        ),
        encode(
            2,
            &pb::DeleteServiceRequest {
                name: "db".into(),
                force: true,
                ..Default::default()
            },
        ),
        encode(
            3,
            &pb::RestartServiceRequest {
                name: "web".into(),
                slot: Some(1),
                ..Default::default()
            },
        ),
        encode(
            4,
            &pb::RollbackServiceRequest {
                name: "web".into(),
                to_generation: 1,
                ..Default::default()
            },
        ),
        encode(
            5,
            &pb::DrainNodeRequest {
                id: 1,
                force: false,
                ..Default::default()
            },
        ),
        encode(
            6,
            &pb::UndrainNodeRequest {
                id: 2,
                ..Default::default()
            },
        ),
        encode(7, &pb::RemoveNodeRequest { id: 3, force: true }),
        encode(
            8,
            &pb::GetServiceRequest {
                name: "web".into(),
                stale: true,
            },
        ),
        encode(9, &pb::WatchServiceRequest { name: "db".into() }),
        encode(
            10,
            &pb::GraphRequest {
                service: "web".into(),
                node: 1,
                daemon: true,
                deadline_ms: 500,
            },
        ),
        encode(
            11,
            &pb::ListEventsRequest {
                service: "web".into(),
                tail: 10,
                stale: false,
            },
        ),
        encode(
            12,
            &pb::WatchEventsRequest {
                after_seq: 3,
                service: "web".into(),
                only_new: false,
            },
        ),
        encode(
            18,
            &pb::LogsRequest {
                service: "batch".into(),
                slot: Some(0),
                tail: 100,
                since_ms: NOW_MS,
                ..Default::default()
            },
        ),
    ];
    out.extend(control.into_iter().map(|c| ("control_request", c)));

    // Peer requests.
    let commands = seed_commands();
    let batches: Vec<Vec<Proposal>> = commands
        .chunks(4)
        .map(|c| c.iter().cloned().map(proposal).collect())
        .collect();
    for (rpc, payload) in raft::seed_requests(batches.clone(), &state) {
        let r = pb::RaftRequest {
            protocol: mode_proto::PROTOCOL_VERSION,
            from: 2,
            payload,
            incarnation: 12,
            to: 1,
            to_incarnation: 11,
        };
        out.push(("peer_request", encode(rpc, &r)));
    }
    for c in commands.iter().skip(3).step_by(3) {
        let r = pb::ProposeRequest {
            command_json: serde_json::to_string(c).expect("commands encode"),
            request_id: "p1".into(),
            by: String::new(),
        };
        out.push(("peer_request", encode(4, &r)));
    }
    let peer = [
        encode(
            5,
            &pb::RegisterRequest {
                node: 4,
                address: "10.0.0.4:7071".into(),
                labels: [("zone".to_string(), "c".to_string())].into(),
                capacity: 16,
                kinds: vec!["exec".into(), "ticker".into()],
                incarnation: 14,
                heartbeat_grace_ms: 3000,
                role: "agent".into(),
                ..Default::default()
            },
        ),
        encode(
            6,
            &pb::ReportInstancesRequest {
                node: 2,
                incarnation: 12,
                reports: vec![
                    pb::InstanceReport {
                        service: "web".into(),
                        slot: 1,
                        state: "running".into(),
                        health: "healthy".into(),
                        epoch: 5,
                        ..Default::default()
                    },
                    pb::InstanceReport {
                        service: "batch".into(),
                        slot: 0,
                        state: "crashed".into(),
                        restart_count: 1,
                        last_crash: "exit status 2".into(),
                        r#move: "release".into(),
                        ..Default::default()
                    },
                ],
            },
        ),
        encode(
            7,
            &pb::QueryRequest {
                query: "drain:2".into(),
                stale: true,
            },
        ),
        encode(
            8,
            &pb::JoinRequest {
                id: 4,
                address: "10.0.0.4:7071".into(),
                incarnation: 14,
                rejoin: false,
            },
        ),
        encode(
            9,
            &pb::NodeBeaconRequest {
                service: "web".into(),
                daemon: true,
            },
        ),
        encode(
            10,
            &pb::HeartbeatRequest {
                node: 2,
                incarnation: 12,
                leaving: true,
            },
        ),
        encode(
            12,
            &pb::WatchPlacementsRequest {
                node: 3,
                incarnation: 13,
                after_index: 7,
            },
        ),
        encode(
            14,
            &pb::InstanceLogsRequest {
                node: 2,
                service: "batch".into(),
                slots: vec![0, 1],
                follow: true,
                tail: 10,
                ..Default::default()
            },
        ),
    ];
    out.extend(peer.into_iter().map(|p| ("peer_request", p)));

    // Answers from peers.
    let placements = Follower::new(state.clone()).view(1);
    out.push(("peer_reply", encode(0, &placements)));
    let report = serde_json::json!({
        "node": 1,
        "instances": [{"service": "web", "slot": 0, "state": "running", "restart_count": 1,
            "last_crash": "exit 1",
            "tree": {"kind": "supervisor", "label": "web#0", "state": "running", "restart_count": 0,
                "uptime_s": 12.5, "children": [
                    {"kind": "service", "label": "ticker", "state": "running", "restart_count": 1,
                     "crash_reason": null, "uptime_s": 3.0, "detail": "every 100 ms", "children": []}]}}],
        "daemon": {"kind": "worker", "label": "mode-node", "state": "running", "restart_count": 0,
            "uptime_s": 60.0, "children": []}
    });
    out.push((
        "peer_reply",
        encode(
            1,
            &pb::NodeBeaconReply {
                node: 1,
                report_json: serde_json::to_vec(&report).expect("json"),
            },
        ),
    ));
    let result = state.clone().apply(&proposal(commands[12].clone()));
    out.push((
        "peer_reply",
        encode(
            2,
            &pb::ProposeReply {
                response_json: serde_json::to_string(&result).expect("json"),
                log_index: 12,
                leader: 1,
            },
        ),
    ));
    out.push((
        "peer_reply",
        encode(
            3,
            &pb::QueryReply {
                result_json: state.query("spec:web").expect("web").to_string(),
                applied_index: 12,
                answered_by: 1,
            },
        ),
    ));
    out.push((
        "peer_reply",
        encode(
            4,
            &pb::ClusterStatusReply {
                answered_by: 1,
                has_leader: true,
                leader: 1,
                term: 2,
                ..Default::default()
            },
        ),
    ));
    for (rpc, reply) in raft::seed_replies() {
        // `peer_reply` numbers the Raft RPCs from 5.
        out.push(("peer_reply", encode(5 + rpc, &reply)));
    }
    out.push((
        "peer_reply",
        encode(
            9,
            &pb::LogLine {
                service: "batch".into(),
                slot: 0,
                node: 2,
                time_ms: NOW_MS,
                stream: "stderr".into(),
                text: "\u{1b}[31mfailed\u{1b}[0m".into(),
                run: 2,
            },
        ),
    ));

    // Raft messages, all in one input and one of each kind alone.
    let requests = raft::seed_requests(batches.clone(), &state);
    let line = |(rpc, payload): &(u8, Vec<u8>)| {
        let mut l = vec![*rpc];
        l.extend(payload);
        l
    };
    out.push(("raft_message", lines(requests.iter().map(line))));
    out.extend(requests.iter().take(4).map(|r| ("raft_message", line(r))));

    // Commands, all in one input and one by one.
    let json: Vec<Vec<u8>> = commands
        .iter()
        .map(|c| serde_json::to_vec(c).expect("commands encode"))
        .collect();
    out.push(("command", lines(json.clone())));
    out.extend(json.into_iter().skip(4).map(|c| ("command", c)));

    // Snapshots: the small state, and one where more happened.
    out.push(("snapshot", serde_json::to_vec(&state).expect("json")));
    let mut later = Follower::new(state.clone());
    commit(&mut later, commands.iter().skip(10).cloned());
    out.push(("snapshot", serde_json::to_vec(later.state()).expect("json")));

    // The data directory.
    let stored = raft::seed_stored(batches);
    out.push(("stored_log", lines(stored.iter().map(line))));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus_dir(target: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target)
    }

    /// Every input the fuzzers kept (and the seeds) runs through its entry point again: a
    /// regression shows here without the fuzzer.
    #[test]
    fn every_corpus_input_replays_without_a_panic() {
        for (target, run) in TARGETS {
            let dir = corpus_dir(target);
            let files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.expect("a corpus entry").path())
                .collect();
            assert!(!files.is_empty(), "{} is empty", dir.display());
            for file in files {
                let data = std::fs::read(&file).expect("a corpus file");
                let replayed = std::panic::catch_unwind(|| run(&data));
                assert!(replayed.is_ok(), "{} panicked", file.display());
            }
        }
        for (target, data) in seeds() {
            let run = TARGETS
                .iter()
                .find(|(t, _)| *t == target)
                .expect("a target")
                .1;
            run(&data);
        }
    }

    /// The seeds are inputs the node accepts (else they would teach the fuzzer little).
    #[test]
    fn the_seeds_are_accepted() {
        let seeds = seeds();
        for (target, _) in TARGETS {
            assert!(
                seeds.iter().any(|(t, _)| t == target),
                "no seed for {target}"
            );
        }
        let texts = seed_spec_texts();
        let ok = texts
            .iter()
            .filter(|t| {
                crate::api::checked_specs("t.yaml", Vec::new(), t.to_string(), kinds()).is_ok()
            })
            .count();
        assert!(
            ok >= texts.len() - 2,
            "{ok} of {} spec texts pass",
            texts.len()
        );
        let mut follower = Follower::new(small_state());
        for c in seed_commands() {
            follower.apply_proposals(vec![proposal(c)]);
        }
        assert!(
            !follower.state().specs.contains_key("db"),
            "the seed commands applied"
        );
        use crate::replication::fuzz as raft;
        let batches = vec![seed_commands().into_iter().map(proposal).collect()];
        let mut follower = Follower::new(small_state());
        for (rpc, payload) in raft::seed_requests(batches.clone(), &small_state()) {
            let r = pb::RaftRequest {
                protocol: mode_proto::PROTOCOL_VERSION,
                payload,
                ..Default::default()
            };
            assert!(follower.take_request(rpc, &r), "Raft message {rpc}");
        }
        for (rpc, reply) in raft::seed_replies() {
            assert!(raft::take_reply(rpc, &reply), "Raft answer {rpc}");
        }
        for (what, bytes) in raft::seed_stored(batches) {
            assert!(raft::stored(what, &bytes, &mut follower), "stored {what}");
        }
    }

    /// Write the seeds into `fuzz/corpus/<target>/seed-<n>` and the words of their JSON
    /// into `fuzz/mode.dict` (run by hand, then minimize the corpora with `cargo fuzz cmin`;
    /// see the README).
    #[test]
    #[ignore]
    fn write_seeds() {
        let mut n: BTreeMap<&str, usize> = BTreeMap::new();
        let mut words = std::collections::BTreeSet::new();
        for (target, data) in seeds() {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).expect("the corpus directory");
            let i = n.entry(target).or_default();
            std::fs::write(dir.join(format!("seed-{i:02}")), &data).expect("a seed");
            *i += 1;
            for line in data.split(|b| *b == b'\n') {
                // A Raft message or stored value after the byte that picks its kind.
                for json in [line, line.get(1..).unwrap_or_default()] {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) {
                        json_words(&v, &mut words);
                    }
                }
            }
        }
        // libFuzzer's dictionary format: a quoted word a line, escaping only `\`, `"` and
        // (as \xHH) bytes that are not printable ASCII.
        let quote = |w: &String| {
            let escaped: String = w
                .bytes()
                .map(|b| match b {
                    b'\\' | b'"' => format!("\\{}", b as char),
                    b' '..=b'~' => (b as char).to_string(),
                    _ => format!("\\x{b:02x}"),
                })
                .collect();
            format!("\"{escaped}\"\n")
        };
        let dict: String = words.iter().map(quote).collect();
        std::fs::write(corpus_dir("../mode.dict"), dict).expect("the dictionary");
    }

    /// The keys of `v`'s objects with their colon (quoted as in JSON and bare as in YAML),
    /// and its short strings, quoted.
    fn json_words(v: &serde_json::Value, words: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::String(s) if s.len() <= 24 => {
                words.insert(format!("\"{s}\""));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| json_words(x, words)),
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    words.insert(format!("\"{k}\":"));
                    words.insert(format!("{k}: "));
                    json_words(x, words);
                }
            }
            _ => {}
        }
    }
}
