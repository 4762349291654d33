//! The image in containers, with real faults: 3 servers and 2 agent-only nodes from
//! `mode:latest` (built by `deploy/image/build.sh`) on a private Docker network.
//!
//! - `docker kill` of the node running a singleton: it runs elsewhere within the heartbeat
//!   grace plus a margin;
//! - `docker network disconnect` of the leader while it hosts a singleton `exec` probe: the
//!   minority stops it before the majority starts it; reconnected, exactly one runs;
//! - a rolling restart of the three servers, one at a time, waiting for readiness: writes keep
//!   succeeding (the longest gap is printed), the singleton never overlaps;
//! - a full stop and start keeps every spec and the event log.
//!
//! Each prints a `FIGURES` line (the README's "Deploy" numbers come from them). Without a
//! Docker engine the tests say so and pass; with one they need `busybox-static` (the probe's
//! shell, added in a test image on top of `mode:latest`, which has none).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_tests::probe::{self, Run};
use mode_tests::{client, Scratch};

const SERVERS: [u64; 3] = [1, 2, 3];
const AGENTS: [u64; 2] = [11, 12];
/// The nodes' --heartbeat-grace (the image's default).
const GRACE: Duration = Duration::from_millis(1500);
const PROBE_TEST_IMAGE: &str = "mode-test-probe:latest";

/// One cluster at a time: they share two cores and the compose ports.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether a Docker engine answers; if not, the reason the tests are skipped.
fn engine() -> Option<String> {
    docker(&["info", "--format", "{{.ServerVersion}}"]).err()
}

/// Build `mode:latest` from this checkout (incremental: quick when it is up to date), then the
/// probe image on top of it. Once per test binary.
fn images() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new("bash")
            .arg(root.join("deploy/image/build.sh"))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "deploy/image/build.sh failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
        probe_image("mode:latest", PROBE_TEST_IMAGE)
    });
    if let Err(e) = built {
        panic!("{e}");
    }
}

/// `base` with the probe's static shell, tagged `tag`.
fn probe_image(base: &str, tag: &str) -> Result<(), String> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err("the probe needs a static shell: apt-get install busybox-static".into());
    }
    let context = Scratch::new("probe-image");
    std::fs::copy(busybox, context.0.join("busybox")).map_err(|e| e.to_string())?;
    std::fs::write(
        context.0.join("Dockerfile"),
        format!("FROM {base}\nCOPY busybox /bin/sh\nCOPY busybox /bin/sleep\n"),
    )
    .map_err(|e| e.to_string())?;
    docker(&["build", "-q", "-t", tag, &context.0.display().to_string()]).map(|_| ())
}

/// Milliseconds of the kernel's uptime: the clock the probes write (containers share it).
fn uptime_ms() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs = text.split_whitespace().next().unwrap();
    let (s, cs) = secs.split_once('.').unwrap();
    s.parse::<u64>().unwrap() * 1000 + cs.parse::<u64>().unwrap() * 10
}

/// A singleton exec probe appending `<uptime ms> <node * 1e6 + pid> <uptime ms it started>` to
/// /ledger/NAME every 50 ms (pids repeat across containers, and in a restarted container: the
/// node id and the start keep them apart).
fn probe_spec(name: &str, servers: &[u64]) -> String {
    let script = format!(
        "read up _ < /proc/uptime; born=${{up%.*}}${{up#*.}}0; while :; do read up _ < /proc/uptime; echo \"${{up%.*}}${{up#*.}}0 $((MODE_NODE_ID * 1000000 + $$)) $born\" >> /ledger/{name}; sleep 0.05; done"
    );
    let names: Vec<String> = servers.iter().map(|s| format!("mode-{s}")).collect();
    serde_json::json!({
        "name": name,
        "kind": "exec",
        "singleton": true,
        "stop_grace_s": 1,
        "config": {"command": "/bin/sh", "args": ["-c", script]},
        "constraints": [{"label": "name", "in": names}],
    })
    .to_string()
}

/// The node a probe run was on.
fn node_of(run: &Run) -> u64 {
    u64::from(run.pid) / 1_000_000
}

/// 3 servers and 2 agents from the probe image on a network of their own.
struct Cluster {
    net: String,
    ledger: Scratch,
}

impl Cluster {
    /// Start one (the caller holds [`serial`]: one cluster at a time).
    fn start() -> Cluster {
        Cluster::start_servers_on(PROBE_TEST_IMAGE)
    }

