//! What this node's instances wrote: a bounded in-memory ring of each instance's stdout and
//! stderr lines, for its current run and the run before its last restart (what `modectl logs`
//! and `--previous` read).
//!
//! Bounds ([`Limits`]): a line is cut at [`Limits::line_bytes`] (it then ends with a marker
//! saying so); a run keeps its last [`Limits::run_lines`] lines within
//! [`Limits::run_bytes`]; the whole node keeps at most [`Limits::total_bytes`]. An instance
//! that stopped here (moved away, scaled down, deleted) stays readable until
//! [`Limits::stopped`] instances that stopped more recently push it out, or the node needs its
//! room: over the total, stopped instances go first (least recently written first), then the
//! oldest lines of whichever instance holds the most.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::service::lock;

/// The bounds of an [`OutputLog`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longer lines are cut to this many bytes (plus a marker).
    pub(crate) line_bytes: usize,
    /// Lines a run keeps (its last ones).
    pub(crate) run_lines: usize,
    /// Bytes a run keeps (its last lines).
    pub(crate) run_bytes: usize,
    /// Bytes the node keeps for all its instances.
    pub(crate) total_bytes: usize,
    /// Instances no longer running here that stay readable.
    pub(crate) stopped: usize,
}

impl Default for Limits {
    /// 8 KiB lines; 1,000 lines or 256 KiB per run; 64 MiB per node; 256 stopped instances.
    fn default() -> Self {
        Limits {
            line_bytes: 8 * 1024,
            run_lines: 1_000,
            run_bytes: 256 * 1024,
            total_bytes: 64 << 20,
            stopped: 256,
        }
    }
}

/// What a kept line costs besides its text (its time, sequence number, stream, the deque's
/// slot): counted so that a flood of empty lines is bounded too.
const LINE_OVERHEAD: usize = 48;

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pipe {
    Stdout,
    Stderr,
}

impl Pipe {
    /// `stdout` or `stderr`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Pipe::Stdout => "stdout",
            Pipe::Stderr => "stderr",
        }
    }
}

/// One kept line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    /// Increasing across the instance's runs on this node (followers resume after it).
    pub(crate) seq: u64,
    /// The run it belongs to (1 for the first start here).
    pub(crate) run: u32,
    /// When it was read, ms since the Unix epoch.
    pub(crate) time_ms: u64,
    pub(crate) pipe: Pipe,
    pub(crate) text: String,
}

impl Line {
    fn cost(&self) -> usize {
        self.text.len() + LINE_OVERHEAD
    }
}

/// One run's kept lines.
#[derive(Debug, Default)]
struct Run {
    /// 0: not started yet.
    number: u32,
    lines: VecDeque<Line>,
    bytes: usize,
}

impl Run {
    fn pop_oldest(&mut self) -> usize {
        let cost = self.lines.pop_front().map_or(0, |l| l.cost());
        self.bytes -= cost;
        cost
    }
}

/// An instance's output on this node.
#[derive(Debug)]
struct Entry {
    current: Run,
    previous: Option<Run>,
    /// Services holding it ([`InstanceOutput`]s): 0 once it stopped here.
    holders: usize,
    /// The store's clock when it was last written to (or stopped): least recently first.
    touched: u64,
    next_seq: u64,
    /// The last sequence number written, for followers.
    written: watch::Sender<u64>,
}

impl Entry {
    fn new(touched: u64) -> Entry {
        Entry {
            current: Run::default(),
            previous: None,
            holders: 0,
            touched,
            next_seq: 1,
            written: watch::Sender::new(0),
        }
    }

    fn bytes(&self) -> usize {
        self.current.bytes + self.previous.as_ref().map_or(0, |r| r.bytes)
    }

    /// Drop its oldest line (of the previous run first); what that freed.
    fn pop_oldest(&mut self) -> usize {
        if let Some(previous) = &mut self.previous {
            let freed = previous.pop_oldest();
            if previous.lines.is_empty() {
                self.previous = None;
            }
            if freed > 0 {
                return freed;
            }
        }
        self.current.pop_oldest()
    }
}

