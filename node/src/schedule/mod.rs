//! Placement: given nodes, service specs and the current assignments, decide where every
//! instance runs. Pure and deterministic (same input, same plan), no I/O, so it can be tested
//! and benchmarked alone. The leader runs it and commits the plan through Raft.
//!
//! * Existing assignments that are still valid stay where they are (adding a node reshuffles
//!   nothing); instances on nodes that are down, draining, gone, or no longer match the spec
//!   are moved.
//! * New instances go to eligible nodes (up, offering the kind, matching the constraints, with
//!   free capacity, not hosting an anti-affine service), spread over the spread label's values
//!   first, then over nodes, then by free capacity, then by id.
//! * An instance that cannot be placed gets a reason naming what excluded every node.

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Node id.
    pub id: u64,
    /// Labels for constraints and spreading.
    pub labels: BTreeMap<String, String>,
    /// Capacity units.
    pub capacity: u64,
    /// Eligible for new instances and keeps its instances.
    pub schedulable: bool,
    /// Service kinds it can run; `None` means any.
    pub kinds: Option<BTreeSet<String>>,
}

/// A placement constraint on node labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// `label == value`.
    Equals {
        /// Label key.
        label: String,
        /// Required value.
        value: String,
    },
    /// `label` is one of `values`.
    In {
        /// Label key.
        label: String,
        /// Allowed values.
        values: BTreeSet<String>,
    },
}

impl Constraint {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Constraint::Equals { label, value } => labels.get(label) == Some(value),
            Constraint::In { label, values } => {
                labels.get(label).is_some_and(|v| values.contains(v))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Constraint::Equals { label, value } => format!("{label}={value}"),
            Constraint::In { label, values } => {
                format!(
                    "{label} in [{}]",
                    values.iter().cloned().collect::<Vec<_>>().join(",")
                )
            }
        }
    }
}

/// A service as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecView {
    /// Service name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Instances wanted (1 for a singleton).
    pub replicas: u32,
    /// All must hold on a node.
    pub constraints: Vec<Constraint>,
    /// Spread instances over this label's values before spreading over nodes.
    pub spread: Option<String>,
    /// Never share a node with these services (symmetric).
    pub anti_affinity: BTreeSet<String>,
    /// Capacity units per instance.
    pub cost: u64,
}

/// Instance `slot` of `service` runs on `node`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Assignment {
    /// Service name.
    pub service: String,
    /// Instance number, 0-based.
    pub slot: u32,
    /// Node id.
    pub node: u64,
}

/// An instance no node can take, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    /// Service name.
    pub service: String,
    /// Instance number.
    pub slot: u32,
    /// What excluded every node.
    pub reason: String,
}

/// Unplaced instances counted by service, then by reason.
pub fn count_unplaced<'a>(
    unplaced: impl IntoIterator<Item = &'a Unplaced>,
) -> BTreeMap<&'a str, BTreeMap<&'a str, usize>> {
    let mut counts: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for u in unplaced {
        *counts
            .entry(u.service.as_str())
            .or_default()
            .entry(u.reason.as_str())
            .or_default() += 1;
    }
    counts
}

/// The most common of `reasons` (of equals, the first by name) and how many had it.
pub fn most_common<'a>(reasons: &BTreeMap<&'a str, usize>) -> (&'a str, usize) {
    reasons
        .iter()
        .max_by_key(|(reason, n)| (**n, Reverse(**reason)))
        .map_or(("", 0), |(r, n)| (*r, *n))
}

/// What to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// New or moved instances.
    pub assign: Vec<Assignment>,
    /// Instances to stop (scaled down, node gone or ineligible, service removed).
    pub unassign: Vec<Assignment>,
    /// Instances that could not be placed.
    pub unplaced: Vec<Unplaced>,
}

/// Per node during one planning pass.
struct NodeState<'a> {
    view: &'a NodeView,
    used: u64,
    /// Services with an instance here.
    services: HashMap<&'a str, u32>,
}