    /// [`Cluster::start`] with the servers on `image` (the agents on this build's).
    fn start_servers_on(image: &str) -> Cluster {
        images();
        let net = format!("mode-ct-{}", std::process::id());
        let _ = docker(&["network", "rm", &net]);
        let owner = format!("{OWNER}={}", std::process::id());
        must(&["network", "create", "--internal", "--label", &owner, &net]);
        let ledger = Scratch::new("ledger");
        let mut perms = std::fs::metadata(&ledger.0).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o777);
        std::fs::set_permissions(&ledger.0, perms).unwrap();
        let c = Cluster { net, ledger };
        for id in SERVERS {
            c.run_on(id, image);
        }
        for id in AGENTS {
            c.run_on(id, PROBE_TEST_IMAGE);
        }
        c
    }

    fn name(&self, id: u64) -> String {
        format!("{}-{id}", self.net)
    }

    /// Start node `id`'s container from `image`, its data in a volume of its own that outlives
    /// the container (a replaced container takes it over, as an upgrade does).
    fn run_on(&self, id: u64, image: &str) {
        let peers = SERVERS
            .iter()
            .map(|s| format!("{s}=mode-{s}:7071"))
            .collect::<Vec<_>>()
            .join(",");
        let servers = SERVERS
            .iter()
            .map(|s| format!("mode-{s}:7071"))
            .collect::<Vec<_>>()
            .join(",");
        let mut env = vec![
            format!("MODE_NODE_ID={id}"),
            // A private network this test made; the compose and Kubernetes deployments run
            // with mutual TLS.
            "MODE_INSECURE=true".to_string(),
            format!("MODE_LABELS=name=mode-{id}"),
        ];
        if SERVERS.contains(&id) {
            env.push(format!("MODE_PEERS={peers}"));
            env.push(format!("MODE_ADVERTISE=mode-{id}:7070"));
        } else {
            env.push("MODE_ROLE=agent".to_string());
            env.push(format!("MODE_SERVERS={servers}"));
            env.push(format!("MODE_ADVERTISE_PEER=mode-{id}:7071"));
        }
        let name = self.name(id);
        let host = format!("mode-{id}");
        let volume = format!("{}:/ledger", self.ledger.0.display());
        let data = format!("{}-data:/var/lib/mode", self.name(id));
        let owner = format!("{OWNER}={}", std::process::id());
        let mut args = vec![
            "run",
            "-d",
            "--label",
            &owner,
            "--name",
            &name,
            "--hostname",
            &host,
            "--network",
            &self.net,
            "--network-alias",
            &host,
            "-v",
            &volume,
            "-v",
            &data,
        ];
        for e in &env {
            args.extend(["-e", e.as_str()]);
        }
        args.push(image);
        must(&args);
    }

    /// Its address on the test network (the host reaches the network directly).
    fn ip(&self, id: u64) -> Option<String> {
        let format = format!(
            "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
            self.net
        );
        docker(&["inspect", "-f", &format, &self.name(id)])
            .ok()
            .filter(|ip| !ip.is_empty())
    }

    fn client(
        &self,
        id: u64,
    ) -> Option<mode_proto::v1::control_client::ControlClient<tonic::transport::Channel>> {
        self.ip(id).map(|ip| client(&format!("{ip}:7070")))
    }

    /// `/readyz` of node `id` answers 200.
    fn ready(&self, id: u64) -> bool {
        let Some(ip) = self.ip(id) else { return false };
        let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &format!("{ip}:7080").parse().unwrap(),
            Duration::from_millis(500),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
    }

    async fn wait_ready(&self, ids: &[u64], within: Duration) {
        let deadline = Instant::now() + within;
        while !ids.iter().all(|id| self.ready(*id)) {
            assert!(
                Instant::now() < deadline,
                "nodes {ids:?} not ready within {within:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for id in SERVERS {
                if let Some(mut c) = self.client(id) {
                    if let Ok(s) = c
                        .cluster_status(pb::ClusterStatusRequest { local: true })
                        .await
                    {
                        let s = s.into_inner();
                        if s.has_leader {
                            return s.leader;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A call through the first server that answers.
    async fn apply(&self, text: &str) -> Result<(), String> {
        let mut last = String::new();
        for id in SERVERS {
            let Some(mut c) = self.client(id) else {
                continue;
            };
            let mut req = tonic::Request::new(pb::ApplyServicesRequest {
                text: text.to_string(),
                file: "test.yaml".to_string(),
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(3));
            match c.apply_services(req).await {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("node {id}: {}", e.message()),
            }
        }
        Err(last)
    }

    async fn must_apply(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = self.apply(text).await {
            assert!(
                Instant::now() < deadline,
                "apply failed: {e}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn ledger(&self, name: &str) -> PathBuf {
        self.ledger.0.join(name)
    }

    /// The probe runs that wrote in the last `window`.
    fn writing(&self, name: &str, window: Duration) -> Vec<Run> {
        let since = uptime_ms().saturating_sub(window.as_millis() as u64);
        probe::runs(&self.ledger(name))
            .into_iter()
            .filter(|r| r.last_ms >= since)
            .collect()
    }

    /// Wait until exactly one probe run writes, and has for a while; returns it.
    async fn one_writing(&self, name: &str, within: Duration) -> Run {
        self.one_writing_off(name, None, within).await
    }

    /// [`Cluster::one_writing`], on another node than `off`.
    async fn one_writing_off(&self, name: &str, off: Option<u64>, within: Duration) -> Run {
        let deadline = Instant::now() + within;
        loop {
            let now = self.writing(name, Duration::from_millis(500));
            if let [one] = now.as_slice() {
                if one.lines >= 5 && Some(node_of(one)) != off {
                    return *one;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not exactly one {name} probe writing within {within:?}: {}\n{}",
                probe::describe(&probe::runs(&self.ledger(name))),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for id in SERVERS.iter().chain(&AGENTS) {
            let logs = Command::new("docker")
                .args(["logs", "--tail", "25", &self.name(*id)])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
                .unwrap_or_default();
            out.push_str(&format!("---- node {id} ----\n{logs}\n"));
        }
        out
    }

    async fn docker_async(&self, args: &[&str]) {
        let out = tokio::process::Command::new("docker")
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in SERVERS.iter().chain(&AGENTS) {
            let _ = docker(&["rm", "-f", "-v", &self.name(*id)]);
            let _ = docker(&["volume", "rm", &format!("{}-data", self.name(*id))]);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

/// Skip (saying why) without an engine, unless MODE_REQUIRE_DOCKER is set (`.ci/test` sets it
/// where `docker info` answers): there a missing engine is a failure, not a skip.
macro_rules! needs_docker {
    () => {
        if let Some(why) = engine() {
            if std::env::var_os("MODE_REQUIRE_DOCKER").is_some() {
                panic!("MODE_REQUIRE_DOCKER is set but the Docker engine does not answer: {why}");
            }
            eprintln!(
                "SKIPPED: no Docker engine here ({why}); these tests run the image in containers"
            );
            return;
        }
        sweep();
    };
}

/// The label every container and network of these tests carries: the test process's pid.
const OWNER: &str = "mode.test.pid";

/// Remove what an earlier run of these tests left behind when it was killed (its process is
/// gone): containers and networks carry [`OWNER`].
fn sweep() {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    let format = format!("{{{{.ID}}}} {{{{.Label \"{OWNER}\"}}}}");
    let filter = format!("label={OWNER}");
    for network in [false, true] {
        let list: &[&str] = if network {
            &["network", "ls"]
        } else {
            &["ps", "-a"]
        };
        let mut args = list.to_vec();
        args.extend(["--filter", &filter, "--format", &format]);
        let Ok(listed) = docker(&args) else { continue };
        for line in listed.lines() {
            let mut parts = line.split_whitespace();
            let (Some(id), Some(pid)) = (parts.next(), parts.next()) else {
                continue;
            };
            if !alive(pid) {
                let _ = if network {
                    docker(&["network", "rm", id])
                } else {
                    docker(&["rm", "-f", "-v", id])
                };
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_container_s_singleton_runs_elsewhere_within_the_grace() {
    needs_docker!();
    let _serial = serial().await;
    let c = Cluster::start();
    c.wait_ready(&SERVERS, Duration::from_secs(60)).await;
    c.must_apply(&probe_spec("killed", &SERVERS)).await;
    let first = c.one_writing("killed", Duration::from_secs(30)).await;
    let victim = node_of(&first);
    let killed_at = uptime_ms();
    must(&["kill", &c.name(victim)]);
    let next = c
        .one_writing_off("killed", Some(victim), Duration::from_secs(30))
        .await;
    let moved_s = (next.first_ms.saturating_sub(killed_at)) as f64 / 1000.0;
    let runs = probe::runs(&c.ledger("killed"));
    assert!(
        probe::overlaps(&runs, 0).is_empty(),
        "{}",
        probe::describe(&runs)
    );
    // Grace, then a placement and a process start: seconds, with room for a loaded machine.
    let bound = GRACE.as_secs_f64() + 10.0;
    assert!(
        moved_s < bound,
        "the singleton took {moved_s:.2} s to run elsewhere (grace {GRACE:?}); {}",
        probe::describe(&runs)
    );
    eprintln!(
        "FIGURES docker-kill: singleton rescheduled in {moved_s:.2} s (grace {:.1} s)",
        GRACE.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_leader_stops_its_singleton_before_the_majority_starts_one() {
    needs_docker!();
    let _serial = serial().await;
    let c = Cluster::start();
    c.wait_ready(&SERVERS, Duration::from_secs(60)).await;
    let leader = c.leader().await;
    // On the leader first, then free to move among the servers: placement keeps it where it is.
    c.must_apply(&probe_spec("cut", &[leader])).await;
    let first = c.one_writing("cut", Duration::from_secs(30)).await;
    assert_eq!(node_of(&first), leader);
    c.must_apply(&probe_spec("cut", &SERVERS)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let on = c.one_writing("cut", Duration::from_secs(30)).await;
    assert_eq!(node_of(&on), leader, "the probe moved off the leader");

    must(&["network", "disconnect", &c.net, &c.name(leader)]);
    let cut_at = uptime_ms();
    let next = c
        .one_writing_off("cut", Some(leader), Duration::from_secs(30))
        .await;
    let runs = probe::runs(&c.ledger("cut"));
    let old_last = runs
        .iter()
        .filter(|r| node_of(r) == leader)
        .map(|r| r.last_ms)
        .max()
        .unwrap();
    assert!(
        old_last < next.first_ms,
        "the cut-off leader's probe ran until {old_last}, after the new one started at {}: {}",
        next.first_ms,
        probe::describe(&runs)
    );
    let handover_ms = next.first_ms - old_last;
    let stopped_after_ms = old_last.saturating_sub(cut_at);

    let alias = format!("mode-{leader}");
    must(&[
        "network",
        "connect",
        "--alias",
        &alias,
        &c.net,
        &c.name(leader),
    ]);
    c.wait_ready(&SERVERS, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = c.one_writing("cut", Duration::from_secs(30)).await;
    let runs = probe::runs(&c.ledger("cut"));
    let overlaps = probe::overlaps(&runs, 0);
    assert!(
        overlaps.is_empty(),
        "{overlaps:?}\n{}",
        probe::describe(&runs)
    );
    eprintln!(
        "FIGURES docker-partition: the cut-off leader stopped its singleton {:.2} s after the cut; the majority started one {:.2} s later; overlaps {}; after reconnecting one runs (node {})",
        stopped_after_ms as f64 / 1000.0,
        handover_ms as f64 / 1000.0,
        overlaps.len(),
        node_of(&after)
    );
}

/// How a rolling test replaces each server.
#[derive(Clone, Copy)]
enum Roll {
    /// `docker restart`: the same container, the same build.
    Restart,
    /// Stop and remove the container, start a new one from this build's image on the same data
    /// volume: how a compose or Kubernetes upgrade replaces a node.
    Replace,
}

/// Roll the servers one at a time (waiting for every server's readiness in between) while a
/// writer applies a spec every 50 ms through whichever server answers and a singleton probe
/// runs; checks that writes kept succeeding and the singleton never overlapped; returns the
/// figures line.
async fn roll_servers(c: std::sync::Arc<Cluster>, how: Roll, probe: &str) -> String {
    c.wait_ready(&SERVERS, Duration::from_secs(60)).await;
    c.must_apply(&probe_spec(probe, &SERVERS)).await;
    c.one_writing(probe, Duration::from_secs(30)).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut last_ok, mut longest, mut writes, mut failed) =
                (Instant::now(), Duration::ZERO, 0u64, 0u64);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let spec = format!(
                    "{{\"name\": \"writes\", \"kind\": \"ticker\", \"replicas\": 0, \"config\": {{\"message\": \"write {n}\"}}}}"
                );
                match c.apply(&spec).await {
                    Ok(()) => {
                        longest = longest.max(last_ok.elapsed());
                        last_ok = Instant::now();
                        writes += 1;
                    }
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (longest.max(last_ok.elapsed()), writes, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    for id in SERVERS {
        let name = c.name(id);
        match how {
            Roll::Restart => c.docker_async(&["restart", "-t", "10", &name]).await,
            Roll::Replace => {
                c.docker_async(&["stop", "-t", "10", &name]).await;
                c.docker_async(&["rm", &name]).await;
                c.run_on(id, PROBE_TEST_IMAGE);
            }
        }
        c.wait_ready(&SERVERS, Duration::from_secs(60)).await;
    }
    let rolled = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (longest, writes, failed) = writer.await.unwrap();
    c.one_writing(probe, Duration::from_secs(30)).await;
    let runs = probe::runs(&c.ledger(probe));
    let overlaps = probe::overlaps(&runs, 0);
    assert!(
        overlaps.is_empty(),
        "{overlaps:?}\n{}",
        probe::describe(&runs)
    );
    assert!(writes > 0);
    // Available throughout: a restart costs at most an election, never the whole roll.
    assert!(
        longest < Duration::from_secs(15),
        "writes stopped for {longest:?} during the roll\n{}",
        c.logs()
    );
    format!(
        "3 servers one at a time in {:.1} s; {writes} writes succeeded, {failed} attempts failed over to another server; longest gap between successful writes {:.2} s; singleton overlaps {}; singleton runs {}:\n{}",
        rolled.as_secs_f64(),
        longest.as_secs_f64(),
        overlaps.len(),
        runs.len(),
        probe::describe(&runs)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_servers_keeps_writes_going_and_one_singleton() {
    needs_docker!();
    let _serial = serial().await;
    let c = std::sync::Arc::new(Cluster::start());
    let figures = roll_servers(c, Roll::Restart, "rolling").await;
    eprintln!("FIGURES docker-rolling-restart: {figures}");
}

/// The image a rolling upgrade starts from: `MODE_UPGRADE_FROM` (an image of an earlier build,
/// e.g. one `deploy/image/build.sh` made from an older commit), else this build's own.
fn upgrade_from() -> String {
    std::env::var("MODE_UPGRADE_FROM").unwrap_or_else(|_| "mode:latest".to_string())
}

fn revision_of(image: &str) -> String {
    docker(&[
        "image",
        "inspect",
        "-f",
        "{{index .Config.Labels \"org.opencontainers.image.revision\"}}",
        image,
    ])
    .unwrap_or_else(|e| e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_replaces_each_server_container_on_its_volume_and_keeps_writes_going() {
    needs_docker!();
    let _serial = serial().await;
    images();
    let from = upgrade_from();
    let from_probe = "mode-test-probe:upgrade-from";
    probe_image(&from, from_probe).unwrap_or_else(|e| panic!("{e}"));
    let c = std::sync::Arc::new(Cluster::start_servers_on(from_probe));
    let figures = roll_servers(c.clone(), Roll::Replace, "upgrade").await;
    // Every server now runs this build.
    for id in SERVERS {
        let image = must(&["inspect", "-f", "{{.Config.Image}}", &c.name(id)]);
        assert_eq!(image, PROBE_TEST_IMAGE);
    }
    eprintln!(
        "FIGURES docker-rolling-upgrade from {from} ({}) to mode:latest ({}): {figures}",
        revision_of(&from),
        revision_of("mode:latest")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stop_and_start_keeps_every_spec_and_the_event_log() {
    needs_docker!();
    let _serial = serial().await;
    let c = Cluster::start();
    c.wait_ready(&SERVERS, Duration::from_secs(60)).await;
    let names: BTreeSet<String> = (0..20).map(|i| format!("kept-{i}")).collect();
    for n in &names {
        c.must_apply(&format!(
            "{{\"name\": \"{n}\", \"kind\": \"ticker\", \"replicas\": 1, \"config\": {{\"message\": \"{n}\"}}}}"
        ))
        .await;
    }
    let events = |c: &Cluster| {
        let mut cl = c.client(1);
        async move {
            let r = cl
                .as_mut()?
                .list_events(pb::ListEventsRequest {
                    stale: false,
                    ..Default::default()
                })
                .await
                .ok()?;
            Some(
                r.into_inner()
                    .events
                    .into_iter()
                    .map(|e| (e.seq, e.message))
                    .collect::<BTreeSet<_>>(),
            )
        }
    };
    let before = events(&c).await.expect("events before the stop");
    assert!(before.len() >= names.len(), "{before:?}");

    let all: Vec<String> = SERVERS
        .iter()
        .chain(&AGENTS)
        .map(|id| c.name(*id))
        .collect();
    let mut stop = vec!["stop", "-t", "10"];
    stop.extend(all.iter().map(String::as_str));
    c.docker_async(&stop).await;
    let mut start = vec!["start"];
    start.extend(all.iter().map(String::as_str));
    c.docker_async(&start).await;
    c.wait_ready(&SERVERS, Duration::from_secs(60)).await;

    let listed = c
        .client(1)
        .unwrap()
        .list_services(pb::ListServicesRequest::default())
        .await
        .expect("list services after the restart")
        .into_inner();
    let after: BTreeSet<String> = listed
        .services
        .iter()
        .map(|s| s.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default())
        .collect();
    assert!(
        after.is_superset(&names),
        "lost specs: {:?}",
        names.difference(&after).collect::<Vec<_>>()
    );
    let events_after = events(&c).await.expect("events after the restart");
    let lost: Vec<_> = before.difference(&events_after).collect();
    assert!(lost.is_empty(), "events lost over the restart: {lost:?}");
    eprintln!(
        "FIGURES docker-full-restart: {} specs and {} events before a full stop; all kept after the start",
        names.len(),
        before.len()
    );
}

/// `docker-compose down -v` of a compose project when the test ends, however it ends.
struct ComposeProject {
    dir: PathBuf,
    name: String,
}

impl ComposeProject {
    fn compose(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker-compose")
            .current_dir(&self.dir)
            .env("COMPOSE_PROJECT_NAME", &self.name)
            .args(args)
            .output()
            .expect("run docker-compose")
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "-t", "5"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_comes_up_with_mutual_tls_and_modectl_reaches_it_from_the_host() {
    needs_docker!();
    if Command::new("docker-compose")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no docker-compose here");
        return;
    }
    let _serial = serial().await;
    images();
    // A copy of deploy/ (certs.sh writes next to the compose file), with this build's modectl
    // first on PATH.
    let scratch = Scratch::new("compose");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let copied = Command::new("cp")
        .args(["-r"])
        .arg(root.join("deploy"))
        .arg(&scratch.0)
        .status()
        .unwrap();
    assert!(copied.success());
    let project = ComposeProject {
        dir: scratch.0.join("deploy/compose"),
        name: format!("mode-compose-{}", std::process::id()),
    };
    let bin = mode_tests::binary("modectl");
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let certs = Command::new("bash")
        .arg("certs.sh")
        .current_dir(&project.dir)
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(certs.status.success(), "certs.sh: {certs:?}");
    let up = project.compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "docker-compose up: {}",
        String::from_utf8_lossy(&up.stderr)
    );

    let tls = project.dir.join("tls");
    let modectl = |args: &[&str], credentials: bool| {
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--endpoint",
            "127.0.0.1:17071,127.0.0.1:17072,127.0.0.1:17073",
        ]);
        if credentials {
            cmd.arg("--ca")
                .arg(tls.join("ca.pem"))
                .arg("--cert")
                .arg(tls.join("admin.pem"))
                .arg("--key")
                .arg(tls.join("admin-key.pem"));
        }
        for v in [
            "MODE_ENDPOINT",
            "MODE_CA",
            "MODE_CERT",
            "MODE_KEY",
            "MODE_TOKEN",
        ] {
            cmd.env_remove(v);
        }
        cmd.args(args).output().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        let out = modectl(&["-o", "json", "cluster", "status"], true);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if v["members"].as_array().is_some_and(|m| m.len() == 3) && v["leader"].is_u64() {
                break v;
            }
        }
        if Instant::now() > deadline {
            let logs = project.compose(&["logs", "--tail", "30"]);
            panic!(
                "the compose cluster never answered modectl with 3 members: {out:?}\n{}",
                String::from_utf8_lossy(&logs.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The agent registers with the servers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = modectl(&["-o", "json", "node", "ls"], true);
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("1001") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never registered: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let whoami = modectl(&["whoami"], true);
    assert!(
        String::from_utf8_lossy(&whoami.stdout).contains("admin"),
        "{whoami:?}"
    );
    // Without credentials the cluster is closed.
    let refused = modectl(&["svc", "ls"], false);
    assert!(!refused.status.success(), "{refused:?}");
    eprintln!(
        "FIGURES compose: 3 servers + 1 agent up with mutual TLS, leader {}, modectl from the host as admin",
        status["leader"]
    );
}
