//! `raft`, `orchestration`, `failover` and `reschedule`: three nodes as separate processes on
//! loopback, durable storage.

use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_tests::{put_spec, Launcher, TestCluster};
use serde_json::{json, Value};

/// etcd 3.4 on the same machine (bench/peers/RESULTS.md, quiet run 2).
const ETCD_P50_MS: f64 = 1.84;
const ETCD_128_WRITES_PER_S: f64 = 3724.0;
const ETCD_FAILOVER_S: f64 = 1.245;

fn launcher() -> anyhow::Result<Launcher> {
    Ok(Launcher {
        program: std::env::current_exe()?,
        prefix: vec!["__node".into()],
        env: Vec::new(),
    })
}

/// Three nodes of this very build (`mode-bench __node`), quiet, with `extra` flags.
pub fn bench_cluster(extra: &[&str]) -> anyhow::Result<TestCluster> {
    let mut args = vec!["--log-level", "warn"];
    args.extend_from_slice(extra);
    Ok(TestCluster::start_with(launcher()?, 3, &args))
}

/// The median of unsorted samples.
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    percentile(&sorted, 0.5)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One Raft write that schedules nothing: a ~256-byte event (the control loop plans only when
/// specs, nodes or placements change, and events change none of them).
fn event_write(writer: usize, i: usize) -> pb::ProposeRequest {
    pb::ProposeRequest {
        command_json: json!({
            "op": "record_event",
            "kind": "bench",
            "message": format!("writer {writer} write {i} {}", "x".repeat(200)),
        })
        .to_string(),
        ..Default::default()
    }
}

/// Run `inflight` concurrent writers of [`event_write`]s against `address` (a peer address:
/// raw `Propose`, Raft replication alone) for `window`.
async fn load(address: &str, inflight: usize, window: Duration) -> anyhow::Result<Value> {
    let client = mode_tests::peer_client(address);
    let deadline = Instant::now() + window;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                c.propose(event_write(w, i)).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                i += 1;
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    Ok(json!({
        "writes": all.len(),
        "writes_per_s": all.len() as f64 / elapsed,
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
    }))
}

pub fn raft_suite(window_s: f64, endpoint: Option<&str>) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = match endpoint {
        Some(_) => None,
        None => Some(TestCluster::start_with(
            launcher()?,
            3,
            &["--log-level", "warn"],
        )),
    };
    let out = rt.block_on(async {
        let address = match (&cluster, endpoint) {
            (Some(c), _) => {
                let leader = c.wait_leader(Duration::from_secs(30)).await;
                c.nodes[&leader].peer_address()
            }
            (None, Some(e)) => e.to_string(),
            (None, None) => unreachable!("either a cluster or an endpoint"),
        };
        // Warm up connections and the log.
        load(&address, 8, Duration::from_millis(500)).await?;
        let window = Duration::from_secs_f64(window_s);
        let mut figures = serde_json::Map::new();
        for inflight in [1usize, 16, 128] {
            let v = load(&address, inflight, window).await?;
            figures.insert(format!("inflight_{inflight}"), v);
        }
        Ok::<_, anyhow::Error>(Value::Object(figures))
    })?;
    drop(cluster);
    println!("raft: 3 nodes (separate processes, loopback, fsync'd redb), writes of ~256 B events to the leader (they schedule nothing: Raft replication alone), {window_s} s per point");
    println!("  in flight        writes/s    p50 ms    p99 ms   etcd 3.4 same machine");
    for (k, etcd) in [
        ("inflight_1", format!("526/s, p50 {ETCD_P50_MS} ms")),
        ("inflight_16", "1356/s at 8, 2944/s at 32".to_string()),
        (
            "inflight_128",
            format!("{ETCD_128_WRITES_PER_S}/s, p50 33 ms"),
        ),
    ] {
        let v = &out[k];
        println!(
            "  {:<12} {:>12.0} {:>9.2} {:>9.2}   {etcd}",
            k.trim_start_matches("inflight_"),
            v["writes_per_s"].as_f64().unwrap_or(0.0),
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    let x = out["inflight_128"]["writes_per_s"].as_f64().unwrap_or(0.0) / ETCD_128_WRITES_PER_S;
    println!(
        "  targets: >= 3x etcd at 128 in flight ({x:.1}x), single-client p50 <= {ETCD_P50_MS} ms"
    );
    Ok(out)
}

/// The full path of a deploy: `count` one-instance `ticker` specs applied `inflight` at a time;
/// for each, from the write's start to its instance reported running (the leader commits the
/// spec, plans and commits the placement, the chosen node's agent starts the instance, and
/// its report is committed).
pub fn orchestration_suite(count: usize, inflight: usize) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    // Room for every instance.
    let capacity = (count / 2 + 100).to_string();
    let cluster = bench_cluster(&["--capacity", &capacity])?;
    let out = rt.block_on(async {
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        cluster.wait_registered(3).await;
        let address = cluster.nodes[&leader].peer_address();
        let t0 = Instant::now();
        let sent: std::sync::Arc<std::sync::Mutex<Vec<Option<Duration>>>> =
            std::sync::Arc::new(std::sync::Mutex::new(vec![None; count]));
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writers = Vec::new();
        for _ in 0..inflight {
            let (mut c, sent, next) = (mode_tests::peer_client(&address), sent.clone(), next.clone());
            writers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return Ok::<_, tonic::Status>(());
                    }
                    let at = t0.elapsed();
                    c.propose(pb::ProposeRequest {
                        command_json: json!({"op": "put_spec", "spec": {"name": format!("o{i}"), "kind": "ticker", "config": {"every_ms": 60000}}}).to_string(),
                        ..Default::default()
                    })
                    .await?;
                    sent.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(at);
                }
            }));
        }
        // Watch the placements on the leader until every instance runs.
        let mut running: Vec<Option<Duration>> = vec![None; count];
        let deadline = Instant::now() + Duration::from_secs(120);
        while running.iter().any(Option::is_none) {
            anyhow::ensure!(Instant::now() < deadline, "not every instance ran within 120 s");
            let p = cluster.read(leader, "placements", true).await?;
            let now = t0.elapsed();
            for (i, r) in running.iter_mut().enumerate() {
                if r.is_none() && p[format!("o{i}")]["0"]["state"] == "running" {
                    *r = Some(now);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let total = t0.elapsed().as_secs_f64();
        for w in writers {
            w.await??;
        }
        let sent = sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut lat: Vec<f64> = sent
            .iter()
            .zip(&running)
            .filter_map(|(s, r)| Some((r.as_ref()?.saturating_sub(*s.as_ref()?)).as_secs_f64() * 1000.0))
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        Ok::<_, anyhow::Error>(json!({
            "instances": count,
            "inflight": inflight,
            "p50_ms": percentile(&lat, 0.5),
            "p99_ms": percentile(&lat, 0.99),
            "deploys_per_s": count as f64 / total,
        }))
    })?;
    drop(cluster);
    println!(
        "orchestration: {count} one-instance specs, {inflight} applied at a time, write -> instance reported running: p50 {:.1} ms, p99 {:.1} ms, {:.0} deploys/s (placements polled every 5 ms)",
        out["p50_ms"].as_f64().unwrap_or(0.0),
        out["p99_ms"].as_f64().unwrap_or(0.0),
        out["deploys_per_s"].as_f64().unwrap_or(0.0)
    );
    Ok(out)
}

