//! The process ledger: which process groups this node started and has not reaped yet, in
//! `processes.jsonl` of its data directory, so that a node restarted after `kill -9` can kill
//! what its previous run left behind before it runs anything.
//!
//! One JSON object a line, appended when a group starts (`started`: its label, group id, and
//! the pid *and start time* of its leader and keeper) and when it is reaped (`reaped`). A pid
//! alone is never trusted: after a restart it may belong to a stranger, so a process counts as
//! the recorded one only while its start time (field 22 of `/proc/<pid>/stat`) is the recorded
//! one. Lines are not fsynced: the ledger has to survive its node, not the machine (a machine
//! that goes down takes its processes with it), and a write is in the page cache once
//! `write` returns. The file is rewritten (to a temporary file, then renamed) when reaped groups
//! make up most of it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::replication::PROCESS_LEDGER_FILE;
use crate::service::lock;

/// A process as the ledger knows it: a pid is only that process while its start time matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct ProcessId {
    pub(crate) pid: libc::pid_t,
    /// Clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub(crate) start_time: u64,
}

impl ProcessId {
    /// A child of this process not reaped yet, even one that exited already (its pid is its
    /// own until it is reaped).
    pub(crate) fn of_unreaped_child(pid: libc::pid_t) -> Option<ProcessId> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, stat) = ProcStat::parse_any(&text)?;
        Some(ProcessId {
            pid,
            start_time: stat.start_time,
        })
    }
}

/// One process group this node started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GroupRecord {
    /// The instance, `web#0`.
    pub(crate) label: String,
    pub(crate) pgid: libc::pid_t,
    /// The process the node spawned (its pid is the group id).
    pub(crate) leader: ProcessId,
    /// The group's keeper (see `spawner`), if it has one.
    pub(crate) keeper: Option<ProcessId>,
    /// The value of [`RUN_ID_VAR`] in the environment of the leader, inherited by what it
    /// starts: proves a process is this group's even once leader and keeper are gone.
    #[serde(default)]
    pub(crate) run_id: Option<String>,
}

/// The environment variable that marks every process of one run of an `exec` instance.
pub(crate) const RUN_ID_VAR: &str = "MODE_RUN_ID";

/// A new run id: `<node pid>-<nanoseconds since the epoch>-<sequence>`, unique on this machine.
pub(crate) fn new_run_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

impl GroupRecord {
    fn key(&self) -> ProcessId {
        self.leader
    }
}

/// A line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    Started(GroupRecord),
    Reaped { leader: ProcessId },
}

/// The groups a ledger file still records, and the lines that could not be read.
#[derive(Debug, Default)]
struct Replayed {
    live: BTreeMap<ProcessId, GroupRecord>,
    lines: usize,
    /// (line number, what is wrong), the first few.
    unreadable: Vec<(usize, String)>,
    unreadable_count: usize,
}

fn replay(bytes: &[u8]) -> Replayed {
    let mut r = Replayed::default();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        r.lines += 1;
        match serde_json::from_slice::<Line>(line) {
            Ok(Line::Started(record)) => {
                r.live.insert(record.key(), record);
            }
            Ok(Line::Reaped { leader }) => {
                r.live.remove(&leader);
            }
            Err(e) => {
                r.unreadable_count += 1;
                if r.unreadable.len() < 3 {
                    r.unreadable.push((n + 1, e.to_string()));
                }
            }
        }
    }
    r
}

/// The ledger of one node, shared by every `exec` instance (cheap to clone). Until
/// [`ProcessLedger::open`] is called it records nothing (a registry used outside a node).
#[derive(Clone, Default)]
pub(crate) struct ProcessLedger {
    file: Arc<Mutex<Option<LedgerFile>>>,
}

struct LedgerFile {
    path: PathBuf,
    file: File,
    live: BTreeMap<ProcessId, GroupRecord>,
    lines: usize,
}

/// Rewrite the file once it holds this many lines more than twice the live groups.
const COMPACT_SLACK: usize = 256;

/// How long the start-up check waits for killed leftovers to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);

