//! Durable Raft storage in the node's data directory: the log, the vote and snapshots in one
//! redb database, written by a single writer thread that group-commits (one fsync covers every
//! operation queued meanwhile); the log is mirrored in memory for reads, and the state machine
//! lives in memory, rebuilt at start from the latest snapshot plus the committed log.

// openraft's StorageError is large, and its traits dictate it.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::types::{Entry, LogId, StorageError, StoredMembership, TypeConfig, Vote};
use crate::model::state::{ClusterState, CommandResult};
use crate::service::lock;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const IDENTITY_FILE: &str = "mode-node.json";
const DATABASE_FILE: &str = "raft.redb";
/// The agent's record of the process groups this node started (see `agent::kinds::ledger`);
/// it may outlive the two files above (a wiped Raft state with processes still recorded).
pub(crate) const PROCESS_LEDGER_FILE: &str = "processes.jsonl";
const FORMAT: u32 = 1;

/// What is wrong with a data directory. Nothing is written to a directory that fails to open.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory holds files that are not mode's.
    #[error("{path} is not a mode data directory (it contains {found}); refusing to use it: point --data-dir at an empty directory or at this node's own data")]
    Foreign {
        /// The directory.
        path: PathBuf,
        /// Some of what it contains.
        found: String,
    },
    /// The directory belongs to another node id.
    #[error("{path} belongs to node {owner}, but this node was started with --id {requested}: use --id {owner}, or another --data-dir")]
    OtherNode {
        /// The directory.
        path: PathBuf,
        /// Its node id.
        owner: u64,
        /// The id asked for.
        requested: u64,
    },
    /// The files are damaged or of an unknown format.
    #[error("data directory {path} is corrupt: {problem}. Nothing was changed. Restore it from a backup, or move it away and re-add this node under a new --id")]
    Corrupt {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The directory cannot be read or created.
    #[error("cannot use data directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct Identity {
    format: u32,
    node_id: u64,
    /// Made at random when the directory is created: a wiped directory gets another one, so
    /// the cluster can tell it from the member it replaced.
    #[serde(default)]
    incarnation: u64,
}

/// A random non-zero u64 (from the OS-seeded keys of the standard hasher).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

fn write_identity(dir: &Path, identity: &Identity) -> std::io::Result<()> {
    let text = serde_json::to_string(identity).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(IDENTITY_FILE))?;
    // The rename itself must be durable before anything is written under this identity.
    std::fs::File::open(dir)?.sync_all()
}

/// Everything read back from a data directory at start.
pub(crate) struct Recovered {
    /// The directory's incarnation.
    pub(crate) incarnation: u64,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    entries: BTreeMap<u64, Entry>,
    snapshot: Option<StoredSnapshot>,
}

/// A snapshot's metadata and its serialized state.
type StoredSnapshot = (SnapshotMeta<u64, openraft::BasicNode>, Vec<u8>);

/// Open (or create) the data directory of node `node_id`.
pub(crate) fn open(dir: &Path, node_id: u64) -> Result<(Arc<Database>, Recovered), DataDirError> {
    let io = |source| DataDirError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let corrupt = |problem: String| DataDirError::Corrupt {
        path: dir.to_path_buf(),
        problem,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let identity_path = dir.join(IDENTITY_FILE);
    let db_path = dir.join(DATABASE_FILE);
    let fresh = !identity_path.exists();
    let mut incarnation = 0;
    if fresh {
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !is_process_ledger(name))
            .collect();
        if !found.is_empty() {
            found.sort();
            found.truncate(3);
            return Err(DataDirError::Foreign {
                path: dir.to_path_buf(),
                found: found.join(", "),
            });
        }
    } else {
        let text = std::fs::read_to_string(&identity_path).map_err(io)?;
        let identity: Identity = serde_json::from_str(&text)
            .map_err(|e| corrupt(format!("{IDENTITY_FILE} is unreadable ({e})")))?;
        if identity.format != FORMAT {
            return Err(corrupt(format!(
                "format {} is not supported by this version (which reads format {FORMAT})",
                identity.format
            )));
        }
        if identity.node_id != node_id {
            return Err(DataDirError::OtherNode {
                path: dir.to_path_buf(),
                owner: identity.node_id,
                requested: node_id,
            });
        }
        if !db_path.exists() {
            return Err(corrupt(format!("{DATABASE_FILE} is missing")));
        }
        incarnation = identity.incarnation;
    }

    let db = if fresh {
        Database::create(&db_path).map_err(|e| corrupt(e.to_string()))?
    } else {
        Database::open(&db_path).map_err(|e| corrupt(format!("{DATABASE_FILE}: {e}")))?
    };
    // A new directory, or one made by a version without incarnations, gets one now.
    if incarnation == 0 {
        incarnation = random_u64();
        write_identity(
            dir,
            &Identity {
                format: FORMAT,
                node_id,
                incarnation,
            },
        )
        .map_err(io)?;
    }
    let mut recovered = recover(&db).map_err(corrupt)?;
    recovered.incarnation = incarnation;
    Ok((Arc::new(db), recovered))
}

