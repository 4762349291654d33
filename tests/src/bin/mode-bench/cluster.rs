//! `raft`, `orchestration`, `failover` and `reschedule`: three nodes as separate processes on
//! loopback, durable storage.

use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_proto::v1::peer_client::PeerClient;
use mode_tests::{put_spec, Launcher, TestCluster};
use serde_json::{json, Value};
use tonic::transport::Channel;

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

/// Plaintext or mutual TLS between the nodes and for the bench's own clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    Plain,
    Tls,
}

impl Security {
    pub fn key(self) -> &'static str {
        match self {
            Security::Plain => "plaintext",
            Security::Tls => "mtls",
        }
    }
}

/// Three nodes of this very build (`mode-bench __node`), quiet, with `extra` flags.
pub fn bench_cluster(extra: &[&str]) -> anyhow::Result<TestCluster> {
    bench_cluster_as(Security::Plain, extra)
}

/// [`bench_cluster`] with an HTTP side port on every node (the web view).
pub fn bench_cluster_http(extra: &[&str]) -> anyhow::Result<TestCluster> {
    let mut args = vec!["--log-level", "warn"];
    args.extend_from_slice(extra);
    Ok(TestCluster::start_with_http_as(launcher()?, 3, &args))
}

/// [`bench_cluster`], with mutual TLS when `security` says so (a CA and node certificates in
/// the cluster's scratch directory; no HTTP side port, as in plaintext).
pub fn bench_cluster_as(security: Security, extra: &[&str]) -> anyhow::Result<TestCluster> {
    let mut args = vec!["--log-level", "warn"];
    args.extend_from_slice(extra);
    Ok(match security {
        Security::Plain => TestCluster::start_with(launcher()?, 3, &args),
        Security::Tls => TestCluster::start_tls_with(launcher()?, 3, &args, false),
    })
}

/// The machine's load averages (1, 5, 15 min) from /proc/loadavg; the machine is shared.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The median of unsorted samples (the mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    if n > 0 && n.is_multiple_of(2) {
        return (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0;
    }
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

