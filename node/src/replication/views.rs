//! Each node's view of its placements, for its agent: kept incrementally. The state machine
//! tells the index which instances (or whole services) every applied entry touched; the index
//! knows where each instance is placed and which nodes' views include which services, marks
//! the views that changed, and a sender task rebuilds and publishes only those, coalesced.
//! An idle cluster costs nothing here; 1,000,000 placements are never scanned per entry.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::model::spec::ServiceSpec;
use crate::model::state::{ClusterState, Command, Placement};

/// What one node's agent needs: every service with an instance placed on the node (or moving
/// from it) and each service those depend on. What is absent must not run there.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeView {
    /// The applied index this view reflects.
    pub index: u64,
    /// By service name.
    pub services: BTreeMap<String, ViewService>,
}

/// One service of a [`NodeView`].
#[derive(Debug, Clone, PartialEq)]
pub struct ViewService {
    /// Its spec.
    pub spec: ServiceSpec,
    /// The older versions its instances here still run (during a rollout), by generation.
    pub versions: BTreeMap<u64, ServiceSpec>,
    /// Being deleted: its dependents stop first.
    pub deleting: bool,
    /// Its instances on (or moving from) the node, by slot: what the agent acts on (node,
    /// move, epoch, restart sequence, trace). The reported fields (state, restarts, crash)
    /// are left out: a node's own reports must not change its view (each report would send
    /// the whole view again); the agent knows what it reported from the answers.
    pub here: BTreeMap<u32, Placement>,
    /// Whether an instance of it runs anywhere, for the services the node's instances depend
    /// on (dependency gating); `false` for the others.
    pub running: bool,
}

/// What applied commands touched.
#[derive(Default)]
pub(crate) struct Touched {
    /// Everything may have changed (a snapshot, an unknown command).
    all: bool,
    services: HashSet<String>,
    slots: HashSet<(String, u32)>,
    /// Something the leader's placement plan depends on may have changed (not only reports
    /// of instances starting or running).
    plan: bool,
    /// The Raft membership changed.
    membership: bool,
}

impl Touched {
    /// Note what `command` may change in any node's view.
    pub(crate) fn note(&mut self, command: &Command) {
        self.plan |= match command {
            Command::ReportInstance { state, .. } => state == "failed",
            Command::ReportInstances { reports, .. } => reports
                .iter()
                .any(|r| r.state == "failed" || !r.move_.is_empty()),
            Command::RecordEvent { .. }
            | Command::CreateToken { .. }
            | Command::RevokeToken { .. } => false,
            _ => true,
        };
        let mut slot = |s: &str, n: u32| {
            self.slots.insert((s.to_string(), n));
        };
        match command {
            Command::RegisterNode { .. }
            | Command::SetNodeStatus { .. }
            | Command::RemoveNode { .. }
            | Command::FinishRollout { .. }
            | Command::NoteUnplaced { .. }
            | Command::CreateToken { .. }
            | Command::RevokeToken { .. }
            | Command::RecordEvent { .. } => {}
            Command::RollInstances { service, slots, .. } => {
                for n in slots {
                    slot(service, *n);
                }
            }
            Command::Place { assign, unassign } => {
                for a in assign.iter().chain(unassign) {
                    slot(&a.service, a.slot);
                }
            }
            Command::ReportInstance {
                service, slot: n, ..
            }
            | Command::FinishMove { service, slot: n }
            | Command::ReleaseMove {
                service, slot: n, ..
            }
            | Command::RestartInstance { service, slot: n } => slot(service, *n),
            Command::ReportInstances { reports, .. } => {
                for r in reports {
                    slot(&r.service, r.slot);
                }
            }
            Command::PutSpec { spec } => {
                self.services.insert(spec.name.clone());
            }
            Command::DeleteSpec { name, .. }
            | Command::RollbackSpec { name, .. }
            | Command::PurgeSpec { name }
            | Command::ScaleSpec { name, .. } => {
                self.services.insert(name.clone());
            }
            Command::ApplySpecs { specs, .. } => {
                self.services.extend(specs.iter().map(|s| s.name.clone()));
            }
            #[allow(unreachable_patterns)]
            _ => self.all = true,
        }
    }

