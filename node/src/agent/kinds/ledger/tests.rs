//! Tests of the process ledger: the file's round trip, and the start-up check against real
//! process groups (each test kills the groups it started, even on failure).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::*;

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mode-ledger-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn ledger(&self) -> PathBuf {
        self.0.join(PROCESS_LEDGER_FILE)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process group this test started with `sh -c script`; SIGKILLed and reaped on drop.
struct Group {
    child: std::process::Child,
    pgid: libc::pid_t,
}

impl Group {
    /// `script` writes the pids it wants the test to know, space-separated, to stdout.
    fn start(script: &str) -> (Group, Vec<libc::pid_t>) {
        let mut child = Command::new("/bin/sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as libc::pid_t;
        let mut line = String::new();
        use std::io::BufRead as _;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pids: Vec<libc::pid_t> = line
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        // A background command is a forked shell until it execs: wait until each process
        // the script named runs its own program, so that members read now and later agree.
        for pid in pids.iter().skip(1) {
            let comm = format!("/proc/{pid}/comm");
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sh")
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        (Group { child, pgid }, pids)
    }

    fn record(&self, leader: ProcessId) -> GroupRecord {
        GroupRecord {
            label: "svc#0".into(),
            pgid: self.pgid,
            leader,
            keeper: None,
            run_id: None,
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: plain syscall; the group is led by (or was led by) this test's own child,
        // and holds this test's processes only.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process of the test that left its group: SIGKILLed on drop while it is still a `sleep`.
struct Stray(libc::pid_t);

impl Drop for Stray {
    fn drop(&mut self) {
        if ProcStat::read(self.0).is_some_and(|s| s.name == "sleep") {
            // SAFETY: plain syscall on the test's own grandchild.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// The process `pid` is now, if it exists and is not a zombie.
fn id_of(pid: libc::pid_t) -> Option<ProcessId> {
    let stat = ProcStat::read(pid)?;
    Some(ProcessId {
        pid,
        start_time: stat.start_time,
    })
}

fn alive(pid: libc::pid_t) -> bool {
    ProcStat::read(pid).is_some()
}

fn wait_gone(pid: libc::pid_t) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn record(pid: libc::pid_t, start_time: u64) -> GroupRecord {
    GroupRecord {
        label: format!("svc#{pid}"),
        pgid: pid,
        leader: ProcessId { pid, start_time },
        keeper: Some(ProcessId {
            pid: pid + 1,
            start_time: start_time + 1,
        }),
        run_id: Some(format!("test-{pid}")),
    }
}

#[test]
fn the_ledger_replays_to_the_groups_started_and_not_reaped() {
    let dir = TempDir::new();
    let ledger = ProcessLedger::default();
    // Not opened: records nothing, and writes nothing anywhere.
    ledger.started(&record(10, 1));
    assert!(ledger.open(&dir.0).is_empty());
    let (a, b, c) = (record(100, 5), record(200, 6), record(300, 7));
    ledger.started(&a);
    ledger.started(&b);
    ledger.started(&c);
    ledger.reaped(&b);
    // A group reaped twice, or never recorded, writes nothing.
    ledger.reaped(&b);
    ledger.reaped(&record(400, 8));
    let bytes = std::fs::read(dir.ledger()).unwrap();
    let replayed = replay(&bytes);
    assert_eq!(replayed.lines, 4, "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(replayed.unreadable_count, 0);
    assert_eq!(
        replayed.live.into_values().collect::<Vec<_>>(),
        [a.clone(), c.clone()]
    );
}

#[test]
fn the_ledger_is_rewritten_when_mostly_reaped_groups() {
    let dir = TempDir::new();
    let ledger = ProcessLedger::default();
    ledger.open(&dir.0);
    let kept = record(7, 70);
    ledger.started(&kept);
    for pid in 1000..1000 + COMPACT_SLACK as i32 {
        ledger.started(&record(pid, 1));
        ledger.reaped(&record(pid, 1));
    }
    let bytes = std::fs::read(dir.ledger()).unwrap();
    let replayed = replay(&bytes);
    assert!(
        replayed.lines < COMPACT_SLACK,
        "never rewritten: {} lines",
        replayed.lines
    );
    assert_eq!(replayed.live.into_values().collect::<Vec<_>>(), [kept]);
    assert!(!dir.0.join("processes.jsonl.tmp").exists());
}

#[test]
fn unreadable_lines_are_counted_and_the_rest_is_replayed() {
    let good = serde_json::to_string(&Line::Started(record(5, 50))).unwrap();
    let text = format!("{good}\n{{\"event\":\"started\",\"pgid\"\n\n\u{0}\u{ff}garbage\n");
    let replayed = replay(text.as_bytes());
    assert_eq!(replayed.lines, 3);
    assert_eq!(replayed.unreadable_count, 2);
    assert_eq!(replayed.unreadable[0].0, 2);
    assert_eq!(replayed.unreadable[1].0, 4);
    assert_eq!(replayed.live.len(), 1);
}

#[test]
fn proc_stat_reads_names_with_spaces_and_parentheses() {
    let line = "4242 (my (odd) name) S 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 1 2 3";
    let stat = ProcStat::parse(line).unwrap();
    assert_eq!(stat.name, "my (odd) name");
    assert_eq!(stat.pgid, 4240);
    assert_eq!(stat.start_time, 987654);
    let zombie = "4242 (sh) Z 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654";
    assert_eq!(ProcStat::parse(zombie), None);
    assert!(ProcStat::read(std::process::id() as libc::pid_t).is_some());
}

#[test]
fn a_recorded_group_still_running_is_killed_with_its_grandchildren() {
    let (group, pids) = Group::start("sleep 1000 & echo $$ $!; wait");
    let (leader, grandchild) = (pids[0], pids[1]);
    assert_eq!(leader, group.pgid);
    let record = group.record(id_of(leader).unwrap());
    let found = reap([record.clone()]);
    let [Leftover::Killed { members, .. }] = &found[..] else {
        panic!("not killed: {found:?}");
    };
    let killed: Vec<libc::pid_t> = members.iter().map(|m| m.pid).collect();
    assert_eq!(killed, [leader, grandchild], "{members:?}");
    assert!(wait_gone(leader) && wait_gone(grandchild));
}

#[test]
fn a_group_is_also_proven_by_its_keeper() {
    let (group, pids) = Group::start("sleep 1000 & echo $$ $!; wait");
    let (leader, grandchild) = (pids[0], pids[1]);
    // The leader's pid now belongs to "another process" (a wrong start time), the second
    // member stands for the keeper.
    let mut record = group.record(id_of(leader).unwrap());
    record.leader.start_time += 1;
    record.keeper = id_of(grandchild);
    let found = reap([record]);
    assert!(matches!(&found[..], [Leftover::Killed { .. }]), "{found:?}");
    assert!(wait_gone(leader) && wait_gone(grandchild));
}

#[test]
fn a_pid_with_another_start_time_is_never_killed() {
    let (group, pids) = Group::start("sleep 1000 & echo $$ $!; wait");
    let leader = id_of(pids[0]).unwrap();
    // The same pid, started at another time: a stranger that reused it.
    for start_time in [leader.start_time - 1, leader.start_time + 1] {
        let mut record = group.record(leader);
        record.leader.start_time = start_time;
        let found = reap([record.clone()]);
        assert_eq!(
            found,
            [Leftover::Unproven {
                record,
                members: members_of(group.pgid)
            }]
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(pids[0]) && alive(pids[1]));
}

#[test]
fn the_rest_of_a_group_whose_leader_is_gone_is_left_alone() {
    // The shell exits at once; its background sleep stays in the group.
    let (mut group, pids) = Group::start("sleep 1000 & echo $$ $!");
    let leader = ProcessId {
        pid: pids[0],
        start_time: 1,
    };
    let _ = group.child.wait();
    let found = reap([group.record(leader)]);
    let [Leftover::Unproven { members, .. }] = &found[..] else {
        panic!("{found:?}");
    };
    assert_eq!(members.iter().map(|m| m.pid).collect::<Vec<_>>(), [pids[1]]);
    assert!(alive(pids[1]));
    // A group with nothing left is simply gone.
    drop(group);
    assert!(wait_gone(pids[1]));
    let found = reap([record(pids[0], 1)]);
    assert!(matches!(&found[..], [Leftover::Gone { .. }]), "{found:?}");
}

#[test]
fn a_process_carrying_the_run_id_is_killed_after_leader_and_keeper_are_gone() {
    let run_id = new_run_id();
    // The shell exits at once: its sleep is re-parented, and a second one even left the group.
    let script = format!(
        "{RUN_ID_VAR}={run_id} sleep 1000 & a=$!; {RUN_ID_VAR}={run_id} setsid sleep 1000 & b=$!; sleep 1000 & echo $$ $a $b $!"
    );
    let (mut group, pids) = Group::start(&script);
    // The shell may have exited already: a zombie until it is waited for, with its start time.
    let leader = ProcessId::of_unreaped_child(pids[0]).unwrap();
    let _ = group.child.wait();
    let (in_group, left_group, untagged) = (pids[1], pids[2], pids[3]);
    let _stray = Stray(left_group);
    // `setsid` runs in its own group.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ProcStat::read(left_group).is_none_or(|s| s.pgid == group.pgid || s.name != "sleep") {
        assert!(Instant::now() < deadline, "setsid never ran sleep");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut record = group.record(leader);
    record.run_id = Some(run_id);
    let found = reap([record]);
    let [Leftover::Killed { members, .. }] = &found[..] else {
        panic!("not killed: {found:?}");
    };
    let killed: Vec<libc::pid_t> = members.iter().map(|m| m.pid).collect();
    assert_eq!(killed, [in_group, left_group], "{members:?}");
    assert!(wait_gone(in_group) && wait_gone(left_group));
    // Without the run id, nothing proves the last one is the group's.
    assert!(alive(untagged));
}

#[test]
fn opening_kills_the_leftovers_and_starts_a_fresh_ledger() {
    let dir = TempDir::new();
    let (group, pids) = Group::start("sleep 1000 & echo $$ $!; wait");
    let (stranger, stranger_pids) = Group::start("echo $$; exec sleep 1000");
    let leftover = group.record(id_of(pids[0]).unwrap());
    let mut reused = stranger.record(id_of(stranger_pids[0]).unwrap());
    reused.leader.start_time += 3;
    let previous = ProcessLedger::default();
    previous.open(&dir.0);
    previous.started(&leftover);
    previous.started(&reused);
    previous.started(&record(1_000_000_000, 1));
    // A torn last line, as a crash mid-write might leave.
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.ledger())
        .and_then(|mut f| f.write_all(b"{\"event\":\"sta"))
        .unwrap();

    let found = ProcessLedger::default().open(&dir.0);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(
        found
            .iter()
            .any(|l| matches!(l, Leftover::Killed { record, .. } if *record == leftover)),
        "{found:?}"
    );
    assert!(wait_gone(pids[0]) && wait_gone(pids[1]));
    assert!(alive(stranger_pids[0]));
    assert_eq!(std::fs::read(dir.ledger()).unwrap(), b"");
}

#[test]
fn an_unreadable_ledger_does_not_stop_the_node() {
    let dir = TempDir::new();
    // A directory where the file should be: it cannot be read, nor replaced.
    std::fs::create_dir(dir.ledger()).unwrap();
    let ledger = ProcessLedger::default();
    assert!(ledger.open(&dir.0).is_empty());
    // Recording is off, and says nothing more.
    ledger.started(&record(5, 5));
    assert!(dir.ledger().is_dir());
}
