//! Safe deploys end to end with real processes: rolling updates under `update.max_unavailable`,
//! `--wait` that follows the new generation (and fails with the failing instance's reason),
//! auto-revert that keeps the old version serving, health checks of each type, history and
//! rollback, `svc plan`, and Ctrl-C during `--wait`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mode_proto::v1 as pb;
use mode_tests::{binary, free_port, Scratch, TestCluster};

const ELECTION: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn both(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

async fn cluster(n: u64) -> (TestCluster, u64) {
    let c = TestCluster::start(n, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(n as usize).await;
    (c, leader)
}

/// A base port with `n` free ports after it (a few tries).
fn free_ports(n: u16) -> u16 {
    for _ in 0..50 {
        let base = free_port();
        if base > 60_000 {
            continue;
        }
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} free ports in a row");
}

/// A `health-target` service: `replicas` instances on ports `port + slot`, version `version`,
/// with an HTTP check and `update` as given (YAML flow mapping).
fn web_spec(replicas: u32, port: u16, version: &str, update: &str, extra: &str) -> String {
    format!(
        "name: web\nkind: exec\nreplicas: {replicas}\nstop_grace_s: 2\nupdate: {update}\nhealth: {{http: {{port: {port}, path: /healthz}}, port_plus_slot: true, interval_ms: 100, timeout_ms: 500, unhealthy_threshold: 1}}\nrestart: {{max_restarts: 1, within_s: 30, backoff_initial_ms: 50}}\n{extra}config:\n  command: {}\n  args: [\"--port\", \"{port}\", \"--plus-slot\", \"--version\", \"{version}\"]\n",
        binary("health-target").display()
    )
}

async fn service(c: &TestCluster, via: u64, name: &str) -> Option<pb::Service> {
    c.client(via)
        .await
        .get_service(pb::GetServiceRequest {
            name: name.into(),
            stale: true,
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Instances of `s` running and healthy.
fn healthy(s: &pb::Service) -> u32 {
    s.instances
        .iter()
        .filter(|i| i.state == "running" && i.health == "healthy")
        .count() as u32
}

/// Samples service `name` every 50 ms until dropped: the fewest instances seen by `count`.
struct Sampler {
    stop: Arc<AtomicBool>,
    least: Arc<AtomicU32>,
    samples: Arc<AtomicU32>,
}

impl Sampler {
    fn start(c: &TestCluster, via: u64, name: &str, count: fn(&pb::Service) -> u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let least = Arc::new(AtomicU32::new(u32::MAX));
        let samples = Arc::new(AtomicU32::new(0));
        let (s, l, n) = (stop.clone(), least.clone(), samples.clone());
        let client = mode_tests::client(&c.nodes[&via].address());
        let name = name.to_string();
        tokio::spawn(async move {
            let mut client = client;
            while !s.load(Ordering::Relaxed) {
                if let Ok(r) = client
                    .get_service(pb::GetServiceRequest {
                        name: name.clone(),
                        stale: true,
                    })
                    .await
                {
                    l.fetch_min(count(&r.into_inner()), Ordering::Relaxed);
                    n.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Sampler {
            stop,
            least,
            samples,
        }
    }

    fn finish(self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        (
            self.least.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

/// `modectl svc apply -f FILE --wait` (in a blocking thread: the sampler keeps running).
async fn apply_wait(c: &TestCluster, via: u64, file: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(binary("modectl"));
    cmd.arg("--endpoint")
        .arg(c.nodes[&via].address())
        .args(["svc", "apply", "-f"])
        .arg(file)
        .args(["--wait", "--wait-timeout", "90"])
        .args(extra)
        .env_remove("MODE_ENDPOINT");
    tokio::task::spawn_blocking(move || cmd.output().expect("run modectl"))
        .await
        .unwrap()
}

/// The `rollout-step` events about `service`: what each replaced.
async fn rollout_steps(c: &TestCluster, via: u64, service: &str) -> Vec<String> {
    c.events(via)
        .await
        .iter()
        .filter(|e| e["kind"] == "rollout-step" && e["service"] == service)
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// What instance `slot`'s process answers on its port (the version it runs).
fn version_at(port: u16, slot: u16) -> String {
    match std::net::TcpStream::connect(("127.0.0.1", port + slot)) {
        Ok(_) => mode_tests::http_get(port + slot, "/").1,
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_command_fails_wait_with_its_reason_and_auto_revert_keeps_the_old_version_serving(
) {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("revert");
    let port = free_ports(3);
    let update = "{max_unavailable: 1, min_healthy_ms: 300, deadline_s: 60, auto_revert: true}";
    let v1 = scratch.0.join("v1.yaml");
    std::fs::write(&v1, web_spec(3, port, "v1", update, "")).unwrap();
    let out = apply_wait(&c, leader, &v1, &[]).await;
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        text(&out.stdout).contains("generation 1 rolled out"),
        "{}",
        both(&out)
    );
    let s = service(&c, leader, "web").await.unwrap();
    assert_eq!(healthy(&s), 3, "{s:?}");

    // The same spec with a command that does not exist.
    let bad = scratch.0.join("bad.yaml");
    let text_v1 = std::fs::read_to_string(&v1).unwrap();
    let typo = text_v1.replace(
        &binary("health-target").display().to_string(),
        "/usr/bin/python9",
    );
    std::fs::write(&bad, typo).unwrap();
    let sampler = Sampler::start(&c, leader, "web", healthy);
    let out = apply_wait(&c, leader, &bad, &[]).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{}", both(&out));
    assert!(
        err.contains("python9"),
        "the instance's reason: {}",
        both(&out)
    );
    assert!(err.contains("reverted"), "{}", both(&out));

    // The revert rolls out; the old version serves throughout.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = service(&c, leader, "web").await.unwrap();
        let r = s.rollout.clone().unwrap_or_default();
        if r.generation == 3 && r.status == "succeeded" {
            assert_eq!(r.revert_of, 2);
            assert!(s.instances.iter().all(|i| i.generation == 3), "{s:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revert did not roll out: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (least, samples) = sampler.finish();
    assert!(samples > 10, "only {samples} samples");
    // max_unavailable 1 of 3: never fewer than 2 healthy instances.
    assert!(least >= 2, "only {least} healthy instances at one moment");
    for slot in 0..3 {
        assert_eq!(version_at(port, slot), "v1", "slot {slot}");
    }
    // The history tells the story.
    let out = c.modectl(leader, &["svc", "history", "web"]);
    let history = text(&out.stdout);
    assert!(out.status.success(), "{}", both(&out));
    assert!(history.contains("reverted: web#0 failed"), "{history}");
    assert!(history.contains("python9"), "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_the_new_generation_only_and_a_one_field_change_replaces_one_at_a_time() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("rolling");
    let sleeper = |max_restarts: u32, extra: &str| {
        format!(
            "name: web\nkind: exec\nreplicas: 3\nstop_grace_s: 1\nupdate: {{max_unavailable: 1, min_healthy_ms: 400}}\nrestart: {{max_restarts: {max_restarts}, within_s: 30, backoff_initial_ms: 50}}\n{extra}config:\n  command: /bin/sleep\n  args: [\"1000\"]\n"
        )
    };
    // Unplaceable first: --wait fails with why (exit 6).
    let file = scratch.0.join("web.yaml");
    std::fs::write(
        &file,
        sleeper(3, "constraints: [{label: zone, equals: nowhere}]\n"),
    )
    .unwrap();
    let out = apply_wait(&c, leader, &file, &[]).await;
    assert_eq!(out.status.code(), Some(6), "{}", both(&out));
    assert!(
        text(&out.stderr).contains("could not be placed"),
        "{}",
        both(&out)
    );
    // Fixed: --wait succeeds, on the new generation only.
    std::fs::write(&file, sleeper(3, "")).unwrap();
    let out = apply_wait(&c, leader, &file, &[]).await;
    assert!(out.status.success(), "{}", both(&out));
    let s = service(&c, leader, "web").await.unwrap();
    let generation = s.spec.as_ref().unwrap().generation;
    assert_eq!(generation, 2);
    assert_eq!(s.instances.len(), 3);
    assert!(
        s.instances
            .iter()
            .all(|i| i.generation == 2 && i.state == "running"),
        "--wait returned before every instance ran generation 2: {s:?}"
    );
    assert!(rollout_steps(&c, leader, "web").await.is_empty());

    // An unchanged re-apply is a no-op that says so.
    let events_before = c.events(leader).await.len();
    let out = c.modectl(leader, &["svc", "apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", both(&out));
    assert!(text(&out.stdout).contains("unchanged"), "{}", both(&out));
    let after = c.events(leader).await;
    assert!(
        !after[events_before..]
            .iter()
            .any(|e| e["kind"] == "spec-applied"),
        "{after:?}"
    );

    // One field (max_restarts 3 -> 4): replaced one at a time, never two down at once.
    let epochs: BTreeMap<u32, u64> = s.instances.iter().map(|i| (i.slot, i.epoch)).collect();
    std::fs::write(&file, sleeper(4, "")).unwrap();
    let running =
        |s: &pb::Service| s.instances.iter().filter(|i| i.state == "running").count() as u32;
    let sampler = Sampler::start(&c, leader, "web", running);
    let out = apply_wait(&c, leader, &file, &[]).await;
    let (least, samples) = sampler.finish();
    assert!(out.status.success(), "{}", both(&out));
    assert!(samples > 10, "only {samples} samples");
    assert!(least >= 2, "{least} of 3 running at one moment");
    let steps = rollout_steps(&c, leader, "web").await;
    assert_eq!(steps.len(), 3, "one step per instance: {steps:?}");
    assert!(
        steps.iter().all(|s| s.matches("web#").count() == 1),
        "{steps:?}"
    );
    let s = service(&c, leader, "web").await.unwrap();
    assert!(s
        .instances
        .iter()
        .all(|i| i.generation == 3 && epochs[&i.slot] < i.epoch));

    // A replica change alone replaces nothing: the same epochs, the new generation.
    let epochs: BTreeMap<u32, u64> = s.instances.iter().map(|i| (i.slot, i.epoch)).collect();
    let out = c.modectl(leader, &["svc", "scale", "web", "4", "--wait"]);
    assert!(out.status.success(), "{}", both(&out));
    let s = service(&c, leader, "web").await.unwrap();
    assert_eq!(s.instances.len(), 4);
    for i in &s.instances {
        assert_eq!(i.generation, 4, "{i:?}");
        if let Some(e) = epochs.get(&i.slot) {
            assert_eq!(*e, i.epoch, "web#{} was replaced by a scale", i.slot);
        }
    }
    assert_eq!(rollout_steps(&c, leader, "web").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_of_each_type_flip_instances_unhealthy_and_back_and_gate_dependents() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("health");
    let (http_port, tcp_port) = (free_ports(1), free_ports(1));
    let sick = scratch.0.join("sick");
    let down = scratch.0.join("down");
    let ready = scratch.0.join("ready");
    let target = binary("health-target").display().to_string();
    let check = "interval_ms: 100, timeout_ms: 500, unhealthy_threshold: 1";
    let specs = format!(
        "- name: http\n  kind: exec\n  stop_grace_s: 1\n  health: {{http: {{port: {http_port}}}, {check}}}\n  config: {{command: {target}, args: [\"--port\", \"{http_port}\", \"--fail-file\", \"{}\"]}}\n\
- name: tcp\n  kind: exec\n  stop_grace_s: 1\n  health: {{tcp: {{port: {tcp_port}}}, {check}}}\n  config: {{command: {target}, args: [\"--port\", \"{tcp_port}\", \"--down-file\", \"{}\"]}}\n\
- name: cmd\n  kind: exec\n  stop_grace_s: 1\n  health: {{command: [/bin/sh, -c, \"test -e {}\"], {check}}}\n  config: {{command: /bin/sleep, args: [\"1000\"]}}\n\
- name: after\n  kind: exec\n  stop_grace_s: 1\n  depends_on: [cmd]\n  config: {{command: /bin/sleep, args: [\"1000\"]}}\n\
- name: inproc\n  kind: ticker\n  config: {{every_ms: 100, healthy_file: \"{}\"}}\n",
        sick.display(),
        down.display(),
        ready.display(),
        ready.display()
    );
    let file = scratch.0.join("checks.yaml");
    std::fs::write(&file, specs).unwrap();
    let out = c.modectl(leader, &["svc", "apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", both(&out));

    let health_of = |name: &'static str| {
        let c = &c;
        async move {
            service(c, leader, name)
                .await
                .and_then(|s| s.instances.first().cloned())
                .map(|i| (i.state, i.health))
                .unwrap_or_default()
        }
    };
    async fn until<F, Fut>(what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f().await {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let is = |name: &'static str, health: &'static str| {
        let h = &health_of;
        move || async move { h(name).await == ("running".to_string(), health.to_string()) }
    };
    until("http healthy", is("http", "healthy")).await;
    until("tcp healthy", is("tcp", "healthy")).await;
    // The command check fails until the file exists: unhealthy, and its dependent waits.
    until("cmd unhealthy", is("cmd", "unhealthy")).await;
    // An in-process kind says so itself (Context::set_healthy).
    until("inproc unhealthy", is("inproc", "unhealthy")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (state, _) = health_of("after").await;
    assert_ne!(
        state, "running",
        "started although its dependency is unhealthy"
    );

    std::fs::write(&sick, "").unwrap();
    std::fs::write(&down, "").unwrap();
    std::fs::write(&ready, "").unwrap();
    until("http unhealthy", is("http", "unhealthy")).await;
    until("tcp unhealthy", is("tcp", "unhealthy")).await;
    until("cmd healthy", is("cmd", "healthy")).await;
    until("inproc healthy", is("inproc", "healthy")).await;
    until("after runs once cmd is healthy", || async {
        health_of("after").await.0 == "running"
    })
    .await;

    std::fs::remove_file(&sick).unwrap();
    std::fs::remove_file(&down).unwrap();
    std::fs::remove_file(&ready).unwrap();
    until("http healthy again", is("http", "healthy")).await;
    until("tcp healthy again", is("tcp", "healthy")).await;
    until("cmd unhealthy again", is("cmd", "unhealthy")).await;
    until("inproc unhealthy again", is("inproc", "unhealthy")).await;
    let events = c.events(leader).await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "instance-health"
                && e["message"] == "http#0 on node 1 is unhealthy"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_writes_nothing_and_rollback_restores_the_previous_version() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("rollback");
    let spec = |arg: &str, replicas: u32| {
        format!(
            "name: web\nkind: exec\nreplicas: {replicas}\nstop_grace_s: 1\nupdate: {{max_unavailable: 2, min_healthy_ms: 100}}\nconfig:\n  command: /bin/sleep\n  args: [\"{arg}\"]\n"
        )
    };
    let v1 = scratch.0.join("v1.yaml");
    let v2 = scratch.0.join("v2.yaml");
    std::fs::write(&v1, spec("1000", 2)).unwrap();
    std::fs::write(&v2, spec("2000", 3)).unwrap();
    let out = apply_wait(&c, leader, &v1, &[]).await;
    assert!(out.status.success(), "{}", both(&out));

    for verb in ["plan", "diff"] {
        let out = c.modectl(leader, &["svc", verb, "-f", v2.to_str().unwrap()]);
        let plan = text(&out.stdout);
        assert!(out.status.success(), "{}", both(&out));
        assert!(plan.contains("web: updated (generation 2)"), "{plan}");
        assert!(
            plan.contains("config.args: [\"1000\"] -> [\"2000\"]"),
            "{plan}"
        );
        assert!(plan.contains("replicas: 2 -> 3"), "{plan}");
        assert!(plan.contains("web#0 replaced on node 1"), "{plan}");
        assert!(plan.contains("web#2 placed on node 1"), "{plan}");
        assert!(plan.contains("nothing was stored"), "{plan}");
    }
    let out = c.modectl(
        leader,
        &["-o", "json", "svc", "plan", "-f", v2.to_str().unwrap()],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan -o json");
    assert_eq!(
        json["services"][0]["fields"].as_array().map(Vec::len),
        Some(2),
        "{json}"
    );
    let s = service(&c, leader, "web").await.unwrap();
    assert_eq!(s.spec.unwrap().generation, 1, "plan stored something");

    let out = apply_wait(&c, leader, &v2, &[]).await;
    assert!(out.status.success(), "{}", both(&out));
    let out = c.modectl(leader, &["svc", "rollback", "web", "--wait"]);
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        text(&out.stdout).contains("rolled back to generation 1's spec (generation 3)"),
        "{}",
        both(&out)
    );
    let s = service(&c, leader, "web").await.unwrap();
    let spec = s.spec.clone().unwrap();
    assert_eq!((spec.generation, spec.replicas), (3, Some(2)));
    assert!(s
        .instances
        .iter()
        .all(|i| i.state == "running" && i.generation == 3));
    let out = c.modectl(leader, &["svc", "history", "web"]);
    let history = text(&out.stdout);
    assert_eq!(history.lines().count(), 4, "{history}");
    assert!(history.contains("rolled back to generation 1"), "{history}");
    // --to names a version; one not kept says which are.
    let out = c.modectl(leader, &["svc", "rollback", "web", "--to", "2"]);
    assert!(out.status.success(), "{}", both(&out));
    let out = c.modectl(leader, &["svc", "rollback", "web", "--to", "99"]);
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(
        text(&out.stderr).contains("kept: 1, 2, 3, 4"),
        "{}",
        both(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_wait_exits_130_and_the_rollout_goes_on() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("ctrlc");
    let file = scratch.0.join("slow.yaml");
    // Each instance must stay up a minute before it counts: --wait would take long.
    std::fs::write(
        &file,
        "name: slow\nkind: exec\nstop_grace_s: 1\nupdate: {min_healthy_ms: 60000}\nconfig: {command: /bin/sleep, args: [\"1000\"]}\n",
    )
    .unwrap();
    let child = Command::new(binary("modectl"))
        .arg("--endpoint")
        .arg(c.nodes[&leader].address())
        .args(["svc", "apply", "-f"])
        .arg(&file)
        .arg("--wait")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run modectl");
    // Once the rollout is under way (its instance runs), interrupt.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running = service(&c, leader, "slow")
            .await
            .is_some_and(|s| s.running == 1);
        if running {
            break;
        }
        assert!(Instant::now() < deadline, "slow never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", both(&out));
    let err = text(&out.stderr);
    assert!(err.contains("goes on in the cluster"), "{err}");
    assert!(!err.contains("not every instance runs"), "{err}");
    // Still rolling in the cluster.
    let s = service(&c, leader, "slow").await.unwrap();
    assert_eq!(s.rollout.unwrap().status, "rolling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_carries_on_under_a_new_leader_and_drain_wait_ends_when_instances_moved() {
    let (mut c, leader) = cluster(3).await;
    let scratch = Scratch::new("failover");
    let spec = |arg: &str| {
        format!(
            "name: web\nkind: exec\nreplicas: 6\nstop_grace_s: 1\nupdate: {{max_unavailable: 1, min_healthy_ms: 1500}}\nconfig:\n  command: /bin/sleep\n  args: [\"{arg}\"]\n"
        )
    };
    let file = scratch.0.join("web.yaml");
    std::fs::write(&file, spec("1000")).unwrap();
    let out = apply_wait(&c, leader, &file, &[]).await;
    assert!(out.status.success(), "{}", both(&out));
    std::fs::write(&file, spec("2000")).unwrap();
    let out = c.modectl(leader, &["svc", "apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", both(&out));
    // Once the first step is taken, the leader dies; the rollout is in the replicated state.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rollout_steps(&c, leader, "web").await.is_empty() {
        assert!(Instant::now() < deadline, "no rollout step");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.node(leader).kill9();
    let other = (1..=3).find(|id| *id != leader).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(s) = service(&c, other, "web").await {
            let r = s.rollout.clone().unwrap_or_default();
            if r.generation == 2 && r.status == "succeeded" {
                assert!(
                    s.instances
                        .iter()
                        .all(|i| i.generation == 2 && i.state == "running"),
                    "{s:?}"
                );
                break;
            }
            assert!(
                r.status == "rolling" || r.generation != 2,
                "the rollout ended otherwise: {r:?}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not finish under the new leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Drain a survivor and wait: its instances run elsewhere when modectl returns.
    c.node(leader).start();
    let victim = (1..=3).find(|id| *id != leader && *id != other).unwrap();
    let out = c.modectl(
        other,
        &[
            "node",
            "drain",
            &victim.to_string(),
            "--wait",
            "--wait-timeout",
            "60",
        ],
    );
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        text(&out.stdout).contains(&format!("node {victim} is drained")),
        "{}",
        both(&out)
    );
    let s = service(&c, other, "web").await.unwrap();
    assert!(
        s.instances
            .iter()
            .all(|i| i.node != victim && i.moving_from != victim),
        "{s:?}"
    );
}

/// An idle agent looks at its instances cheaply (no view, lease or lifecycle change: only
/// their state and health against what it last saw); a health flip of an in-process kind,
/// which changes none of those, must still be seen and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_agent_still_reports_an_in_process_health_flip() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("settled-health");
    let ready = scratch.0.join("ready");
    let file = scratch.0.join("inproc.yaml");
    std::fs::write(
        &file,
        format!(
            "name: inproc\nkind: ticker\nconfig: {{every_ms: 100, healthy_file: \"{}\"}}\n",
            ready.display()
        ),
    )
    .unwrap();
    let out = c.modectl(leader, &["svc", "apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", both(&out));
    let until = |health: &'static str| {
        let c = &c;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let now = service(c, leader, "inproc")
                    .await
                    .and_then(|s| s.instances.first().cloned())
                    .map(|i| (i.state, i.health))
                    .unwrap_or_default();
                if now == ("running".to_string(), health.to_string()) {
                    return;
                }
                assert!(Instant::now() < deadline, "not running {health}: {now:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    until("unhealthy").await;
    for round in 0..2 {
        // Long enough for the agent to settle into its idle looks.
        tokio::time::sleep(Duration::from_secs(3)).await;
        if round % 2 == 0 {
            std::fs::write(&ready, "").unwrap();
            until("healthy").await;
        } else {
            std::fs::remove_file(&ready).unwrap();
            until("unhealthy").await;
        }
    }
}