pub fn failover_suite(reps: usize) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut cluster = bench_cluster(&[])?;
    let samples = rt.block_on(async {
        let mut samples = Vec::new();
        for rep in 0..reps {
            let leader = cluster.wait_leader(Duration::from_secs(30)).await;
            let survivors: Vec<String> = cluster
                .nodes
                .values()
                .filter(|n| n.id != leader)
                .map(|n| n.peer_address())
                .collect();
            cluster.node(leader).kill9();
            let t0 = Instant::now();
            // A probe every 10 ms, alternating survivors, each with a 3 s timeout (like the
            // etcd script); the first success ends the measurement.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
            let mut probes = Vec::new();
            let mut i = 0usize;
            let took = loop {
                if let Ok(d) = rx.try_recv() {
                    break d;
                }
                let mut c = mode_tests::peer_client(&survivors[i % survivors.len()]);
                let tx = tx.clone();
                let name = format!("failover-{rep}-{i}");
                probes.push(tokio::spawn(async move {
                    let mut req = tonic::Request::new(pb::ProposeRequest {
                        command_json:
                            json!({"op": "put_spec", "spec": {"name": name, "kind": "ticker"}})
                                .to_string(),
                        ..Default::default()
                    });
                    req.set_timeout(Duration::from_secs(3));
                    if c.propose(req).await.is_ok() {
                        let _ = tx.send(t0.elapsed());
                    }
                }));
                i += 1;
                if t0.elapsed() > Duration::from_secs(30) {
                    anyhow::bail!("no write succeeded within 30 s of killing the leader");
                }
                tokio::select! {
                    d = rx.recv() => break d.unwrap_or_default(),
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            };
            for p in probes {
                p.abort();
            }
            println!(
                "  rep {}: killed node {leader}, write OK after {:.3} s",
                rep + 1,
                took.as_secs_f64()
            );
            samples.push(took.as_secs_f64());
            cluster.node(leader).start();
            // Wait until the restarted node is back in and caught up.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let l = cluster.wait_leader(Duration::from_secs(30)).await;
                if let Ok(s) = cluster.status(l, false).await {
                    if s.members
                        .iter()
                        .all(|m| m.reachable && m.lag >= 0 && m.lag < 5)
                    {
                        break;
                    }
                }
                anyhow::ensure!(Instant::now() < deadline, "node {leader} did not catch up");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = put_spec(
                &mut mode_tests::client(&cluster.nodes[&leader].address()),
                "settle",
            )
            .await;
        }
        Ok::<_, anyhow::Error>(samples)
    })?;
    let median = median(&samples);
    println!(
        "failover: kill -9 the leader -> first successful write, median of {reps}: {median:.3} s (etcd 3.4 defaults: {ETCD_FAILOVER_S} s; target < 0.6 s)"
    );
    Ok(json!({ "failover_s": median, "samples_s": samples }))
}