impl ProcessLedger {
    /// Kill what the previous run of this node left running (every group the ledger in `dir`
    /// still records whose leader or keeper is still the recorded process), log it, and record
    /// from now on in a fresh ledger. Never fails: what cannot be checked or recorded is
    /// logged as a warning saying so, and the node starts anyway (the parent-death signals of
    /// the processes it starts do not depend on the ledger).
    pub(crate) fn open(&self, dir: &Path) -> Vec<Leftover> {
        let path = dir.join(PROCESS_LEDGER_FILE);
        let leftovers = match std::fs::read(&path) {
            Ok(bytes) => {
                let replayed = replay(&bytes);
                warn_unreadable(&path, &replayed);
                if !replayed.live.is_empty() {
                    tracing::info!(
                        "{}: checking {} process group(s) the previous run of this node left unreaped",
                        path.display(),
                        replayed.live.len()
                    );
                }
                let leftovers = reap(replayed.live.into_values());
                for leftover in &leftovers {
                    leftover.log();
                }
                leftovers
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(
                    "cannot read the process ledger {}: {e}; processes left running by this node's previous run (if it was killed) could not be checked: look for them with `ps -eo pid,pgid,lstart,args`",
                    path.display()
                );
                Vec::new()
            }
        };
        match start_fresh(&path) {
            Ok(file) => {
                *lock(&self.file) = Some(LedgerFile {
                    path,
                    file,
                    live: BTreeMap::new(),
                    lines: 0,
                });
            }
            Err(e) => tracing::warn!(
                "cannot write the process ledger {}: {e}; the processes this node starts are not recorded, so if it is killed the next start cannot check for leftovers (their parent-death signal still kills them): fix the data directory's permissions or free space",
                path.display()
            ),
        }
        leftovers
    }

    /// Record a group that just started.
    pub(crate) fn started(&self, record: &GroupRecord) {
        let mut guard = lock(&self.file);
        let Some(ledger) = guard.as_mut() else {
            return;
        };
        ledger.live.insert(record.key(), record.clone());
        ledger.append(&Line::Started(record.clone()));
    }

    /// Record that a group is gone (its leader reaped, the rest of the group killed).
    pub(crate) fn reaped(&self, record: &GroupRecord) {
        let mut guard = lock(&self.file);
        let Some(ledger) = guard.as_mut() else {
            return;
        };
        if ledger.live.remove(&record.key()).is_none() {
            return;
        }
        let compacted = ledger.lines > 2 * ledger.live.len() + COMPACT_SLACK && ledger.compact();
        if !compacted {
            ledger.append(&Line::Reaped {
                leader: record.key(),
            });
        }
    }
}

impl LedgerFile {
    fn append(&mut self, line: &Line) {
        let result = serde_json::to_vec(line)
            .map_err(std::io::Error::other)
            .and_then(|mut bytes| {
                bytes.push(b'\n');
                // One write: a line is never interleaved with another (the file is in append mode).
                self.file.write_all(&bytes)
            });
        match result {
            Ok(()) => self.lines += 1,
            Err(e) => tracing::warn!(
                "cannot append to the process ledger {}: {e}; if this node is killed now, its next start may not find every leftover process (their parent-death signal still kills them)",
                self.path.display()
            ),
        }
    }

    /// Rewrite the file with the live groups only; false if that failed (the old file is still
    /// the ledger).
    fn compact(&mut self) -> bool {
        let tmp = self.path.with_extension("jsonl.tmp");
        let result = (|| -> std::io::Result<File> {
            let mut text = Vec::new();
            for record in self.live.values() {
                serde_json::to_writer(&mut text, &Line::Started(record.clone()))
                    .map_err(std::io::Error::other)?;
                text.push(b'\n');
            }
            // Opened before the rename, so that the file appended to is the one renamed.
            let mut file = start_fresh(&tmp)?;
            file.write_all(&text)?;
            std::fs::rename(&tmp, &self.path)?;
            Ok(file)
        })();
        match result {
            Ok(file) => {
                self.file = file;
                self.lines = self.live.len();
                true
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(
                    "cannot rewrite the process ledger {}: {e}; it keeps growing until the next start",
                    self.path.display()
                );
                false
            }
        }
    }
}

/// An empty ledger at `path`, open for appending.
fn start_fresh(path: &Path) -> std::io::Result<File> {
    let file = File::options().create(true).append(true).open(path)?;
    file.set_len(0)?;
    Ok(file)
}

fn warn_unreadable(path: &Path, replayed: &Replayed) {
    if replayed.unreadable_count == 0 {
        return;
    }
    let first: Vec<String> = replayed
        .unreadable
        .iter()
        .map(|(n, e)| format!("line {n}: {e}"))
        .collect();
    tracing::warn!(
        "process ledger {} is corrupt: {} of its {} lines are unreadable ({}); the process groups those lines recorded could not be checked and may still be running (look for them with `ps -eo pid,pgid,lstart,args`); the readable lines were checked and the ledger starts afresh",
        path.display(),
        replayed.unreadable_count,
        replayed.lines,
        first.join("; ")
    );
}

