//! `mode-bench`: benchmarks of the service framework.
//!
//! ```text
//! cargo run --release -p mode-tests --bin mode-bench -- <services|timers|restart|all> [--json]
//! mode-bench fleet [--agents 1000] [--services 100] [--replicas 1000] [--heartbeat-grace 10s] --json
//! mode-bench rollout [--instances 300] [--min-healthy-ms 500] --json
//! mode-bench web [--instances 10000] [--samples 10] --json   # needs chromium
//! mode-bench chaos --minutes 3 [--nodes 5] [--seed 1] [--verbose] --json   # as root
//! ```
//!
//! With `--json` the last line of stdout is one JSON object with the suite's figures; the
//! human-readable tables come before it. No tracing subscriber is installed, so the
//! framework's logging costs (next to) nothing; `MODE_BENCH_LOG=<filter>` (e.g.
//! `mode::agent=info`) installs one on stderr, to see what in-process agents say.
//!
//! * `services`: start and stop N no-op services, N = 100, 1000, 10000, 100000, in two shapes.
//!   *flat*: one root with N children (N + 1 services). *tree*: exactly N services in four
//!   levels — root → k mid nodes → k·k inner nodes → the remaining N − 1 − k − k² leaves spread
//!   evenly over the inner nodes, where k = ⌊∛N⌋ (so every level fans out by about ∛N).
//!   Every measurement runs in a fresh child process (this binary re-executed with the hidden
//!   `__services <shape> <n>` subcommand) so that the RSS growth is clean; timings are the
//!   median of `--reps` runs (default 3), `bytes_per_service` too. Then the same for flat
//!   services that each run one 100 ms timer, or one task sleeping until the stop
//!   (`--work-sizes`, default 10,000), stopped 300 ms after the start so that every task runs:
//!   stopping them means waking and joining every task.
//! * `timers`: 10,000 services, each with one 100 ms timer started in `on_start`; after a 1 s
//!   warm-up, every fire during a 5 s window records its interval-based lateness
//!   ((now − previous fire of the same timer) − 100 ms, signed).
//! * `restart`: one-for-one restart latency (`crash()` → the replacement is `Running`),
//!   1,000 crashes after 20 warm-ups, with 1 and with 10,000 idle siblings.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
mod chaos;
mod cluster;
mod fleet;
mod graph;
mod rollout;
mod schedule;
mod web;

use clap::{Parser, Subcommand, ValueEnum};
use mode::service::{
    Backoff, BoxError, Context, RestartIntensity, Result, Service, ServiceHandle, ServiceState,
    Strategy, Supervisor,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Python mode-ng, 10,000 flat services: 173 ms start + 447 ms stop.
const PY_10K_START_STOP_MS: f64 = 620.0;
/// Target: start + stop at least 50× faster than Python mode-ng.
const TARGET_SPEEDUP: f64 = 50.0;
const TARGET_BYTES_PER_SERVICE: f64 = 1024.0;
const TARGET_LATE_P99_MS: f64 = 2.0;
const TARGET_RESTART_MEDIAN_US: f64 = 20.0;
/// Target: stop 10,000 services with a timer (or a task) each in under 20 ms (mode-ng's
/// `root.stop()` with 10,000 timers did not finish within 30 s).
const TARGET_STOP_WORK_MS: f64 = 20.0;

#[derive(Parser)]
#[command(
    name = "mode-bench",
    about = "Benchmarks of the mode service framework"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
    /// Print the figures as one JSON object on the last line of stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Runs per point of the `services` suite (median reported).
    #[arg(long, global = true, default_value_t = 3)]
    reps: usize,
    /// Service counts of the `services` suite.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_values_t = [100usize, 1000, 10000, 100000]
    )]
    sizes: Vec<usize>,
    /// Service counts of the `services` suite's points with a timer or a task per service.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_values_t = [10000usize]
    )]
    work_sizes: Vec<usize>,
    /// Number of timer services of the `timers` suite.
    #[arg(long, global = true, default_value_t = 10_000)]
    timer_services: usize,
    /// Warm-up of the `timers` suite, in seconds.
    #[arg(long, global = true, default_value_t = 1.0)]
    warmup_s: f64,
    /// Measurement window of the `timers` suite, in seconds.
    #[arg(long, global = true, default_value_t = 5.0)]
    window_s: f64,
    /// `raft`: load this existing cluster's leader (its peer API, HOST:PORT) instead of
    /// starting three nodes.
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// `failover`, `reschedule`: run the suite on a plaintext cluster and then on a mutual-TLS
    /// one, and print both (`raft` always runs both, alternated, `--reps` rounds of each).
    #[arg(long, global = true)]
    tls: bool,
    /// Measured crashes per point of the `restart` suite.
    #[arg(long, global = true, default_value_t = 1000)]
    crashes: usize,
}