    /// Everything may have changed.
    /// A membership entry was applied.
    pub(crate) fn membership(&mut self) {
        self.membership = true;
    }

    /// Whether the node table or the membership may have changed (anything but reports,
    /// events and tokens may: see [`Touched::note`]).
    pub(crate) fn may_change_nodes(&self) -> bool {
        self.all || self.plan || self.membership
    }

    pub(crate) fn everything(&mut self) {
        self.all = true;
        self.plan = true;
    }
}

/// Where one instance is indexed, and what of it an agent acts on.
#[derive(Clone, Copy, PartialEq)]
struct Loc {
    node: u64,
    moving_from: Option<u64>,
    running: bool,
    epoch: u64,
    restart_seq: u64,
    generation: u64,
}

impl Loc {
    fn of(state: &ClusterState, service: &str, p: &Placement) -> Loc {
        // A dependency counts once it runs and, when its version has a health check, passes
        // it.
        let checked = state
            .spec_of(service, p)
            .is_some_and(|s| s.health.is_some());
        let healthy = if checked {
            p.healthy == Some(true)
        } else {
            p.healthy != Some(false)
        };
        Loc {
            node: p.node,
            moving_from: p.moving_from,
            running: p.state == "running" && healthy,
            epoch: p.epoch,
            restart_seq: p.restart_seq,
            generation: p.generation,
        }
    }

    /// Whether the views that show it would show it differently.
    fn shows_as(&self, other: &Loc) -> bool {
        let shown = |l: &Loc| (l.node, l.moving_from, l.epoch, l.restart_seq, l.generation);
        shown(self) == shown(other)
    }

    fn nodes(&self) -> impl Iterator<Item = u64> {
        std::iter::once(self.node).chain(self.moving_from.filter(|m| *m != self.node))
    }
}

struct Watcher {
    tx: tokio::sync::watch::Sender<Arc<NodeView>>,
    /// The index stamped on the view last published.
    sent: u64,
}

#[derive(Default)]
struct Index {
    slots: HashMap<(String, u32), Loc>,
    /// node -> service -> slots on (or moving from) it.
    by_node: HashMap<u64, BTreeMap<String, BTreeSet<u32>>>,
    /// service -> node -> instances there.
    service_nodes: HashMap<String, HashMap<u64, usize>>,
    /// service -> instances reported running.
    running: HashMap<String, usize>,
    /// Views that may differ from what was published.
    dirty: HashSet<u64>,
    /// Views the entries being applied now change (their `changed` index moves).
    changing: HashSet<u64>,
    /// The applied index the index reflects.
    processed: u64,
    /// The index of the last change of each node's view (absent: `base`).
    changed: HashMap<u64, u64>,
    base: u64,
    watchers: HashMap<u64, Watcher>,
}

impl Index {
    fn add(&mut self, service: &str, slot: u32, loc: Loc) {
        for n in loc.nodes() {
            self.by_node
                .entry(n)
                .or_default()
                .entry(service.to_string())
                .or_default()
                .insert(slot);
            *self
                .service_nodes
                .entry(service.to_string())
                .or_default()
                .entry(n)
                .or_default() += 1;
        }
        if loc.running {
            *self.running.entry(service.to_string()).or_default() += 1;
        }
        self.slots.insert((service.to_string(), slot), loc);
    }

    fn remove(&mut self, service: &str, slot: u32) -> Option<Loc> {
        let loc = self.slots.remove(&(service.to_string(), slot))?;
        for n in loc.nodes() {
            if let Some(services) = self.by_node.get_mut(&n) {
                if let Some(slots) = services.get_mut(service) {
                    slots.remove(&slot);
                    if slots.is_empty() {
                        services.remove(service);
                    }
                }
                if services.is_empty() {
                    self.by_node.remove(&n);
                }
            }
            if let Some(nodes) = self.service_nodes.get_mut(service) {
                if let Some(c) = nodes.get_mut(&n) {
                    *c -= 1;
                    if *c == 0 {
                        nodes.remove(&n);
                    }
                }
                if nodes.is_empty() {
                    self.service_nodes.remove(service);
                }
            }
        }
        if loc.running {
            if let Some(c) = self.running.get_mut(service) {
                *c -= 1;
                if *c == 0 {
                    self.running.remove(service);
                }
            }
        }
        Some(loc)
    }