/// What the start-up check found of one recorded group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Leftover {
    /// Still running: SIGKILLed (`members` as found before the kill).
    Killed {
        record: GroupRecord,
        members: Vec<Member>,
    },
    /// Gone, or its pids now belong to other processes: nothing to do.
    Gone { record: GroupRecord },
    /// Neither its leader nor its keeper is left, nor a process with its run id, yet processes
    /// are in a group of that id: they may be its grandchildren or a stranger that reused the
    /// id, so they are left alone.
    Unproven {
        record: GroupRecord,
        members: Vec<Member>,
    },
    /// Still running, but the kill failed.
    Failed { record: GroupRecord, error: String },
}

impl Leftover {
    fn log(&self) {
        match self {
            Leftover::Killed { record, members } => tracing::warn!(
                "killed process group {} of {} left running by this node's previous run: {}",
                record.pgid,
                record.label,
                Members(members)
            ),
            Leftover::Gone { record } => tracing::debug!(
                "process group {} of {} is gone",
                record.pgid,
                record.label
            ),
            Leftover::Unproven { record, members } => tracing::warn!(
                "process group {} of {} was left unreaped by this node's previous run, and a group of that id still has {}, but neither its leader (pid {}) nor its keeper is left to prove it is the same group, nor do they carry its {RUN_ID_VAR}: not killed. If they are leftovers, kill them with `kill -KILL -- -{}`",
                record.pgid,
                record.label,
                Members(members),
                record.leader.pid,
                record.pgid
            ),
            Leftover::Failed { record, error } => tracing::warn!(
                "cannot kill process group {} of {}, left running by this node's previous run: {error}; kill it by hand (`kill -KILL -- -{}`)",
                record.pgid,
                record.label,
                record.pgid
            ),
        }
    }
}

/// A process found in a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) pid: libc::pid_t,
    pub(crate) name: String,
}

struct Members<'a>(&'a [Member]);

impl fmt::Display for Members<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self
            .0
            .iter()
            .map(|m| format!("pid {} ({})", m.pid, m.name))
            .collect();
        match all.len() {
            0 => f.write_str("no process left"),
            _ => f.write_str(&all.join(", ")),
        }
    }
}

/// Check and kill the recorded groups (see [`ProcessLedger::open`]); waits up to
/// [`KILL_WAIT`] for the killed processes to be gone.
///
/// A process is proven to be a group's when it is the recorded leader or keeper (same pid and
/// start time), when it is in the group while one of those still is (a group id is not reused
/// while a member lives), or when its environment carries the group's run id (a shell's
/// grandchild re-parented to init, even one that left the group). Anything else is left alone.
fn reap(records: impl IntoIterator<Item = GroupRecord>) -> Vec<Leftover> {
    let records: Vec<GroupRecord> = records.into_iter().collect();
    let mut tagged = processes_by_run_id(records.iter().filter_map(|r| r.run_id.as_deref()));
    let mut out = Vec::new();
    let mut killed: Vec<libc::pid_t> = Vec::new();
    for record in records {
        let witnesses: Vec<(ProcessId, ProcStat)> = [Some(record.leader), record.keeper]
            .into_iter()
            .flatten()
            .filter_map(|p| {
                ProcStat::read(p.pid)
                    .filter(|s| s.start_time == p.start_time)
                    .map(|s| (p, s))
            })
            .collect();
        let carrying = record
            .run_id
            .as_ref()
            .and_then(|id| tagged.remove(id))
            .unwrap_or_default();
        let in_group = members_of(record.pgid);
        let group_proven = witnesses.iter().any(|(_, s)| s.pgid == record.pgid);
        if !group_proven && witnesses.is_empty() && carrying.is_empty() {
            out.push(if in_group.is_empty() {
                Leftover::Gone { record }
            } else {
                Leftover::Unproven {
                    record,
                    members: in_group,
                }
            });
            continue;
        }
        let mut members: Vec<Member> = if group_proven { in_group } else { Vec::new() };
        let mut errors = Vec::new();
        if group_proven {
            if let Err(e) = kill(-record.pgid) {
                errors.push(format!("group {}: {e}", record.pgid));
            }
        }
        // The proven ones outside the group (or all of them, without a proven group) one by one.
        let singles = witnesses
            .iter()
            .map(|(p, s)| (p.pid, s.name.clone(), s.pgid))
            .chain(carrying.into_iter().map(|(m, pgid)| (m.pid, m.name, pgid)));
        for (pid, name, pgid) in singles {
            if members.iter().any(|m| m.pid == pid) {
                continue;
            }
            if !(group_proven && pgid == record.pgid) {
                if let Err(e) = kill(pid) {
                    errors.push(format!("pid {pid}: {e}"));
                }
            }
            members.push(Member { pid, name });
        }
        members.sort_by_key(|m| m.pid);
        killed.extend(members.iter().map(|m| m.pid));
        out.push(if errors.is_empty() {
            Leftover::Killed { record, members }
        } else {
            Leftover::Failed {
                record,
                error: errors.join("; "),
            }
        });
    }
    let deadline = Instant::now() + KILL_WAIT;
    while killed.iter().any(|&pid| ProcStat::read(pid).is_some()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    out
}

/// The live processes whose environment has [`RUN_ID_VAR`] set to one of `ids`, by id, with
/// their process group.
fn processes_by_run_id<'a>(
    ids: impl Iterator<Item = &'a str>,
) -> BTreeMap<String, Vec<(Member, libc::pid_t)>> {
    let wanted: std::collections::BTreeSet<String> =
        ids.map(|id| format!("{RUN_ID_VAR}={id}")).collect();
    let mut found: BTreeMap<String, Vec<(Member, libc::pid_t)>> = BTreeMap::new();
    if wanted.is_empty() {
        return found;
    }
    for pid in all_pids() {
        // Another user's process cannot be read, and is not ours anyway.
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(entry) = environ
            .split(|&b| b == 0)
            .filter_map(|e| std::str::from_utf8(e).ok())
            .find(|e| wanted.contains(*e))
        else {
            continue;
        };
        if let Some(stat) = ProcStat::read(pid) {
            let id = entry[RUN_ID_VAR.len() + 1..].to_string();
            found.entry(id).or_default().push((
                Member {
                    pid,
                    name: stat.name,
                },
                stat.pgid,
            ));
        }
    }
    found
}