#[derive(Subcommand)]
enum Suite {
    /// Start/stop time and memory of no-op services, flat and as a tree.
    Services,
    /// 10,000 services with a 100 ms timer each: throughput, lateness, CPU.
    Timers,
    /// One-for-one restart latency with 1 and 10,000 siblings.
    Restart,
    /// services, timers, restart, in that order.
    All,
    /// Raft write latency and throughput: 3 node processes, 1/16/128 writes in flight of
    /// events that schedule nothing (replication alone); plaintext and mutual-TLS clusters
    /// alternated, `--reps` rounds of each (fresh clusters), and the mTLS overhead.
    Raft,
    /// The full path of a deploy: spec write -> placement -> agent start -> report committed.
    Orchestration {
        /// One-instance specs applied.
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Applied at a time.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
    },
    /// Leader failover: kill -9 the leader, time to the first successful write.
    Failover,
    /// The scheduler: 100,000 placements on 1,000 nodes, then committed through Raft.
    Schedule,
    /// Node loss: kill -9 a node hosting 100 instances, time until they all run elsewhere.
    Reschedule,
    /// A rolling update: 3 nodes, a service of N instances with an HTTP health check, a
    /// config change rolled with max_unavailable 10%: seconds to complete, and the fewest
    /// healthy instances seen meanwhile (sampled every 50 ms).
    Rollout {
        /// Instances of the service.
        #[arg(long, default_value_t = 300)]
        instances: u32,
        /// Each new instance must stay healthy this long before the next step.
        #[arg(long, default_value_t = 500)]
        min_healthy_ms: u64,
    },
    /// A fleet: 3 server processes and N agent-only nodes (in this process), S services x R
    /// replicas: time until all run, leader CPU and memory, Raft log per instance, and the
    /// leader's load with the agents idle.
    Fleet {
        /// Agent-only nodes.
        #[arg(long, default_value_t = 1000)]
        agents: u64,
        /// Services.
        #[arg(long, default_value_t = 100)]
        services: u32,
        /// Replicas of each service.
        #[arg(long, default_value_t = 1000)]
        replicas: u32,
        /// The cluster's --heartbeat-grace (agents heartbeat every sixth of it). Nomad's
        /// default grace is 10 s; 1.5 s means 4 heartbeats/s per agent.
        #[arg(long, default_value = "10s", value_parser = mode::daemon::parse_duration)]
        heartbeat_grace: std::time::Duration,
    },
    /// The combined beacon graph: `modectl graph -o json` over 3 nodes running 10,000
    /// instances (needs `modectl` built next to this binary).
    Graph {
        /// Instances spread over the 3 nodes.
        #[arg(long, default_value_t = 10_000)]
        instances: u32,
        /// Timed runs (after one warm-up).
        #[arg(long, default_value_t = 30)]
        samples: usize,
    },
    /// The web view of 3 nodes running 10,000 instances: bytes and time of what the page
    /// fetches for its first render and per refresh, and headless chromium's wall clock
    /// loading and drawing it (needs Debian's `chromium`).
    Web {
        /// Instances spread over the 3 nodes.
        #[arg(long, default_value_t = 10_000)]
        instances: u32,
        /// Timed runs (after one warm-up; chromium runs at most 5).
        #[arg(long, default_value_t = 10)]
        samples: usize,
    },
    /// Random faults (kill -9, partitions, SIGSTOP) on nodes in network namespaces, against
    /// acknowledged writes and singleton probes: writes lost, singleton overlaps, duplicate
    /// processes, time to converge. Needs root.
    Chaos {
        /// Minutes of faults.
        #[arg(long, default_value_t = 3.0)]
        minutes: f64,
        #[arg(long, default_value_t = 5)]
        nodes: u64,
        /// Seed of the fault schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print each fault as it is injected.
        #[arg(long)]
        verbose: bool,
    },
    /// One `services` measurement in this (fresh) process; prints one JSON line.
    #[command(name = "__services", hide = true)]
    ServicesChild {
        shape: Shape,
        n: usize,
        #[arg(long, value_enum, default_value_t = Work::None)]
        work: Work,
    },
}