/// The process ledger and its temporary copy are mode's own, in a fresh directory too.
fn is_process_ledger(name: &str) -> bool {
    name.strip_prefix(PROCESS_LEDGER_FILE)
        .is_some_and(|rest| rest.is_empty() || rest == ".tmp")
}

fn recover(db: &Database) -> Result<Recovered, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let mut r = Recovered {
        incarnation: 0,
        vote: None,
        committed: None,
        purged: None,
        entries: BTreeMap::new(),
        snapshot: None,
    };
    let meta = match txn.open_table(META) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.to_string()),
    };
    if let Some(meta) = meta {
        let get = |key: &str| -> Result<Option<Vec<u8>>, String> {
            Ok(meta
                .get(key)
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_vec()))
        };
        r.vote = get("vote")?.map(|b| decode_meta("vote", &b)).transpose()?;
        r.committed = get("committed")?
            .map(|b| decode_meta::<Option<LogId>>("committed", &b))
            .transpose()?
            .flatten();
        r.purged = get("purged")?
            .map(|b| decode_meta("purged", &b))
            .transpose()?;
    }
    match txn.open_table(LOG) {
        Ok(log) => {
            for item in log.iter().map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                let entry =
                    decode_entry(v.value()).map_err(|e| format!("log entry {}: {e}", k.value()))?;
                r.entries.insert(k.value(), entry);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    match txn.open_table(SNAPSHOT) {
        Ok(snap) => {
            let meta = snap
                .get("meta")
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_vec());
            let data = snap
                .get("data")
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_vec());
            if let (Some(meta), Some(data)) = (meta, data) {
                let meta = decode_meta("snapshot meta", &meta)?;
                r.snapshot = Some((meta, data));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(r)
}

/// A log entry as stored in the `log` table.
pub(super) fn decode_entry(bytes: &[u8]) -> serde_json::Result<Entry> {
    serde_json::from_slice(bytes)
}

/// A value of the `meta` table (the vote, the committed and purged log ids) or a snapshot's
/// metadata, as stored; `key` names it in the error.
pub(super) fn decode_meta<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{key}: {e}"))
}

/// A snapshot's state, as stored or as received from the leader.
pub(super) fn decode_snapshot(bytes: &[u8]) -> serde_json::Result<ClusterState> {
    serde_json::from_slice(bytes)
}

// ---- the writer thread ----------------------------------------------------------------------

type Done = oneshot::Sender<Result<(), String>>;

/// How long the committed log id, which nobody waits for, may wait for the next operation to
/// share its transaction (and fsync). Under load the next append comes sooner, so each round
/// of replication costs one commit on every node instead of two.
const COMMITTED_MAY_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Most operations written in one transaction.
const MAX_OPS_PER_WRITE: usize = 4096;

enum Op {
    Append(Vec<(u64, Vec<u8>)>, LogFlushed<TypeConfig>),
    TruncateFrom(u64),
    PurgeUpTo(u64, Vec<u8>),
    Meta(&'static str, Vec<u8>, Done),
    /// The committed log id: written with the next operation, or on its own after
    /// [`COMMITTED_MAY_WAIT`]. openraft does not need it durable at once (it is not even
    /// required); at start a node applies its log up to the one stored, and learns the rest
    /// from the leader.
    Committed(Vec<u8>),
    Snapshot(Vec<u8>, Vec<u8>, Done),
}

/// Sends operations to the writer thread, in order. After one failed write the writer is
/// poisoned: every later operation fails, so Raft stops instead of running on a log whose disk
/// copy diverged from memory.
#[derive(Clone)]
struct Writer {
    tx: std_mpsc::Sender<Op>,
    poisoned: Arc<std::sync::atomic::AtomicBool>,
}

impl Writer {
    fn start(db: Arc<Database>) -> std::io::Result<Writer> {
        let (tx, rx) = std_mpsc::channel::<Op>();
        let poisoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = poisoned.clone();
        std::thread::Builder::new()
            .name("mode-raft-writer".into())
            .spawn(move || writer_loop(&db, rx, &flag))?;
        Ok(Writer { tx, poisoned })
    }

    fn send(&self, op: Op) -> Result<(), StorageError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StorageIOError::write(&std::io::Error::other(
                "an earlier storage write failed; this node stopped writing (restart it once the disk is healthy)",
            ))
            .into());
        }
        self.tx.send(op).map_err(|_| {
            StorageIOError::write(&std::io::Error::other("the storage writer has stopped")).into()
        })
    }

    async fn send_and_wait(&self, make: impl FnOnce(Done) -> Op) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(make(done))
            .map_err(|_| "the storage writer has stopped".to_string())?;
        wait.await
            .map_err(|_| "the storage writer has stopped".to_string())?
    }
}

