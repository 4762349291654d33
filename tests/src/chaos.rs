//! A chaos run: random faults (kill -9 and restart, an isolated leader, minority and majority
//! partitions, flapping links, SIGSTOP) on a [`NetCluster`], against acknowledged writes and
//! singleton probes; then everything is healed and checked: acknowledged writes lost,
//! singleton copies that ran at once, probe processes left running, time to converge.
//!
//! Used by `mode-bench chaos` and by the `chaos` test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use serde_json::{json, Value};

use crate::netns::NetCluster;
use crate::{probe, Launcher, Scratch};

/// Probe runs touching for this long at a hand-over are not counted as overlapping.
pub const OVERLAP_TOLERANCE_MS: u64 = 250;

/// What to run.
#[derive(Clone)]
pub struct ChaosConfig {
    /// How long faults are injected.
    pub duration: Duration,
    pub nodes: u64,
    pub seed: u64,
    /// Singleton probes.
    pub probes: usize,
    /// Concurrent writers (each waits 100 ms between writes).
    pub writers: usize,
    /// How nodes are started (default: the workspace's `mode-node`).
    pub launcher: Option<Launcher>,
    /// Extra flags for every node.
    pub flags: Vec<String>,
    /// How long to wait for the cluster to converge after the last fault.
    pub converge_timeout: Duration,
    /// Print each fault as it is injected.
    pub verbose: bool,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            duration: Duration::from_secs(60),
            nodes: 5,
            seed: 1,
            probes: 3,
            writers: 2,
            launcher: None,
            flags: vec!["--log-level".into(), "warn".into()],
            converge_timeout: Duration::from_secs(60),
            verbose: false,
        }
    }
}

/// What a chaos run found.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    pub seed: u64,
    pub nodes: u64,
    pub seconds: f64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    pub writes_attempted: u64,
    pub writes_acknowledged: u64,
    /// Writes that failed (error or timeout) but are in the state after heal.
    pub failed_writes_present: u64,
    /// Of those, writes whose error said they were not made: a broken promise.
    pub not_made_but_present: u64,
    /// Acknowledged writes missing from a linearizable read after heal.
    pub lost: Vec<String>,
    /// Pairs of singleton copies that ran at once (per probe, summed).
    pub overlaps: u64,
    /// Of those, the pairs where neither copy outlived its node (so not caused by orphans).
    pub overlaps_without_orphans: u64,
    pub worst_overlap_without_orphans_ms: u64,
    pub worst_overlap_ms: u64,
    /// The worst overlaps, described.
    pub overlap_examples: Vec<String>,
    /// Probe processes running at the end, and how many should (one per probe).
    pub probe_processes: u64,
    pub probe_processes_expected: u64,
    /// Probe processes at the end whose node is gone (their parent is not a `mode-node`).
    pub orphans: u64,
    /// Seconds from the last fault's end until every node agreed on the leader and applied
    /// index (the Raft part of converging); None if they never did.
    pub raft_converge_s: Option<f64>,
    /// Seconds from the last fault's end (everything healed) until every node agreed on the
    /// leader and applied index and every probe ran exactly once; None if it never did.
    pub converge_s: Option<f64>,
    /// What was done when, for the record.
    pub timeline: Vec<String>,
}