/// What each service of a `services` point runs.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Work {
    /// Nothing (no hooks).
    None,
    /// One 100 ms timer.
    Timer,
    /// One task that sleeps until the service stops.
    Task,
}

impl Work {
    fn name(self) -> &'static str {
        match self {
            Work::None => "none",
            Work::Timer => "timer",
            Work::Task => "task",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shape {
    Flat,
    Tree,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Flat => "flat",
            Shape::Tree => "tree",
        }
    }
}

fn main() -> anyhow::Result<()> {
    // `mode-bench __node ARGS` runs a mode-node (same build) for the cluster suites.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "__node") {
        let node_args = std::iter::once("mode-node".into()).chain(args);
        std::process::exit(i32::from(
            mode::daemon::main_with_args(node_args) != std::process::ExitCode::SUCCESS,
        ));
    }
    if let Ok(filter) = std::env::var("MODE_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = Cli::parse();
    let json = match &cli.suite {
        Suite::ServicesChild { shape, n, work } => {
            let point = services_child(*shape, *n, *work)?;
            println!("{}", serde_json::to_string(&point)?);
            return Ok(());
        }
        Suite::Services => timed("services", || services_suite(&cli))?,
        Suite::Timers => timed("timers", || timers_suite(&cli))?,
        Suite::Restart => timed("restart", || restart_suite(&cli))?,
        Suite::Raft => timed("raft", || {
            cluster::raft_suite(cli.window_s, cli.endpoint.as_deref(), cli.reps)
        })?,
        Suite::Orchestration { count, inflight } => timed("orchestration", || {
            cluster::orchestration_suite(*count, (*inflight).max(1))
        })?,
        Suite::Failover => timed("failover", || {
            let reps = cli.reps.max(5);
            match cli.tls {
                true => cluster::plain_vs_tls("failover", "failover_s", |s| {
                    cluster::failover_suite(reps, s)
                }),
                false => cluster::failover_suite(reps, cluster::Security::Plain),
            }
        })?,
        Suite::Schedule => timed("schedule", || schedule::schedule_suite(cli.reps))?,
        Suite::Reschedule => timed("reschedule", || {
            let reps = cli.reps.max(5);
            match cli.tls {
                true => cluster::plain_vs_tls("reschedule", "reschedule_s", |s| {
                    cluster::reschedule_suite(reps, s)
                }),
                false => cluster::reschedule_suite(reps, cluster::Security::Plain),
            }
        })?,
        Suite::Rollout {
            instances,
            min_healthy_ms,
        } => timed("rollout", || {
            rollout::rollout_suite(*instances, *min_healthy_ms)
        })?,
        Suite::Fleet {
            agents,
            services,
            replicas,
            heartbeat_grace,
        } => timed("fleet", || {
            fleet::fleet_suite(*agents, *services, *replicas, *heartbeat_grace)
        })?,
        Suite::Graph { instances, samples } => {
            timed("graph", || graph::graph_suite(*instances, *samples))?
        }
        Suite::Web { instances, samples } => timed("web", || web::web_suite(*instances, *samples))?,
        Suite::Chaos {
            minutes,
            nodes,
            seed,
            verbose,
        } => timed("chaos", || {
            chaos::chaos_suite(*minutes, *nodes, *seed, *verbose)
        })?,
        Suite::All => {
            let services = timed("services", || services_suite(&cli))?;
            let timers = timed("timers", || timers_suite(&cli))?;
            let restart = timed("restart", || restart_suite(&cli))?;
            json!({ "services": services, "timers": timers, "restart": restart })
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string(&json)?);
    }
    Ok(())
}

fn timed(name: &str, f: impl FnOnce() -> anyhow::Result<Value>) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    let v = f()?;
    println!("[{name} suite took {:.1} s]\n", t0.elapsed().as_secs_f64());
    Ok(v)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("MODE_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        b.worker_threads(n);
    }
    Ok(b.enable_all().build()?)
}

