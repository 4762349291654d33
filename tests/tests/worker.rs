//! The Worker as a real process: signals, exit codes, logs.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FIXTURE: &str = env!("CARGO_BIN_EXE_worker-fixture");

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Proc {
    let mut child = Command::new(FIXTURE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the fixture");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    Proc { child }
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Wait (bounded) for the exit code and the whole stderr.
fn finish(mut p: Proc, limit: Duration) -> (i32, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            let mut err = String::new();
            p.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_stops_gracefully_with_exit_0() {
    let p = start(&[]);
    signal(&p, "TERM");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("[^Worker]: Stopping on signal received (SIGTERM)..."),
        "{err}"
    );
    assert!(err.contains("[^-Fixture]: -Stopped!"), "{err}");
    assert!(err.contains("[^Worker]: -Stopped!"), "{err}");
}

#[test]
fn sigint_prints_the_int_banner_and_exits_0() {
    let p = start(&[]);
    signal(&p, "INT");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("-INT- -INT- -INT-"), "{err}");
}

#[test]
fn a_crash_exits_1_and_prints_the_reason() {
    let p = start(&["--crash-after-ms", "100"]);
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "error: crashed: dependency 'Fixture' crashed: task 'work' failed: simulated failure"
        ),
        "{err}"
    );
}

#[test]
fn a_failed_start_exits_1_naming_the_service() {
    let mut child = Command::new(FIXTURE)
        .arg("--fail-start")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("failed to start"), "{err}");
    assert!(err.contains("port 80 is already in use"), "{err}");
}

#[test]
fn a_shutdown_past_its_timeout_exits_2_naming_the_hook_it_waits_for() {
    let p = start(&["--hang-on-stop", "--shutdown-timeout-ms", "300"]);
    signal(&p, "TERM");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("did not stop within the 300ms shutdown timeout; still stopping:\n  Worker/Fixture: in on_stop (grace period 60s)"),
        "{err}"
    );
}

#[test]
fn a_shutdown_past_its_timeout_names_the_tasks_it_waits_for() {
    let p = start(&["--hang-task", "--shutdown-timeout-ms", "300"]);
    signal(&p, "TERM");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("Worker/Fixture: waiting for its tasks 'work' (grace period 60s)"),
        "{err}"
    );
}

#[test]
fn a_panic_in_on_start_exits_1_not_101_and_names_the_hook() {
    let mut child = Command::new(FIXTURE)
        .args(["--panic-in", "on_start"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("error: service 'Worker' failed to start: dependency 'Fixture' failed to start: on_start panicked: simulated panic in on_start"),
        "{err}"
    );
}

#[test]
fn a_panic_in_on_stop_still_stops_everything_and_exits_0() {
    let p = start(&["--panic-in", "on_stop"]);
    signal(&p, "TERM");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("[^-Fixture]: on_stop panicked: simulated panic in on_stop; the stop goes on"),
        "{err}"
    );
    assert!(err.contains("[^Worker]: -Stopped!"), "{err}");
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let p = start(&["--crash-after-ms", "100"]);
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Crashed"), "{err}");
    assert!(!err.contains('\x1b'), "stderr is a pipe: {err:?}");
}

#[test]
fn a_second_signal_exits_at_once_with_130() {
    let p = start(&["--hang-on-stop"]);
    signal(&p, "INT");
    std::thread::sleep(Duration::from_millis(300));
    signal(&p, "INT");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 130, "{err}");
    assert!(
        err.contains("SIGINT received again while stopping: exiting now"),
        "{err}"
    );
}

#[test]
fn sigusr1_logs_the_beacon_with_every_task() {
    let p = start(&[]);
    std::thread::sleep(Duration::from_millis(300));
    signal(&p, "USR1");
    std::thread::sleep(Duration::from_millis(300));
    signal(&p, "TERM");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("beacon (SIGUSR1):"), "{err}");
    assert!(err.contains("Worker [worker] running"), "{err}");
    assert!(err.contains("heartbeat [timer] running"), "{err}");
    assert!(err.contains("work [task] running"), "{err}");
}

#[test]
fn a_blocked_runtime_is_reported() {
    let p = start(&[
        "--block-ms",
        "1500",
        "--blocking-threshold-ms",
        "300",
        "--worker-threads",
        "1",
    ]);
    std::thread::sleep(Duration::from_millis(2200));
    signal(&p, "TERM");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Blocking detected"), "{err}");
    assert!(err.contains("task 'work' of service 'Fixture'"), "{err}");
}

#[test]
fn one_blocked_worker_thread_among_healthy_ones_is_reported_by_name() {
    let p = start(&[
        "--block-ms",
        "1500",
        "--blocking-threshold-ms",
        "300",
        "--worker-threads",
        "2",
    ]);
    std::thread::sleep(Duration::from_millis(2200));
    signal(&p, "TERM");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Blocking detected: thread '"), "{err}");
    assert!(
        err.contains("in one poll of task 'work' of service 'Fixture'"),
        "{err}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let p = start(&["--log-format", "json"]);
    signal(&p, "TERM");
    let (code, err) = finish(p, Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    let mut n = 0;
    for line in err.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect(line);
        assert!(v["fields"]["message"].is_string(), "{line}");
        n += 1;
    }
    assert!(n >= 4, "{err}");
}