/// Nodes to avoid for particular instances (where they exceeded their restart intensity),
/// by `(service, slot)`. Avoided nodes are used only when no other node can take it.
pub type Avoid = HashMap<(String, u32), BTreeSet<u64>>;

/// Compute the changes that bring `current` in line with `specs` on `nodes`.
pub fn plan(nodes: &[NodeView], specs: &[SpecView], current: &[Assignment]) -> Plan {
    plan_avoiding(nodes, specs, current, &Avoid::new())
}

/// [`plan`], placing instances away from the nodes in `avoid` where possible.
pub fn plan_avoiding(
    nodes: &[NodeView],
    specs: &[SpecView],
    current: &[Assignment],
    avoid_nodes: &Avoid,
) -> Plan {
    let mut out = Plan::default();
    let spec_by_name: BTreeMap<&str, &SpecView> =
        specs.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut state: BTreeMap<u64, NodeState> = nodes
        .iter()
        .map(|n| {
            (
                n.id,
                NodeState {
                    view: n,
                    used: 0,
                    services: HashMap::new(),
                },
            )
        })
        .collect();
    // Symmetric anti-affinity.
    let mut avoid: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for s in specs {
        for other in &s.anti_affinity {
            avoid
                .entry(s.name.as_str())
                .or_default()
                .insert(other.as_str());
            avoid
                .entry(other.as_str())
                .or_default()
                .insert(s.name.as_str());
        }
    }

    // Keep what is still valid, in a stable order; the rest is unassigned.
    let mut kept: BTreeMap<&str, BTreeMap<u32, u64>> = BTreeMap::new();
    let mut sorted: Vec<&Assignment> = current.iter().collect();
    sorted.sort();
    for a in sorted {
        let keep = spec_by_name.get(a.service.as_str()).is_some_and(|spec| {
            a.slot < spec.replicas
                && !kept
                    .get(a.service.as_str())
                    .is_some_and(|k| k.contains_key(&a.slot))
                && state.get(&a.node).is_some_and(|n| {
                    n.view.schedulable
                        && offers(n.view, &spec.kind)
                        && spec.constraints.iter().all(|c| c.matches(&n.view.labels))
                })
        });
        if keep {
            let spec = spec_by_name[a.service.as_str()];
            let n = state.get_mut(&a.node).expect("checked above");
            n.used += spec.cost;
            *n.services.entry(spec.name.as_str()).or_default() += 1;
            kept.entry(spec.name.as_str())
                .or_default()
                .insert(a.slot, a.node);
        } else {
            out.unassign.push(a.clone());
        }
    }

    for spec in specs {
        let have = kept.get(spec.name.as_str()).cloned().unwrap_or_default();
        let missing: Vec<u32> = (0..spec.replicas)
            .filter(|s| !have.contains_key(s))
            .collect();
        if missing.is_empty() {
            continue;
        }
        place_spec(
            spec,
            &missing,
            &mut state,
            avoid.get(spec.name.as_str()),
            avoid_nodes,
            &mut out,
        );
    }
    out
}

fn offers(node: &NodeView, kind: &str) -> bool {
    node.kinds.as_ref().is_none_or(|k| k.contains(kind))
}

/// Heap entry: fewest instances of this service first, then least used, then lowest id.
type Candidate = Reverse<(u32, u64, u64)>;