fn writer_loop(
    db: &Database,
    rx: std_mpsc::Receiver<Op>,
    poisoned: &std::sync::atomic::AtomicBool,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let drain = |batch: &mut Vec<Op>| {
            while batch.len() < MAX_OPS_PER_WRITE {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
        };
        drain(&mut batch);
        // Only the committed log id so far: give the next operation a moment to come along.
        while batch.len() < MAX_OPS_PER_WRITE
            && batch.iter().all(|op| matches!(op, Op::Committed(_)))
        {
            match rx.recv_timeout(COMMITTED_MAY_WAIT) {
                Ok(op) => {
                    batch.push(op);
                    drain(&mut batch);
                }
                Err(_) => break,
            }
        }
        let result = if poisoned.load(Ordering::Acquire) {
            Err("an earlier storage write failed; nothing more is written".to_string())
        } else {
            write_batch(db, &batch).map_err(|e| e.to_string())
        };
        if result.is_err() {
            poisoned.store(true, Ordering::Release);
        }
        if let Err(e) = &result {
            tracing::error!("raft storage write failed: {e}");
        }
        for op in batch {
            match op {
                Op::Append(_, flushed) => {
                    flushed.log_io_completed(result.clone().map_err(std::io::Error::other))
                }
                Op::Meta(_, _, done) | Op::Snapshot(_, _, done) => {
                    let _ = done.send(result.clone());
                }
                Op::Committed(_) | Op::TruncateFrom(_) | Op::PurgeUpTo(..) => {}
            }
        }
    }
}