// ---- services -----------------------------------------------------------------------------

/// A service with no hooks.
struct Noop;

impl Service for Noop {}

#[derive(Serialize, Deserialize, Clone, Copy)]
struct ServicesPoint {
    services: usize,
    construct_ms: f64,
    start_ms: f64,
    stop_ms: f64,
    bytes_per_service: f64,
}

/// A service running one timer or one task (or nothing).
struct Busy(Work);

impl Service for Busy {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        match self.0 {
            Work::None => {}
            Work::Timer => ctx.timer("tick", TICK, || std::future::ready(Ok(()))),
            Work::Task => {
                let c = ctx.clone();
                ctx.spawn("wait", async move {
                    while !c.should_stop() {
                        c.sleep(Duration::from_secs(3600)).await;
                    }
                    Ok(())
                });
            }
        }
        Ok(())
    }
}

fn leaf(work: Work) -> ServiceHandle {
    match work {
        Work::None => ServiceHandle::new(Noop),
        _ => ServiceHandle::new(Busy(work)),
    }
}

/// Build `n` children under one root (flat), or exactly `n` services as a 4-level tree.
fn build(shape: Shape, n: usize, work: Work) -> (ServiceHandle, usize) {
    let root = ServiceHandle::new(Noop);
    match shape {
        Shape::Flat => {
            for _ in 0..n {
                root.add_dependency(leaf(work));
            }
            (root, n + 1)
        }
        Shape::Tree => {
            let mut k = (n as f64).cbrt() as usize;
            while (k + 1).pow(3) <= n {
                k += 1;
            }
            while k > 1 && k.pow(3) > n {
                k -= 1;
            }
            let k = k.max(1);
            let mut count = 1;
            let mut inner = Vec::with_capacity(k * k);
            for _ in 0..k {
                let mid = root.add_dependency(ServiceHandle::new(Noop));
                count += 1;
                for _ in 0..k {
                    inner.push(mid.add_dependency(ServiceHandle::new(Noop)));
                    count += 1;
                }
            }
            let leaves = n.saturating_sub(count);
            let (each, extra) = (leaves / inner.len(), leaves % inner.len());
            for (i, parent) in inner.iter().enumerate() {
                for _ in 0..each + usize::from(i < extra) {
                    parent.add_dependency(leaf(work));
                    count += 1;
                }
            }
            (root, count)
        }
    }
}

