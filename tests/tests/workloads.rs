//! What `exec` workloads may see and do, with real `mode-node` processes: not the node's
//! environment; only the programs a node's `--exec-allow` permits; nothing on a `--no-exec`
//! node; as the spec's `user` when the node runs as root. And `modectl` prints the escape
//! sequences a workload writes as visible text, never raw.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mode_tests::{Launcher, Scratch, TestCluster};
use serde_json::{json, Value};

const ELECTION: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(30);

/// One node with these flags (and `env` in its environment), leader and kinds registered.
async fn one_node(flags: &[&str], env: &[(&str, &str)]) -> TestCluster {
    let mut launcher = Launcher::mode_node();
    launcher.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let c = TestCluster::start_with(launcher, 1, flags);
    c.wait_leader(ELECTION).await;
    c.wait_registered(1).await;
    c
}

/// A spec as JSON (which is YAML), applied through node 1.
async fn apply(c: &TestCluster, spec: Value) {
    if let Err(e) = c.apply(1, &spec.to_string()).await {
        panic!("apply {spec}: {e}\n{}", c.logs());
    }
}

/// The text a workload wrote to `path` (written as `path.tmp`, then renamed).
async fn written(path: &Path, c: &TestCluster) -> String {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written\n{}",
            path.display(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `sh -c script` with `OUT` in its environment (and `env`), as an exec spec named `name`.
fn shell_spec(name: &str, script: &str, out: &Path, env: Value) -> Value {
    let mut env = env;
    env["OUT"] = json!(out);
    json!({
        "name": name,
        "kind": "exec",
        "config": {"command": "/bin/sh", "args": ["-c", script], "env": env},
    })
}

/// Wait until instance 0 of `service` has a last crash containing `text`; returns it.
async fn crash_reason(c: &TestCluster, service: &str, text: &str) -> String {
    let inst = c
        .wait_instances(1, service, SETTLE, |i| {
            i.get(&0)
                .and_then(|p| p["last_crash"].as_str())
                .is_some_and(|r| r.contains(text))
        })
        .await;
    inst[&0]["last_crash"].as_str().unwrap_or("").to_string()
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "modectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_workload_sees_its_spec_env_and_not_the_nodes() {
    let c = one_node(&[], &[("MODE_TEST_SECRET", "AKIA-not-for-workloads")]).await;
    let out = c.scratch.0.join("env");
    let script = r#"env > "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exec sleep 1000"#;
    apply(
        &c,
        shell_spec("envy", script, &out, json!({"GREETING": "hello"})),
    )
    .await;
    let text = written(&out, &c).await;
    let env: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    assert!(!text.contains("AKIA-not-for-workloads"), "{text}");
    assert_eq!(env.get("GREETING"), Some(&"hello"), "{text}");
    assert_eq!(
        env.get("PATH"),
        Some(&"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    );
    assert_eq!(
        (
            env.get("MODE_SERVICE"),
            env.get("MODE_SLOT"),
            env.get("MODE_NODE_ID")
        ),
        (Some(&"envy"), Some(&"0"), Some(&"1")),
        "{text}"
    );
    for set in ["MODE_FENCING_TOKEN", "MODE_RUN_ID", "HOME"] {
        assert!(env.get(set).is_some_and(|v| !v.is_empty()), "{set}: {text}");
    }
    // Nothing of the node's (nor of the test runner's, which the node inherited) but these.
    let mut keys: Vec<&str> = env
        .keys()
        .copied()
        .filter(|k| !["PWD", "OLDPWD", "SHLVL", "_"].contains(k))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "GREETING",
            "HOME",
            "MODE_FENCING_TOKEN",
            "MODE_NODE_ID",
            "MODE_RUN_ID",
            "MODE_SERVICE",
            "MODE_SLOT",
            "OUT",
            "PATH"
        ],
        "{text}"
    );
    c.modectl(1, &["svc", "rm", "envy", "--wait"]);
}

/// An executable shell script.
fn script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().expect("a directory")).expect("mkdir");
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write the script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_allow_runs_the_programs_it_names_and_refuses_the_others() {
    let programs = Scratch::new("allowed");
    let dir = std::fs::canonicalize(&programs.0).expect("canonical scratch");
    let tool = dir.join("bin/tool");
    script(
        &tool,
        r#"echo ran > "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exec sleep 1000"#,
    );
    let pattern = format!("{}/bin/*", dir.display());
    let c = one_node(&["--exec-allow", &pattern], &[]).await;
    let out = c.scratch.0.join("ran");
    apply(
        &c,
        json!({"name": "tool", "kind": "exec", "config": {"command": tool, "env": {"OUT": out}}}),
    )
    .await;
    assert_eq!(written(&out, &c).await, "ran\n");

    let shell_out = c.scratch.0.join("shell");
    apply(
        &c,
        shell_spec("shell", "echo escaped > \"$OUT\"", &shell_out, json!({})),
    )
    .await;
    let reason = crash_reason(&c, "shell", "is not allowed").await;
    assert!(
        reason.contains("`/bin/sh` (")
            && reason.contains(&format!("its --exec-allow permits only {pattern}")),
        "{reason}"
    );
    assert!(!shell_out.exists());
    c.modectl(1, &["svc", "rm", "tool", "--wait"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_exec_node_is_not_offered_exec_instances() {
    // A server and an agent without exec, and an agent with it.
    let mut c = TestCluster::start(1, &["--no-exec"]);
    c.wait_leader(ELECTION).await;
    c.add_agent(2, vec!["--no-exec".into()]).start();
    c.add_agent(3, vec![]).start();
    c.wait_registered(3).await;
    let kinds = stdout(&c.modectl(1, &["kinds", "-o", "json"]));
    let kinds: Value = serde_json::from_str(&kinds).expect("kinds as JSON");
    let offering = |kind: &str| {
        kinds["kinds"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|k| k["name"] == kind)
            .map(|k| k["nodes"].clone())
    };
    assert_eq!(offering("exec"), Some(json!([3])), "{kinds}");
    assert_eq!(offering("ticker"), Some(json!([1, 2, 3])), "{kinds}");
    // The server still checks exec configs it does not run itself.
    let refused = c
        .apply(
            1,
            "name: bad\nkind: exec\nconfig: {command: /bin/true, group: nogroup}\n",
        )
        .await
        .expect_err("an invalid exec config");
    assert!(
        refused.message().contains("`group` needs `user`"),
        "{refused:?}"
    );

    let out = c.scratch.0.join("placed");
    let script = r#"echo "$MODE_NODE_ID" > "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exec sleep 1000"#;
    let mut spec = shell_spec("anywhere", script, &out, json!({}));
    spec["replicas"] = json!(2);
    apply(&c, spec).await;
    let inst = c
        .wait_instances(1, "anywhere", SETTLE, |i| {
            i.len() == 2 && i.values().all(|p| p["state"] == "running")
        })
        .await;
    assert!(inst.values().all(|p| p["node"] == 3), "{inst:?}");
    assert_eq!(written(&out, &c).await, "3\n");
    c.modectl(1, &["svc", "rm", "anywhere", "--wait"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_workload_runs_as_the_spec_user() {
    let me = std::process::Command::new("id").arg("-u").output();
    if !me.is_ok_and(|o| o.stdout.trim_ascii() == b"0") {
        eprintln!("skipped: running a workload as another user needs a node running as root, and these tests do not run as root");
        return;
    }
    let c = one_node(&[], &[]).await;
    // A directory the workload's user can write to.
    let shared: PathBuf = c.scratch.0.join("shared");
    std::fs::create_dir_all(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = shared.join("id");
    let script = r#"(id -u; id -g) > "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exec sleep 1000"#;
    let mut spec = shell_spec("nobody", script, &out, json!({}));
    spec["config"]["user"] = json!("nobody");
    apply(&c, spec).await;
    let ids = written(&out, &c).await;
    assert_eq!(ids.lines().next(), Some("65534"), "{ids}");
    c.modectl(1, &["svc", "rm", "nobody", "--wait"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_sequences_from_a_workload_print_escaped() {
    let c = one_node(&[], &[]).await;
    // Red text, a window title, a C1 CSI (U+009B, as UTF-8), a carriage return; then exit 1:
    // the last stderr line is the crash reason.
    let script =
        r#"printf 'boom \033[31mred\033]0;owned\007 \302\2332J\rhidden\n' >&2; sleep 0.2; exit 1"#;
    apply(
        &c,
        shell_spec("loud", script, &c.scratch.0.join("unused"), json!({})),
    )
    .await;
    let reason = crash_reason(&c, "loud", "status 1").await;
    assert!(reason.contains("\x1b[31m"), "the raw reason: {reason:?}");
    let raw = |text: &str| {
        text.chars()
            .any(|ch| ch.is_control() && ch != '\n' && ch != '\t')
    };
    for args in [
        &["svc", "get", "loud"][..],
        &["events"],
        &["svc", "get", "loud", "-o", "json"],
        &["events", "-o", "json"],
        &["graph"],
    ] {
        let text = stdout(&c.modectl(1, args));
        assert!(
            !raw(&text),
            "modectl {args:?} printed raw control characters: {text:?}"
        );
        if args[0] == "svc" || args[0] == "events" {
            assert!(
                text.contains(r"\u001b[31mred\u001b]0;owned\u0007 \u009b2J\rhidden"),
                "modectl {args:?}: {text}"
            );
        }
    }
    // JSON stays JSON, with the same text in it.
    let json: Value = serde_json::from_str(&stdout(
        &c.modectl(1, &["svc", "get", "loud", "-o", "json"]),
    ))
    .expect("JSON");
    assert!(json.to_string().contains(r"\u001b[31mred"), "{json}");
    c.modectl(1, &["svc", "rm", "loud", "--wait"]);
}