/// Kill -9 a node hosting 100 instances; time until every instance runs elsewhere.
pub fn reschedule_suite(reps: usize) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    // Room for the 300 instances on the two survivors.
    let mut cluster = bench_cluster(&["--capacity", "1000"])?;
    let samples = rt.block_on(async {
        let mut samples = Vec::new();
        for rep in 0..reps {
            let leader = cluster.wait_leader(Duration::from_secs(30)).await;
            // Wait until every node is registered (and back up after the previous round).
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let nodes = cluster.read(leader, "nodes", false).await?;
                let up = nodes.as_array().map_or(0, |a| a.iter().filter(|n| n["status"] == "up" && !n["kinds"].as_array().is_none_or(|k| k.is_empty())).count());
                if up == 3 {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "nodes did not come up: {nodes}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let name = format!("load{rep}");
            let results = cluster
                .apply(leader, &format!("name: {name}\nkind: counter\nconfig: {{every_ms: 1000}}\nreplicas: 300\n"))
                .await?;
            anyhow::ensure!(!results.changes.is_empty(), "apply stored nothing");
            let running_everywhere = |inst: &std::collections::BTreeMap<u64, Value>| {
                inst.len() == 300 && inst.values().all(|p| p["state"] == "running")
            };
            let inst = cluster.wait_instances(leader, &name, Duration::from_secs(60), running_everywhere).await;
            let victim = (1..=3).find(|id| *id != leader).unwrap_or(1);
            let hosted = inst.values().filter(|p| p["node"].as_u64() == Some(victim)).count();
            cluster.node(victim).kill9();
            let t0 = Instant::now();
            cluster
                .wait_instances(leader, &name, Duration::from_secs(60), |i| {
                    running_everywhere(i) && i.values().all(|p| p["node"].as_u64() != Some(victim))
                })
                .await;
            let took = t0.elapsed().as_secs_f64();
            println!("  rep {}: killed node {victim} hosting {hosted} instances; all 300 running elsewhere after {took:.2} s", rep + 1);
            samples.push(took);
            cluster.node(victim).start();
            let _ = cluster
                .write_command(leader, &json!({"op": "delete_spec", "name": name}).to_string())
                .await;
            cluster
                .wait_instances(leader, &name, Duration::from_secs(60), |i| i.is_empty())
                .await;
        }
        Ok::<_, anyhow::Error>(samples)
    })?;
    let median = median(&samples);
    println!(
        "reschedule: kill -9 a node hosting 100 instances -> all running elsewhere, median of {reps}: {median:.2} s (target < 3 s; Kubernetes defaults take ~6 min, Nomad 20-30 s)"
    );
    Ok(json!({ "reschedule_s": median, "samples_s": samples }))
}
