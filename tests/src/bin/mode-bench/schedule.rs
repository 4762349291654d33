//! `schedule`: the pure scheduler placing 100,000 instances on 1,000 nodes with constraints,
//! and the whole plan committed through Raft on a 3-node loopback cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mode::schedule::{plan, Constraint, NodeView, SpecView};
use serde_json::{json, Value};

/// Nomad's published C1M run placed 3,750 instances per second.
const NOMAD_PLACEMENTS_PER_S: f64 = 3750.0;

fn cluster_model(nodes: u64, services: u32, replicas: u32) -> (Vec<NodeView>, Vec<SpecView>) {
    let zones = ["a", "b", "c", "d", "e"];
    let nodes: Vec<NodeView> = (1..=nodes)
        .map(|id| NodeView {
            id,
            labels: BTreeMap::from([
                ("zone".to_string(), zones[(id % 5) as usize].to_string()),
                ("rack".to_string(), format!("r{}", id % 40)),
                (
                    "disk".to_string(),
                    if id % 3 == 0 { "ssd" } else { "hdd" }.to_string(),
                ),
            ]),
            capacity: 400,
            schedulable: true,
            kinds: None,
        })
        .collect();
    let specs: Vec<SpecView> = (0..services)
        .map(|i| {
            let mut constraints = Vec::new();
            if i % 2 == 0 {
                constraints.push(Constraint::In {
                    label: "zone".into(),
                    values: BTreeSet::from(["a".into(), "b".into(), "c".into()]),
                });
            }
            if i % 5 == 0 {
                constraints.push(Constraint::Equals {
                    label: "disk".into(),
                    value: "ssd".into(),
                });
            }
            SpecView {
                name: format!("svc-{i:04}"),
                kind: "ticker".into(),
                replicas,
                constraints,
                spread: (i % 3 == 0).then(|| "zone".to_string()),
                anti_affinity: if i % 7 == 0 {
                    BTreeSet::from([format!("svc-{:04}", (i + 1) % services)])
                } else {
                    BTreeSet::new()
                },
                cost: 1 + (i % 3) as u64,
            }
        })
        .collect();
    (nodes, specs)
}

pub fn schedule_suite(reps: usize) -> anyhow::Result<Value> {
    let (nodes, specs) = cluster_model(1000, 1000, 100);
    let mut times = Vec::new();
    let mut result = None;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let p = plan(&nodes, &specs, &[]);
        times.push(t0.elapsed().as_secs_f64());
        result = Some(p);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let p = result.expect("at least one run");
    let placed = p.assign.len();
    let placements_per_s = placed as f64 / median;
    println!("schedule: 100,000 instances (1,000 services x 100) on 1,000 nodes; half the services constrained to 3 of 5 zones, a fifth to ssd nodes, a third spread by zone, some anti-affine");
    println!("  plan: {placed} placed, {} unplaced in {:.1} ms (median of {}) = {placements_per_s:.0} placements/s (target > 100,000/s; Nomad C1M: {NOMAD_PLACEMENTS_PER_S}/s)", p.unplaced.len(), median * 1000.0, times.len());

    // Commit the whole plan through Raft, in chunks of 1,000 assignments, 4 chunks in flight.
    let rt = tokio::runtime::Runtime::new()?;
    // The control loop would act on these synthetic placements (their services and nodes do
    // not exist in this cluster), so it is off: this measures committing the plan.
    let cluster = super::cluster::bench_cluster(&["--no-control-loop"])?;
    let commit_s = rt.block_on(async {
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        let client = cluster.peer_client(leader);
        let chunks: Vec<Vec<Value>> = p
            .assign
            .chunks(1000)
            .map(|c| {
                c.iter()
                    .map(|a| json!({"service": a.service, "slot": a.slot, "node": a.node}))
                    .collect()
            })
            .collect();
        let t0 = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
        let mut tasks = Vec::new();
        for chunk in chunks {
            let mut c = client.clone();
            let permit = sem.clone().acquire_owned().await?;
            tasks.push(tokio::spawn(async move {
                let command = json!({"op": "place", "assign": chunk});
                let r = c
                    .propose(mode_proto::v1::ProposeRequest {
                        command_json: command.to_string(),
                        ..Default::default()
                    })
                    .await;
                drop(permit);
                r.map(|_| ())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let took = t0.elapsed().as_secs_f64();
        // Every node has every placement.
        for id in 1..=3 {
            let v = cluster.read(id, "placements", true).await?;
            let n: usize = v
                .as_object()
                .map(|o| {
                    o.values()
                        .map(|s| s.as_object().map_or(0, |s| s.len()))
                        .sum()
                })
                .unwrap_or(0);
            anyhow::ensure!(
                n == placed,
                "node {id} has {n} placements, expected {placed}"
            );
        }
        Ok::<_, anyhow::Error>(took)
    })?;
    println!("  commit: all {placed} placements through Raft on 3 nodes in {commit_s:.2} s (target < 10 s)");
    Ok(json!({
        "placements_per_s": placements_per_s,
        "plan_ms": median * 1000.0,
        "placed": placed,
        "unplaced": p.unplaced.len(),
        "commit_100k_s": commit_s,
    }))
}