/// Run `inflight` concurrent writers of [`event_write`]s through `client` (a leader's peer
/// API: raw `Propose`, Raft replication alone; one HTTP/2 connection) for `window`.
async fn load(
    client: &PeerClient<Channel>,
    inflight: usize,
    window: Duration,
) -> anyhow::Result<Value> {
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

const INFLIGHT: [usize; 3] = [1, 16, 128];

/// Warm up, then every in-flight level for `window` against `client`.
async fn load_levels(client: &PeerClient<Channel>, window: Duration) -> anyhow::Result<Value> {
    // Warm up connections and the log.
    load(client, 8, Duration::from_millis(500)).await?;
    let mut figures = serde_json::Map::new();
    for inflight in INFLIGHT {
        let v = load(client, inflight, window).await?;
        figures.insert(format!("inflight_{inflight}"), v);
    }
    Ok(Value::Object(figures))
}

/// One fresh three-node cluster (`security`): the writer connects to the leader's peer API
/// (under TLS presenting the leader's own node certificate: raw `Propose` is for members).
fn raft_round(
    rt: &tokio::runtime::Runtime,
    security: Security,
    window: Duration,
) -> anyhow::Result<Value> {
    let cluster = bench_cluster_as(security, &[])?;
    let out = rt.block_on(async {
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        let client = cluster.peer_client(leader);
        load_levels(&client, window).await
    });
    drop(cluster);
    out
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// `mode-bench raft`: plaintext and mutual-TLS clusters alternated (plaintext, mTLS, plaintext,
/// mTLS, ... `rounds` of each, a fresh cluster every time) so machine noise hits both; per
/// in-flight level the median over rounds of each, and the mTLS overhead in throughput.
/// With `endpoint`, only that existing cluster's leader (plaintext), as before.
pub fn raft_suite(window_s: f64, endpoint: Option<&str>, rounds: usize) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let window = Duration::from_secs_f64(window_s);
    if let Some(e) = endpoint {
        let out = rt.block_on(load_levels(&mode_tests::peer_client(e), window))?;
        println!("raft: existing cluster at {e}, {window_s} s per point");
        for k in INFLIGHT {
            let v = &out[format!("inflight_{k}")];
            println!(
                "  {k:<5} in flight: {:>8.0} writes/s  p50 {:.2} ms  p99 {:.2} ms",
                f(&v["writes_per_s"]),
                f(&v["p50_ms"]),
                f(&v["p99_ms"])
            );
        }
        return Ok(out);
    }
    let rounds = rounds.max(1);
    let load_before = loadavg();
    let mut runs: Vec<(Security, Value)> = Vec::new();
    for round in 0..rounds {
        for security in [Security::Plain, Security::Tls] {
            let v = raft_round(&rt, security, window)?;
            println!(
                "  round {} {:<9} 1: {:>6.0}/s  16: {:>6.0}/s  128: {:>6.0}/s   (load {})",
                round + 1,
                security.key(),
                f(&v["inflight_1"]["writes_per_s"]),
                f(&v["inflight_16"]["writes_per_s"]),
                f(&v["inflight_128"]["writes_per_s"]),
                loadavg()
            );
            runs.push((security, v));
        }
    }
    let load_after = loadavg();
    let mut out = serde_json::Map::new();
    for security in [Security::Plain, Security::Tls] {
        let mut per_level = serde_json::Map::new();
        for k in INFLIGHT {
            let level = format!("inflight_{k}");
            let pick = |field: &str| -> Vec<f64> {
                runs.iter()
                    .filter(|(s, _)| *s == security)
                    .map(|(_, v)| f(&v[&level][field]))
                    .collect()
            };
            let wps = pick("writes_per_s");
            per_level.insert(
                level.clone(),
                json!({
                    "writes_per_s": median(&wps),
                    "p50_ms": median(&pick("p50_ms")),
                    "p99_ms": median(&pick("p99_ms")),
                    "writes_per_s_rounds": wps,
                }),
            );
        }
        out.insert(security.key().into(), Value::Object(per_level));
    }
    let mut overhead = serde_json::Map::new();
    for k in INFLIGHT {
        let level = format!("inflight_{k}");
        let p = f(&out["plaintext"][&level]["writes_per_s"]);
        let t = f(&out["mtls"][&level]["writes_per_s"]);
        overhead.insert(level, json!((p - t) / p * 100.0));
    }
    out.insert("mtls_overhead_pct".into(), Value::Object(overhead));
    out.insert("rounds".into(), json!(rounds));
    out.insert("window_s".into(), json!(window_s));
    out.insert("loadavg_before".into(), json!(load_before));
    out.insert("loadavg_after".into(), json!(load_after));
    let out = Value::Object(out);
    println!("raft: 3 nodes (separate processes, loopback, fsync'd redb), writes of ~256 B events to the leader's peer API (they schedule nothing: Raft replication alone), {window_s} s per point; plaintext and mTLS clusters alternated, {rounds} fresh clusters of each, medians; load {load_before} -> {load_after}");
    println!("  in flight   plaintext/s  p50 ms  p99 ms      mTLS/s  p50 ms  p99 ms   mTLS overhead   etcd 3.4 (RESULTS.md)");
    for (k, etcd) in [
        (1, format!("526/s, p50 {ETCD_P50_MS} ms")),
        (16, "1356/s at 8, 2944/s at 32".to_string()),
        (128, format!("{ETCD_128_WRITES_PER_S}/s, p50 33 ms")),
    ] {
        let level = format!("inflight_{k}");
        let (p, t) = (&out["plaintext"][&level], &out["mtls"][&level]);
        println!(
            "  {k:<9} {:>12.0} {:>7.2} {:>7.2} {:>11.0} {:>7.2} {:>7.2}   {:>12.1} %   {etcd}",
            f(&p["writes_per_s"]),
            f(&p["p50_ms"]),
            f(&p["p99_ms"]),
            f(&t["writes_per_s"]),
            f(&t["p50_ms"]),
            f(&t["p99_ms"]),
            f(&out["mtls_overhead_pct"][&level]),
        );
    }
    let o = f(&out["mtls_overhead_pct"]["inflight_128"]);
    let x = f(&out["mtls"]["inflight_128"]["writes_per_s"]) / ETCD_128_WRITES_PER_S;
    println!(
        "  targets: mTLS overhead <= 10% at 128 in flight ({o:.1}%); mTLS >= 3x etcd at 128 in flight ({x:.1}x the RESULTS.md figure; compare with etcd_bench.sh run the same hour)"
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

pub fn failover_suite(reps: usize, security: Security) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let load_before = loadavg();
    let mut cluster = bench_cluster_as(security, &[])?;
    let samples = rt.block_on(async {
        let mut samples = Vec::new();
        for rep in 0..reps {
            let leader = cluster.wait_leader(Duration::from_secs(30)).await;
            let survivors: Vec<u64> = cluster
                .nodes
                .values()
                .filter(|n| n.id != leader)
                .map(|n| n.id)
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
                // A fresh client (connection) per probe; under TLS presenting that survivor's
                // own node certificate.
                let mut c = cluster.peer_client(survivors[i % survivors.len()]);
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
            let _ = put_spec(&mut cluster.client(leader).await, "settle").await;
        }
        Ok::<_, anyhow::Error>(samples)
    })?;
    drop(cluster);
    let median = median(&samples);
    let load_after = loadavg();
    println!(
        "failover ({}): kill -9 the leader -> first successful write, median of {reps}: {median:.3} s (etcd 3.4 defaults: {ETCD_FAILOVER_S} s; target < 0.6 s); load {load_before} -> {load_after}",
        security.key()
    );
    Ok(
        json!({ "failover_s": median, "samples_s": samples, "loadavg_before": load_before, "loadavg_after": load_after }),
    )
}

/// Kill -9 a node hosting 100 instances; time until every instance runs elsewhere.
pub fn reschedule_suite(reps: usize, security: Security) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let load_before = loadavg();
    // Room for the 300 instances on the two survivors.
    let mut cluster = bench_cluster_as(security, &["--capacity", "1000"])?;
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
    drop(cluster);
    let median = median(&samples);
    let load_after = loadavg();
    println!(
        "reschedule ({}): kill -9 a node hosting 100 instances -> all running elsewhere, median of {reps}: {median:.2} s (target < 3 s; Kubernetes defaults take ~6 min, Nomad 20-30 s); load {load_before} -> {load_after}",
        security.key()
    );
    Ok(
        json!({ "reschedule_s": median, "samples_s": samples, "loadavg_before": load_before, "loadavg_after": load_after }),
    )
}

/// `failover`/`reschedule` with `--tls`: the suite on a plaintext cluster, then on an mTLS one
/// (each its own fresh cluster); both figures and the mTLS change of the median `key` in %.
pub fn plain_vs_tls(
    name: &str,
    key: &str,
    suite: impl Fn(Security) -> anyhow::Result<Value>,
) -> anyhow::Result<Value> {
    let plain = suite(Security::Plain)?;
    let tls = suite(Security::Tls)?;
    let (p, t) = (f(&plain[key]), f(&tls[key]));
    let change = (t - p) / p * 100.0;
    println!("{name}: plaintext {p:.3} s, mTLS {t:.3} s (medians): mTLS {change:+.1}% (target within 10%)");
    Ok(json!({ "plaintext": plain, "mtls": tls, "mtls_change_pct": change }))
}