fn write_batch(db: &Database, batch: &[Op]) -> Result<(), Box<dyn std::error::Error>> {
    let txn = db.begin_write()?;
    {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        let mut snap = txn.open_table(SNAPSHOT)?;
        for op in batch {
            match op {
                Op::Append(entries, _) => {
                    for (index, bytes) in entries {
                        log.insert(*index, bytes.as_slice())?;
                    }
                }
                Op::TruncateFrom(index) => log.retain_in(*index.., |_, _| false)?,
                Op::PurgeUpTo(index, purged) => {
                    log.retain_in(..=*index, |_, _| false)?;
                    meta.insert("purged", purged.as_slice())?;
                }
                Op::Meta(key, value, _) => {
                    meta.insert(*key, value.as_slice())?;
                }
                Op::Committed(value) => {
                    meta.insert("committed", value.as_slice())?;
                }
                Op::Snapshot(m, data, _) => {
                    snap.insert("meta", m.as_slice())?;
                    snap.insert("data", data.as_slice())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(|e| StorageIOError::write(&e).into())
}

// ---- the log ----------------------------------------------------------------------------------

/// The Raft log: in memory for reads, durable through the writer.
#[derive(Clone)]
pub(crate) struct LogStore {
    inner: Arc<LogInner>,
}

struct LogInner {
    mem: Mutex<LogMem>,
    writer: Writer,
    committed_index: AtomicU64,
}

struct LogMem {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

impl LogStore {
    /// Highest committed index saved by Raft (0 when none).
    pub(crate) fn committed_index(&self) -> u64 {
        self.inner.committed_index.load(Ordering::Relaxed)
    }

    /// The highest committed log id saved by Raft.
    pub(crate) fn committed(&self) -> Option<LogId> {
        lock(&self.inner.mem).committed
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let mem = lock(&self.inner.mem);
        Ok(mem.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = lock(&self.inner.mem);
        let last = mem
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(mem.purged);
        Ok(LogState {
            last_purged_log_id: mem.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = to_json(vote)?;
        self.inner
            .writer
            .send_and_wait(|done| Op::Meta("vote", bytes, done))
            .await
            .map_err(|e| StorageIOError::write_vote(&std::io::Error::other(e)))?;
        lock(&self.inner.mem).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(lock(&self.inner.mem).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = to_json(&committed)?;
        self.inner.writer.send(Op::Committed(bytes))?;
        self.inner
            .committed_index
            .store(committed.map(|c| c.index).unwrap_or(0), Ordering::Relaxed);
        lock(&self.inner.mem).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(lock(&self.inner.mem).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        {
            let mut mem = lock(&self.inner.mem);
            for entry in entries {
                encoded.push((entry.log_id.index, to_json(&entry)?));
                mem.entries.insert(entry.log_id.index, entry);
            }
        }
        self.inner.writer.send(Op::Append(encoded, callback))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        lock(&self.inner.mem).entries.split_off(&log_id.index);
        self.inner.writer.send(Op::TruncateFrom(log_id.index))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut mem = lock(&self.inner.mem);
            let keep = mem.entries.split_off(&(log_id.index + 1));
            mem.entries = keep;
            mem.purged = Some(log_id);
        }
        self.inner
            .writer
            .send(Op::PurgeUpTo(log_id.index, to_json(&log_id)?))
    }
}

// ---- the state machine ---------------------------------------------------------------------

/// The applied state, shared with readers.
pub(crate) struct Applied {
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
    pub(crate) state: ClusterState,
}

/// What the peer and agent paths ask of every message (a node's data-directory incarnation,
/// whether it is a server, whether it is a Raft member), kept apart from the state: those
/// paths must not wait behind a long apply for the state's lock (Raft's own heartbeats and
/// thousands of agents' heartbeats did, for hundreds of milliseconds during a big deploy).
#[derive(Debug, Default)]
pub(crate) struct NodeDirectory {
    /// node -> (incarnation, is a server).
    nodes: HashMap<u64, (u64, bool)>,
    /// The Raft members (voters and learners).
    members: std::collections::HashSet<u64>,
}

impl NodeDirectory {
    fn of(a: &Applied) -> Self {
        NodeDirectory {
            nodes: a
                .state
                .nodes
                .iter()
                .map(|(id, n)| {
                    (
                        *id,
                        (
                            n.incarnation,
                            n.role == crate::model::state::NodeRole::Server,
                        ),
                    )
                })
                .collect(),
            members: a
                .membership
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect(),
        }
    }

    /// `node`'s data-directory incarnation in the node table (0: unknown).
    pub(crate) fn incarnation(&self, node: u64) -> u64 {
        self.nodes.get(&node).map_or(0, |(i, _)| *i)
    }

    pub(crate) fn is_server(&self, node: u64) -> bool {
        self.nodes.get(&node).is_some_and(|(_, server)| *server)
    }

    pub(crate) fn is_member(&self, node: u64) -> bool {
        self.members.contains(&node)
    }

    /// Whether the membership names anyone (it does once the cluster is initialized).
    pub(crate) fn initialized(&self) -> bool {
        !self.members.is_empty()
    }
}

/// The state machine: in memory, snapshots durable.
#[derive(Clone)]
pub(crate) struct StateMachineStore {
    applied: Arc<RwLock<Applied>>,
    /// Rebuilt from the state whenever an entry may change it.
    directory: Arc<RwLock<Arc<NodeDirectory>>>,
    /// Each node's view of its placements, kept as entries apply.
    pub(crate) views: Arc<super::views::Views>,
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    writer: Writer,
    snapshots_built: Arc<AtomicU64>,
}

/// A state-lock hold or wait this long is logged.
const SLOW_LOCK: std::time::Duration = std::time::Duration::from_millis(100);

fn slow_lock(
    what: &str,
    caller: &std::panic::Location<'_>,
    waited: std::time::Duration,
    held: std::time::Duration,
) {
    if waited >= SLOW_LOCK || held >= SLOW_LOCK {
        tracing::warn!(
            "the replicated state's lock: {what} by {caller} waited {waited:?} and held it {held:?} (everything else that needs the state waits meanwhile)"
        );
    }
}

/// Call `f` with the state under `guard` (taken since `started`), logging a slow wait or hold.
fn held<T>(
    caller: &std::panic::Location<'_>,
    started: std::time::Instant,
    guard: std::sync::RwLockReadGuard<'_, Applied>,
    f: impl FnOnce(&Applied) -> T,
) -> T {
    let locked = std::time::Instant::now();
    let out = f(&guard);
    drop(guard);
    slow_lock("read", caller, locked - started, locked.elapsed());
    out
}

/// Run `f`, which may block its thread for long (waiting for the state's lock, or holding it
/// through a big apply or a copy of the whole state), without stalling the other tasks queued
/// on this runtime worker: on a multi-threaded runtime the worker hands them to another thread
/// first. (Two blocked workers used to stall a server whole: every agent's heartbeat timed
/// out at once and thousands of agents failed over.)
pub(crate) fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Take a lock with `try_now`; if it is busy, wait for it with `wait` off the runtime's
/// worker ([`off_worker`]). A poisoned lock is taken as it is.
pub(crate) fn lock_off_worker<G>(
    try_now: impl FnOnce() -> Result<G, std::sync::TryLockError<G>>,
    wait: impl FnOnce() -> G,
) -> G {
    match try_now() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => off_worker(wait),
    }
}

impl StateMachineStore {
    /// Read the applied state. The lock blocks a runtime thread: holding (or waiting for) it
    /// long stalls everything else on that thread, Raft's heartbeats included, so a slow hold
    /// is logged with its caller. A read that has to wait (an apply holds the lock) waits off
    /// the runtime's workers ([`off_worker`]); one that may hold the lock long says so
    /// ([`StateMachineStore::read_long`]).
    #[track_caller]
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        let caller = std::panic::Location::caller();
        let started = std::time::Instant::now();
        let guard = lock_off_worker(|| self.applied.try_read(), || self.read_guard());
        held(caller, started, guard, f)
    }

    /// [`StateMachineStore::read`] for a reader that may hold the lock long (a copy of the
    /// whole state): off the runtime's workers from the start.
    #[track_caller]
    pub(crate) fn read_long<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        let caller = std::panic::Location::caller();
        let started = std::time::Instant::now();
        off_worker(|| held(caller, started, self.read_guard(), f))
    }

    fn read_guard(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_guard(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The node directory as of the last applied entry (never waits for an apply).
    pub(crate) fn directory(&self) -> Arc<NodeDirectory> {
        self.directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_directory(&self, a: &Applied) {
        let fresh = Arc::new(NodeDirectory::of(a));
        *self.directory.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    async fn persist_snapshot(
        &self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        data: &[u8],
    ) -> Result<(), StorageError> {
        let m = to_json(meta)?;
        let d = data.to_vec();
        self.writer
            .send_and_wait(|done| Op::Snapshot(m, d, done))
            .await
            .map_err(|e| {
                StorageIOError::write_snapshot(Some(meta.signature()), &std::io::Error::other(e))
                    .into()
            })
    }
}

/// Build the stores over an opened data directory.
pub(crate) fn stores(
    db: Arc<Database>,
    r: Recovered,
) -> Result<(LogStore, StateMachineStore), DataDirError> {
    let writer = Writer::start(db).map_err(|source| DataDirError::Io {
        path: PathBuf::from("(writer thread)"),
        source,
    })?;
    let log = LogStore {
        inner: Arc::new(LogInner {
            mem: Mutex::new(LogMem {
                entries: r.entries,
                vote: r.vote,
                committed: r.committed,
                purged: r.purged,
            }),
            writer: writer.clone(),
            committed_index: AtomicU64::new(r.committed.map(|c| c.index).unwrap_or(0)),
        }),
    };
    let mut applied = Applied {
        last_applied: None,
        membership: StoredMembership::default(),
        state: ClusterState::default(),
    };
    if let Some((meta, data)) = &r.snapshot {
        applied.state = decode_snapshot(data).map_err(|e| DataDirError::Corrupt {
            path: PathBuf::from(DATABASE_FILE),
            problem: format!("snapshot data: {e}"),
        })?;
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
    }
    let views = super::views::Views::new(
        &applied.state,
        applied.last_applied.map(|l| l.index).unwrap_or(0),
    );
    let sm = StateMachineStore {
        views,
        directory: Arc::new(RwLock::new(Arc::new(NodeDirectory::of(&applied)))),
        applied: Arc::new(RwLock::new(applied)),
        snapshot: Arc::new(Mutex::new(r.snapshot)),
        writer,
        snapshots_built: Arc::new(AtomicU64::new(0)),
    };
    Ok((log, sm))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, membership) = self.read_long(|a| {
            (
                serde_json::to_vec(&a.state),
                a.last_applied,
                a.membership.clone(),
            )
        });
        let data = data.map_err(|e| StorageIOError::read_state_machine(&e))?;
        let n = self.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}-{n}",
                last_applied.map(|l| l.leader_id.term).unwrap_or(0),
                last_applied.map(|l| l.index).unwrap_or(0)
            ),
        };
        self.persist_snapshot(&meta, &data).await?;
        *lock(&self.snapshot) = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Apply one committed entry to `a`, noting in `touched` what it changed for the views.
pub(super) fn apply_entry(
    a: &mut Applied,
    entry: &Entry,
    touched: &mut super::views::Touched,
) -> Vec<CommandResult> {
    a.last_applied = Some(entry.log_id);
    match &entry.payload {
        EntryPayload::Blank => Vec::new(),
        EntryPayload::Normal(batch) => {
            for p in batch.proposals.iter() {
                touched.note(&p.command);
            }
            batch
                .proposals
                .iter()
                .map(|p| match &p.trace {
                    // A traced proposal shows being applied on every replica, but not when
                    // the log is replayed after a restart.
                    Some(parent) if super::node::now_ms().saturating_sub(p.at_ms) < 60_000 => {
                        let span = tracing::info_span!(
                            target: crate::telemetry::TARGET,
                            "raft.apply",
                            otel.name = "raft.apply",
                            op = p.command.op(),
                            index = entry.log_id.index,
                        );
                        crate::telemetry::set_parent(&span, Some(parent));
                        let _in = span.enter();
                        a.state.apply_at(p, entry.log_id.index)
                    }
                    _ => a.state.apply_at(p, entry.log_id.index),
                })
                .collect()
        }
        EntryPayload::Membership(m) => {
            touched.membership();
            a.membership = StoredMembership::new(Some(entry.log_id), m.clone());
            Vec::new()
        }
    }
}

/// How long the state machine holds the state's write lock at most before it lets readers in
/// between two entries.
const APPLY_SLICE: std::time::Duration = std::time::Duration::from_millis(20);

/// Entries this heavy in all ([`weight`]) are applied off the runtime's workers
/// ([`off_worker`]); lighter ones (a write, a few reports) on the worker, unless they have to
/// wait for the lock: handing the worker off costs more than applying them.
const HEAVY_APPLY: usize = 1_000;

/// Roughly how much work applying `entry` is: one per command, plus one per placement,
/// report, spec or slot it carries.
fn weight(entry: &Entry) -> usize {
    use crate::model::state::Command;
    match &entry.payload {
        EntryPayload::Normal(batch) => batch
            .proposals
            .iter()
            .map(|p| {
                1 + match &p.command {
                    Command::Place { assign, unassign } => assign.len() + unassign.len(),
                    Command::ReportInstances { reports, .. } => reports.len(),
                    Command::ApplySpecs { specs, .. } => specs.len(),
                    Command::RollInstances { slots, .. } => slots.len(),
                    _ => 0,
                }
            })
            .sum(),
        _ => 1,
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok(self.read(|a| (a.last_applied, a.membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<CommandResult>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        let entries: Vec<Entry> = entries.into_iter().collect();
        let heavy = entries.iter().map(weight).sum::<usize>() >= HEAVY_APPLY;
        let mut entries = entries.into_iter().peekable();
        // In slices: a long run of entries (a big deploy's reports) must not keep every
        // reader (heartbeats, views, queries) waiting for all of it.
        while entries.peek().is_some() {
            {
                // Off the runtime's workers when heavy (one big placement may take most of a
                // second to apply); a light one only waits off them if readers hold the lock.
                let mut apply = |mut a: std::sync::RwLockWriteGuard<'_, Applied>,
                                 started: std::time::Instant| {
                    let locked = std::time::Instant::now();
                    let mut touched = super::views::Touched::default();
                    for entry in entries.by_ref() {
                        results.push(apply_entry(&mut a, &entry, &mut touched));
                        if locked.elapsed() >= APPLY_SLICE {
                            break;
                        }
                    }
                    let index = a.last_applied.map(|l| l.index).unwrap_or(0);
                    if touched.may_change_nodes() {
                        self.set_directory(&a);
                    }
                    self.views.applied(&a.state, touched, index);
                    drop(a);
                    slow_lock(
                        "apply",
                        std::panic::Location::caller(),
                        locked - started,
                        locked.elapsed(),
                    );
                };
                let started = std::time::Instant::now();
                if heavy {
                    off_worker(|| apply(self.write_guard(), started));
                } else {
                    apply(
                        lock_off_worker(|| self.applied.try_write(), || self.write_guard()),
                        started,
                    );
                }
            }
            if entries.peek().is_some() {
                tokio::task::yield_now().await;
            }
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        // Megabytes of state: decoded off the async threads.
        let (state, data) = tokio::task::spawn_blocking(move || (decode_snapshot(&data), data))
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let state = state.map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.persist_snapshot(meta, &data).await?;
        off_worker(|| {
            let mut a = self.write_guard();
            a.state = state;
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
            let mut all = super::views::Touched::default();
            all.everything();
            let index = a.last_applied.map(|l| l.index).unwrap_or(0);
            self.set_directory(&a);
            self.views.applied(&a.state, all, index);
        });
        *lock(&self.snapshot) = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(lock(&self.snapshot).clone().map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_data_directory_may_hold_the_process_ledger_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("mode-store-ledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(PROCESS_LEDGER_FILE), "").unwrap();
        std::fs::write(dir.join(format!("{PROCESS_LEDGER_FILE}.tmp")), "").unwrap();
        std::fs::write(dir.join(format!("{PROCESS_LEDGER_FILE}.bak")), "").unwrap();
        let refused = open(&dir, 1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("it contains processes.jsonl.bak)"),
            "{refused}"
        );
        std::fs::remove_file(dir.join(format!("{PROCESS_LEDGER_FILE}.bak"))).unwrap();
        let opened = open(&dir, 1).map(|_| ());
        let _ = std::fs::remove_dir_all(&dir);
        opened.unwrap();
    }

    /// The committed log id waits for an operation to share its transaction; with none
    /// coming it is still written, on its own.
    #[tokio::test]
    async fn the_committed_log_id_is_stored_without_an_append_to_carry_it() {
        let dir = std::env::temp_dir().join(format!("mode-store-committed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (db, recovered) = open(&dir, 1).unwrap();
        let (mut log, _sm) = stores(db.clone(), recovered).unwrap();
        let committed = LogId::new(openraft::CommittedLeaderId::new(1, 1), 5);
        log.save_committed(Some(committed)).await.unwrap();
        assert_eq!(log.committed(), Some(committed), "known at once in memory");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let stored = loop {
            let stored = recover(&db).unwrap().committed;
            if stored.is_some() || std::time::Instant::now() > deadline {
                break stored;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        drop((log, db));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(stored, Some(committed));
    }

    /// The node directory (what peer and agent messages are checked against without the
    /// state's lock) follows the node table as entries apply: a node registering, removed and
    /// registering from a new data directory; instance reports leave it as it was.
    #[tokio::test]
    async fn the_node_directory_follows_the_node_table() {
        use crate::model::state::{Batch, Command, InstanceReport, NodeRole, Proposal};
        let dir = std::env::temp_dir().join(format!("mode-store-directory-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (db, recovered) = open(&dir, 1).unwrap();
        let (_log, mut sm) = stores(db, recovered).unwrap();
        let entry = |index: u64, command: Command| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Batch {
                proposals: vec![Proposal {
                    at_ms: 0,
                    command,
                    trace: None,
                    request_id: None,
                    by: None,
                }]
                .into(),
            }),
        };
        let register = |incarnation: u64, role: NodeRole| Command::RegisterNode {
            id: 7,
            address: "127.0.0.1:1".into(),
            labels: Default::default(),
            capacity: 0,
            kinds: vec![],
            incarnation,
            heartbeat_grace_ms: 0,
            api_address: String::new(),
            role,
        };
        assert_eq!(
            sm.directory().incarnation(7),
            0,
            "unknown before it registers"
        );
        sm.apply(vec![entry(1, register(42, NodeRole::Agent))])
            .await
            .unwrap();
        let d = sm.directory();
        assert_eq!((d.incarnation(7), d.is_server(7)), (42, false));
        let report = Command::ReportInstances {
            node: 7,
            incarnation: 42,
            reports: vec![InstanceReport {
                service: "web".into(),
                slot: 0,
                state: "running".into(),
                restart_count: 0,
                last_crash: None,
                epoch: 1,
                healthy: None,
                retry_at_ms: None,
                move_: String::new(),
            }],
        };
        sm.apply(vec![entry(2, report)]).await.unwrap();
        assert!(
            Arc::ptr_eq(&d, &sm.directory()),
            "a report does not rebuild the directory"
        );
        // A registration from another data directory is refused while the node is known...
        sm.apply(vec![entry(3, register(43, NodeRole::Server))])
            .await
            .unwrap();
        assert_eq!(sm.directory().incarnation(7), 42);
        // ...and taken once it was removed.
        sm.apply(vec![
            entry(4, Command::RemoveNode { id: 7 }),
            entry(5, register(43, NodeRole::Server)),
        ])
        .await
        .unwrap();
        let d = sm.directory();
        assert_eq!((d.incarnation(7), d.is_server(7)), (43, true));
        drop(sm);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A read that has to wait for the state's lock (an apply holds it) waits off the
    /// runtime's worker: the other tasks of a one-worker runtime keep running meanwhile (they
    /// stood still for the whole apply, and a server's heartbeats timed out with them).
    #[test]
    fn a_read_waiting_for_the_lock_lets_the_other_tasks_run() {
        let dir = std::env::temp_dir().join(format!("mode-store-offworker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (db, recovered) = open(&dir, 1).unwrap();
        let (_log, sm) = stores(db, recovered).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let ticks = Arc::new(AtomicU64::new(0));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = {
            let applied = sm.applied.clone();
            std::thread::spawn(move || {
                let guard = applied.write().unwrap();
                held_tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(500));
                drop(guard);
            })
        };
        held_rx.recv().unwrap();
        let during = rt.block_on(async {
            let ticker = {
                let ticks = ticks.clone();
                tokio::spawn(async move {
                    loop {
                        ticks.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                })
            };
            // Let the ticker start, then wait for the lock on the only worker.
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            let reader = tokio::spawn({
                let sm = sm.clone();
                let ticks = ticks.clone();
                async move {
                    let before = ticks.load(Ordering::Relaxed);
                    sm.read(|_| ());
                    ticks.load(Ordering::Relaxed) - before
                }
            });
            let during = reader.await.unwrap();
            ticker.abort();
            during
        });
        holder.join().unwrap();
        drop(rt);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            during >= 10,
            "the other task ticked {during} times while a read waited 0.5 s for the lock"
        );
    }
}