    /// `nodes`' views change with the entries being applied.
    fn mark(&mut self, nodes: impl IntoIterator<Item = u64>) {
        for n in nodes {
            self.dirty.insert(n);
            self.changing.insert(n);
        }
    }

    fn runs(&self, service: &str) -> bool {
        self.running.get(service).is_some_and(|c| *c > 0)
    }

    /// Every node whose view shows `service` (its instances, or as a dependency).
    fn mark_service(&mut self, state: &ClusterState, service: &str) {
        let mut nodes: Vec<u64> = self
            .service_nodes
            .get(service)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        nodes.extend(self.dependent_nodes(state, service));
        self.mark(nodes);
    }

    /// The nodes that run a dependent of `service` (their views show whether it runs).
    fn dependent_nodes(&self, state: &ClusterState, service: &str) -> Vec<u64> {
        let mut nodes = Vec::new();
        for dependent in state
            .specs
            .values()
            .filter(|s| s.depends_on.iter().any(|d| d == service))
        {
            if let Some(m) = self.service_nodes.get(&dependent.name) {
                nodes.extend(m.keys().copied());
            }
        }
        nodes
    }

    fn reindex_slot(&mut self, state: &ClusterState, service: &str, slot: u32) {
        let was_running = self.runs(service);
        let old = self.remove(service, slot);
        let new = state
            .placements
            .get(service)
            .and_then(|s| s.get(&slot))
            .map(|p| Loc::of(state, service, p));
        // A report (a new state, more restarts) changes no view; only where the instance is
        // and what it is asked to run does.
        let shown_alike = match (&old, &new) {
            (Some(o), Some(n)) => o.shows_as(n),
            (None, None) => true,
            _ => false,
        };
        if !shown_alike {
            if let Some(o) = old {
                self.mark(o.nodes());
            }
            if let Some(n) = new {
                self.mark(n.nodes());
            }
        }
        if let Some(n) = new {
            self.add(service, slot, n);
        }
        if was_running != self.runs(service) {
            let nodes = self.dependent_nodes(state, service);
            self.mark(nodes);
        }
    }

    fn reindex_service(&mut self, state: &ClusterState, service: &str) {
        self.mark_service(state, service);
        // Its indexed slots, through the nodes it is on (not a scan of every slot).
        let old: BTreeSet<u32> = self
            .service_nodes
            .get(service)
            .into_iter()
            .flat_map(|nodes| nodes.keys())
            .filter_map(|n| self.by_node.get(n)?.get(service))
            .flatten()
            .copied()
            .collect();
        for n in old {
            self.remove(service, n);
        }
        if let Some(slots) = state.placements.get(service) {
            for (n, p) in slots {
                self.add(service, *n, Loc::of(state, service, p));
            }
        }
        self.mark_service(state, service);
    }

    fn rebuild(&mut self, state: &ClusterState, index: u64) {
        self.slots.clear();
        self.by_node.clear();
        self.service_nodes.clear();
        self.running.clear();
        self.changed.clear();
        self.base = index;
        for (service, slots) in &state.placements {
            for (n, p) in slots {
                self.add(service, *n, Loc::of(state, service, p));
            }
        }
        let watched: Vec<u64> = self.watchers.keys().copied().collect();
        self.mark(watched);
    }

