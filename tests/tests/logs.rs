//! `modectl logs` with real processes: an `exec` service whose instances print to stdout and
//! stderr, crash once and are restarted by their node. Its instances run on an agent-only
//! node (the only one that runs `exec`), and every `modectl` call asks the server, which
//! relays the lines from the agent: the current run, `--previous`, a whole service (lines
//! prefixed), `--follow` (also after the instance moves to another node), escaping, JSON, and
//! the errors (unknown names exit 3, a kind without output, the owning node unreachable exits
//! 4 naming it).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mode_tests::{binary, TestCluster};
use serde_json::Value;

const ELECTION: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(30);

/// Each run of an instance counts itself in `$OUT/count-<slot>`, prints a line on stdout, one
/// on stderr and one with an escape sequence; the first run then exits 3 (its node restarts
/// it), later ones print `slot N later` whenever `$OUT/go-<slot>` appears.
const SCRIPT: &str = r#"c="$OUT/count-$MODE_SLOT"; n=$(( $(cat "$c" 2>/dev/null || echo 0) + 1 )); echo $n > "$c"
echo "slot $MODE_SLOT run $n out"
echo "slot $MODE_SLOT run $n err" >&2
printf 'esc \033[31mred\033[0m\n'
if [ $n -eq 1 ]; then exit 3; fi
while :; do
  if [ -f "$OUT/go-$MODE_SLOT" ]; then rm -f "$OUT/go-$MODE_SLOT"; echo "slot $MODE_SLOT later"; fi
  sleep 0.1
done"#;

/// A server that runs no `exec` instances and an agent-only node 2 that does, with service
/// `talker` (two instances of [`SCRIPT`], both on node 2) in their second run.
async fn talker_cluster() -> (TestCluster, PathBuf) {
    let mut c = TestCluster::start(1, &["--no-exec"]);
    c.wait_leader(ELECTION).await;
    c.add_agent(2, vec![]).start();
    c.wait_registered(2).await;
    let out = c.scratch.0.join("talker");
    std::fs::create_dir_all(&out).expect("a directory for the workload");
    let spec = serde_json::json!({
        "name": "talker",
        "kind": "exec",
        "replicas": 2,
        "config": {
            "command": "/bin/sh",
            "args": ["-c", SCRIPT],
            "env": {"OUT": out},
        },
    });
    if let Err(e) = c.apply(1, &spec.to_string()).await {
        panic!("apply: {e}\n{}", c.logs());
    }
    for slot in ["0", "1"] {
        let name = format!("talker#{slot}");
        wait_for_line(&c, &name, &format!("slot {slot} run 2 out")).await;
    }
    (c, out)
}

