//! Processes never outlive their node: `exec` processes die with a `kill -9`ed node, and a
//! restarted node kills what its previous run left behind before it starts anything. Real
//! `mode-node` processes on loopback; every process a test learns of is SIGKILLed (with its
//! group) when the test ends, pass or fail.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mode_tests::{Scratch, TestCluster};
use serde_json::Value;

const ELECTION: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(30);

fn all_running(inst: &BTreeMap<u64, Value>, n: usize) -> bool {
    inst.len() == n && inst.values().all(|p| p["state"] == "running")
}

/// `n` nodes with a leader and every node registered with its kinds; returns the leader.
async fn cluster(n: u64) -> (TestCluster, u64) {
    let c = TestCluster::start(n, &[]);
    let leader = c.wait_leader(ELECTION).await;
    c.wait_registered(n as usize).await;
    (c, leader)
}

/// An `exec` service of `replicas` shells, each forking a `sleep` (its grandchild, in its
/// group) and appending "shell-pid sleep-pid" to `pid_file`.
fn forking_spec(name: &str, replicas: u32, pid_file: &Path) -> String {
    format!(
        "name: {name}\nkind: exec\nreplicas: {replicas}\nconfig:\n  command: /bin/sh\n  args: [\"-c\", \"sleep 1000 & echo $$ $! >> {}; wait\"]\n",
        pid_file.display()
    )
}

/// What `/proc/<pid>/stat` says: (state, ppid, pgid, start time).
fn stat(pid: u32) -> Option<(char, u32, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(1)?.parse().ok()?,
        fields.get(2)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Running (a zombie no longer runs, and nobody may reap one in a container).
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, ..)| !matches!(state, 'Z' | 'X'))
}

fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// The instances' process groups, as their pid file lists them: each SIGKILLed on drop while it
/// is still theirs (its shell still runs the script naming the file, or its `sleep`, started
/// after the test, is still in the group). Made before the cluster, so that it is dropped after
/// the nodes (and whatever they restarted meanwhile).
struct Instances {
    pid_file: PathBuf,
    since: u64,
    _dir: Scratch,
}

impl Instances {
    fn new() -> Instances {
        let dir = Scratch::new("pids");
        let since = stat(std::process::id()).map_or(0, |(.., start)| start);
        Instances {
            pid_file: dir.0.join("pids"),
            since,
            _dir: dir,
        }
    }