    fn view(&self, state: &ClusterState, node: u64, index: u64) -> NodeView {
        let mut services = BTreeMap::new();
        let mut deps = BTreeSet::new();
        if let Some(mine) = self.by_node.get(&node) {
            for (name, slots) in mine {
                let (Some(spec), Some(placed)) =
                    (state.specs.get(name), state.placements.get(name))
                else {
                    continue;
                };
                let here: BTreeMap<u32, Placement> = slots
                    .iter()
                    .filter_map(|n| placed.get(n).map(|p| (*n, as_shown(p))))
                    .collect();
                let versions = here
                    .values()
                    .filter(|p| p.generation != spec.generation)
                    .filter_map(|p| state.spec_of(name, p))
                    .filter(|s| s.generation != spec.generation)
                    .map(|s| (s.generation, s.clone()))
                    .collect();
                deps.extend(spec.depends_on.iter().cloned());
                services.insert(
                    name.clone(),
                    ViewService {
                        spec: spec.clone(),
                        versions,
                        deleting: state.deleting.contains(name),
                        here,
                        running: false,
                    },
                );
            }
        }
        for d in deps {
            if let Some(s) = services.get_mut(&d) {
                s.running = self.runs(&d);
                continue;
            }
            if let Some(spec) = state.specs.get(&d) {
                services.insert(
                    d.clone(),
                    ViewService {
                        spec: spec.clone(),
                        versions: BTreeMap::new(),
                        deleting: state.deleting.contains(&d),
                        here: BTreeMap::new(),
                        running: self.runs(&d),
                    },
                );
            }
        }
        NodeView { index, services }
    }
}

/// What a view shows of a placement (see [`ViewService::here`]).
fn as_shown(p: &Placement) -> Placement {
    let mut shown = Placement::on(p.node);
    shown.state = String::new();
    shown.moving_from = p.moving_from;
    shown.restart_seq = p.restart_seq;
    shown.epoch = p.epoch;
    shown.trace = p.trace.clone();
    shown.reschedules = p.reschedules;
    shown.generation = p.generation;
    shown
}

/// The per-node views of one replica (see the module docs).
pub(crate) struct Views {
    /// Written by applies, the sender and new watches; read by heartbeats (many at once).
    index: RwLock<Index>,
    /// Counts the applies that may change the leader's placement plan (see [`Touched`]).
    plan_changes: std::sync::atomic::AtomicU64,
    wake: tokio::sync::Notify,
    processed: tokio::sync::watch::Sender<u64>,
}

/// How long the sender waits for more changes before it publishes (coalescing).
const COALESCE: Duration = Duration::from_millis(30);

/// How soon a heartbeat that found the views' index busy looks again.
const INDEX_BUSY_RETRY: Duration = Duration::from_millis(2);

/// How long a heartbeat retries a busy index before it waits for it on a parked thread.
const INDEX_PATIENCE: Duration = Duration::from_millis(250);

/// The views' index is held by another thread now.
#[derive(Debug)]
struct IndexBusy;

/// How many views the sender builds per hold of the state's lock.
const VIEWS_PER_LOCK: usize = 32;

impl Views {
    /// The index of `state` at `applied`.
    pub(crate) fn new(state: &ClusterState, applied: u64) -> Arc<Views> {
        let mut index = Index::default();
        index.rebuild(state, applied);
        index.processed = applied;
        Arc::new(Views {
            index: RwLock::new(index),
            plan_changes: Default::default(),
            wake: tokio::sync::Notify::new(),
            processed: tokio::sync::watch::channel(applied).0,
        })
    }

