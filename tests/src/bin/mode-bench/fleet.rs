//! `fleet`: 3 server processes and N agent-only nodes, the agents run inside this process
//! (real agents: each its own gRPC connection to a server, its own lease and watchdog, real
//! framework instances of the demo kind `ticker`), S services x R replicas applied at once.
//! Measures the time until every instance is reported running in the replicated state, the
//! leader's CPU and memory, the Raft log per instance, and the leader's load with N idle agents.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mode::agent::{run_remote, EmbeddedAgent, KindRegistry, RemoteAgentConfig};
use mode_proto::v1 as pb;
use serde_json::{json, Value};

/// Agents' node ids start here (the servers are 1-3).
const FIRST_AGENT: u64 = 1000;

/// The servers' Raft heartbeat and minimum election timeout.
const RAFT_HEARTBEAT: &str = "100ms";
const ELECTION_TIMEOUT: &str = "1s";

/// How often a deploy in progress says how far it got (on stderr).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Clock ticks per second of /proc/<pid>/stat (Linux's USER_HZ).
const TICKS_PER_S: f64 = 100.0;

/// utime + stime of `pid`, in seconds.
fn cpu_s(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After "pid (comm)": state is field 0, utime 11, stime 12.
    let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    Ok((utime + stime) / TICKS_PER_S)
}

