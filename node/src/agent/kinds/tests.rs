//! Tests of the kind registry and the stock kinds. Demo kinds run on paused time; `exec` runs
//! real processes (`/bin/sh`, `sleep`), and every test kills what it started, even on failure.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{InstanceSpec, Kind, KindRegistry};
use crate::service::{BeaconNode, Service, ServiceHandle, ServiceState};

// ---- helpers -----------------------------------------------------------------------------

fn spec(config: Value, grace: Duration) -> InstanceSpec {
    InstanceSpec {
        service: "svc".into(),
        slot: 0,
        node: 1,
        config,
        secrets: Default::default(),
        grace,
        fencing_token: 1,
        kill: Default::default(),
        lease: None,
    }
}

fn create(kind: &str, config: Value, grace: Duration) -> ServiceHandle {
    KindRegistry::stock()
        .create(kind, &spec(config, grace))
        .unwrap()
}

fn invalid(kind: &str, config: Value) -> String {
    let kinds = KindRegistry::stock();
    let error = kinds.validate(kind, &config).unwrap_err();
    // `create` checks the config just as well.
    let created = kinds.create(kind, &spec(config, Duration::from_secs(1)));
    assert_eq!(created.unwrap_err(), error);
    error
}

/// Fail the test instead of hanging.
async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

async fn crashed(svc: &ServiceHandle, limit: Duration) -> String {
    within(
        limit,
        "the crash",
        svc.wait_for_state(ServiceState::Crashed),
    )
    .await;
    svc.crash_reason().unwrap().to_string()
}

fn find<'a>(node: &'a BeaconNode, label: &str) -> Option<&'a BeaconNode> {
    if node.label == label || node.label.starts_with(&format!("{label} ")) {
        return Some(node);
    }
    node.children.iter().find_map(|c| find(c, label))
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mode-kinds-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pids a test learned from its processes; SIGKILLed on drop so nothing outlives a failure.
struct Pids(Vec<i32>);