    /// The index, for a caller on a runtime worker (a heartbeat, a watch): an apply may hold
    /// it through a big placement, and the wait is then done off the worker
    /// ([`super::store::off_worker`]).
    fn index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        super::store::lock_off_worker(|| self.index.try_write(), || self.write_index())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The index to read, taken at once or `Err(IndexBusy)` while it is written; after
    /// `patience` of busy tries, waited for (off the worker): one heartbeat parks a thread only
    /// after it has retried that long, and is never turned away for good by a busy index.
    fn read_index(
        &self,
        patient: bool,
    ) -> Result<std::sync::RwLockReadGuard<'_, Index>, IndexBusy> {
        match self.index.try_read() {
            Ok(ix) => Ok(ix),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if patient => {
                Ok(super::store::off_worker(|| {
                    self.index.read().unwrap_or_else(|p| p.into_inner())
                }))
            }
            Err(std::sync::TryLockError::WouldBlock) => Err(IndexBusy),
        }
    }

    /// After the state machine applied through `applied` (it holds the state's write lock).
    pub(crate) fn applied(&self, state: &ClusterState, touched: Touched, applied: u64) {
        if touched.plan {
            self.plan_changes
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        let mut guard = self.write_index();
        let ix = &mut *guard;
        if touched.all {
            ix.rebuild(state, applied);
            let placed: Vec<u64> = ix.by_node.keys().copied().collect();
            ix.mark(placed);
        } else {
            for s in &touched.services {
                ix.reindex_service(state, s);
            }
            for (s, n) in &touched.slots {
                if !touched.services.contains(s) {
                    ix.reindex_slot(state, s, *n);
                }
            }
        }
        for n in std::mem::take(&mut ix.changing) {
            ix.changed.insert(n, applied);
        }
        ix.processed = applied;
        let wake = ix.dirty.iter().any(|n| ix.watchers.contains_key(n));
        drop(guard);
        self.processed.send_replace(applied);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Watch `node`'s view. `after`: the index of a view the watcher has; when the view has
    /// not changed since, the first value is that (empty) marker rather than a copy.
    pub(crate) fn watch(
        &self,
        state: &ClusterState,
        node: u64,
        after: u64,
    ) -> (tokio::sync::watch::Receiver<Arc<NodeView>>, bool) {
        let mut ix = self.index();
        let processed = ix.processed;
        if let Some(w) = ix.watchers.get(&node) {
            if w.tx.receiver_count() > 0 {
                return (w.tx.subscribe(), false);
            }
        }
        // Unchanged since `after`: the view now is the view then, stamped so (the watcher
        // skips it; a lease's index translates to the one it has).
        let unchanged = after != 0
            && after <= processed
            && ix.changed.get(&node).copied().unwrap_or(ix.base) <= after;
        let sent = if unchanged { after } else { processed };
        let view = ix.view(state, node, sent);
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(view));
        ix.dirty.remove(&node);
        ix.watchers.insert(node, Watcher { tx, sent });
        (rx, unchanged)
    }

    /// The index of the view `node`'s watcher must have for it to reflect the state at
    /// `wanted` (a lease's index), once this replica has processed that far and published
    /// `node`'s view; `Ok(None)` meanwhile, and `Err(IndexBusy)` without looking when an apply,
    /// the sender or a new watch holds the index now and the caller is not yet `patient`
    /// ([`Views::read_index`]).
    fn view_index_for(
        &self,
        node: u64,
        wanted: u64,
        patient: bool,
    ) -> Result<Option<u64>, IndexBusy> {
        let ix = self.read_index(patient)?;
        if ix.processed < wanted {
            return Ok(None);
        }
        Ok(match ix.watchers.get(&node) {
            // Nobody watches here: the lease is valid for a view of at least `wanted`.
            None => Some(wanted),
            Some(_) if ix.dirty.contains(&node) => None,
            Some(w) => Some(w.sent.min(wanted)),
        })
    }

    /// [`Views::view_index_for`], waiting up to `timeout`. Every agent's heartbeat through
    /// this server waits here: a busy index is retried for [`INDEX_PATIENCE`] before a thread
    /// is parked on it (thousands of heartbeats parked on it at once took hundreds of threads,
    /// and stalled the server they were meant to spare); heartbeats read it side by side.
    pub(crate) async fn wait_view_index(
        &self,
        node: u64,
        wanted: u64,
        timeout: Duration,
    ) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut processed = self.processed.subscribe();
        let mut busy_since: Option<tokio::time::Instant> = None;
        loop {
            let patient = busy_since.is_some_and(|t| t.elapsed() >= INDEX_PATIENCE);
            let wait = match self.view_index_for(node, wanted, patient) {
                Ok(Some(i)) => return Some(i),
                Ok(None) => {
                    busy_since = None;
                    COALESCE
                }
                Err(IndexBusy) => {
                    busy_since.get_or_insert_with(tokio::time::Instant::now);
                    INDEX_BUSY_RETRY
                }
            };
            let wait = wait.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = processed.changed() => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Publish the views that changed, until the process ends; `read` calls its argument with
    /// the state under the lock the state machine applies under. Views are built a few at a
    /// time, the lock released in between: thousands of dirty views must not hold up the
    /// applies (on the leader too) for the whole round. Each view is stamped with the index
    /// its state was read at, under the same lock, so a stamp never claims more than it holds.
    pub(crate) async fn run_sender(
        self: Arc<Self>,
        read: impl Fn(&mut dyn FnMut(&ClusterState)) + Send + Sync + 'static,
    ) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(COALESCE).await;
            loop {
                let me = self.clone();
                let mut more = false;
                read(&mut |state| {
                    let mut ix = me.write_index();
                    let applied = ix.processed;
                    ix.watchers.retain(|_, w| w.tx.receiver_count() > 0);
                    let dirty: Vec<u64> = ix
                        .dirty
                        .iter()
                        .copied()
                        .filter(|n| ix.watchers.contains_key(n))
                        .take(VIEWS_PER_LOCK)
                        .collect();
                    for n in &dirty {
                        ix.dirty.remove(n);
                    }
                    more = ix.dirty.iter().any(|n| ix.watchers.contains_key(n));
                    if !more {
                        ix.dirty.clear();
                    }
                    tracing::debug!("publishing the views of nodes {dirty:?} at index {applied}");
                    for n in dirty {
                        let view = Arc::new(ix.view(state, n, applied));
                        if let Some(w) = ix.watchers.get_mut(&n) {
                            w.sent = applied;
                            w.tx.send_replace(view);
                        }
                    }
                });
                if !more {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    }

    /// How many applies so far may have changed the placement plan (reports of instances
    /// starting or running do not, unless an instance is moving or a service being removed).
    pub(crate) fn plan_changes(&self) -> u64 {
        self.plan_changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How many nodes are watched here.
    pub(crate) fn watchers(&self) -> usize {
        self.read_index(true).map_or(0, |ix| ix.watchers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::{Proposal, SlotAssignment};

    fn apply(state: &mut ClusterState, views: &Views, index: u64, command: Command) {
        let mut touched = Touched::default();
        touched.note(&command);
        state.apply_at(
            &Proposal {
                at_ms: 0,
                command,
                trace: None,
                request_id: None,
                by: None,
            },
            index,
        );
        views.applied(state, touched, index);
    }

    fn place(service: &str, slot: u32, node: u64) -> Command {
        Command::Place {
            assign: vec![SlotAssignment {
                service: service.into(),
                slot,
                node,
                moving_from: None,
            }],
            unassign: vec![],
        }
    }

    /// A heartbeat waiting for a busy index (an apply or the sender holds it) must leave its
    /// thread to the other tasks for its patience: parked threads, one per waiting heartbeat,
    /// stalled servers with thousands of agents. On a one-thread runtime, a parked wait would
    /// stop the ticker.
    #[test]
    fn a_heartbeat_waits_for_a_busy_index_without_parking_its_thread() {
        let views = Views::new(&ClusterState::default(), 5);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (held, release) = std::sync::mpsc::channel::<()>();
        let holder = {
            let views = views.clone();
            std::thread::spawn(move || {
                let _ix = views.index.write().unwrap();
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(200));
            })
        };
        release.recv().unwrap();
        let (index, ticks) = rt.block_on(async {
            let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let ticker = {
                let ticks = ticks.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            };
            tokio::task::yield_now().await;
            let index = views.wait_view_index(1, 5, Duration::from_secs(5)).await;
            ticker.abort();
            (index, ticks.load(std::sync::atomic::Ordering::Relaxed))
        });
        holder.join().unwrap();
        assert_eq!(
            index,
            Some(5),
            "no watcher of node 1: the lease's own index"
        );
        assert!(
            ticks >= 5,
            "the other task ticked {ticks} times in the 200 ms the wait took"
        );
    }

    #[test]
    fn only_the_views_an_entry_touches_change_and_leases_translate() {
        let mut state = ClusterState::default();
        let views = Views::new(&state, 0);
        let mut db = ServiceSpec::new("db", "ticker");
        db.replicas = 1;
        let mut web = ServiceSpec::new("web", "ticker");
        web.depends_on = vec!["db".into()];
        apply(&mut state, &views, 1, Command::PutSpec { spec: db });
        apply(&mut state, &views, 2, Command::PutSpec { spec: web });
        apply(&mut state, &views, 3, place("db", 0, 1));
        apply(&mut state, &views, 4, place("web", 0, 2));
        let (one, _) = views.watch(&state, 1, 0);
        let (two, _) = views.watch(&state, 2, 0);
        assert_eq!(one.borrow().services.keys().collect::<Vec<_>>(), ["db"]);
        // Node 2 sees web, and db as its dependency (not running yet).
        let v2 = two.borrow().clone();
        assert_eq!(v2.services.keys().collect::<Vec<_>>(), ["db", "web"]);
        assert!(!v2.services["db"].running && v2.services["db"].here.is_empty());
        // An entry about other nodes leaves these views alone; a lease at a later index translates to the
        // index of the view already sent.
        apply(&mut state, &views, 5, place("other", 0, 9));
        assert_eq!(views.view_index_for(1, 5, true).unwrap(), Some(4));
        assert_eq!(
            views.view_index_for(1, 6, true).unwrap(),
            None,
            "not applied that far"
        );
        // db running on node 1: node 1's own view and node 2's (dependency) change.
        let report = Command::ReportInstance {
            service: "db".into(),
            slot: 0,
            node: 1,
            state: "running".into(),
            restart_count: 0,
            last_crash: None,
            epoch: 0,
            healthy: None,
            retry_at_ms: None,
        };
        apply(&mut state, &views, 6, report);
        assert_eq!(
            views.view_index_for(1, 6, true).unwrap(),
            Some(4),
            "node 1's own report changes nothing it is shown"
        );
        assert_eq!(
            views.view_index_for(2, 6, true).unwrap(),
            None,
            "node 2's view is dirty: db, its dependency, runs now"
        );
        assert_eq!(
            views.view_index_for(9, 6, true).unwrap(),
            Some(6),
            "no watcher there"
        );
        // A reconnecting watcher whose view did not change since skips it.
        let (_, unchanged) = views.watch(&state, 9, 5);
        assert!(unchanged);
        // One whose view changed since does not, even when nobody watched it here meanwhile
        // (its view was dirty all along): node 3 was placed at 7 and changes again at 8.
        apply(&mut state, &views, 7, place("db", 1, 3));
        apply(&mut state, &views, 8, place("web", 1, 3));
        let (three, unchanged) = views.watch(&state, 3, 7);
        assert!(!unchanged, "node 3's view changed at 8, after 7");
        assert_eq!(
            three.borrow().services.keys().collect::<Vec<_>>(),
            ["db", "web"]
        );
    }

    #[test]
    fn only_plan_changing_applies_are_counted() {
        let mut state = ClusterState::default();
        let views = Views::new(&state, 0);
        let report = |st: &str| Command::ReportInstances {
            node: 1,
            incarnation: 0,
            reports: vec![crate::model::state::InstanceReport {
                service: "db".into(),
                slot: 0,
                state: st.into(),
                restart_count: 0,
                last_crash: None,
                epoch: 0,
                move_: String::new(),
                healthy: None,
                retry_at_ms: None,
            }],
        };
        apply(&mut state, &views, 1, place("db", 0, 1));
        assert_eq!(views.plan_changes(), 1, "a placement");
        apply(&mut state, &views, 2, report("running"));
        apply(&mut state, &views, 3, report("starting"));
        assert_eq!(views.plan_changes(), 1, "instances starting or running");
        apply(&mut state, &views, 4, report("failed"));
        assert_eq!(views.plan_changes(), 2, "a failed instance is moved");
        apply(
            &mut state,
            &views,
            5,
            Command::SetNodeStatus {
                id: 1,
                status: crate::model::state::NodeStatus::Down,
            },
        );
        assert_eq!(views.plan_changes(), 3, "a node down");
    }
}