impl ChaosReport {
    pub fn duplicates(&self) -> u64 {
        self.probe_processes
            .saturating_sub(self.probe_processes_expected)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "seed": self.seed,
            "nodes": self.nodes,
            "seconds": self.seconds,
            "faults": self.faults,
            "faults_total": self.faults.values().sum::<u64>(),
            "writes_attempted": self.writes_attempted,
            "writes_acknowledged": self.writes_acknowledged,
            "acknowledged_writes_lost": self.lost.len(),
            "lost_examples": self.lost.iter().take(20).collect::<Vec<_>>(),
            "failed_writes_present_after_heal": self.failed_writes_present,
            "not_made_writes_present_after_heal": self.not_made_but_present,
            "singleton_overlaps": self.overlaps,
            "worst_overlap_ms": self.worst_overlap_ms,
            "singleton_overlaps_without_orphans": self.overlaps_without_orphans,
            "worst_overlap_without_orphans_ms": self.worst_overlap_without_orphans_ms,
            "orphaned_probe_processes": self.orphans,
            "raft_converge_s": self.raft_converge_s,
            "overlap_examples": self.overlap_examples,
            "probe_processes_at_end": self.probe_processes,
            "probe_processes_expected": self.probe_processes_expected,
            "duplicate_processes": self.duplicates(),
            "converge_s": self.converge_s,
        })
    }

    /// The figures as a table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let rows = [
            (
                "faults injected".to_string(),
                format!(
                    "{} ({})",
                    self.faults.values().sum::<u64>(),
                    faults.join(", ")
                ),
                String::new(),
            ),
            (
                "writes acknowledged".to_string(),
                format!("{} of {}", self.writes_acknowledged, self.writes_attempted),
                String::new(),
            ),
            (
                "acknowledged writes lost".to_string(),
                self.lost.len().to_string(),
                target(self.lost.is_empty(), "0"),
            ),
            (
                "failed writes present after heal".to_string(),
                self.failed_writes_present.to_string(),
                "(their outcome was unknown: a client timeout or `outcome unknown`)".to_string(),
            ),
            (
                "  of which said `the write was not made`".to_string(),
                self.not_made_but_present.to_string(),
                target(self.not_made_but_present == 0, "0"),
            ),
            (
                "overlapping singleton runs".to_string(),
                format!("{} (worst {} ms)", self.overlaps, self.worst_overlap_ms),
                target(self.overlaps == 0, "0"),
            ),
            (
                "  of which no copy outlived its node".to_string(),
                format!(
                    "{} (worst {} ms)",
                    self.overlaps_without_orphans, self.worst_overlap_without_orphans_ms
                ),
                String::new(),
            ),
            (
                "probe processes at the end".to_string(),
                format!(
                    "{} for {} probes ({} duplicates)",
                    self.probe_processes,
                    self.probe_processes_expected,
                    self.duplicates()
                ),
                target(self.duplicates() == 0, "0 duplicates"),
            ),
            (
                "  of which outlived their node".to_string(),
                self.orphans.to_string(),
                String::new(),
            ),
            (
                "seconds until one leader and applied index".to_string(),
                match self.raft_converge_s {
                    Some(s) => format!("{s:.1}"),
                    None => "never (within the timeout)".to_string(),
                },
                String::new(),
            ),
            (
                "seconds to converge after the last fault".to_string(),
                match self.converge_s {
                    Some(s) => format!("{s:.1}"),
                    None => "never (within the timeout)".to_string(),
                },
                target(self.converge_s.is_some_and(|s| s < 5.0), "< 5"),
            ),
        ];
        t.push_str(&format!(
            "chaos: {} nodes in network namespaces, {:.0} s of faults, seed {}\n",
            self.nodes, self.seconds, self.seed
        ));
        for (k, v, goal) in rows {
            t.push_str(&format!("  {k:<42} {v:<40} {goal}\n"));
        }
        for e in self.overlap_examples.iter().take(3) {
            t.push_str(&format!("  overlap: {e}\n"));
        }
        if !self.lost.is_empty() {
            let some: Vec<&str> = self.lost.iter().take(10).map(String::as_str).collect();
            t.push_str(&format!("  lost: {}\n", some.join(", ")));
        }
        t
    }
}

fn target(ok: bool, goal: &str) -> String {
    format!("target {goal}: {}", if ok { "ok" } else { "MISSED" })
}