type Key = (String, u32);

#[derive(Debug, Default)]
struct Store {
    limits: Limits,
    instances: HashMap<Key, Entry>,
    /// Bytes of every kept line.
    bytes: usize,
    /// Increases with each write and stop (the LRU's clock).
    clock: u64,
}

impl Store {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Forget stopped instances beyond the count limit, least recently touched first.
    fn trim_stopped(&mut self) {
        let mut stopped: Vec<(u64, Key)> = self
            .instances
            .iter()
            .filter(|(_, e)| e.holders == 0)
            .map(|(k, e)| (e.touched, k.clone()))
            .collect();
        if stopped.len() <= self.limits.stopped {
            return;
        }
        stopped.sort();
        let excess = stopped.len() - self.limits.stopped;
        for (_, key) in stopped.into_iter().take(excess) {
            self.forget(&key);
        }
    }

    fn forget(&mut self, key: &Key) {
        if let Some(e) = self.instances.remove(key) {
            self.bytes -= e.bytes();
        }
    }

    /// Make room until the node is within its total: stopped instances first (least recently
    /// touched first), then the oldest line of the instance holding the most.
    fn trim_total(&mut self) {
        while self.bytes > self.limits.total_bytes {
            let stopped = self
                .instances
                .iter()
                .filter(|(_, e)| e.holders == 0)
                .min_by_key(|(_, e)| e.touched)
                .map(|(k, _)| k.clone());
            if let Some(key) = stopped {
                self.forget(&key);
                continue;
            }
            let Some(biggest) = self.instances.values_mut().max_by_key(|e| e.bytes()) else {
                return;
            };
            let freed = biggest.pop_oldest();
            if freed == 0 {
                return;
            }
            self.bytes -= freed;
        }
    }
}

/// The output of every instance of this node (see the module docs). Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct OutputLog(Arc<Mutex<Store>>);

/// What to read of an instance's output.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Selection {
    /// The run before the last restart instead of the current one.
    pub(crate) previous: bool,
    /// Only the last N lines (0: all kept).
    pub(crate) tail: u32,
    /// Only lines read at or after this time (ms since the epoch; 0: all).
    pub(crate) since_ms: u64,
}

/// What [`OutputLog::read`] found.
#[derive(Debug)]
pub(crate) struct Kept {
    pub(crate) lines: Vec<Line>,
    /// The last sequence number written so far (a follower goes on after it).
    pub(crate) last_seq: u64,
}

/// Why [`OutputLog::read`] has nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Nothing of the instance is kept here (never started here, or forgotten).
    Instance,
    /// The instance is kept, but not a run before its current one.
    PreviousRun { current: u32 },
}

impl OutputLog {
    /// An empty log with these bounds.
    #[cfg(test)]
    pub(crate) fn with_limits(limits: Limits) -> OutputLog {
        OutputLog(Arc::new(Mutex::new(Store {
            limits,
            ..Store::default()
        })))
    }

    /// A writer for instance `service#slot`, which counts as running here until every writer
    /// of it is dropped.
    pub(crate) fn attach(&self, service: &str, slot: u32) -> InstanceOutput {
        let key = (service.to_string(), slot);
        let mut store = lock(&self.0);
        let now = store.tick();
        let entry = store
            .instances
            .entry(key.clone())
            .or_insert_with(|| Entry::new(now));
        entry.holders += 1;
        entry.touched = now;
        InstanceOutput {
            log: self.clone(),
            key,
        }
    }

    /// The lines `selection` picks of `service#slot`, oldest first.
    pub(crate) fn read(
        &self,
        service: &str,
        slot: u32,
        selection: Selection,
    ) -> Result<Kept, Missing> {
        let store = lock(&self.0);
        let entry = store
            .instances
            .get(&(service.to_string(), slot))
            .ok_or(Missing::Instance)?;
        let run = if selection.previous {
            entry.previous.as_ref().ok_or(Missing::PreviousRun {
                current: entry.current.number,
            })?
        } else {
            &entry.current
        };
        let picked = run.lines.iter().filter(|l| l.time_ms >= selection.since_ms);
        let count = picked.clone().count();
        let skip = match selection.tail {
            0 => 0,
            n => count.saturating_sub(n as usize),
        };
        Ok(Kept {
            lines: picked.skip(skip).cloned().collect(),
            last_seq: entry.next_seq - 1,
        })
    }