/// Poll `modectl logs NAME` through node 1 until it prints a line containing `text`.
async fn wait_for_line(c: &TestCluster, name: &str, text: &str) -> String {
    let deadline = Instant::now() + SETTLE;
    loop {
        let out = c.modectl(1, &["logs", name]);
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && printed.contains(text) {
            return printed;
        }
        assert!(
            Instant::now() < deadline,
            "`modectl logs {name}` never printed {text:?}; last: {:?} {printed}{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            c.log_tails(60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `modectl ARGS` through node 1: (exit code, stdout, stderr).
fn modectl(c: &TestCluster, args: &[&str]) -> (Option<i32>, String, String) {
    let out = c.modectl(1, args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(c: &TestCluster, args: &[&str]) -> String {
    let (code, stdout, stderr) = modectl(c, args);
    assert_eq!(code, Some(0), "modectl {args:?}: {stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_show_the_current_and_the_previous_run_of_an_instance_on_another_node() {
    let (mut c, _out) = talker_cluster().await;

    // The current run, read through node 1 from node 2: stdout and stderr, escaped.
    let current = ok(&c, &["logs", "talker#0"]);
    assert!(current.contains("slot 0 run 2 out\n"), "{current}");
    assert!(current.contains("slot 0 run 2 err\n"), "{current}");
    assert!(!current.contains("run 1"), "{current}");
    assert!(
        !current.contains("[talker#0]"),
        "one instance: no prefix\n{current}"
    );
    assert!(
        current.contains(r"esc \u001b[31mred\u001b[0m"),
        "the escape sequence prints escaped: {current}"
    );
    assert!(!current.contains('\x1b'), "no raw escape: {current:?}");

    // The run before the restart.
    let previous = ok(&c, &["logs", "talker#0", "--previous"]);
    assert!(previous.contains("slot 0 run 1 out\n"), "{previous}");
    assert!(previous.contains("slot 0 run 1 err\n"), "{previous}");
    assert!(!previous.contains("run 2"), "{previous}");

    // A whole service: every instance, prefixed.
    let all = ok(&c, &["logs", "talker"]);
    assert!(all.contains("[talker#0] slot 0 run 2 out\n"), "{all}");
    assert!(all.contains("[talker#1] slot 1 run 2 err\n"), "{all}");
    assert!(
        all.lines()
            .all(|l| l.starts_with("[talker#0] ") || l.starts_with("[talker#1] ")),
        "{all}"
    );

    // --tail, --timestamps, --since.
    let tail = ok(&c, &["logs", "talker#1", "--tail", "1"]);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    let stamped = ok(&c, &["logs", "talker#1", "--timestamps"]);
    // `2026-12-07 07:00:00.123 slot 1 run 2 out`
    let dated =
        |l: &str| l.len() > 24 && l.starts_with("20") && &l[4..5] == "-" && &l[23..24] == " ";
    assert!(stamped.lines().all(dated), "{stamped}");
    assert!(stamped.contains(" slot 1 run 2 out\n"), "{stamped}");
    let recent = ok(&c, &["logs", "talker#1", "--since", "10m"]);
    assert!(recent.contains("slot 1 run 2 out"), "{recent}");

    // -o json: one object per line.
    let json = ok(&c, &["-o", "json", "logs", "talker#0"]);
    let lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let err = lines
        .iter()
        .find(|l| l["text"] == "slot 0 run 2 err")
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(err["stream"], "stderr", "{err}");
    assert_eq!(err["instance"], "talker#0", "{err}");
    assert_eq!(err["node"], 2, "read from the node that runs it: {err}");
    assert_eq!(err["run"], 2, "{err}");
    assert!(
        json.contains(r"\u001b[31m") && !json.contains('\x1b'),
        "{json}"
    );

    // Unknown names exit 3; a malformed one is a usage error.
    for name in ["nope", "nope#0", "talker#7"] {
        let (code, _, stderr) = modectl(&c, &["logs", name]);
        assert_eq!(code, Some(3), "{name}: {stderr}");
        assert!(
            stderr.contains("nope") || stderr.contains("talker#7"),
            "{stderr}"
        );
    }
    let (code, _, stderr) = modectl(&c, &["logs", "talker#x"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) = modectl(&c, &["logs", "talker#0", "--previous", "--follow"]);
    assert_eq!(code, Some(2), "{stderr}");

    // A kind whose instances run no process has no output: said, not an empty answer.
    c.apply(1, "name: clock\nkind: ticker\n")
        .await
        .expect("apply a ticker");
    let (code, stdout, stderr) = modectl(&c, &["logs", "clock"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("kind `ticker`"), "{stderr}");
    assert!(stderr.contains("only `exec` instances"), "{stderr}");

    // The node that runs the instance is gone: exit 4, naming it.
    c.node(2).kill9();
    let (code, _, stderr) = modectl(&c, &["logs", "talker#0"]);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("node 2"), "{stderr}");
}

/// `modectl ARGS` through node 1 as a child whose stdout lines arrive on the receiver.
fn spawn_modectl(c: &TestCluster, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(binary("modectl"))
        .arg("--endpoint")
        .arg(c.nodes[&1].address())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run modectl");
    let stdout = child.stdout.take().expect("its stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Wait (up to [`SETTLE`]) for a line containing `text`; every line read so far otherwise.
fn expect_line(rx: &mpsc::Receiver<String>, text: &str, seen: &mut Vec<String>) -> bool {
    let deadline = Instant::now() + SETTLE;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(text);
                seen.push(line);
                if found {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

fn touch(path: &Path) {
    std::fs::write(path, b"").expect("touch");
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_prints_new_lines_until_interrupted_and_a_closed_pipe_ends_it_quietly() {
    let (c, out) = talker_cluster().await;

    // -f: what is kept, then the lines written from then on.
    let (child, rx) = spawn_modectl(&c, &["logs", "talker#0", "-f"]);
    let mut seen = Vec::new();
    let kept = expect_line(&rx, "slot 0 run 2 out", &mut seen);
    if !kept {
        stop(child);
        panic!("no kept lines: {seen:?}\n{}", c.log_tails(40));
    }
    touch(&out.join("go-0"));
    let followed = expect_line(&rx, "slot 0 later", &mut seen);
    stop(child);
    assert!(
        followed,
        "no new line followed: {seen:?}\n{}",
        c.log_tails(40)
    );
    assert_eq!(seen.last().map(String::as_str), Some("slot 0 later"));

    // A service, followed, into a reader that goes away after one line (`| head -1`).
    let mut child = Command::new(binary("modectl"))
        .arg("--endpoint")
        .arg(c.nodes[&1].address())
        .args(["logs", "talker", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run modectl");
    let mut first = String::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("its stdout"));
    stdout.read_line(&mut first).expect("a line");
    assert!(first.starts_with("[talker#"), "{first}");
    drop(stdout);
    // More lines come, and the writes fail.
    let deadline = Instant::now() + SETTLE;
    let status = loop {
        touch(&out.join("go-0"));
        touch(&out.join("go-1"));
        if let Some(status) = child.try_wait().expect("its status") {
            break status;
        }
        if Instant::now() > deadline {
            stop(child);
            panic!("modectl kept running after its reader went away");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut stderr);
    }
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_goes_with_an_instance_that_moves_to_another_node() {
    let (mut c, out) = talker_cluster().await;
    c.add_agent(3, vec![]).start();
    c.wait_registered(3).await;

    let (child, rx) = spawn_modectl(&c, &["-o", "json", "logs", "talker#0", "-f"]);
    let mut seen = Vec::new();
    if !expect_line(&rx, "slot 0 run 2 out", &mut seen) {
        stop(child);
        panic!("no kept lines: {seen:?}\n{}", c.log_tails(40));
    }
    // Node 2 drained: talker#0 starts on node 3 (its third run), and the same `-f` goes on
    // with its lines from there.
    ok(&c, &["node", "drain", "2"]);
    let moved = expect_line(&rx, "slot 0 run 3 out", &mut seen);
    touch(&out.join("go-0"));
    let later = moved && expect_line(&rx, "slot 0 later", &mut seen);
    stop(child);
    assert!(later, "{seen:?}\n{}", c.log_tails(40));
    let node_of = |text: &str| {
        seen.iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .find(|l| l["text"] == text)
            .map(|l| l["node"].clone())
    };
    assert_eq!(
        node_of("slot 0 run 2 out"),
        Some(Value::from(2)),
        "{seen:?}"
    );
    assert_eq!(
        node_of("slot 0 run 3 out"),
        Some(Value::from(3)),
        "{seen:?}"
    );
    assert_eq!(node_of("slot 0 later"), Some(Value::from(3)), "{seen:?}");
}
