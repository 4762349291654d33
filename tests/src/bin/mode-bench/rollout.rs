//! `rollout`: a rolling update of a big service. Three node processes; a service of N
//! `health-target` instances (an HTTP server each, on its own port) with an HTTP health check;
//! then a config change rolled with `max_unavailable: 10%`. Measured: seconds from the apply
//! to the rollout's success, and the fewest healthy instances (running, health check passing)
//! seen while it ran, sampled every 50 ms.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_proto::v1::control_client::ControlClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::cluster::bench_cluster;

/// Target: never below 90% healthy.
const TARGET_HEALTHY_FRACTION: f64 = 0.9;
/// Target: done within this plus the configured minimum healthy times (one per step).
const TARGET_BASE_S: f64 = 10.0;

/// A base port with `n` free ports after it, below the usual ephemeral range (a busy
/// machine's outgoing connections crowd that one).
fn free_ports(n: u16) -> anyhow::Result<u16> {
    let mut base = 20_000u16;
    while u32::from(base) + u32::from(n) < 32_768 {
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
        base += n + 1;
    }
    anyhow::bail!("no {n} free ports in a row between 20000 and 32768")
}

fn spec(instances: u32, port: u16, version: &str, min_healthy_ms: u64) -> anyhow::Result<String> {
    let target = std::env::current_exe()?
        .parent()
        .map(|d| d.join("health-target"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("health-target is not built next to mode-bench: cargo build --release -p mode-tests --bins"))?;
    Ok(format!(
        "name: web\nkind: exec\nreplicas: {instances}\nstop_grace_s: 2\nupdate: {{max_unavailable: \"10%\", min_healthy_ms: {min_healthy_ms}, deadline_s: 600}}\nhealth: {{http: {{port: {port}, path: /healthz}}, port_plus_slot: true, interval_ms: 200, timeout_ms: 1000, unhealthy_threshold: 2}}\nconfig:\n  command: {}\n  args: [\"--port\", \"{port}\", \"--plus-slot\", \"--version\", \"{version}\"]\n",
        target.display()
    ))
}

async fn get(client: &mut ControlClient<Channel>, name: &str) -> Option<pb::Service> {
    client
        .get_service(pb::GetServiceRequest {
            name: name.into(),
            stale: true,
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

fn healthy(s: &pb::Service) -> u32 {
    s.instances
        .iter()
        .filter(|i| i.state == "running" && i.health == "healthy")
        .count() as u32
}

/// Wait until the rollout of `generation` succeeded; fail on any other verdict.
async fn rolled_out(
    client: &mut ControlClient<Channel>,
    generation: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = get(client, "web").await {
            if let Some(r) = &s.rollout {
                if r.generation == generation {
                    match r.status.as_str() {
                        "succeeded" => return Ok(()),
                        "rolling" => {}
                        other => anyhow::bail!(
                            "rollout of generation {generation} {other}: {}",
                            r.reason
                        ),
                    }
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "generation {generation} did not roll out within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn rollout_suite(instances: u32, min_healthy_ms: u64) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = bench_cluster(&["--capacity", "1000"])?;
    let port = free_ports(u16::try_from(instances)?)?;
    let out = rt.block_on(async {
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        cluster.wait_registered(3).await;
        let mut client = cluster.client(leader).await;
        let t0 = Instant::now();
        cluster.apply(leader, &spec(instances, port, "v1", min_healthy_ms)?).await?;
        rolled_out(&mut client, 1, Duration::from_secs(300)).await?;
        println!(
            "  {instances} instances with an HTTP health check healthy after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        // Sample while the change rolls.
        let stop = Arc::new(AtomicBool::new(false));
        let least = Arc::new(AtomicU32::new(u32::MAX));
        let samples = Arc::new(AtomicU32::new(0));
        let sampler = {
            let (stop, least, samples) = (stop.clone(), least.clone(), samples.clone());
            let mut c = client.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if let Some(s) = get(&mut c, "web").await {
                        least.fetch_min(healthy(&s), Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50).saturating_sub(t.elapsed())).await;
                }
            })
        };
        let t0 = Instant::now();
        cluster.apply(leader, &spec(instances, port, "v2", min_healthy_ms)?).await?;
        rolled_out(&mut client, 2, Duration::from_secs(600)).await?;
        let took = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.await;
        let s = get(&mut client, "web").await.unwrap_or_default();
        let all_new = s.instances.iter().filter(|i| i.generation == 2).count();
        let events = cluster.events(leader).await;
        let steps = events
            .iter()
            .filter(|e| e["kind"] == "rollout-step" && e["service"] == "web")
            .count();
        let least = least.load(Ordering::Relaxed);
        let fraction = f64::from(least) / f64::from(instances);
        // The minimum healthy times the policy imposes: one per batch of 10%.
        let batch = (instances / 10).max(1);
        let batches = instances.div_ceil(batch);
        let waits_s = f64::from(batches) * min_healthy_ms as f64 / 1000.0;
        let target_s = TARGET_BASE_S + waits_s;
        println!(
            "rollout: {instances} instances, max_unavailable 10%, min_healthy_ms {min_healthy_ms}: done in {took:.1} s ({steps} replacement commands; target < {target_s:.1} s = 10 s + {batches} batches x {min_healthy_ms} ms)"
        );
        println!(
            "  fewest healthy instances seen: {least} of {instances} ({:.1}%; target >= {:.0}%), {} samples at 50 ms; {all_new} instances run generation 2",
            fraction * 100.0,
            TARGET_HEALTHY_FRACTION * 100.0,
            samples.load(Ordering::Relaxed)
        );
        Ok::<_, anyhow::Error>(json!({
            "instances": instances,
            "min_healthy_ms": min_healthy_ms,
            "rollout_s": took,
            "steps": steps,
            "target_s": target_s,
            "min_healthy_instances": least,
            "min_healthy_fraction": fraction,
            "samples": samples.load(Ordering::Relaxed),
            "updated": all_new,
            "meets_targets": fraction >= TARGET_HEALTHY_FRACTION && took < target_s,
        }))
    })?;
    drop(cluster);
    Ok(out)
}