    /// Every kept line of `service#slot` after sequence number `seq` (a follower's next
    /// lines), and the last sequence number written; `None` once the instance is forgotten.
    pub(crate) fn after(&self, service: &str, slot: u32, seq: u64) -> Option<(Vec<Line>, u64)> {
        let store = lock(&self.0);
        let entry = store.instances.get(&(service.to_string(), slot))?;
        let lines = entry
            .previous
            .iter()
            .chain([&entry.current])
            .flat_map(|run| run.lines.iter())
            .filter(|l| l.seq > seq)
            .cloned()
            .collect();
        Some((lines, entry.next_seq - 1))
    }

    /// Changes to the last sequence number written for `service#slot`, for a follower. An
    /// instance not kept yet (placed here, not started) is kept from now on, as a stopped one
    /// until it starts. The receiver ends (`changed` fails) when the instance is forgotten.
    pub(crate) fn watch(&self, service: &str, slot: u32) -> watch::Receiver<u64> {
        let mut store = lock(&self.0);
        let now = store.tick();
        let receiver = store
            .instances
            .entry((service.to_string(), slot))
            .or_insert_with(|| Entry::new(now))
            .written
            .subscribe();
        store.trim_stopped();
        receiver
    }

    /// Whether anything of `service#slot` is kept here.
    #[cfg(test)]
    fn holds(&self, service: &str, slot: u32) -> bool {
        lock(&self.0)
            .instances
            .contains_key(&(service.to_string(), slot))
    }

    /// Bytes kept for every instance.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        lock(&self.0).bytes
    }
}

/// Where one instance's service writes its process's output (see [`OutputLog::attach`]).
#[derive(Debug)]
pub(crate) struct InstanceOutput {
    log: OutputLog,
    key: Key,
}

impl InstanceOutput {
    /// A new run starts (the process starts, or starts again after a crash): the current run
    /// becomes the previous one.
    pub(crate) fn begin_run(&self) {
        let mut store = lock(&self.log.0);
        let now = store.tick();
        let Some(entry) = store.instances.get_mut(&self.key) else {
            return;
        };
        entry.touched = now;
        let number = entry.current.number + 1;
        let ended = std::mem::take(&mut entry.current);
        entry.current.number = number;
        // Lines written before any run started (none, from `exec`) go with it.
        let freed = if ended.number == 0 {
            ended.bytes
        } else {
            entry
                .previous
                .replace(ended)
                .map_or(0, |forgotten| forgotten.bytes)
        };
        store.bytes -= freed;
    }

    /// Keep one line the process wrote on `pipe`.
    pub(crate) fn push(&self, pipe: Pipe, text: &str) {
        let time_ms = crate::replication::now_ms();
        let mut store = lock(&self.log.0);
        let now = store.tick();
        let limits = store.limits;
        let Some(entry) = store.instances.get_mut(&self.key) else {
            return;
        };
        entry.touched = now;
        let line = Line {
            seq: entry.next_seq,
            run: entry.current.number.max(1),
            time_ms,
            pipe,
            text: cut(text, limits.line_bytes),
        };
        entry.next_seq += 1;
        let mut added = line.cost();
        entry.current.bytes += added;
        entry.current.lines.push_back(line);
        let mut freed = 0;
        while entry.current.lines.len() > limits.run_lines
            || (entry.current.bytes > limits.run_bytes && entry.current.lines.len() > 1)
        {
            freed += entry.current.pop_oldest();
        }
        let seq = entry.next_seq - 1;
        entry.written.send_replace(seq);
        // `added` and `freed` may overlap (the line itself over the run's bytes): net them.
        let common = added.min(freed);
        added -= common;
        freed -= common;
        store.bytes = store.bytes + added - freed;
        store.trim_total();
    }
}