fn services_child(shape: Shape, n: usize, work: Work) -> anyhow::Result<ServicesPoint> {
    let rt = runtime()?;
    rt.block_on(async {
        // Let the worker threads settle before the baseline.
        tokio::task::yield_now().await;
        let rss_before = rss_bytes()?;
        let t0 = Instant::now();
        let (root, services) = build(shape, n, work);
        let construct = t0.elapsed();
        let t1 = Instant::now();
        root.start().await?;
        let start = t1.elapsed();
        let rss_after = rss_bytes()?;
        if root.state() != ServiceState::Running {
            bail!("root is {} after start", root.state());
        }
        if work != Work::None {
            // Let every task or timer get its first poll: the stop should measure stopping
            // running work, not the tail of the start.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let t2 = Instant::now();
        root.stop().await;
        let stop = t2.elapsed();
        if root.state() != ServiceState::Shutdown {
            bail!("root is {} after stop", root.state());
        }
        drop(root);
        Ok(ServicesPoint {
            services,
            construct_ms: ms(construct),
            start_ms: ms(start),
            stop_ms: ms(stop),
            bytes_per_service: rss_after.saturating_sub(rss_before) as f64 / services as f64,
        })
    })
}

/// One point of the `services` suite: the median of `reps` fresh child processes.
fn services_point(
    exe: &std::path::Path,
    shape: Shape,
    n: usize,
    work: Work,
    reps: usize,
) -> anyhow::Result<ServicesPoint> {
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let o = Command::new(exe)
            .args([
                "__services",
                shape.name(),
                &n.to_string(),
                "--work",
                work.name(),
            ])
            .output()
            .context("running the services child")?;
        if !o.status.success() {
            bail!(
                "services child {} {n} --work {} failed ({}): {}",
                shape.name(),
                work.name(),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&o.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        let p: ServicesPoint = serde_json::from_str(line)
            .with_context(|| format!("parsing services child output {line:?}"))?;
        runs.push(p);
    }
    let med = |f: fn(&ServicesPoint) -> f64| median(runs.iter().map(f).collect());
    Ok(ServicesPoint {
        services: runs[0].services,
        construct_ms: med(|p| p.construct_ms),
        start_ms: med(|p| p.start_ms),
        stop_ms: med(|p| p.stop_ms),
        bytes_per_service: med(|p| p.bytes_per_service),
    })
}

fn services_suite(cli: &Cli) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let reps = cli.reps.max(1);
    let target_ms = PY_10K_START_STOP_MS / TARGET_SPEEDUP;
    println!("services: start/stop of no-op services (median of {reps} runs, fresh process each)");
    println!(
        "  {:<5} {:>7} {:>8} {:>10} {:>9} {:>9} {:>11} {:>10} {:>18}",
        "shape", "N", "services", "construct", "start", "stop", "start+stop", "bytes/svc", "target"
    );
    let mut out = Map::new();
    for shape in [Shape::Flat, Shape::Tree] {
        let mut per_n = Map::new();
        for &n in &cli.sizes {
            let p = services_point(&exe, shape, n, Work::None, reps)?;
            let total = p.start_ms + p.stop_ms;
            let target = if shape == Shape::Flat && n == 10_000 {
                format!(
                    "<={target_ms:.1}ms {} ({:.0}x py)",
                    ok(total <= target_ms),
                    PY_10K_START_STOP_MS / total
                )
            } else {
                String::new()
            };
            println!(
                "  {:<5} {:>7} {:>8} {:>8.2}ms {:>7.2}ms {:>7.2}ms {:>9.2}ms {:>6.0} {:<3} {}",
                shape.name(),
                n,
                p.services,
                p.construct_ms,
                p.start_ms,
                p.stop_ms,
                total,
                p.bytes_per_service,
                ok(p.bytes_per_service <= TARGET_BYTES_PER_SERVICE),
                target
            );
            per_n.insert(n.to_string(), serde_json::to_value(p)?);
        }
        out.insert(shape.name().to_string(), Value::Object(per_n));
    }
    println!(
        "  targets: <= {TARGET_BYTES_PER_SERVICE:.0} bytes/service; 10k flat start+stop >= \
         {TARGET_SPEEDUP:.0}x faster than Python mode-ng ({PY_10K_START_STOP_MS:.0} ms)"
    );
    println!("  tree = root -> k -> k*k -> leaves (k = floor(cbrt N)), N services in total");
    println!(
        "  bytes/svc = VmRSS growth over construct+start / services; at small N it is dominated \
         by fixed, page-granular process costs"
    );
    println!();
    println!("services with work: flat, each service runs one 100 ms timer or one task");
    println!(
        "  {:<5} {:>7} {:>9} {:>9} {:>10} {:>18}",
        "work", "N", "start", "stop", "bytes/svc", "target"
    );
    for work in [Work::Timer, Work::Task] {
        let mut per_n = Map::new();
        for &n in &cli.work_sizes {
            let p = services_point(&exe, Shape::Flat, n, work, reps)?;
            let target = if n == 10_000 {
                format!(
                    "stop < {TARGET_STOP_WORK_MS:.0}ms {}",
                    ok(p.stop_ms < TARGET_STOP_WORK_MS)
                )
            } else {
                String::new()
            };
            println!(
                "  {:<5} {:>7} {:>7.2}ms {:>7.2}ms {:>10.0} {:>18}",
                work.name(),
                n,
                p.start_ms,
                p.stop_ms,
                p.bytes_per_service,
                target
            );
            per_n.insert(n.to_string(), serde_json::to_value(p)?);
        }
        out.insert(format!("flat_with_{}", work.name()), Value::Object(per_n));
    }
    Ok(Value::Object(out))
}

// ---- timers -------------------------------------------------------------------------------

const TICK: Duration = Duration::from_millis(100);

/// Set while the measurement window is open.
static RECORDING: AtomicBool = AtomicBool::new(false);

/// One fire: interval-based lateness and lateness against the timer's own fixed-rate schedule
/// (anchored at its first fire), both in signed microseconds.
type Sample = (i32, i32);

struct Ticker {
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl Service for Ticker {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let samples = self.samples.clone();
        let mut first: Option<Instant> = None;
        let mut last: Option<Instant> = None;
        let tick_us = TICK.as_micros() as i64;
        ctx.timer("tick", TICK, move || {
            let now = Instant::now();
            if let (Some(prev), Some(first)) = (last, first) {
                if RECORDING.load(Ordering::Relaxed) {
                    let late = (now - prev).as_micros() as i64 - tick_us;
                    let since = (now - first).as_micros() as i64;
                    let k = (since + tick_us / 2) / tick_us;
                    let drift = since - k * tick_us;
                    samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((late as i32, drift as i32));
                }
            }
            first.get_or_insert(now);
            last = Some(now);
            std::future::ready(Ok::<(), BoxError>(()))
        });
        Ok(())
    }
}

fn timers_suite(cli: &Cli) -> anyhow::Result<Value> {
    let n = cli.timer_services;
    let rt = runtime()?;
    let v = rt.block_on(async {
        let cells: Vec<Arc<Mutex<Vec<Sample>>>> = (0..n)
            .map(|_| Arc::new(Mutex::new(Vec::with_capacity(64))))
            .collect();
        let root = ServiceHandle::new(Noop);
        for c in &cells {
            root.add_dependency(ServiceHandle::new(Ticker { samples: c.clone() }));
        }
        let t_start = Instant::now();
        root.start().await?;
        let start_ms = ms(t_start.elapsed());
        tokio::time::sleep(Duration::from_secs_f64(cli.warmup_s)).await;

        let cpu0 = cpu_seconds()?;
        let w0 = Instant::now();
        RECORDING.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(cli.window_s)).await;
        RECORDING.store(false, Ordering::Relaxed);
        let wall = w0.elapsed().as_secs_f64();
        let cpu = cpu_seconds()? - cpu0;

        let t_stop = Instant::now();
        root.stop().await;
        let stop_ms = ms(t_stop.elapsed());

        let mut late = Vec::new();
        let mut drift = Vec::new();
        for c in &cells {
            for &(l, d) in c.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                late.push(l as f64 / 1000.0);
                drift.push(d as f64 / 1000.0);
            }
        }
        let fires = late.len();
        if fires == 0 {
            bail!("no timer fired during the measurement window");
        }
        let gaps = late.iter().filter(|&&l| l >= 50.0).count();
        late.sort_by(f64::total_cmp);
        drift.sort_by(f64::total_cmp);
        let fires_per_s = fires as f64 / wall;
        let expected = n as f64 / TICK.as_secs_f64();
        let late_p50 = percentile(&late, 0.50);
        let late_p99 = percentile(&late, 0.99);
        let cpu_s_per_s = cpu / wall;
        println!(
            "timers: {n} services x one {} ms timer, {:.1} s window after {:.1} s warm-up",
            TICK.as_millis(),
            cli.window_s,
            cli.warmup_s
        );
        println!("  {:<28} {:>12} {:>16}", "figure", "measured", "target");
        let row = |name: &str, v: String, t: String| println!("  {name:<28} {v:>12} {t:>16}");
        row(
            "fires/s",
            format!("{fires_per_s:.0}"),
            format!("{expected:.0} {}", ok(fires_per_s >= 0.99 * expected)),
        );
        row(
            "late p50 (interval) ms",
            format!("{late_p50:.3}"),
            String::new(),
        );
        row(
            "late p99 (interval) ms",
            format!("{late_p99:.3}"),
            format!(
                "< {TARGET_LATE_P99_MS} {}",
                ok(late_p99 < TARGET_LATE_P99_MS)
            ),
        );
        row(
            "late min/max (interval) ms",
            format!("{:.3}/{:.3}", late[0], late[fires - 1]),
            String::new(),
        );
        row(
            "drift p50 (schedule) ms",
            format!("{:.3}", percentile(&drift, 0.50)),
            String::new(),
        );
        row(
            "drift p99 (schedule) ms",
            format!("{:.3}", percentile(&drift, 0.99)),
            String::new(),
        );
        row("gaps >= 150 ms (skips)", format!("{gaps}"), String::new());
        row("CPU s/s", format!("{cpu_s_per_s:.3}"), String::new());
        row(
            "start / stop ms",
            format!("{start_ms:.1}/{stop_ms:.1}"),
            if n == 10_000 {
                format!(
                    "stop < {TARGET_STOP_WORK_MS:.0} {}",
                    ok(stop_ms < TARGET_STOP_WORK_MS)
                )
            } else {
                String::new()
            },
        );
        anyhow::Ok(json!({
            "services": n,
            "interval_ms": TICK.as_millis() as u64,
            "window_s": wall,
            "fires": fires,
            "fires_per_s": fires_per_s,
            "expected_fires_per_s": expected,
            "late_p50_ms": late_p50,
            "late_p99_ms": late_p99,
            "late_max_ms": late[fires - 1],
            "drift_p50_ms": percentile(&drift, 0.50),
            "drift_p99_ms": percentile(&drift, 0.99),
            "gaps_over_150ms": gaps,
            "cpu_s_per_s": cpu_s_per_s,
            "start_ms": start_ms,
            "stop_ms": stop_ms,
        }))
    })?;
    Ok(v)
}

