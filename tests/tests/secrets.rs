//! A spec's `secrets` with real `mode-node` processes: an `exec` instance finds them in its
//! environment, and their values show nowhere else — not in `svc apply`/`svc plan`, the event
//! log, the graph (`modectl graph`, `/api/graph`, `/api/graph.svg`), the web view, or the
//! node's log at debug level. (Reads by a viewer get placeholders: unit tests in
//! `node/src/api/convert.rs`; end to end once clients authenticate.)

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use mode_tests::{http_get, TestCluster};

const ELECTION: Duration = Duration::from_secs(20);

/// Both values start with this: neither may show anywhere but the instance's environment
/// (and reads by those who may see secrets).
const VALUE: &str = "hunter";

/// A spec `db` whose process writes its environment to `out`, with `DB_PASSWORD` = `password`.
fn spec(out: &Path, password: &str) -> String {
    let out = out.display();
    format!(
        "name: db\nkind: exec\nsecrets: {{DB_PASSWORD: {password}}}\nconfig:\n  command: /bin/sh\n  args: [\"-c\", \"env > {out}.tmp; mv {out}.tmp {out}; exec sleep 1000\"]\n"
    )
}

/// Its stdout, after checking it succeeded.
fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Wait until `file` holds `line` (the instance wrote its environment).
async fn wait_for_line(file: &Path, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never held {line}: {text}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_process_and_nothing_else() {
    let c = TestCluster::start_with_http(1, &["--log-level", "debug,openraft=debug"]);
    c.wait_leader(ELECTION).await;
    c.wait_registered(1).await;
    let dir = &c.scratch.0;
    let env = dir.join("env.out");
    let (v1, v2) = (dir.join("v1.yaml"), dir.join("v2.yaml"));
    std::fs::write(&v1, spec(&env, "hunter2")).unwrap();
    std::fs::write(&v2, spec(&env, "hunter3")).unwrap();
    let file = |p: &Path| p.display().to_string();

    let mut said = Vec::new();
    said.push(ok(
        "svc apply",
        c.modectl(1, &["svc", "apply", "-f", &file(&v1), "--wait"]),
    ));
    wait_for_line(&env, "DB_PASSWORD=hunter2").await;

    // A plan names the secret that changes, never a value.
    let plan = ok("svc plan", c.modectl(1, &["svc", "plan", "-f", &file(&v2)]));
    assert!(
        plan.contains("secrets.DB_PASSWORD: changed (value not shown)"),
        "{plan}"
    );
    said.push(plan);
    said.push(ok(
        "svc plan -o json",
        c.modectl(1, &["-o", "json", "svc", "plan", "-f", &file(&v2)]),
    ));
    let applied = ok(
        "svc apply",
        c.modectl(1, &["svc", "apply", "-f", &file(&v2), "--wait"]),
    );
    assert!(applied.contains("secrets.DB_PASSWORD"), "{applied}");
    said.push(applied);
    // Changing a secret replaces the instance: the new process has the new value.
    wait_for_line(&env, "DB_PASSWORD=hunter3").await;

    // Reads show the name; the value only to a caller who may see secrets (until the
    // authentication layer names the caller, none may: every read is redacted).
    let got = ok("svc get", c.modectl(1, &["-o", "json", "svc", "get", "db"]));
    assert!(got.contains("\"DB_PASSWORD\": \""), "{got}");

    let events = ok("events", c.modectl(1, &["-o", "json", "events"]));
    assert!(events.contains("secrets.DB_PASSWORD"), "{events}");
    said.push(events);
    said.push(ok("history", c.modectl(1, &["svc", "history", "db"])));
    said.push(ok("graph", c.modectl(1, &["-o", "json", "graph"])));
    let http = c.nodes[&1].http.expect("an HTTP port");
    for path in [
        "/",
        "/api/graph",
        "/api/graph.svg",
        "/api/events",
        "/metrics",
    ] {
        let (code, body) = http_get(http, path);
        assert_eq!(code, 200, "{path}: {body}");
        said.push(body);
    }
    for text in &said {
        assert!(!text.contains(VALUE), "a secret value was shown:\n{text}");
    }
    let log = c.nodes[&1].logs();
    assert!(log.contains("DEBUG"), "the node logged at debug level");
    assert!(
        !log.contains(VALUE),
        "a secret value in the node's log:\n{log}"
    );
}