impl Pids {
    /// Wait for the file a script writes its pids to (`echo $$ > "$PIDFILE"`).
    async fn read(path: &Path) -> Pids {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                if text.ends_with('\n') {
                    let pids = text.split_whitespace().map(|p| p.parse().unwrap());
                    return Pids(pids.collect());
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} never written",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Pids {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                // SAFETY: plain syscall on a pid this test's process started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Running (a zombie no longer runs, and nobody may reap one in a container).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.trim().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

async fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// An `exec` of `/bin/sh -c script`, with `PIDFILE` (and `OUT`) in its environment.
fn shell(dir: &TempDir, script: &str, grace: Duration) -> ServiceHandle {
    let config = json!({
        "command": "/bin/sh",
        "args": ["-c", script],
        "env": {
            "PIDFILE": dir.path("pid"),
            "OUT": dir.path("out"),
        },
    });
    create("exec", config, grace)
}

/// Log lines written while the guard lives, on this thread (`#[tokio::test]` runs the
/// service's tasks on it too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Lines containing both `level` and `text`.
    fn count(&self, level: &str, text: &str) -> usize {
        let all = self.text();
        all.lines()
            .filter(|l| l.contains(level) && l.contains(text))
            .count()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---- registry ----------------------------------------------------------------------------

#[test]
fn stock_kinds_are_listed_sorted() {
    let kinds = KindRegistry::stock();
    let names = kinds.names();
    assert_eq!(names, ["counter", "crasher", "exec", "ticker", "webapp"]);
    assert!(kinds.contains("exec") && !kinds.contains("Exec"));
    assert!(KindRegistry::new().names().is_empty());
    assert_eq!(
        format!("{kinds:?}"),
        r#"{"counter", "crasher", "exec", "ticker", "webapp"}"#
    );
}

#[test]
fn an_unknown_kind_lists_the_known_ones() {
    let kinds = KindRegistry::stock();
    let error = kinds.validate("nope", &Value::Null).unwrap_err();
    assert_eq!(
        error,
        "unknown service kind `nope`; this node runs: counter, crasher, exec, ticker, webapp"
    );
    let created = kinds.create("nope", &spec(Value::Null, Duration::from_secs(1)));
    assert_eq!(created.unwrap_err(), error);
    let empty = KindRegistry::new()
        .validate("exec", &Value::Null)
        .unwrap_err();
    assert!(empty.contains("no kinds registered"), "{empty}");
}

#[test]
fn instance_label_is_service_and_slot() {
    let mut instance = spec(Value::Null, Duration::from_secs(1));
    instance.slot = 3;
    assert_eq!(instance.label(), "svc#3");
}

struct Idle;
impl Service for Idle {}

#[tokio::test]
async fn register_fn_adds_a_kind_that_accepts_any_config() {
    let mut kinds = KindRegistry::new();
    kinds.register_fn("idle", |instance: &InstanceSpec| {
        if instance.config == json!("refuse") {
            return Err("idle refuses".to_string());
        }
        Ok(ServiceHandle::builder(Idle).label(instance.label()).build())
    });
    assert_eq!(kinds.names(), ["idle"]);
    assert!(kinds.validate("idle", &json!({"anything": [1, 2]})).is_ok());
    let svc = kinds
        .create("idle", &spec(json!({"x": 1}), Duration::from_secs(1)))
        .unwrap();
    assert_eq!(svc.label(), "svc#0");
    svc.start().await.unwrap();
    svc.stop().await;
    assert_eq!(svc.state(), ServiceState::Shutdown);
    let refused = kinds.create("idle", &spec(json!("refuse"), Duration::from_secs(1)));
    assert_eq!(refused.unwrap_err(), "idle refuses");
}

#[test]
fn register_replaces_a_kind_of_the_same_name() {
    struct Strict;
    impl Kind for Strict {
        fn validate(&self, _config: &Value) -> Result<(), String> {
            Err("strict says no".into())
        }
        fn create(&self, _instance: &InstanceSpec) -> Result<ServiceHandle, String> {
            Err("strict says no".into())
        }
    }
    let mut kinds = KindRegistry::stock();
    kinds.register("exec", Strict);
    assert_eq!(kinds.names().len(), 5);
    let error = kinds.validate("exec", &json!({"command": "/bin/true"}));
    assert_eq!(error.unwrap_err(), "strict says no");
    // Clones share the kinds but not the table.
    let copy = kinds.clone();
    kinds.register_fn("extra", |_: &InstanceSpec| Err("unused".into()));
    assert!(!copy.contains("extra") && kinds.contains("extra"));
}

// ---- validation --------------------------------------------------------------------------

#[test]
fn exec_config_errors_name_the_field() {
    assert_eq!(
        invalid("exec", Value::Null),
        "invalid exec config: missing field `command`"
    );
    assert_eq!(
        invalid("exec", json!({"comand": "/bin/sleep"})),
        "invalid exec config: unknown field `comand`, expected one of `command`, `args`, `env`, `cwd`, `user`, `group`"
    );
    assert_eq!(
        invalid("exec", json!({"command": "/bin/sleep", "args": "1000"})),
        "invalid exec config: field `args`: invalid type: string \"1000\", expected a sequence"
    );
    assert_eq!(
        invalid("exec", json!({"command": 7})),
        "invalid exec config: field `command`: invalid type: integer `7`, expected a string"
    );
    assert_eq!(
        invalid("exec", json!({"command": "x", "env": {"K": 1}})),
        "invalid exec config: field `env`: invalid type: integer `1`, expected a string"
    );
    assert_eq!(
        invalid("exec", json!({"command": "x", "env": {"A=B": "1"}})),
        "invalid exec config: field `env`: `A=B` is not a variable name (empty, or contains '=' or NUL)"
    );
    assert_eq!(
        invalid("exec", json!({"command": " "})),
        "invalid exec config: field `command` is empty: give a program path or name"
    );
    assert_eq!(
        invalid("exec", json!(["/bin/sleep"])),
        "invalid exec config: expected a JSON object, got an array"
    );
    assert_eq!(
        invalid("exec", json!({"command": "x", "user": ""})),
        "invalid exec config: field `user`: empty: give a name or a numeric id"
    );
    assert_eq!(
        invalid("exec", json!({"command": "x", "user": -1})),
        "invalid exec config: field `user`: -1 is not a valid id (ids are not negative)"
    );
    assert_eq!(
        invalid("exec", json!({"command": "x", "user": "a:b"})),
        "invalid exec config: field `user`: `a:b` is not an account name (it contains ':')"
    );
    assert_eq!(
        invalid("exec", json!({"command": "x", "group": "nogroup"})),
        "invalid exec config: field `group` needs `user`: a group alone would leave the process running as the node's user; give `user` too"
    );
    let full = json!({"command": "sleep", "args": ["1"], "env": {"K": "V"}, "cwd": "/tmp", "user": "nobody", "group": 65534});
    assert_eq!(KindRegistry::stock().validate("exec", &full), Ok(()));
    let numeric = json!({"command": "sleep", "user": "1000"});
    assert_eq!(KindRegistry::stock().validate("exec", &numeric), Ok(()));
}

#[test]
fn demo_config_errors_name_the_field() {
    let kinds = KindRegistry::stock();
    for kind in ["ticker", "counter", "webapp"] {
        assert_eq!(kinds.validate(kind, &Value::Null), Ok(()), "{kind}");
        assert_eq!(kinds.validate(kind, &json!({})), Ok(()), "{kind}");
    }
    assert_eq!(
        invalid("ticker", json!({"every_ms": 0})),
        "invalid ticker config: field `every_ms` must be at least 1 (milliseconds)"
    );
    assert_eq!(
        invalid("ticker", json!({"every_ms": "1s"})),
        "invalid ticker config: field `every_ms`: invalid type: string \"1s\", expected u64"
    );
    assert_eq!(
        invalid("counter", json!({"every_ms": 10, "message": "hi"})),
        "invalid counter config: unknown field `message`, expected `every_ms`"
    );
    assert_eq!(
        invalid("webapp", json!({"port": 70000})),
        "invalid webapp config: field `port`: invalid value: integer `70000`, expected u16"
    );
    assert_eq!(
        invalid("crasher", Value::Null),
        "invalid crasher config: set `after_ms` (crash that many milliseconds after starting) \
         or `crash_file` (crash when that file appears), or both"
    );
    assert_eq!(
        invalid("crasher", json!({"after_ms": -1})),
        "invalid crasher config: field `after_ms`: invalid value: integer `-1`, expected u64"
    );
    assert_eq!(
        invalid("crasher", json!({"crash_file": ""})),
        "invalid crasher config: field `crash_file` is empty: give a path"
    );
    assert_eq!(kinds.validate("crasher", &json!({"after_ms": 5})), Ok(()));
}

// ---- exec --------------------------------------------------------------------------------

#[tokio::test]
async fn exec_logs_stdout_at_info_and_stderr_at_warn() {
    let (logs, _guard) = Logs::capture();
    let dir = TempDir::new();
    let script = r#"echo $$ > "$PIDFILE"; echo hello out; echo hello err >&2; printf 'no end'; exec sleep 1000"#;
    let svc = shell(&dir, script, Duration::from_secs(2));
    svc.start().await.unwrap();
    let _pids = Pids::read(&dir.path("pid")).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while logs.count("WARN", "[svc#0] hello err") == 0
        || logs.count("INFO", "[svc#0] hello out") == 0
    {
        assert!(
            Instant::now() < deadline,
            "output not logged:\n{}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The line without an end comes out when the pipe closes at the stop.
    assert_eq!(logs.count("", "no end"), 0);
    svc.stop().await;
    assert_eq!(logs.count("INFO", "[svc#0] no end"), 1, "{}", logs.text());
    assert_eq!(svc.state(), ServiceState::Shutdown);
}

/// What a script wrote to `out` in `dir` (waiting up to 5 s for the file).
async fn output(dir: &TempDir) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(out) = std::fs::read_to_string(dir.path("out")) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "the script never wrote its output"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn exec_uses_env_and_cwd() {
    let dir = TempDir::new();
    let config = json!({
        "command": "sh",
        "args": ["-c", "echo \"$GREETING\" > out.tmp; pwd >> out.tmp; mv out.tmp out; exec sleep 1000"],
        "env": {"GREETING": "bonjour"},
        "cwd": dir.0,
    });
    let svc = create("exec", config, Duration::from_secs(2));
    svc.start().await.unwrap();
    let out = output(&dir).await;
    let cwd = std::fs::canonicalize(&dir.0).unwrap();
    assert_eq!(out, format!("bonjour\n{}\n", cwd.display()));
    svc.stop().await;
    assert_eq!(svc.state(), ServiceState::Shutdown);
}

#[tokio::test]
async fn exec_gets_the_secrets_in_its_environment_and_logs_none() {
    let (logs, _guard) = Logs::capture();
    let dir = TempDir::new();
    let mut instance = spec(
        json!({
            "command": "/bin/sh",
            "args": ["-c", "echo \"$DB_PASSWORD\" > out.tmp; mv out.tmp out; exec sleep 1000"],
            "cwd": dir.0,
        }),
        Duration::from_secs(2),
    );
    instance.secrets.insert(
        "DB_PASSWORD".into(),
        crate::model::secret::Secret::new("hunter2"),
    );
    assert!(!format!("{instance:?}").contains("hunter2"));
    let svc = KindRegistry::stock().create("exec", &instance).unwrap();
    svc.start().await.unwrap();
    let out = output(&dir).await;
    assert_eq!(out, "hunter2\n");
    svc.stop().await;
    assert!(!logs.text().contains("hunter2"), "{}", logs.text());
}

#[tokio::test]
async fn exec_killed_from_outside_crashes_naming_the_signal() {
    let dir = TempDir::new();
    let svc = shell(
        &dir,
        r#"echo $$ > "$PIDFILE"; exec sleep 1000"#,
        Duration::from_secs(2),
    );
    svc.start().await.unwrap();
    let pids = Pids::read(&dir.path("pid")).await;
    // SAFETY: plain syscall on the test's own child.
    assert_eq!(unsafe { libc::kill(pids.0[0], libc::SIGKILL) }, 0);
    let reason = crashed(&svc, Duration::from_secs(5)).await;
    assert_eq!(
        reason,
        "task 'process' failed: process killed by signal 9 (SIGKILL)"
    );
    svc.stop().await;
    assert_eq!(svc.state(), ServiceState::Crashed);
}

#[tokio::test]
async fn exec_exit_status_is_the_crash_reason() {
    let dir = TempDir::new();
    let script = "echo 'bad thing happened' >&2; sleep 0.3; exit 3";
    let svc = shell(&dir, script, Duration::from_secs(2));
    svc.start().await.unwrap();
    let reason = crashed(&svc, Duration::from_secs(5)).await;
    assert_eq!(
        reason,
        "task 'process' failed: process exited with status 3 (last stderr line: bad thing happened)"
    );
    svc.stop().await;
}

#[tokio::test]
async fn exec_stop_sends_sigterm_to_the_process_and_its_children() {
    let dir = TempDir::new();
    let script =
        r#"trap 'echo TERM > "$OUT"; exit 0' TERM; sleep 1000 & echo $$ $! > "$PIDFILE"; wait"#;
    let svc = shell(&dir, script, Duration::from_secs(3));
    svc.start().await.unwrap();
    let pids = Pids::read(&dir.path("pid")).await;
    let begun = Instant::now();
    within(Duration::from_secs(10), "the stop", svc.stop()).await;
    assert!(
        begun.elapsed() < Duration::from_secs(2),
        "{:?}",
        begun.elapsed()
    );
    assert_eq!(svc.state(), ServiceState::Shutdown);
    assert!(!svc.was_forced());
    let out = std::fs::read_to_string(dir.path("out")).unwrap();
    assert_eq!(out, "TERM\n");
    for &pid in &pids.0 {
        assert!(gone(pid).await, "pid {pid} survived the stop");
    }
}

#[tokio::test]
async fn exec_ignoring_sigterm_is_killed_after_the_grace_period() {
    let (logs, _guard) = Logs::capture();
    let dir = TempDir::new();
    let script = r#"trap '' TERM; sleep 1000 & echo $$ $! > "$PIDFILE"; wait; wait; wait"#;
    let grace = Duration::from_millis(300);
    let svc = shell(&dir, script, grace);
    svc.start().await.unwrap();
    let pids = Pids::read(&dir.path("pid")).await;
    let begun = Instant::now();
    within(Duration::from_secs(10), "the stop", svc.stop()).await;
    let took = begun.elapsed();
    assert!(
        took >= grace && took < grace + Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(svc.state(), ServiceState::Shutdown);
    // The kind killed it, not the framework's abort.
    assert!(!svc.was_forced());
    assert_eq!(logs.count("WARN", "sending SIGKILL"), 1, "{}", logs.text());
    for &pid in &pids.0 {
        assert!(gone(pid).await, "pid {pid} survived the stop");
    }
}

#[tokio::test]
async fn exec_restart_replaces_the_process() {
    let dir = TempDir::new();
    let script = r#"echo $$ > "$PIDFILE"; exec sleep 1000"#;
    let svc = shell(&dir, script, Duration::from_secs(2));
    svc.start().await.unwrap();
    let first = Pids::read(&dir.path("pid")).await;
    std::fs::remove_file(dir.path("pid")).unwrap();
    within(Duration::from_secs(10), "the restart", svc.restart())
        .await
        .unwrap();
    let second = Pids::read(&dir.path("pid")).await;
    assert_ne!(first.0, second.0);
    assert!(gone(first.0[0]).await);
    assert!(alive(second.0[0]));
    assert_eq!(svc.state(), ServiceState::Running);
    svc.stop().await;
    assert!(gone(second.0[0]).await);
}

#[tokio::test]
async fn exec_of_a_missing_program_fails_to_start() {
    let svc = create(
        "exec",
        json!({"command": "/nonexistent/mode-test-program"}),
        Duration::from_secs(1),
    );
    let error = svc.start().await.unwrap_err().to_string();
    assert!(
        error.contains("cannot run `/nonexistent/mode-test-program`: No such file or directory"),
        "{error}"
    );
    assert_eq!(svc.state(), ServiceState::Crashed);
}

/// What a test's process wrote to `path` (it writes `path.tmp`, then renames it).
async fn written(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `KEY=VALUE` lines as a map.
fn env_lines(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn exec_gets_a_minimal_environment_not_the_nodes() {
    // SAFETY (edition 2021: safe): a variable no other test reads.
    std::env::set_var("MODE_KINDS_TEST_SECRET", "do-not-leak");
    let dir = TempDir::new();
    let config = json!({
        "command": "/bin/sh",
        "args": ["-c", r#"env > "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exec sleep 1000"#],
        "env": {"OUT": dir.path("out"), "GREETING": "hi", "MODE_SLOT": "42"},
    });
    let svc = create("exec", config, Duration::from_secs(2));
    svc.start().await.unwrap();
    let env = env_lines(&written(&dir.path("out")).await);
    svc.stop().await;
    assert!(!env.contains_key("MODE_KINDS_TEST_SECRET"), "{env:?}");
    assert_eq!(
        env["PATH"],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    // The node's run variables win over the config's.
    assert_eq!(env["MODE_SLOT"], "0");
    assert_eq!(
        (
            env["MODE_SERVICE"].as_str(),
            env["MODE_NODE_ID"].as_str(),
            env["MODE_FENCING_TOKEN"].as_str(),
            env["GREETING"].as_str()
        ),
        ("svc", "1", "1", "hi")
    );
    assert!(env["MODE_RUN_ID"].len() > 8, "{env:?}");
    assert!(env["HOME"].starts_with('/'), "{env:?}");
    // Nothing else, but what the shell sets itself.
    let mut keys: Vec<&str> = env
        .keys()
        .map(String::as_str)
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
        ]
    );
}

/// An executable shell script at `path`.
fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn exec_looks_names_up_in_the_workloads_path() {
    let dir = TempDir::new();
    script(&dir.path("bin/mode-test-tool"), r#"echo "$0 $1" > "$OUT""#);
    let config = json!({
        "command": "mode-test-tool",
        "args": ["ran"],
        "env": {"OUT": dir.path("out"), "PATH": dir.path("bin")},
    });
    let svc = create("exec", config, Duration::from_secs(2));
    svc.start().await.unwrap();
    // (A script's interpreter gets the path the program was found at.)
    let tool = dir.path("bin/mode-test-tool");
    assert_eq!(
        written(&dir.path("out")).await,
        format!("{} ran\n", tool.display())
    );
    svc.stop().await;
    // A program's argv[0] is the command as given.
    let config = json!({
        "command": "sh",
        "args": ["-c", r#"tr '\0' ' ' < /proc/$$/cmdline > "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exec sleep 1000"#],
        "env": {"OUT": dir.path("cmdline")},
    });
    let svc = create("exec", config, Duration::from_secs(2));
    svc.start().await.unwrap();
    assert!(
        written(&dir.path("cmdline")).await.starts_with("sh -c "),
        "{:?}",
        std::fs::read_to_string(dir.path("cmdline"))
    );
    svc.stop().await;
    // Not in the base PATH (the node's own PATH does not count).
    let svc = create(
        "exec",
        json!({"command": "mode-test-tool"}),
        Duration::from_secs(1),
    );
    let error = svc.start().await.unwrap_err().to_string();
    assert!(
        error.contains("`mode-test-tool` is not in the workload's PATH (/usr/local/sbin:")
            && error.contains("set PATH in the exec config's `env`"),
        "{error}"
    );
}

#[tokio::test]
async fn exec_allow_list_runs_only_what_it_allows() {
    let dir = TempDir::new();
    let root = std::fs::canonicalize(&dir.0).unwrap();
    script(&root.join("allowed/tool"), r#"echo ok > "$OUT""#);
    script(&root.join("other/tool"), r#"echo escaped > "$OUT""#);
    std::fs::create_dir_all(root.join("allowed/sub")).unwrap();
    let kinds = KindRegistry::stock();
    let patterns = vec![format!("{}/allowed/*", root.display()), "/bin/true".into()];
    kinds.restrict_exec(super::AllowList::new(&patterns).unwrap());
    let run = |command: String| {
        let config = json!({"command": command, "env": {"OUT": dir.path("out")}});
        kinds
            .create("exec", &spec(config, Duration::from_secs(1)))
            .unwrap()
    };
    for refused in [
        root.join("other/tool"),
        root.join("allowed/../other/tool"),
        root.join("allowed/sub/../../other/tool"),
    ] {
        let command = refused.display().to_string();
        let error = run(command.clone()).start().await.unwrap_err().to_string();
        assert!(
            error.contains(&format!(
                "`{command}` ({}) is not allowed on this node: its --exec-allow permits only {}",
                root.join("other/tool").display(),
                patterns.join(", ")
            )),
            "{error}"
        );
    }
    // By name, too: `sh` is found in the PATH, and is not allowed.
    let error = run("sh".into()).start().await.unwrap_err().to_string();
    assert!(
        error.contains("`sh` (/") && error.contains("is not allowed"),
        "{error}"
    );
    assert!(!dir.path("out").exists());
    let svc = run(root.join("allowed/tool").display().to_string());
    svc.start().await.unwrap();
    assert_eq!(written(&dir.path("out")).await, "ok\n");
    svc.stop().await;
}

#[tokio::test]
async fn a_disabled_kind_is_not_offered_and_not_created_but_still_checked() {
    let mut kinds = KindRegistry::stock();
    kinds.disable("exec", "--no-exec");
    assert_eq!(kinds.names(), ["counter", "crasher", "ticker", "webapp"]);
    assert!(kinds
        .validate("exec", &json!({}))
        .unwrap_err()
        .contains("`command`"));
    let config = json!({"command": "/bin/true"});
    let error = kinds
        .create("exec", &spec(config, Duration::from_secs(1)))
        .err()
        .unwrap();
    assert_eq!(
        error,
        "this node does not run kind `exec` (--no-exec): the instance must run on another node"
    );
}

#[test]
fn health_check_commands_follow_the_nodes_exec_rules() {
    let check =
        |probe: Value| serde_json::from_value::<crate::model::spec::HealthCheck>(probe).unwrap();
    let argv = |c: &crate::model::spec::HealthCheck| match &c.probe {
        crate::model::spec::Probe::Command(argv) => argv.clone(),
        other => panic!("not a command: {other:?}"),
    };
    let dir = TempDir::new();
    let root = std::fs::canonicalize(&dir.0).unwrap();
    script(&root.join("probe"), "exit 0");
    let http = check(json!({"http": {"port": 8080}}));
    let by_name = check(json!({"command": ["sh", "-c", "true"]}));
    let by_path = check(json!({"command": [root.join("probe")]}));

    // Resolved in the base PATH, the rest untouched.
    let kinds = KindRegistry::stock();
    let resolved = argv(&kinds.health_check(&by_name).unwrap());
    assert!(
        resolved[0].ends_with("/sh") && resolved[0].starts_with('/'),
        "{resolved:?}"
    );
    assert_eq!(resolved[1..], ["-c", "true"]);
    assert_eq!(kinds.health_check(&http).unwrap(), http);

    // --exec-allow: only what it allows.
    let kinds = KindRegistry::stock();
    let pattern = format!("{}/*", root.display());
    kinds.restrict_exec(super::AllowList::new(std::slice::from_ref(&pattern)).unwrap());
    assert_eq!(
        argv(&kinds.health_check(&by_path).unwrap()),
        [root.join("probe").display().to_string()]
    );
    let e = kinds.health_check(&by_name).unwrap_err();
    assert!(
        e.starts_with("its health check: `sh` (/")
            && e.contains(&format!(
                "is not allowed on this node: its --exec-allow permits only {pattern}"
            )),
        "{e}"
    );

    // --no-exec: no commands at all; other probes still run.
    let mut kinds = KindRegistry::stock();
    kinds.disable("exec", "--no-exec");
    assert_eq!(
        kinds.health_check(&by_name).unwrap_err(),
        "its health check runs a command (`sh`), and this node runs none (--no-exec)"
    );
    assert_eq!(kinds.health_check(&http).unwrap(), http);
}

#[tokio::test]
async fn exec_runs_as_the_configured_user_with_its_parent_death_signal() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching users needs root, and this test runs as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The parent-death signal as the process itself sees it (prctl PR_GET_PDEATHSIG; a fork
    // clears it, so the shell becomes python3), where python3 is there to ask.
    let pdeathsig = r#"import ctypes, os, time
s = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(s))
out = os.environ["OUT"]
open(out + ".tmp", "a").write("%d\n" % s.value)
os.rename(out + ".tmp", out)
time.sleep(1000)"#;
    let script = r#"{ id -u; id -g; id -G; echo "$HOME"; } > "$OUT.tmp"
if command -v python3 > /dev/null; then exec python3 -c "$PROGRAM"; fi
echo none >> "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exec sleep 1000"#;
    let config = json!({
        "command": "/bin/sh",
        "args": ["-c", script],
        "env": {"OUT": dir.path("out"), "PROGRAM": pdeathsig},
        "user": "nobody",
    });
    let svc = create("exec", config, Duration::from_secs(2));
    svc.start().await.unwrap();
    let out = written(&dir.path("out")).await;
    svc.stop().await;
    let lines: Vec<&str> = out.lines().collect();
    let files = super::exec::users::AccountFiles::read().unwrap();
    let (nobody, home) = files
        .credentials(&super::exec::users::Account::Name("nobody".into()), None)
        .unwrap();
    let groups: Vec<String> = nobody.groups.iter().map(u32::to_string).collect();
    assert_eq!(
        lines[..4],
        [
            nobody.uid.to_string(),
            nobody.gid.to_string(),
            groups.join(" "),
            home
        ],
        "{out}"
    );
    match lines[4] {
        "none" => eprintln!("parent-death signal not checked: no python3"),
        signal => assert_eq!(signal, libc::SIGKILL.to_string(), "{out}"),
    }
}

#[test]
fn exec_process_does_not_outlive_its_runtime() {
    let dir = TempDir::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pids = runtime.block_on(async {
        let script = r#"sleep 1000 & echo $$ $! > "$PIDFILE"; wait"#;
        let svc = shell(&dir, script, Duration::from_secs(1));
        svc.start().await.unwrap();
        Pids::read(&dir.path("pid")).await
    });
    assert!(pids.0.iter().all(|&pid| alive(pid)));
    // Never stopped: dropping the runtime drops the process task, and with it the process
    // (kill_on_drop) and its group.
    drop(runtime);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while pids.0.iter().any(|&pid| alive(pid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} outlived the runtime",
            pids.0
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `(ppid, pgid, name)` of a process, from `/proc/<pid>/stat`, if it exists (zombie or not).
fn stat(pid: i32) -> Option<(i32, i32, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = text.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields[1].parse().ok()?, fields[2].parse().ok()?, name))
}

/// The pids in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| stat(pid).is_some_and(|(_, g, _)| g == pgid))
        .collect();
    pids.sort();
    pids
}

#[tokio::test]
async fn exec_group_has_a_keeper_and_is_in_the_ledger_until_reaped() {
    let dir = TempDir::new();
    let kinds = KindRegistry::stock();
    kinds.open_process_ledger(&dir.0);
    let config = json!({
        "command": "/bin/sh",
        "args": ["-c", r#"sleep 1000 & echo $$ $! > "$PIDFILE"; wait"#],
        "env": {"PIDFILE": dir.path("pid")},
    });
    let svc = kinds
        .create("exec", &spec(config, Duration::from_secs(2)))
        .unwrap();
    svc.start().await.unwrap();
    let mut pids = Pids::read(&dir.path("pid")).await;
    let (shell, sleep) = (pids.0[0], pids.0[1]);
    let members = group_members(shell);
    let keeper = members
        .iter()
        .copied()
        .find(|p| !pids.0.contains(p))
        .unwrap_or_else(|| panic!("no keeper in group {shell}: {members:?}"));
    pids.0.push(keeper);
    assert_eq!(members.len(), 3, "{members:?}");
    // The keeper names itself once it runs (until then it has its spawner's name).
    let mut seen = stat(keeper).unwrap();
    for _ in 0..200 {
        if seen.2 == "mode-keeper" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        seen = stat(keeper).unwrap();
    }
    let (ppid, _, name) = seen;
    assert_eq!(
        (ppid, name.as_str()),
        (std::process::id() as i32, "mode-keeper")
    );
    // It holds none of the node's files or sockets open, and shares the node's memory instead
    // of copying it.
    let fds = std::fs::read_dir(format!("/proc/{keeper}/fd"))
        .unwrap()
        .count();
    assert_eq!(fds, 0);
    let maps = |pid: String| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // (Read twice, and other threads may map memory in between: a few tries.)
    assert!((0..20).any(|_| maps(keeper.to_string()) == maps("self".to_string())));
    let ledger = std::fs::read_to_string(dir.path("processes.jsonl")).unwrap();
    assert!(
        ledger.contains(r#""event":"started""#)
            && ledger.contains(&format!(r#""pgid":{shell}"#))
            && ledger.contains(&format!(r#""pid":{keeper},"#)),
        "{ledger}"
    );

    // The shell's child carries the run id the ledger recorded.
    let environ = std::fs::read(format!("/proc/{sleep}/environ")).unwrap();
    let run_id = String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|e| e.strip_prefix("MODE_RUN_ID=").map(str::to_string))
        .unwrap();
    assert!(
        ledger.contains(&format!(r#""run_id":"{run_id}""#)),
        "{ledger}"
    );

    svc.stop().await;
    for pid in [shell, sleep] {
        assert!(gone(pid).await, "pid {pid} survived the stop");
    }
    // Reaped: not even a zombie is left of the keeper.
    assert_eq!(stat(keeper), None);
    let ledger = std::fs::read_to_string(dir.path("processes.jsonl")).unwrap();
    assert_eq!(ledger.lines().count(), 2, "{ledger}");
    assert!(ledger
        .lines()
        .nth(1)
        .unwrap()
        .contains(r#""event":"reaped""#));
}

#[test]
fn exec_processes_outlive_the_thread_that_asked_for_them() {
    // The parent-death signal fires when the thread that forked exits: a short-lived blocking
    // thread asks for the process here, and the process must not die with it.
    let dir = TempDir::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_keep_alive(Duration::from_millis(20))
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let handle = tokio::runtime::Handle::current();
        let pidfile = dir.path("pid");
        let child = tokio::task::spawn_blocking(move || {
            handle.block_on(async {
                let mut command = tokio::process::Command::new("/bin/sh");
                command
                    .args(["-c", r#"echo $$ > "$PIDFILE"; exec sleep 1000"#])
                    .env("PIDFILE", &pidfile)
                    .process_group(0)
                    .kill_on_drop(true);
                super::spawner::spawn(command, None, None).await.unwrap()
            })
        })
        .await
        .unwrap();
        let mut spawned = child;
        let pids = Pids::read(&dir.path("pid")).await;
        // Well past the blocking thread's keep-alive: it has exited.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            alive(pids.0[0]),
            "the process died with the thread that asked for it"
        );
        assert!(spawned.child.try_wait().unwrap().is_none());
        let keeper = spawned.keeper.unwrap();
        // SAFETY: plain syscall on the group of the test's own child.
        unsafe { libc::kill(-pids.0[0], libc::SIGKILL) };
        drop(keeper);
        let _ = spawned.child.wait().await;
    });
}

// ---- demo kinds --------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn ticker_logs_its_message_every_period_and_stops_cleanly() {
    let (logs, _guard) = Logs::capture();
    let svc = create(
        "ticker",
        json!({"every_ms": 1000, "message": "hello there"}),
        Duration::from_secs(1),
    );
    svc.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        logs.count("INFO", "[svc#0] hello there"),
        3,
        "{}",
        logs.text()
    );
    let timer = find(&svc.beacon(), "tick").cloned().unwrap();
    assert!(timer.detail.unwrap().contains("fires=3"));
    svc.stop().await;
    assert_eq!(svc.state(), ServiceState::Shutdown);
    assert!(!svc.was_forced());
}

#[tokio::test(start_paused = true)]
async fn counter_counts_ticks_and_stops_cleanly() {
    let (logs, _guard) = Logs::capture();
    let svc = create("counter", json!({"every_ms": 250}), Duration::from_secs(1));
    svc.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in 1..=4 {
        assert_eq!(logs.count("INFO", &format!("[svc#0] count = {n}")), 1);
    }
    assert_eq!(logs.count("INFO", "count = 5"), 0);
    // The count goes on across a restart.
    svc.restart().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        logs.count("INFO", "[svc#0] count = 5"),
        1,
        "{}",
        logs.text()
    );
    svc.stop().await;
    assert_eq!(svc.state(), ServiceState::Shutdown);
    assert!(!svc.was_forced());
}

#[tokio::test(start_paused = true)]
async fn crasher_crashes_after_the_configured_delay() {
    let svc = create("crasher", json!({"after_ms": 1000}), Duration::from_secs(1));
    let begun = Instant::now();
    svc.start().await.unwrap();
    let reason = crashed(&svc, Duration::from_secs(10)).await;
    assert_eq!(begun.elapsed(), Duration::from_millis(1000));
    assert_eq!(
        reason,
        "task 'crash_after' failed: crasher: crashing as configured after 1000 ms"
    );
    svc.stop().await;
}

#[tokio::test(start_paused = true)]
async fn crasher_stopped_before_its_delay_stops_cleanly() {
    let svc = create("crasher", json!({"after_ms": 1000}), Duration::from_secs(1));
    svc.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    svc.stop().await;
    assert_eq!(svc.state(), ServiceState::Shutdown);
    assert!(!svc.was_forced());
}

#[tokio::test]
async fn crasher_crashes_once_per_crash_file() {
    let dir = TempDir::new();
    let file = dir.path("crash");
    let svc = create(
        "crasher",
        json!({"crash_file": file}),
        Duration::from_secs(1),
    );
    svc.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(svc.state(), ServiceState::Running);
    for round in 0..2 {
        std::fs::write(&file, "").unwrap();
        let reason = crashed(&svc, Duration::from_secs(5)).await;
        assert_eq!(
            reason,
            format!(
                "task 'crash_file' failed: crasher: crashing as requested by {}",
                file.display()
            ),
            "round {round}"
        );
        assert!(!file.exists(), "the crash file is consumed");
        svc.restart().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(svc.state(), ServiceState::Running);
    }
    svc.stop().await;
    assert_eq!(svc.state(), ServiceState::Shutdown);
}

async fn http(port: u16, request: &str) -> String {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    socket.read_to_string(&mut reply).await.unwrap();
    reply
}

#[tokio::test]
async fn webapp_serves_http_and_shows_the_tutorial_tree() {
    let svc = create("webapp", json!({"port": 0}), Duration::from_secs(1));
    within(Duration::from_secs(5), "the start", svc.start())
        .await
        .unwrap();
    let beacon = svc.beacon();
    assert_eq!(beacon.label, "svc#0");
    let children: Vec<&str> = beacon.children.iter().map(|c| c.label.as_str()).collect();
    assert_eq!(children, ["Websockets", "UserCache", "Webserver"]);
    assert!(find(&beacon, "remove_expired_users").is_some());
    let accept = find(&beacon, "accept").unwrap();
    let port: u16 = accept
        .label
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert_ne!(port, 0);

    let reply = within(
        Duration::from_secs(5),
        "the reply",
        http(port, "GET / HTTP/1.1\r\n\r\n"),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(
        reply.ends_with("Hello from mode! svc#0: 1 recent users.\n"),
        "{reply}"
    );
    let reply = within(
        Duration::from_secs(5),
        "the reply",
        http(port, "POST / HTTP/1.1\r\n\r\n"),
    )
    .await;
    assert!(
        reply.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{reply}"
    );

    within(Duration::from_secs(5), "the stop", svc.stop()).await;
    assert_eq!(svc.state(), ServiceState::Shutdown);
    assert!(!svc.was_forced());
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
}

#[tokio::test]
async fn webapp_on_a_taken_port_fails_to_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let svc = create("webapp", json!({"port": port}), Duration::from_secs(1));
    let error = within(Duration::from_secs(5), "the start", svc.start())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{error}"
    );
    assert_eq!(svc.state(), ServiceState::Crashed);
}