// ---- restart ------------------------------------------------------------------------------

const RESTART_WARMUP: usize = 20;

async fn restart_point(siblings: usize, crashes: usize) -> anyhow::Result<Vec<f64>> {
    let crasher = ServiceHandle::builder(Noop).label("crasher").build();
    let supervisor = Supervisor::new(Strategy::OneForOne)
        .intensity(RestartIntensity::unlimited())
        .backoff(Backoff::none())
        .child(crasher.clone())
        .children((0..siblings).map(|_| ServiceHandle::new(Noop)))
        .build();
    supervisor.start().await?;
    let mut lat = Vec::with_capacity(crashes);
    for i in 0..RESTART_WARMUP + crashes {
        let t0 = Instant::now();
        if !crasher.crash("bench") {
            bail!("crash #{i} ignored: crasher is {}", crasher.state());
        }
        crasher.wait_for_state(ServiceState::Running).await;
        let dt = t0.elapsed();
        if i >= RESTART_WARMUP {
            lat.push(dt.as_secs_f64() * 1e6);
        }
    }
    let restarts = crasher.restart_count() as usize;
    if restarts != RESTART_WARMUP + crashes {
        bail!(
            "crasher restarted {restarts} times for {} crashes",
            RESTART_WARMUP + crashes
        );
    }
    if supervisor.state() != ServiceState::Running {
        bail!("supervisor is {} after the crashes", supervisor.state());
    }
    supervisor.stop().await;
    Ok(lat)
}

