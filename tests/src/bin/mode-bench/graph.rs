//! `graph`: the combined beacon graph of 3 nodes running 10,000 instances, end to end through
//! `modectl graph -o json` (a process per sample: connect, fan-out, merge, JSON, print).

use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use serde_json::{json, Value};

use mode_tests::TestCluster;

use super::cluster::{bench_cluster, median, percentile};

/// The target for the median.
const TARGET_P50_MS: f64 = 150.0;

/// The demo kinds the instances run: each instance is a small tree (its supervisor, the
/// kind's service, a timer and the supervisor's task).
const KINDS: [&str; 2] = ["ticker", "counter"];

/// The instances of the `i`th kind (the first takes the remainder).
fn share(instances: u32, i: usize) -> u32 {
    let kinds = KINDS.len() as u32;
    let each = instances / kinds;
    if i == 0 {
        instances - each * (kinds - 1)
    } else {
        each
    }
}

/// Wait for a leader and 3 registered nodes, then run `instances` quiet instances of the
/// [`KINDS`] on `cluster`, waiting until all run; the leader's id.
pub async fn load(cluster: &TestCluster, instances: u32) -> anyhow::Result<u64> {
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    cluster.wait_registered(3).await;
    let t0 = Instant::now();
    for (i, kind) in KINDS.iter().enumerate() {
        let n = share(instances, i);
        // Slow timers: the cluster stays quiet while it is measured.
        cluster
            .apply(
                leader,
                &format!(
                    "name: load-{kind}\nkind: {kind}\nconfig: {{every_ms: 10000}}\nreplicas: {n}\n"
                ),
            )
            .await?;
    }
    for (i, kind) in KINDS.iter().enumerate() {
        let n = share(instances, i) as usize;
        cluster
            .wait_instances(
                leader,
                &format!("load-{kind}"),
                Duration::from_secs(300),
                |p| p.len() == n && p.values().all(|p| p["state"] == "running"),
            )
            .await;
    }
    println!(
        "{instances} instances running on 3 nodes after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(leader)
}

pub fn graph_suite(instances: u32, samples: usize) -> anyhow::Result<Value> {
    let modectl = std::env::current_exe()?.with_file_name("modectl");
    anyhow::ensure!(
        modectl.exists(),
        "{} is missing: build it in the same profile (cargo build --release --bins)",
        modectl.display()
    );
    let rt = tokio::runtime::Runtime::new()?;
    let capacity = instances.to_string();
    let cluster = bench_cluster(&["--capacity", &capacity])?;
    let (reply_bytes, report_bytes, rpc_p50, beacon_p50) = rt.block_on(async {
        let leader = load(&cluster, instances).await?;
        // Bytes on the wire: the merged graph, and each node's own report.
        let mut c = cluster
            .client(leader)
            .await
            .max_decoding_message_size(1 << 30);
        let graph =
            prost::Message::encoded_len(&c.graph(pb::GraphRequest::default()).await?.into_inner());
        let mut reports = 0;
        for id in 1..=3 {
            let mut c = cluster.peer_client(id).max_decoding_message_size(1 << 30);
            reports += c
                .node_beacon(pb::NodeBeaconRequest::default())
                .await?
                .into_inner()
                .report_json
                .len();
        }
        // Where the time goes: the Graph call alone (fan-out, merge, JSON), and one node's
        // own report.
        let mut c = cluster.client(1).await.max_decoding_message_size(1 << 30);
        let mut peer = cluster.peer_client(1).max_decoding_message_size(1 << 30);
        let mut rpc = Vec::new();
        let mut beacon = Vec::new();
        for _ in 0..samples.min(20) {
            let t = Instant::now();
            c.graph(pb::GraphRequest::default()).await?;
            rpc.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            peer.node_beacon(pb::NodeBeaconRequest::default()).await?;
            beacon.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok::<_, anyhow::Error>((graph, reports, median(&rpc), median(&beacon)))
    })?;
    let endpoint = cluster.nodes[&1].address();
    let mut times = Vec::with_capacity(samples);
    let mut printed = 0;
    // One warm-up, then the samples.
    for i in 0..=samples {
        let t = Instant::now();
        let out = std::process::Command::new(&modectl)
            .args(["--endpoint", &endpoint, "graph", "-o", "json"])
            .output()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(
            out.status.success(),
            "modectl graph failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i == 0 {
            // A real answer: every node reachable, every instance with its tree.
            let g: Value = serde_json::from_slice(&out.stdout)?;
            let nodes = g["nodes"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(
                nodes.len() == 3 && nodes.iter().all(|n| n["reachable"] == true),
                "not every node answered: {:?}",
                nodes.iter().map(|n| &n["error"]).collect::<Vec<_>>()
            );
            let with_tree: usize = nodes
                .iter()
                .flat_map(|n| n["instances"].as_array().cloned().unwrap_or_default())
                .filter(|i| i["tree"].is_object())
                .count();
            anyhow::ensure!(
                with_tree == instances as usize,
                "the graph shows {with_tree} instances with their trees"
            );
            printed = out.stdout.len();
            continue;
        }
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    let p50 = median(&times);
    let p99 = percentile(&times, 0.99);
    println!(
        "graph: modectl graph -o json, {instances} instances on 3 nodes, {samples} runs: p50 {p50:.1} ms, p99 {p99:.1} ms (target p50 < {TARGET_P50_MS} ms)"
    );
    println!(
        "graph: of which the Graph call p50 {rpc_p50:.1} ms, one node's NodeBeacon p50 {beacon_p50:.1} ms"
    );
    println!(
        "graph: bytes on the wire: merged graph {reply_bytes} B ({:.0} B/instance), node reports {report_bytes} B in all; printed JSON {printed} B",
        reply_bytes as f64 / f64::from(instances)
    );
    Ok(json!({
        "instances": instances,
        "graph_p50_ms": p50,
        "graph_p99_ms": p99,
        "graph_rpc_p50_ms": rpc_p50,
        "node_beacon_p50_ms": beacon_p50,
        "bytes": reply_bytes,
        "node_report_bytes": report_bytes,
        "printed_bytes": printed,
        "samples": samples,
        "meets_target": p50 < TARGET_P50_MS,
    }))
}