/// Resident memory of `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// CPU of the leader and of this process (the agents), in % of one core, over 10 s.
async fn idle_cpu(leader_pid: u32) -> anyhow::Result<(f64, f64)> {
    let me = std::process::id();
    let (l0, a0, w0) = (cpu_s(leader_pid)?, cpu_s(me)?, Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let s = w0.elapsed().as_secs_f64();
    Ok((
        (cpu_s(leader_pid)? - l0) / s * 100.0,
        (cpu_s(me)? - a0) / s * 100.0,
    ))
}

pub fn fleet_suite(
    agents: u64,
    services: u32,
    replicas: u32,
    grace: Duration,
) -> anyhow::Result<Value> {
    let instances = u64::from(services) * u64::from(replicas);
    let grace_flag = format!("{}ms", grace.as_millis());
    // A fleet this size shares 2 cores with its servers here: Raft's timings are set as an
    // operator sets them for a loaded machine (etcd's advice too), so that a server slowed
    // for a few hundred ms by the deploy is not voted out.
    let cluster = super::cluster::bench_cluster(&[
        "--heartbeat-grace",
        &grace_flag,
        "--heartbeat",
        RAFT_HEARTBEAT,
        "--election-timeout",
        ELECTION_TIMEOUT,
    ])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        let leader_pid = cluster.nodes[&leader]
            .pid()
            .ok_or_else(|| anyhow::anyhow!("the leader is not running"))?;
        // Agents talk to the followers (which relay their heartbeats in batches), half each;
        // the leader is their last resort.
        let followers: Vec<String> = (1..=3)
            .filter(|s| *s != leader)
            .map(|s| cluster.nodes[&s].peer_address())
            .collect();
        let capacity = (instances / agents.max(1)) * 2 + 10;
        println!(
            "fleet: 3 server processes, {agents} agent-only nodes in this process (real agents, each with its own gRPC connection to a server, instances of the demo kind `ticker`), {services} services x {replicas} replicas = {instances} instances, heartbeat grace {grace:?} (a heartbeat per agent every {:?})",
            grace / 6
        );
        let t0 = Instant::now();
        let mut fleet: Vec<EmbeddedAgent> = Vec::with_capacity(agents as usize);
        for i in 0..agents {
            let mut servers = vec![
                followers[(i as usize) % followers.len()].clone(),
                followers[(i as usize + 1) % followers.len()].clone(),
            ];
            servers.push(cluster.nodes[&leader].peer_address());
            let agent = run_remote(RemoteAgentConfig {
                id: FIRST_AGENT + i,
                servers,
                advertise: "127.0.0.1:1".into(),
                labels: BTreeMap::from([("pool".to_string(), "agents".to_string())]),
                capacity,
                kinds: KindRegistry::stock(),
                heartbeat_grace: grace,
            })
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
            fleet.push(agent);
        }
        // Every agent registered and up.
        let mut peer = cluster.peer_client(leader).max_decoding_message_size(1 << 30);
        loop {
            let nodes = peer
                .query(pb::QueryRequest {
                    query: "nodes".into(),
                    stale: true,
                })
                .await?
                .into_inner();
            let v: Value = serde_json::from_str(&nodes.result_json)?;
            let up = v.as_array().map_or(0, |ns| {
                ns.iter()
                    .filter(|n| n["role"] == "agent" && n["status"] == "up")
                    .count()
            });
            if up as u64 == agents {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(600),
                "only {up} of {agents} agents registered within 600 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let registered_s = t0.elapsed().as_secs_f64();
        println!("  {agents} agents registered and up in {registered_s:.1} s");

        // Idle: heartbeats only.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (idle_cpu_pct, idle_agents_cpu_pct) = idle_cpu(leader_pid).await?;
        let idle_agents_rss = rss_mib(std::process::id());
        println!(
            "  idle: the leader used {idle_cpu_pct:.1} % of one core over 10 s with {agents} agents heartbeating (target < 10 % with 5,000); the {agents} agents together {idle_agents_cpu_pct:.1} %, RSS {idle_agents_rss:.0} MiB ({:.0} KiB per agent)",
            idle_agents_rss * 1024.0 / agents.max(1) as f64
        );

        // Deploy.
        let status = cluster.status(leader, false).await?;
        let (log0, bytes0) = (
            status.last_log_index,
            dir_bytes(&cluster.nodes[&leader].data_dir),
        );
        let (cpu0, deploy0) = (cpu_s(leader_pid)?, Instant::now());
        let mut text = String::new();
        for s in 0..services {
            text.push_str(&format!(
                "---\nname: svc-{s:04}\nkind: ticker\nreplicas: {replicas}\nconfig: {{every_ms: 3600000}}\nconstraints: [{{label: pool, equals: agents}}]\n"
            ));
        }
        cluster
            .apply(leader, &text)
            .await
            .map_err(|e| anyhow::anyhow!("applying the services: {e}"))?;
        // Running on the agents, then reported so in the replicated state.
        let mut said = Instant::now();
        loop {
            let running: usize = fleet.iter().map(EmbeddedAgent::running_instances).sum();
            if running as u64 >= instances {
                break;
            }
            if said.elapsed() >= PROGRESS_EVERY {
                said = Instant::now();
                eprintln!(
                    "  {:.0} s: {running} of {instances} instances running on the agents",
                    deploy0.elapsed().as_secs_f64()
                );
            }
            anyhow::ensure!(
                deploy0.elapsed() < Duration::from_secs(900),
                "only {running} of {instances} instances run after 900 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let started_s = deploy0.elapsed().as_secs_f64();
        // Asked of a follower (stale reads), so that the polling costs the leader nothing.
        let follower = (1..=3).find(|s| *s != leader).unwrap_or(leader);
        let mut control = mode_tests::client(&cluster.nodes[&follower].address())
            .max_decoding_message_size(1 << 30);
        loop {
            let list = control
                .list_services(pb::ListServicesRequest {
                    stale: true,
                    summary: true,
                })
                .await?
                .into_inner();
            let running: u64 = list.services.iter().map(|s| u64::from(s.running)).sum();
            if running >= instances {
                break;
            }
            if said.elapsed() >= PROGRESS_EVERY {
                said = Instant::now();
                eprintln!(
                    "  {:.0} s: {running} of {instances} instances reported running",
                    deploy0.elapsed().as_secs_f64()
                );
            }
            anyhow::ensure!(
                deploy0.elapsed() < Duration::from_secs(900),
                "only {running} of {instances} instances reported running after 900 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let reported_s = deploy0.elapsed().as_secs_f64();
        // What listing the services costs a server at this size, with and without their
        // instances (`modectl svc ls` asks for the summary; `-o json` for everything).
        let list = |summary: bool| {
            let mut control = control.clone();
            async move {
                let t = Instant::now();
                let reply = control
                    .list_services(pb::ListServicesRequest {
                        stale: true,
                        summary,
                    })
                    .await?
                    .into_inner();
                anyhow::Ok((
                    t.elapsed().as_secs_f64() * 1000.0,
                    prost::Message::encoded_len(&reply),
                ))
            }
        };
        let (full_ms, full_bytes) = list(false).await?;
        let (summary_ms, summary_bytes) = list(true).await?;
        println!(
            "  listing the services from a follower: {full_ms:.0} ms and {full_bytes} bytes with every instance, {summary_ms:.0} ms and {summary_bytes} bytes as a summary"
        );
        let deploy_cpu_s = cpu_s(leader_pid)? - cpu0;
        let rss = rss_mib(leader_pid);
        let status = cluster.status(leader, false).await?;
        let entries = status.last_log_index.saturating_sub(log0);
        let bytes = dir_bytes(&cluster.nodes[&leader].data_dir).saturating_sub(bytes0);
        let placements_per_s = instances as f64 / reported_s;
        println!(
            "  deploy: all {instances} instances running on the agents after {started_s:.1} s, reported running in the replicated state after {reported_s:.1} s = {placements_per_s:.0} placements/s (target: 1,000,000 on 5,000 agents in < 60 s)"
        );
        println!(
            "  leader: {deploy_cpu_s:.1} CPU s during the deploy, RSS {rss:.0} MiB; Raft: {entries} entries ({:.4} per instance), data directory +{:.0} bytes per instance",
            entries as f64 / instances as f64,
            bytes as f64 / instances as f64
        );
        // Idle again, every instance running: heartbeats, and the agents' looks at their
        // instances.
        let (running_leader_cpu_pct, running_agents_cpu_pct) = idle_cpu(leader_pid).await?;
        let running_agents_rss = rss_mib(std::process::id());
        let bytes_per_instance =
            (running_agents_rss - idle_agents_rss) * 1024.0 * 1024.0 / instances.max(1) as f64;
        println!(
            "  idle with every instance running: the leader used {running_leader_cpu_pct:.1} % of one core over 10 s, the {agents} agents together {running_agents_cpu_pct:.1} %, RSS {running_agents_rss:.0} MiB (+{bytes_per_instance:.0} bytes per instance over the idle agents)"
        );
        // All at once: one by one, each agent that leaves hands its instances to the others.
        let mut stopping = tokio::task::JoinSet::new();
        for a in fleet {
            stopping.spawn(async move { a.stop().await });
        }
        while stopping.join_next().await.is_some() {}
        Ok(json!({
            "agents": agents,
            "services": services,
            "replicas": replicas,
            "instances": instances,
            "agents_in_process": true,
            "heartbeat_grace_ms": grace.as_millis() as u64,
            "instance_kind": "ticker",
            "registered_s": registered_s,
            "running_s": started_s,
            "reported_running_s": reported_s,
            "placements_per_s": placements_per_s,
            "leader_deploy_cpu_s": deploy_cpu_s,
            "leader_rss_mib": rss,
            "raft_entries": entries,
            "raft_entries_per_instance": entries as f64 / instances as f64,
            "data_dir_bytes_per_instance": bytes as f64 / instances as f64,
            "idle_leader_cpu_pct": idle_cpu_pct,
            "idle_agents_cpu_pct": idle_agents_cpu_pct,
            "running_idle_leader_cpu_pct": running_leader_cpu_pct,
            "running_idle_agents_cpu_pct": running_agents_cpu_pct,
            "idle_agents_rss_mib": idle_agents_rss,
            "running_agents_rss_mib": running_agents_rss,
            "agents_bytes_per_instance": bytes_per_instance,
            "list_services_ms": full_ms,
            "list_services_bytes": full_bytes,
            "list_services_summary_ms": summary_ms,
            "list_services_summary_bytes": summary_bytes,
        }))
    })
}