fn place_spec<'a>(
    spec: &'a SpecView,
    missing: &[u32],
    state: &mut BTreeMap<u64, NodeState<'a>>,
    avoid: Option<&BTreeSet<&str>>,
    avoid_nodes: &Avoid,
    out: &mut Plan,
) {
    // Eligible nodes, grouped by the spread label's value ("" when not spreading).
    let mut zones: BTreeMap<String, (u32, BinaryHeap<Candidate>)> = BTreeMap::new();
    let mut excluded = Exclusions::default();
    for n in state.values() {
        let v = n.view;
        if !v.schedulable {
            excluded.unschedulable += 1;
        } else if !offers(v, &spec.kind) {
            excluded.kind += 1;
        } else if let Some(c) = spec.constraints.iter().find(|c| !c.matches(&v.labels)) {
            excluded.constraint.get_or_insert_with(|| c.describe());
            excluded.constraints += 1;
        } else if avoid.is_some_and(|a| a.iter().any(|s| n.services.contains_key(s))) {
            excluded.anti_affinity += 1;
        } else if v.capacity.saturating_sub(n.used) < spec.cost {
            excluded.capacity += 1;
            excluded.max_free = excluded.max_free.max(v.capacity.saturating_sub(n.used));
        } else {
            let zone = match &spec.spread {
                Some(key) => v.labels.get(key).cloned().unwrap_or_default(),
                None => String::new(),
            };
            let mine = n.services.get(spec.name.as_str()).copied().unwrap_or(0);
            let entry = zones.entry(zone).or_insert((0, BinaryHeap::new()));
            entry.0 += mine;
            entry.1.push(Reverse((mine, n.used, v.id)));
        }
    }
    for &slot in missing {
        // The zone with the fewest instances of this service that still has a node.
        let zone = zones
            .iter()
            .filter(|(_, (_, heap))| !heap.is_empty())
            .min_by_key(|(name, (count, _))| (*count, (*name).clone()))
            .map(|(name, _)| name.clone());
        let shun = avoid_nodes.get(&(spec.name.clone(), slot));
        let chosen = zone.and_then(|z| {
            let (count, heap) = zones.get_mut(&z)?;
            // First pass skips the nodes this instance should avoid; the second takes any.
            for allow_shunned in [false, true] {
                let mut skipped = Vec::new();
                let mut found = None;
                while let Some(Reverse((mine, used, id))) = heap.pop() {
                    let Some(n) = state.get_mut(&id) else {
                        continue;
                    };
                    if n.view.capacity.saturating_sub(n.used) < spec.cost {
                        excluded.capacity += 1;
                        continue;
                    }
                    if !allow_shunned && shun.is_some_and(|s| s.contains(&id)) {
                        skipped.push(Reverse((mine, used, id)));
                        continue;
                    }
                    n.used += spec.cost;
                    *n.services.entry(spec.name.as_str()).or_default() += 1;
                    *count += 1;
                    heap.push(Reverse((mine + 1, n.used, id)));
                    found = Some(id);
                    break;
                }
                heap.extend(skipped);
                if found.is_some() {
                    return found;
                }
            }
            None
        });
        match chosen {
            Some(node) => out.assign.push(Assignment {
                service: spec.name.clone(),
                slot,
                node,
            }),
            None => out.unplaced.push(Unplaced {
                service: spec.name.clone(),
                slot,
                reason: excluded.describe(spec, state.len()),
            }),
        }
    }
}

#[derive(Default)]
struct Exclusions {
    unschedulable: usize,
    kind: usize,
    constraints: usize,
    constraint: Option<String>,
    anti_affinity: usize,
    capacity: usize,
    max_free: u64,
}

impl Exclusions {
    fn describe(&self, spec: &SpecView, total: usize) -> String {
        if total == 0 {
            return "the cluster has no nodes".to_string();
        }
        let mut why = Vec::new();
        if self.unschedulable > 0 {
            why.push(format!("{} down or draining", self.unschedulable));
        }
        if self.kind > 0 {
            why.push(format!("{} do not offer kind '{}'", self.kind, spec.kind));
        }
        if self.constraints > 0 {
            why.push(format!(
                "{} do not match {}",
                self.constraints,
                self.constraint.as_deref().unwrap_or("the constraints")
            ));
        }
        if self.anti_affinity > 0 {
            why.push(format!("{} run an anti-affine service", self.anti_affinity));
        }
        if self.capacity > 0 {
            why.push(format!(
                "{} lack capacity (needs {}, most free {})",
                self.capacity, spec.cost, self.max_free
            ));
        }
        if why.is_empty() {
            why.push("every eligible node is taken".to_string());
        }
        format!("no node can take it: of {total} nodes, {}", why.join(", "))
    }
}