/// splitmix64: small, seeded, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }

    fn shuffled(&mut self, mut v: Vec<u64>) -> Vec<u64> {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// Every node's own view (None: no answer within `timeout`), asked concurrently.
async fn views(
    addresses: &BTreeMap<u64, String>,
    timeout: Duration,
) -> BTreeMap<u64, Option<pb::ClusterStatusReply>> {
    let mut set = tokio::task::JoinSet::new();
    for (id, address) in addresses {
        let (id, mut c) = (*id, crate::client(address));
        set.spawn(async move {
            let mut req = tonic::Request::new(pb::ClusterStatusRequest { local: true });
            req.set_timeout(timeout);
            (id, c.cluster_status(req).await.ok().map(|r| r.into_inner()))
        });
    }
    let mut out = BTreeMap::new();
    while let Some(Ok((id, v))) = set.join_next().await {
        out.insert(id, v);
    }
    out
}

/// The leader most answering nodes name.
async fn leader_guess(addresses: &BTreeMap<u64, String>) -> Option<u64> {
    let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
    for s in views(addresses, Duration::from_millis(700))
        .await
        .into_values()
        .flatten()
    {
        if s.has_leader {
            *votes.entry(s.leader).or_default() += 1;
        }
    }
    votes.into_iter().max_by_key(|(_, n)| *n).map(|(l, _)| l)
}

/// What the writers did.
#[derive(Default)]
struct Writes {
    attempted: u64,
    acknowledged: Vec<String>,
    failed: Vec<String>,
    /// Failed writes whose error said the write was not made.
    not_made: Vec<String>,
}

/// Write `put_spec`s of unique names (replicas 0: they schedule nothing) through every node
/// in turn until `stop`.
async fn writer(
    w: usize,
    addresses: Vec<String>,
    stop: Arc<AtomicBool>,
    writes: Arc<Mutex<Writes>>,
) {
    let clients: Vec<_> = addresses.iter().map(|a| crate::peer_client(a)).collect();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("w{w}-{i}");
        let mut c = clients[i % clients.len()].clone();
        i += 1;
        let command = json!({
            "op": "put_spec",
            "spec": {"name": name, "kind": "ticker", "replicas": 0},
        });
        let proposed = crate::propose(
            &mut c,
            &command.to_string(),
            "",
            Some(Duration::from_secs(3)),
        )
        .await;
        let (acked, not_made) = match proposed {
            Ok((result, _)) => (result["ok"] == true, false),
            Err(e) => (false, e.message().contains("was not made")),
        };
        {
            let mut w = writes.lock().unwrap_or_else(|p| p.into_inner());
            w.attempted += 1;
            if acked {
                w.acknowledged.push(name);
            } else {
                if not_made {
                    w.not_made.push(name.clone());
                }
                w.failed.push(name);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Names of every spec in the state, read linearizably through the leader.
async fn stored_names(
    c: &NetCluster,
    addresses: &BTreeMap<u64, String>,
) -> Option<BTreeSet<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(leader) = leader_guess(addresses).await {
            let mut client = c.peer_client(leader);
            let mut req = tonic::Request::new(pb::QueryRequest {
                query: "specs".into(),
                stale: false,
            });
            req.set_timeout(Duration::from_secs(10));
            if let Ok(r) = client.query(req).await {
                if let Ok(Value::Array(specs)) = serde_json::from_str(&r.into_inner().result_json) {
                    return Some(
                        specs
                            .iter()
                            .filter_map(|s| s["name"].as_str().map(str::to_string))
                            .collect(),
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The nodes the probes are placed on, as the first node that answers sees them (`peers`:
/// the nodes' peer addresses).
async fn probe_hosts(peers: &BTreeMap<u64, String>, probes: usize) -> Vec<u64> {
    for address in peers.values() {
        let mut c = crate::peer_client(address);
        let mut req = tonic::Request::new(pb::QueryRequest {
            query: "placements".into(),
            stale: true,
        });
        req.set_timeout(Duration::from_millis(700));
        let Ok(r) = c.query(req).await else {
            continue;
        };
        let Ok(p) = serde_json::from_str::<Value>(&r.into_inner().result_json) else {
            continue;
        };
        let mut hosts: Vec<u64> = (0..probes)
            .filter_map(|i| p[format!("probe-{i}")]["0"]["node"].as_u64())
            .collect();
        hosts.sort();
        hosts.dedup();
        return hosts;
    }
    Vec::new()
}

struct Run<'a> {
    c: &'a mut NetCluster,
    addresses: BTreeMap<u64, String>,
    /// The nodes' peer addresses (raw queries).
    peers: BTreeMap<u64, String>,
    rng: Rng,
    t0: Instant,
    probes: usize,
    report: &'a mut ChaosReport,
    verbose: bool,
}

impl Run<'_> {
    fn note(&mut self, what: String) {
        let line = format!("{:7.2} s  {what}", self.t0.elapsed().as_secs_f64());
        if self.verbose {
            println!("  {line}");
        }
        self.report.timeline.push(line);
    }

    fn count(&mut self, kind: &str) {
        *self.report.faults.entry(kind.to_string()).or_default() += 1;
    }

    fn random_node(&mut self) -> u64 {
        1 + self.rng.below(self.c.ids().len() as u64)
    }

    /// A node hosting a probe (or any node when none is known), half the time; else any node.
    async fn probe_host_or_any(&mut self) -> u64 {
        let hosts = probe_hosts(&self.peers, self.probes).await;
        if !hosts.is_empty() && self.rng.below(2) == 0 {
            hosts[self.rng.below(hosts.len() as u64) as usize]
        } else {
            self.random_node()
        }
    }

    /// A random split into a minority and a majority; the nodes in `first` (as many as fit)
    /// are in the minority.
    fn split(&mut self, first: &[u64]) -> (Vec<u64>, Vec<u64>) {
        let n = self.c.ids().len();
        let mut order = self.rng.shuffled(self.c.ids());
        for id in first.iter().rev() {
            order.retain(|o| o != id);
            order.insert(0, *id);
        }
        let most = (n - 1) / 2;
        let minority_size = (1 + self.rng.below(most as u64) as usize)
            .max(first.len())
            .min(most);
        let majority = order.split_off(minority_size);
        (order, majority)
    }

    async fn fault(&mut self) {
        match self.rng.below(6) {
            0 => {
                let id = self.probe_host_or_any().await;
                self.count("kill9_restart");
                self.note(format!("kill -9 node {id}"));
                self.c.kill9(id);
                tokio::time::sleep(self.rng.millis(500, 3000)).await;
                self.c.restart(id);
                self.note(format!("restarted node {id}"));
            }
            1 => {
                let leader = match leader_guess(&self.addresses).await {
                    Some(l) => l,
                    None => self.random_node(),
                };
                self.count("leader_isolated");
                self.note(format!("isolate the leader, node {leader}"));
                self.c.isolate(leader);
                tokio::time::sleep(self.rng.millis(2000, 6000)).await;
                self.c.heal();
                self.note("heal".into());
            }
            2 => {
                let (minority, majority) = self.split(&[]);
                self.count("partition_random");
                self.note(format!("partition {minority:?} | {majority:?}"));
                self.c.partition(&[&minority, &majority]);
                tokio::time::sleep(self.rng.millis(2000, 6000)).await;
                self.c.heal();
                self.note("heal".into());
            }
            3 => {
                // The leader with a node running a probe (issue 9's defect 4).
                let leader = leader_guess(&self.addresses).await;
                let hosts = probe_hosts(&self.peers, self.probes).await;
                let mut first: Vec<u64> = leader.into_iter().collect();
                if let Some(h) = hosts.iter().find(|h| Some(**h) != leader) {
                    first.push(*h);
                }
                let (minority, majority) = self.split(&first);
                self.count("partition_leader_in_minority");
                self.note(format!(
                    "partition {minority:?} (leader {leader:?}, probes on {hosts:?}) | {majority:?}"
                ));
                self.c.partition(&[&minority, &majority]);
                tokio::time::sleep(self.rng.millis(2000, 6000)).await;
                self.c.heal();
                self.note("heal".into());
            }
            4 => {
                let (minority, majority) = self.split(&[]);
                let until = Instant::now() + self.rng.millis(2000, 6000);
                self.count("partition_flapping");
                self.note(format!("flapping partition {minority:?} | {majority:?}"));
                let mut flips = 0;
                while Instant::now() < until {
                    self.c.partition(&[&minority, &majority]);
                    tokio::time::sleep(self.rng.millis(200, 700)).await;
                    self.c.heal();
                    tokio::time::sleep(self.rng.millis(200, 700)).await;
                    flips += 1;
                }
                self.note(format!("flapping ends after {flips} cuts"));
            }
            _ => {
                let id = match (self.rng.below(2), leader_guess(&self.addresses).await) {
                    (0, Some(l)) => l,
                    _ => self.probe_host_or_any().await,
                };
                self.count("sigstop");
                self.note(format!("SIGSTOP node {id}"));
                self.c.stop(id);
                tokio::time::sleep(self.rng.millis(1000, 5000)).await;
                self.c.cont(id);
                self.note(format!("SIGCONT node {id}"));
            }
        }
    }

    /// Every link healed, every node running and resumed.
    fn heal_everything(&mut self) {
        self.c.heal();
        for id in self.c.ids() {
            self.c.cont(id);
            if !self.c.running(id) {
                self.c.restart(id);
            }
        }
    }
}

/// Whether every node agrees on one leader and one applied index.
async fn raft_converged(addresses: &BTreeMap<u64, String>) -> Result<(), String> {
    let views = views(addresses, Duration::from_secs(1)).await;
    let mut seen = BTreeSet::new();
    for (id, v) in &views {
        match v {
            Some(s) if s.has_leader => {
                seen.insert((s.leader, s.applied_index));
            }
            Some(_) => return Err(format!("node {id} sees no leader")),
            None => return Err(format!("node {id} does not answer")),
        }
    }
    if seen.len() != 1 {
        return Err(format!(
            "nodes disagree on (leader, applied index): {seen:?}"
        ));
    }
    Ok(())
}

/// Whether the cluster has settled: one leader and one applied index on every node (when that
/// first held is noted in `raft_at`, seconds since `since`), and every probe running exactly
/// once.
async fn converged(
    addresses: &BTreeMap<u64, String>,
    probe_files: &[PathBuf],
    raft_at: &mut Option<f64>,
    since: Instant,
) -> Result<(), String> {
    raft_converged(addresses).await?;
    raft_at.get_or_insert(since.elapsed().as_secs_f64());
    for f in probe_files {
        let live = probe::live(f);
        if live.len() != 1 {
            return Err(format!(
                "{} runs {} times: {live:?}",
                f.display(),
                live.len()
            ));
        }
    }
    Ok(())
}

/// What a failed run needs to be understood: each probe's instance as every node's replica
/// has it, the last events, and the tail of every node's log.
async fn diagnose(c: &NetCluster, probes: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..probes {
        let name = format!("probe-{i}");
        for id in c.ids() {
            let seen = tokio::time::timeout(Duration::from_secs(2), c.instances(id, &name)).await;
            out.push(format!("{name} as node {id} has it: {seen:?}"));
        }
    }
    if let Some(id) = c.ids().first() {
        let events = tokio::time::timeout(Duration::from_secs(2), c.events(*id))
            .await
            .unwrap_or_default();
        out.push(format!("last events (node {id}'s replica):"));
        let from = events.len().saturating_sub(60);
        out.extend(events[from..].iter().map(|e| format!("  {e}")));
    }
    out.push(c.log_tails(40));
    out
}

/// Run faults for `cfg.duration` against a fresh cluster, heal, and report.
pub async fn run(cfg: ChaosConfig) -> ChaosReport {
    let mut report = ChaosReport {
        seed: cfg.seed,
        nodes: cfg.nodes,
        probe_processes_expected: cfg.probes as u64,
        ..ChaosReport::default()
    };
    let flags: Vec<&str> = cfg.flags.iter().map(String::as_str).collect();
    let mut builder = NetCluster::builder(cfg.nodes).flags(&flags);
    if let Some(l) = cfg.launcher.clone() {
        builder = builder.launcher(l);
    }
    let mut c = builder.start();
    let scratch = Scratch::new("chaos");
    c.wait_leader(Duration::from_secs(30)).await;
    c.wait_registered(cfg.nodes as usize).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let probe_files: Vec<PathBuf> = (0..cfg.probes)
        .map(|i| scratch.0.join(format!("probe-{i}")))
        .collect();
    for (i, f) in probe_files.iter().enumerate() {
        let spec = probe::probe_spec(&format!("probe-{i}"), f, json!({}));
        c.apply(leader, &spec).await.expect("apply a probe");
    }
    for i in 0..cfg.probes {
        c.wait_instances(
            leader,
            &format!("probe-{i}"),
            Duration::from_secs(30),
            |p| p.get(&0).is_some_and(|p| p["state"] == "running"),
        )
        .await;
    }
    let addresses: BTreeMap<u64, String> =
        c.ids().into_iter().map(|id| (id, c.address(id))).collect();
    let peers: BTreeMap<u64, String> = c
        .ids()
        .into_iter()
        .map(|id| (id, c.nodes[&id].peer_address()))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Writes::default()));
    let mut writers = Vec::new();
    for w in 0..cfg.writers {
        let mut order: Vec<String> = peers.values().cloned().collect();
        let by = w % order.len();
        order.rotate_left(by);
        writers.push(tokio::spawn(writer(w, order, stop.clone(), writes.clone())));
    }

    let t0 = Instant::now();
    let mut run = Run {
        c: &mut c,
        addresses: addresses.clone(),
        peers: peers.clone(),
        rng: Rng(cfg.seed),
        t0,
        probes: cfg.probes,
        report: &mut report,
        verbose: cfg.verbose,
    };
    while t0.elapsed() < cfg.duration {
        run.fault().await;
        let pause = run.rng.millis(500, 2500);
        tokio::time::sleep(pause).await;
    }
    run.heal_everything();
    run.note("healed everything".into());
    let healed = Instant::now();
    report.seconds = t0.elapsed().as_secs_f64();

    stop.store(true, Ordering::Relaxed);
    let mut last_problem = String::new();
    while healed.elapsed() < cfg.converge_timeout {
        match converged(
            &addresses,
            &probe_files,
            &mut report.raft_converge_s,
            healed,
        )
        .await
        {
            Ok(()) => {
                report.converge_s = Some(healed.elapsed().as_secs_f64());
                break;
            }
            Err(e) => last_problem = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if report.converge_s.is_none() {
        report
            .timeline
            .push(format!("did not converge: {last_problem}"));
        report.timeline.extend(diagnose(&c, cfg.probes).await);
    }
    // A write still in flight ends within its 3 s timeout.
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }

    let writes = std::mem::take(&mut *writes.lock().unwrap_or_else(|p| p.into_inner()));
    report.writes_attempted = writes.attempted;
    report.writes_acknowledged = writes.acknowledged.len() as u64;
    match stored_names(&c, &addresses).await {
        Some(stored) => {
            report.lost = writes
                .acknowledged
                .iter()
                .filter(|n| !stored.contains(*n))
                .cloned()
                .collect();
            report.failed_writes_present =
                writes.failed.iter().filter(|n| stored.contains(*n)).count() as u64;
            report.not_made_but_present = writes
                .not_made
                .iter()
                .filter(|n| stored.contains(*n))
                .count() as u64;
        }
        None => {
            report
                .timeline
                .push("no linearizable read of the specs succeeded within 30 s".into());
            report.lost = vec!["(unknown: the state could not be read)".into()];
        }
    }

    let mut all = Vec::new();
    let mut orphans = BTreeSet::new();
    for f in &probe_files {
        let runs = probe::runs(f);
        all.extend(
            probe::overlaps(&runs, OVERLAP_TOLERANCE_MS)
                .into_iter()
                .map(|o| (f.clone(), o)),
        );
        let live = probe::live(f);
        report.probe_processes += live.len() as u64;
        orphans.extend(live.into_iter().filter(|p| !probe::parent_is_a_node(*p)));
    }
    report.orphans = orphans.len() as u64;
    let clean: Vec<u64> = all
        .iter()
        .filter(|(_, o)| !orphans.contains(&o.a.pid) && !orphans.contains(&o.b.pid))
        .map(|(_, o)| o.ms)
        .collect();
    report.overlaps_without_orphans = clean.len() as u64;
    report.worst_overlap_without_orphans_ms = clean.iter().copied().max().unwrap_or(0);
    all.sort_by_key(|(_, o)| std::cmp::Reverse(o.ms));
    report.overlaps = all.len() as u64;
    report.worst_overlap_ms = all.first().map_or(0, |(_, o)| o.ms);
    report.overlap_examples = all
        .iter()
        .take(5)
        .map(|(f, o)| {
            format!(
                "{}: {o}",
                f.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            )
        })
        .collect();
    drop(c);
    report
}
