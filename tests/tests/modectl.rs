//! `modectl` on the typed API: several endpoints (`--endpoint a,b,c`), applies with
//! `--dry-run` and compare-and-set (`--expect-generation`, exit 5), `svc apply --wait`, and
//! `events --follow -o json` (NDJSON) surviving the restart of the node it follows.

use std::io::BufRead as _;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mode_tests::{binary, free_port, Scratch, TestCluster};
use serde_json::Value;

const ELECTION: Duration = Duration::from_secs(20);

/// modectl with `--endpoint list`.
fn modectl_at(list: &str, args: &[&str]) -> Output {
    Command::new(binary("modectl"))
        .arg("--endpoint")
        .arg(list)
        .args(args)
        .env_remove("MODE_ENDPOINT")
        .output()
        .expect("run modectl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn cluster(n: u64) -> (TestCluster, u64) {
    let c = TestCluster::start(n, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(n as usize).await;
    (c, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modectl_moves_past_endpoints_that_are_down_and_names_every_one_when_all_are() {
    let (c, _) = cluster(1).await;
    let (dead, dead2) = (free_port(), free_port());
    let live = c.nodes[&1].address();
    let both = format!("127.0.0.1:{dead},{live}");
    let out = modectl_at(&both, &["cluster", "status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("leader: node 1"),
        "{}",
        text(&out.stdout)
    );
    // A write goes through the live one too (the dead one was never reached).
    let scratch = Scratch::new("endpoints");
    let file = scratch.0.join("web.yaml");
    std::fs::write(&file, "name: web\nkind: ticker\n").unwrap();
    let out = modectl_at(&both, &["svc", "apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = modectl_at(&both, &["svc", "get", "web"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // None answers: exit 4, naming each endpoint tried.
    let out = modectl_at(
        &format!("127.0.0.1:{dead},127.0.0.1:{dead2}"),
        &["svc", "ls"],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{dead}")) && err.contains(&format!("127.0.0.1:{dead2}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_dry_run_stores_nothing_and_a_lost_compare_and_set_exits_5() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("cas");
    let file = scratch.0.join("web.yaml");
    std::fs::write(&file, "name: web\nkind: ticker\nreplicas: 2\n").unwrap();
    let f = file.to_str().unwrap();

    let out = c.modectl(leader, &["svc", "apply", "-f", f, "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("dry run"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("web"), "{}", text(&out.stdout));
    let out = c.modectl(leader, &["svc", "get", "web"]);
    assert_eq!(out.status.code(), Some(3), "a dry run stored the spec");

    // Generation 0: it must not exist yet. Then it does, and the same expectation loses.
    let out = c.modectl(
        leader,
        &["svc", "apply", "-f", f, "--expect-generation", "web=0"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = c.modectl(
        leader,
        &["svc", "apply", "-f", f, "--expect-generation", "web=0"],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let out = c.modectl(
        leader,
        &["svc", "scale", "web", "3", "--expect-generation", "7"],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let out = c.modectl(leader, &["-o", "json", "svc", "get", "web"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("svc get -o json is JSON");
    assert_eq!(v["spec"]["replicas"], 2, "{v}");
    let generation = v["spec"]["generation"].as_u64().unwrap();

    let out = c.modectl(
        leader,
        &[
            "svc",
            "scale",
            "web",
            "3",
            "--expect-generation",
            &generation.to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = c.modectl(leader, &["-o", "json", "svc", "get", "web"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["spec"]["replicas"], 3, "{v}");
    assert!(
        v["spec"]["generation"].as_u64().unwrap() > generation,
        "{v}"
    );

    // A malformed expectation is a usage error.
    let out = c.modectl(
        leader,
        &["svc", "apply", "-f", f, "--expect-generation", "web"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_follows_the_service_until_it_runs_and_unknown_services_have_no_events() {
    let (c, leader) = cluster(1).await;
    let scratch = Scratch::new("wait");
    let file = scratch.0.join("web.yaml");
    std::fs::write(&file, "name: web\nkind: ticker\nreplicas: 2\n").unwrap();
    let out = c.modectl(
        leader,
        &[
            "svc",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--wait",
            "--wait-timeout",
            "30",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text(&out.stderr));
    assert!(stdout.contains("web: generation 1 rolled out"), "{stdout}");
    let inst = c.instances(leader, "web").await;
    assert!(mode_tests::all_running(&inst, 2), "{inst:?}");

    let out = c.modectl(leader, &["events", "--service", "nope"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = c.modectl(leader, &["events", "--service", "web"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("SEQ"), "{}", text(&out.stdout));
}

/// A running `modectl events --follow`, killed on drop.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Follower {
    fn start(list: &str) -> Follower {
        let mut child = Command::new(binary("modectl"))
            .args(["--endpoint", list, "-o", "json", "events", "--follow"])
            .env_remove("MODE_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start modectl events --follow");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait (up to `timeout`) for an event whose message starts with `message`.
    fn wait_for(&mut self, message: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.seen.iter().any(|l| {
                serde_json::from_str::<Value>(l).is_ok_and(|v| {
                    v["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(message))
                })
            }) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(e) => panic!(
                    "no event '{message}' within {timeout:?} ({e:?}); printed so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Stop it; its stderr.
    fn stop(mut self) -> (Vec<String>, String) {
        let _ = self.child.kill();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let _ = self.child.wait();
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        (std::mem::take(&mut self.seen), err)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn record(c: &TestCluster, via: u64, message: &str) {
    let command =
        serde_json::json!({"op": "record_event", "kind": "probe", "message": message}).to_string();
    let deadline = Instant::now() + ELECTION;
    while let Err(e) = c.write_command(via, &command).await {
        assert!(Instant::now() < deadline, "cannot record an event: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_prints_ndjson_and_resumes_after_its_node_restarts_without_gaps_or_repeats() {
    let (mut c, leader) = cluster(3).await;
    let followed = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != followed).unwrap();
    let list = format!(
        "{},{}",
        c.nodes[&followed].address(),
        c.nodes[&other].address()
    );
    let mut f = Follower::start(&list);
    // The kept events first (node-registered...), then what comes while it follows.
    f.wait_for("node 1 registered", Duration::from_secs(20));
    record(&c, leader, "probe-1").await;
    f.wait_for("probe-1", Duration::from_secs(20));

    // The node it follows dies: the next events come through the other endpoint.
    c.node(followed).kill9();
    record(&c, leader, "probe-2").await;
    f.wait_for("probe-2", Duration::from_secs(30));
    c.node(followed).start();
    record(&c, leader, "probe-3").await;
    f.wait_for("probe-3", Duration::from_secs(30));
    let (lines, err) = f.stop();

    // NDJSON only: every line one event object, sequence numbers strictly increasing.
    let mut seqs = Vec::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("not a JSON line ({e}): {line}\nall:\n{}", lines.join("\n"))
        });
        seqs.push(v["seq"].as_u64().expect("a seq"));
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "printed twice or out of order: {seqs:?}"
    );
    assert!(err.contains("reconnected"), "stderr: {err}");
    // Nothing the log holds was missed.
    let last = *seqs.last().unwrap();
    let kept: Vec<u64> = c
        .events(leader)
        .await
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .filter(|s| *s <= last)
        .collect();
    let missing: Vec<&u64> = kept.iter().filter(|s| !seqs.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "missed events {missing:?}; printed {seqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_filter_by_kind_node_and_time_and_version_names_both_builds() {
    let (c, leader) = cluster(1).await;
    for m in ["first probe", "second probe"] {
        record(&c, leader, m).await;
    }
    let lines = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["-o", "json", "events"];
        all.extend_from_slice(args);
        let out = c.modectl(leader, &all);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "events -o json is not a JSON list ({e}): {}",
                text(&out.stdout)
            )
        })
    };
    let everything = lines(&[]);
    assert!(
        everything.iter().any(|e| e["kind"] != "probe"),
        "{everything:?}"
    );

    let probes = lines(&["--kind", "probe"]);
    assert_eq!(probes.len(), 2, "{probes:?}");
    assert!(probes.iter().all(|e| e["kind"] == "probe"));
    let last = lines(&["--kind", "probe", "--tail", "1"]);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["message"], "second probe");

    let about_node = lines(&["--node", &leader.to_string()]);
    assert!(
        !about_node.is_empty(),
        "the node registered: an event about it"
    );
    assert!(
        about_node.iter().all(|e| e["node"] == leader),
        "{about_node:?}"
    );
    assert!(lines(&["--node", "99"]).is_empty());

    assert_eq!(lines(&["--since", "1h"]).len(), everything.len());
    // Nothing is newer than "now minus nothing" except what is recorded from now on.
    assert!(lines(&["--since", "0s", "--kind", "probe"]).len() <= 2);
    let bad = c.modectl(leader, &["events", "--since", "soon"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");

    let out = c.modectl(leader, &["version"]);
    assert!(out.status.success(), "{out:?}");
    let said = text(&out.stdout);
    let v = env!("CARGO_PKG_VERSION");
    assert!(said.contains(&format!("client: modectl {v}")), "{said}");
    assert!(
        said.contains(&format!("server: mode-node {v} (node {leader}")),
        "{said}"
    );
    let json = c.modectl(leader, &["-o", "json", "version"]);
    let j: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(j["server"]["version"], v);
    assert_eq!(j["server"]["node"], leader);

    // With no server to ask, the client's own version is still said, and the exit is 4.
    let down = modectl_at(
        &format!("127.0.0.1:{}", free_port()),
        &["version", "--timeout", "2"],
    );
    assert_eq!(down.status.code(), Some(4), "{down:?}");
    assert!(text(&down.stdout).contains("client: modectl"), "{down:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_takes_standard_input_directories_and_several_files_at_once() {
    let (c, leader) = cluster(1).await;
    let dir = Scratch::new("specs");
    let spec =
        |name: &str| format!("name: {name}\nkind: ticker\nreplicas: 1\nconfig: {{message: hi}}\n");
    let specs = dir.0.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("a.yaml"), spec("from-dir-a")).unwrap();
    std::fs::write(specs.join("b.yml"), spec("from-dir-b")).unwrap();
    std::fs::write(specs.join("notes.txt"), "not a spec").unwrap();
    let single = dir.0.join("single.yaml");
    std::fs::write(&single, spec("from-file")).unwrap();
    let (specs_arg, single_arg) = (specs.display().to_string(), single.display().to_string());

    // A directory and a file, one apply.
    let out = c.modectl(
        leader,
        &["svc", "apply", "-f", &specs_arg, "-f", &single_arg],
    );
    assert!(out.status.success(), "{out:?}");
    // Standard input.
    let mut child = Command::new(binary("modectl"))
        .args([
            "--endpoint",
            &c.nodes[&leader].address(),
            "svc",
            "apply",
            "-f",
            "-",
        ])
        .env_remove("MODE_ENDPOINT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec("from-stdin").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");

    let listed = c.modectl(leader, &["-o", "json", "svc", "ls"]);
    let names = text(&listed.stdout);
    for n in ["from-dir-a", "from-dir-b", "from-file", "from-stdin"] {
        assert!(names.contains(n), "{n} missing: {names}");
    }

    // The same service in two files is refused, and nothing is stored.
    let twice = dir.0.join("twice.yaml");
    std::fs::write(&twice, spec("from-file").replace("hi", "changed")).unwrap();
    let out = c.modectl(
        leader,
        &[
            "svc",
            "apply",
            "-f",
            &single_arg,
            "-f",
            &twice.display().to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("is in both"), "{out:?}");
    // A directory without specs says so.
    let empty = dir.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = c.modectl(leader, &["svc", "plan", "-f", &empty.display().to_string()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("no *.yaml"), "{out:?}");
}