fn restart_suite(cli: &Cli) -> anyhow::Result<Value> {
    let rt = runtime()?;
    println!(
        "restart: one-for-one, crash() -> replacement Running, {} crashes after {RESTART_WARMUP} \
         warm-ups",
        cli.crashes
    );
    println!(
        "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "siblings", "median us", "p99 us", "mean us", "min us", "max us", "target"
    );
    let mut out = Map::new();
    for siblings in [1usize, 10_000] {
        // Run the crash loop as a task, as application code would.
        let mut lat = rt
            .block_on(async { tokio::spawn(restart_point(siblings, cli.crashes.max(1))).await? })?;
        lat.sort_by(f64::total_cmp);
        let median = percentile(&lat, 0.50);
        let p99 = percentile(&lat, 0.99);
        let mean = lat.iter().sum::<f64>() / lat.len() as f64;
        println!(
            "  {:<10} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>14}",
            siblings,
            median,
            p99,
            mean,
            lat[0],
            lat[lat.len() - 1],
            format!(
                "< {TARGET_RESTART_MEDIAN_US:.0} {}",
                ok(median < TARGET_RESTART_MEDIAN_US)
            )
        );
        out.insert(
            format!("siblings_{siblings}"),
            json!({ "median_us": median, "p99_us": p99, "mean_us": mean, "max_us": lat[lat.len() - 1] }),
        );
    }
    Ok(Value::Object(out))
}

// ---- helpers ------------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ok(pass: bool) -> &'static str {
    if pass {
        "ok"
    } else {
        "MISS"
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted data.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Resident set size of this process, from `/proc/self/status`.
fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS in /proc/self/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// User + system CPU time of this process, from `/proc/self/stat` (clock ticks of 1/100 s).
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may contain spaces; the
    // first of them is field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let rest = &stat[stat.rfind(')').context("malformed /proc/self/stat")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) as f64 / 100.0)
}