fn all_pids() -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .collect()
}

fn kill(target: libc::pid_t) -> std::io::Result<()> {
    // Never 0 or ±1: `kill(0)` is our own group, `kill(-1)` every process we may signal.
    if matches!(target, -1..=1) {
        return Err(std::io::Error::other(format!(
            "refusing to signal {target}"
        )));
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    match unsafe { libc::kill(target, libc::SIGKILL) } {
        0 => Ok(()),
        _ => match std::io::Error::last_os_error() {
            // Gone meanwhile: that is what we wanted.
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            e => Err(e),
        },
    }
}

/// The live (not zombie) processes whose process group is `pgid`.
fn members_of(pgid: libc::pid_t) -> Vec<Member> {
    let mut members: Vec<Member> = all_pids()
        .into_iter()
        .filter_map(|pid| {
            let stat = ProcStat::read(pid)?;
            (stat.pgid == pgid).then_some(Member {
                pid,
                name: stat.name,
            })
        })
        .collect();
    members.sort_by_key(|m| m.pid);
    members
}

/// What `/proc/<pid>/stat` says of a live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub(crate) name: String,
    pub(crate) pgid: libc::pid_t,
    pub(crate) start_time: u64,
}

impl ProcStat {
    /// `None` if there is no such process, or it is a zombie (it no longer runs, and nobody
    /// may reap it in a container).
    pub(crate) fn read(pid: libc::pid_t) -> Option<ProcStat> {
        if pid <= 0 {
            return None;
        }
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        ProcStat::parse(&text)
    }

    /// `pid (name) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    /// stime cutime cstime priority nice threads itrealvalue starttime ...`; the name may hold
    /// spaces and parentheses, so the fields are counted from the last `)`.
    fn parse(text: &str) -> Option<ProcStat> {
        match ProcStat::parse_any(text)? {
            ("Z" | "X", _) => None,
            (_, stat) => Some(stat),
        }
    }

    /// The state (`R`, `S`, `Z`, ...) and the rest, zombie or not.
    fn parse_any(text: &str) -> Option<(&str, ProcStat)> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let name = text.get(open + 1..close)?.to_string();
        let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
        // fields[0] is field 3 (state).
        let stat = ProcStat {
            name,
            pgid: fields.get(2)?.parse().ok()?,
            start_time: fields.get(19)?.parse().ok()?,
        };
        Some((fields.first()?, stat))
    }
}

#[cfg(test)]
mod tests;