    fn lines(&self) -> Vec<(u32, u32)> {
        std::fs::read_to_string(&self.pid_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (a, b) = l.trim().split_once(' ')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        let file = self.pid_file.display().to_string();
        for (shell, sleep) in self.lines() {
            let runs_ours = std::fs::read(format!("/proc/{shell}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&file));
            let child_left =
                stat(sleep).is_some_and(|(_, _, pgid, start)| pgid == shell && start >= self.since);
            if runs_ours || child_left {
                kill_group(shell);
            }
        }
    }
}

/// A process group the test starts itself: `sh -c script`, which prints the pids the test
/// should know on its first line. SIGKILLed (group and all) and reaped on drop.
struct OwnGroup {
    child: Child,
    pids: Vec<u32>,
}

impl OwnGroup {
    fn start(script: &str, env: &[(&str, &str)]) -> OwnGroup {
        let mut child = Command::new("/bin/sh")
            .args(["-c", script])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start /bin/sh");
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        let pids = line
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        let group = OwnGroup { child, pids };
        assert!(
            matches!(read, Some(Ok(_))) && !group.pids.is_empty(),
            "the script printed no pids: {read:?} {line:?}"
        );
        group
    }

    fn pgid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for OwnGroup {
    fn drop(&mut self) {
        kill_group(self.pgid());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The "shell-pid sleep-pid" lines of the pid file once it has at least `n`.
async fn wait_lines(instances: &Instances, n: usize, c: &TestCluster) -> Vec<(u32, u32)> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let lines = instances.lines();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} of {n} lines\n{}",
            instances.pid_file.display(),
            lines.len(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait up to `limit` until none of `pids` runs; the survivors otherwise.
async fn wait_gone(pids: &[u32], limit: Duration) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<String> = pids
            .iter()
            .filter(|&&p| alive(p))
            .map(|&p| format!("pid {p} {:?}", stat(p)))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_processes_and_their_children_die_with_it() {
    let instances = Instances::new();
    let (mut c, leader) = cluster(3).await;
    c.apply(leader, &forking_spec("web", 3, &instances.pid_file))
        .await
        .unwrap();
    c.wait_instances(leader, "web", SETTLE, |i| all_running(i, 3))
        .await;
    let before = wait_lines(&instances, 3, &c).await;
    let victim = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let victim_pid = c.nodes[&victim].pid().unwrap_or(0);
    let on_victim: Vec<u32> = before
        .iter()
        .filter(|(shell, _)| stat(*shell).is_some_and(|(_, ppid, ..)| ppid == victim_pid))
        .flat_map(|(shell, sleep)| [*shell, *sleep])
        .collect();
    assert_eq!(
        on_victim.len(),
        2,
        "node {victim} (pid {victim_pid}) should run one instance: {before:?}"
    );

    c.node(victim).kill9();
    if let Err(left) = wait_gone(&on_victim, Duration::from_secs(5)).await {
        panic!("node {victim} was killed 5 s ago, and its processes still run: {left:?}");
    }

    // Rescheduled on the other two nodes; then exactly three instances' processes run.
    c.wait_instances(leader, "web", SETTLE, |i| {
        all_running(i, 3) && i.values().all(|p| p["node"] != victim)
    })
    .await;
    let after = wait_lines(&instances, 4, &c).await;
    let count = |lines: &[(u32, u32)]| {
        let shells = lines.iter().filter(|(s, _)| alive(*s)).count();
        let sleeps = lines.iter().filter(|(_, s)| alive(*s)).count();
        (shells, sleeps)
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&after), (3, 3), "{after:?}\n{}", c.logs());
}

/// Append "started" lines for these groups to a node's process ledger, in the format a
/// previous run writes.
fn record_in_ledger(data_dir: &Path, groups: &[(&str, u32, u64, Option<&str>)]) {
    let path = data_dir.join("processes.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open the ledger");
    for (label, pid, start_time, run_id) in groups {
        let line = serde_json::json!({
            "event": "started",
            "label": label,
            "pgid": pid,
            "leader": {"pid": pid, "start_time": start_time},
            "keeper": null,
            "run_id": run_id,
        });
        writeln!(file, "{line}").expect("append to the ledger");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_kills_what_its_previous_run_left_before_it_starts_anything() {
    let instances = Instances::new();
    let (mut c, leader) = cluster(1).await;
    c.apply(leader, &forking_spec("web", 1, &instances.pid_file))
        .await
        .unwrap();
    c.wait_instances(leader, "web", SETTLE, |i| all_running(i, 1))
        .await;
    wait_lines(&instances, 1, &c).await;
    c.node(1).kill9();

    // What the previous run left behind and neither parent-death signal nor keeper caught,
    // started as the node starts groups: one whose leader still runs (a program that cleared
    // its parent-death signal, its keeper killed by the OOM killer), and the grandchild of a
    // shell that already exited, re-parented and carrying its run's MODE_RUN_ID. And a
    // process whose pid the ledger has, but that started at another time: a stranger that
    // reused the pid, never to be touched.
    let leftover = OwnGroup::start("sleep 1000 & echo $$ $!; wait", &[]);
    let run_id = format!("test-{}", std::process::id());
    let mut orphaned = OwnGroup::start("sleep 1000 & echo $$ $!", &[("MODE_RUN_ID", &run_id)]);
    let stranger = OwnGroup::start("echo $$; exec sleep 1000", &[]);
    let start_of = |pid: u32| stat(pid).map(|(.., start)| start).unwrap_or(0);
    let (l, o, s) = (leftover.pgid(), orphaned.pgid(), stranger.pgid());
    // (A zombie until waited for: its start time is still there.)
    let orphan_start = start_of(o);
    let _ = orphaned.child.wait();
    let grandchild = orphaned.pids[1];
    let data_dir: PathBuf = c.nodes[&1].data_dir.clone();
    record_in_ledger(
        &data_dir,
        &[
            ("web#7", l, start_of(l), None),
            ("web#9", o, orphan_start, Some(&run_id)),
            ("web#8", s, start_of(s) + 1, None),
        ],
    );
    assert!(leftover.pids.iter().all(|&p| alive(p)) && alive(grandchild));
    assert_ne!(stat(grandchild).map(|(_, ppid, ..)| ppid), Some(o));

    let logged_before = c.nodes[&1].logs().len();
    c.node(1).start();
    let mut leftovers = leftover.pids.clone();
    leftovers.push(grandchild);
    if let Err(left) = wait_gone(&leftovers, Duration::from_secs(20)).await {
        panic!("leftovers survived the restart: {left:?}\n{}", c.logs());
    }
    c.wait_instances(1, "web", SETTLE, |i| all_running(i, 1))
        .await;
    let second = wait_lines(&instances, 2, &c).await;
    assert!(alive(second[1].0), "{second:?}");
    assert!(alive(s), "the stranger (pid {s}) was killed");

    let log = c.nodes[&1].logs();
    let log = log.get(logged_before..).unwrap_or_default();
    let started = log.find("starting web#0");
    for (pgid, label) in [(l, "web#7"), (o, "web#9")] {
        let killed = log.find(&format!("killed process group {pgid} of {label}"));
        assert!(
            matches!((killed, started), (Some(k), Some(st)) if k < st),
            "{label} must be killed (and say so) before the instance starts: {killed:?} {started:?}\n{log}"
        );
    }
    assert!(!log.contains(&format!("killed process group {s}")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_process_ledger_is_reported_and_the_node_starts_anyway() {
    let instances = Instances::new();
    let (mut c, leader) = cluster(1).await;
    c.apply(leader, &forking_spec("web", 1, &instances.pid_file))
        .await
        .unwrap();
    c.wait_instances(leader, "web", SETTLE, |i| all_running(i, 1))
        .await;
    wait_lines(&instances, 1, &c).await;
    c.node(1).kill9();
    let ledger = c.nodes[&1].data_dir.join("processes.jsonl");
    std::fs::write(&ledger, b"\x00\xffnot a ledger\n{\"event\": \"sta").expect("write the ledger");

    let logged_before = c.nodes[&1].logs().len();
    c.node(1).start();
    c.wait_leader(ELECTION).await;
    let second = wait_lines(&instances, 2, &c).await;
    c.wait_instances(1, "web", SETTLE, |i| all_running(i, 1))
        .await;
    let log = c.nodes[&1].logs();
    let log = log.get(logged_before..).unwrap_or_default();
    assert!(
        log.contains(&format!("process ledger {} is corrupt", ledger.display()))
            && log.contains("2 of its 2 lines are unreadable")
            && log.contains("could not be checked"),
        "{log}"
    );
    // And it starts afresh, recording the new instance.
    let text = std::fs::read_to_string(&ledger).unwrap_or_default();
    assert!(
        text.lines().count() == 1 && text.contains(&format!("\"pgid\":{}", second[1].0)),
        "{text}"
    );
}