impl Drop for InstanceOutput {
    /// The service is gone from this node: its output stays readable as a stopped instance's.
    fn drop(&mut self) {
        let mut store = lock(&self.log.0);
        let now = store.tick();
        if let Some(entry) = store.instances.get_mut(&self.key) {
            entry.holders = entry.holders.saturating_sub(1);
            entry.touched = now;
        }
        store.trim_stopped();
    }
}

/// `text` within `max` bytes (cut at a character boundary), with a marker saying how much was
/// cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    // Byte 0 is a boundary: this ends.
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARKER}", &text[..end])
}

/// The end of a line cut by [`cut`].
pub(crate) const CUT_MARKER: &str = " [... cut: lines are kept up to 8 KiB]";

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits {
            line_bytes: 16,
            run_lines: 3,
            run_bytes: 1_000,
            total_bytes: 10_000,
            stopped: 2,
        }
    }

    fn texts(kept: &Kept) -> Vec<&str> {
        kept.lines.iter().map(|l| l.text.as_str()).collect()
    }

    fn current(log: &OutputLog, service: &str) -> Vec<String> {
        let kept = log.read(service, 0, Selection::default()).unwrap();
        texts(&kept).into_iter().map(String::from).collect()
    }

    #[test]
    fn a_long_line_is_cut_with_a_marker_at_a_character_boundary() {
        let log = OutputLog::with_limits(small());
        let out = log.attach("web", 0);
        out.begin_run();
        out.push(Pipe::Stdout, "short");
        out.push(Pipe::Stderr, &"é".repeat(20));
        let kept = log.read("web", 0, Selection::default()).unwrap();
        assert_eq!(kept.lines[0].text, "short");
        assert_eq!(kept.lines[0].pipe, Pipe::Stdout);
        assert_eq!(kept.lines[1].pipe, Pipe::Stderr);
        // 16 bytes is 8 two-byte characters.
        assert_eq!(kept.lines[1].text, format!("{}{CUT_MARKER}", "é".repeat(8)));
    }

    #[test]
    fn a_run_keeps_its_last_lines_within_its_count_and_bytes() {
        let log = OutputLog::with_limits(small());
        let out = log.attach("web", 0);
        out.begin_run();
        for i in 1..=5 {
            out.push(Pipe::Stdout, &format!("line {i}"));
        }
        assert_eq!(current(&log, "web"), ["line 3", "line 4", "line 5"]);
        let bytes = Limits {
            run_lines: 100,
            run_bytes: 2 * (LINE_OVERHEAD + 6),
            ..small()
        };
        let log = OutputLog::with_limits(bytes);
        let out = log.attach("web", 0);
        out.begin_run();
        for i in 1..=5 {
            out.push(Pipe::Stdout, &format!("line {i}"));
        }
        assert_eq!(current(&log, "web"), ["line 4", "line 5"]);
        assert_eq!(log.bytes(), 2 * (LINE_OVERHEAD + 6));
    }

    #[test]
    fn a_restart_makes_the_current_run_the_previous_one() {
        let log = OutputLog::with_limits(small());
        let out = log.attach("web", 0);
        out.begin_run();
        out.push(Pipe::Stdout, "first run");
        // No previous run before the first restart.
        let missing = log
            .read(
                "web",
                0,
                Selection {
                    previous: true,
                    ..Selection::default()
                },
            )
            .unwrap_err();
        assert_eq!(missing, Missing::PreviousRun { current: 1 });
        out.begin_run();
        out.push(Pipe::Stdout, "second run");
        out.begin_run();
        out.push(Pipe::Stdout, "third run");
        let previous = Selection {
            previous: true,
            ..Selection::default()
        };
        let kept = log.read("web", 0, previous).unwrap();
        assert_eq!(texts(&kept), ["second run"]);
        assert_eq!(kept.lines[0].run, 2);
        assert_eq!(current(&log, "web"), ["third run"]);
        // The first run is gone, and so are its bytes.
        assert_eq!(
            log.bytes(),
            2 * LINE_OVERHEAD + "second run".len() + "third run".len()
        );
        // A follower after the second run's line sees the third's.
        let (after, last) = log.after("web", 0, kept.lines[0].seq).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].text, "third run");
        assert_eq!(last, after[0].seq);
    }

    #[test]
    fn tail_and_since_pick_the_last_lines_from_a_time() {
        let log = OutputLog::with_limits(Limits {
            run_lines: 100,
            ..small()
        });
        let out = log.attach("web", 0);
        out.begin_run();
        for i in 1..=5 {
            out.push(Pipe::Stdout, &format!("line {i}"));
        }
        let tail = Selection {
            tail: 2,
            ..Selection::default()
        };
        assert_eq!(
            texts(&log.read("web", 0, tail).unwrap()),
            ["line 4", "line 5"]
        );
        let future = Selection {
            since_ms: crate::replication::now_ms() + 60_000,
            ..Selection::default()
        };
        assert!(log.read("web", 0, future).unwrap().lines.is_empty());
        assert_eq!(
            log.read("nope", 0, Selection::default()).unwrap_err(),
            Missing::Instance
        );
    }

    #[test]
    fn stopped_instances_stay_readable_until_newer_ones_push_them_out() {
        let log = OutputLog::with_limits(small());
        for name in ["a", "b", "c"] {
            let out = log.attach(name, 0);
            out.begin_run();
            out.push(Pipe::Stdout, name);
            drop(out);
        }
        // Two stopped instances are kept: the least recently stopped one went.
        assert!(!log.holds("a", 0));
        assert_eq!(current(&log, "b"), ["b"]);
        assert_eq!(current(&log, "c"), ["c"]);
        assert_eq!(log.bytes(), 2 * (LINE_OVERHEAD + 1));
        // A running instance is never pushed out by the count.
        let running = log.attach("d", 0);
        running.begin_run();
        running.push(Pipe::Stdout, "d");
        let e = log.attach("e", 0);
        drop(e);
        assert!(log.holds("d", 0));
    }

    #[test]
    fn over_the_total_stopped_instances_go_first_then_the_biggest_ones_oldest_lines() {
        let line = LINE_OVERHEAD + 10;
        let log = OutputLog::with_limits(Limits {
            line_bytes: 100,
            run_lines: 100,
            run_bytes: 100 * line,
            total_bytes: 6 * line,
            stopped: 10,
        });
        let old = log.attach("old", 0);
        old.begin_run();
        old.push(Pipe::Stdout, "old-000000");
        drop(old);
        let quiet = log.attach("quiet", 0);
        quiet.begin_run();
        quiet.push(Pipe::Stdout, "quiet-0000");
        let loud = log.attach("loud", 0);
        loud.begin_run();
        for i in 0..5 {
            loud.push(Pipe::Stdout, &format!("loud-{i:05}"));
        }
        // 7 lines for room for 6: the stopped instance went.
        assert!(!log.holds("old", 0));
        assert_eq!(log.bytes(), 6 * line);
        loud.push(Pipe::Stdout, "loud-00005");
        // Then the loudest instance's oldest line; the quiet one keeps its line.
        assert_eq!(current(&log, "quiet"), ["quiet-0000"]);
        assert_eq!(current(&log, "loud").first().unwrap(), "loud-00001");
        assert_eq!(log.bytes(), 6 * line);
    }

    #[tokio::test]
    async fn a_follower_is_woken_by_each_new_line() {
        let log = OutputLog::with_limits(small());
        // Watched before it starts here: kept from then on.
        let mut written = log.watch("web", 0);
        let out = log.attach("web", 0);
        out.begin_run();
        out.push(Pipe::Stdout, "hello");
        // Bounded, so that a broken wake-up fails instead of hanging.
        tokio::time::timeout(std::time::Duration::from_secs(10), written.changed())
            .await
            .expect("woken")
            .unwrap();
        let seq = *written.borrow_and_update();
        let (lines, last) = log.after("web", 0, 0).unwrap();
        assert_eq!((lines.len(), last), (1, seq));
        assert_eq!(lines[0].text, "hello");
    }
}
