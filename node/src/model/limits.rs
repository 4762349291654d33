//! Every size, count and duration the cluster accepts, in one place, and the checks that hold
//! them. The checks run where commands are applied (`ClusterState::apply`), so a command that
//! reached the log some other way (an old version, the raw `Write` RPC) is refused on every
//! replica instead of crashing it; the servers check the same limits earlier to answer fast.
//!
//! | what | limit | enforced |
//! | --- | --- | --- |
//! | `replicas` of one service | [`MAX_REPLICAS`] (50,000) | apply, spec validation |
//! | instances wanted in the whole cluster | [`MAX_INSTANCES`] (100,000) | apply |
//! | `stop_grace_s` | 1..=[`MAX_STOP_GRACE_S`] (3,600 s) | apply, validation; clamped where used |
//! | `restart.max_restarts` / `within_s` / `backoff_*_ms` | [`MAX_RESTARTS`], [`MAX_RESTART_WINDOW_S`], [`MAX_BACKOFF_MS`] | apply, validation; clamped where used |
//! | `cost` per instance / node `capacity` | [`MAX_COST`] / [`MAX_CAPACITY`] | apply, validation |
//! | a service name | 63 bytes ([`crate::model::spec::MAX_NAME_LEN`]) | apply, validation |
//! | a spec's `config`, JSON | [`MAX_CONFIG_BYTES`] (64 KiB) | apply, validation |
//! | a spec's `secrets`: entries / all of them, JSON / a name | [`MAX_LIST_LEN`] (64) / [`MAX_SECRETS_BYTES`] (64 KiB) / [`MAX_LABEL_BYTES`] (253) | apply, validation |
//! | a whole spec, JSON | [`MAX_SPEC_BYTES`] (256 KiB) | apply, validation |
//! | list fields (constraints, `in`, anti-affinity, dependencies, labels, kinds) | [`MAX_LIST_LEN`] (64) entries | apply, validation |
//! | a label key or value, a kind, a constraint value | [`MAX_LABEL_BYTES`] (253) | apply, validation |
//! | an event message / crash reason | [`MAX_MESSAGE_BYTES`] (4 KiB) | truncated with a marker on apply |
//! | instances in one `place` command | [`MAX_PLACE_SLOTS`] (10,000) | apply (the control loop sends chunks of [`PLACE_CHUNK`]) |
//! | one write (a proposal, JSON) | [`MAX_WRITE_BYTES`] (1 MiB) | every node's proposer, the `Write` RPC |
//! | one Raft entry (a batch of writes) | [`MAX_ENTRY_BYTES`] (4 MiB) | the leader's batcher |
//! | one control API request | [`MAX_REQUEST_BYTES`] (4 MiB) | the gRPC server (and `modectl` before sending) |
//! | one answer (a state read) | [`MAX_ANSWER_BYTES`] (64 MiB) | the server refuses bigger ones by name; forwarding clients accept up to it |
//! | one AppendEntries | split above [`APPEND_TARGET_BYTES`] (8 MiB); [`MAX_RAFT_MESSAGE_BYTES`] (64 MiB) decoded | the Raft network |
//!
//! Why these fit together: a write (≤ 1 MiB) always fits an entry (≤ 4 MiB), an entry always
//! fits an AppendEntries (split at 8 MiB, decoded up to 64 MiB, so entries written by older
//! versions still replicate), snapshots travel in openraft's 3 MiB chunks, and the event log
//! (10,000 events of at most 4 KiB each, about 45 MiB as JSON) fits an answer. A read bigger
//! than [`MAX_ANSWER_BYTES`] (`all` of a very large cluster) is refused with a message that
//! says so and names narrower queries.

use std::fmt;

use crate::model::spec::{ServiceSpec, MAX_NAME_LEN, MAX_STOP_GRACE_S};
use crate::model::state::Command;

/// Most instances of one service.
pub const MAX_REPLICAS: u32 = 50_000;
/// Most instances wanted by all services together.
pub const MAX_INSTANCES: u64 = 100_000;
/// Most `restart.max_restarts`.
pub const MAX_RESTARTS: u32 = 10_000;
/// Longest `restart.within_s` (a day).
pub const MAX_RESTART_WINDOW_S: u64 = 86_400;
/// Longest `restart.backoff_initial_ms` / `backoff_max_ms` (an hour).
pub const MAX_BACKOFF_MS: u64 = 3_600_000;
/// Most capacity units one instance costs.
pub const MAX_COST: u64 = 1_000_000;
/// Most capacity units a node offers.
pub const MAX_CAPACITY: u64 = 1_000_000_000_000;
/// Largest `config` of a spec, as JSON.
pub const MAX_CONFIG_BYTES: usize = 64 << 10;
/// Largest `secrets` of a spec (names and values), as JSON.
pub const MAX_SECRETS_BYTES: usize = 64 << 10;
/// Largest spec, as JSON.
pub const MAX_SPEC_BYTES: usize = 256 << 10;
/// Most entries of a list field.
pub const MAX_LIST_LEN: usize = 64;
/// Longest label key or value, kind name, constraint value, event kind or instance state.
pub const MAX_LABEL_BYTES: usize = 253;
/// Longest node address.
pub const MAX_ADDRESS_BYTES: usize = 255;
/// Longest event message or crash reason; longer ones are cut with a marker.
pub const MAX_MESSAGE_BYTES: usize = 4 << 10;
/// Most specs one atomic apply stores (and expected generations it names).
pub const MAX_APPLY_SPECS: usize = 1_000;
/// Bearer tokens the cluster keeps.
pub const MAX_TOKENS: usize = 1_000;
/// Most instances one `place` command assigns (and, separately, unassigns).
pub const MAX_PLACE_SLOTS: usize = 10_000;
/// Instances per `place` command the control loop sends (well under [`MAX_WRITE_BYTES`] even
/// with 63-byte names).
pub const PLACE_CHUNK: usize = 5_000;
/// Largest write (one proposal, as JSON).
pub const MAX_WRITE_BYTES: usize = 1 << 20;
/// Largest Raft entry the leader's batcher builds (several writes).
pub const MAX_ENTRY_BYTES: usize = 4 << 20;
/// Largest control API request (a spec file, a write).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Largest answer the control API sends or a forwarding node accepts.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;
/// AppendEntries bigger than this are split (when they carry more than one entry).
pub const APPEND_TARGET_BYTES: usize = 8 << 20;
/// Largest Raft message accepted (a single entry written by an older version may be large).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 << 20;

/// A value over its limit. Displays like `replicas 4294967295 is over the limit of 50000`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LimitError {
    /// What is measured (`replicas`, `config`, `write`).
    pub what: String,
    /// Its value.
    pub value: u64,
    /// The limit.
    pub limit: u64,
    /// The unit, when it helps (`bytes`, `s`, `entries`).
    pub unit: &'static str,
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        write!(
            f,
            "{} {}{unit} is over the limit of {}{unit}",
            self.what, self.value, self.limit
        )
    }
}

fn over(what: impl Into<String>, value: u64, limit: u64, unit: &'static str) -> LimitError {
    LimitError {
        what: what.into(),
        value,
        limit,
        unit,
    }
}

/// `value` must be at most `limit`.
fn at_most(what: &str, value: u64, limit: u64, unit: &'static str) -> Result<(), LimitError> {
    if value > limit {
        Err(over(what, value, limit, unit))
    } else {
        Ok(())
    }
}

fn bytes(what: &str, text: &str, limit: usize) -> Result<(), LimitError> {
    at_most(what, text.len() as u64, limit as u64, "bytes")
}

fn list<T>(what: &str, items: &[T]) -> Result<(), LimitError> {
    at_most(what, items.len() as u64, MAX_LIST_LEN as u64, "entries")
}

/// How many bytes `value` takes as JSON, without building the text.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    // Serializing plain data into a counter cannot fail; a failure counts as too large.
    match serde_json::to_writer(&mut c, value) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// Check a spec's sizes, counts and durations (not its meaning: see
/// [`ServiceSpec::validate`], which calls this).
pub fn check_spec(spec: &ServiceSpec) -> Result<(), LimitError> {
    bytes("service name", &spec.name, MAX_NAME_LEN)?;
    bytes("kind", &spec.kind, MAX_LABEL_BYTES)?;
    at_most(
        "replicas",
        u64::from(spec.replicas),
        u64::from(MAX_REPLICAS),
        "",
    )?;
    at_most("stop_grace_s", spec.stop_grace_s, MAX_STOP_GRACE_S, "s")?;
    let r = &spec.restart;
    at_most(
        "restart.max_restarts",
        u64::from(r.max_restarts),
        u64::from(MAX_RESTARTS),
        "",
    )?;
    at_most("restart.within_s", r.within_s, MAX_RESTART_WINDOW_S, "s")?;
    at_most(
        "restart.backoff_initial_ms",
        r.backoff_initial_ms,
        MAX_BACKOFF_MS,
        "ms",
    )?;
    at_most(
        "restart.backoff_max_ms",
        r.backoff_max_ms,
        MAX_BACKOFF_MS,
        "ms",
    )?;
    at_most("cost", spec.cost, MAX_COST, "")?;
    list("constraints", &spec.constraints)?;
    for (i, c) in spec.constraints.iter().enumerate() {
        bytes(
            &format!("constraints[{i}].label"),
            &c.label,
            MAX_LABEL_BYTES,
        )?;
        if let Some(v) = &c.equals {
            bytes(&format!("constraints[{i}].equals"), v, MAX_LABEL_BYTES)?;
        }
        if let Some(values) = &c.in_ {
            list(&format!("constraints[{i}].in"), values)?;
            for v in values {
                bytes(&format!("constraints[{i}].in value"), v, MAX_LABEL_BYTES)?;
            }
        }
    }
    if let Some(s) = &spec.spread {
        bytes("spread", s, MAX_LABEL_BYTES)?;
    }
    for (field, names) in [
        ("anti_affinity", &spec.anti_affinity),
        ("depends_on", &spec.depends_on),
    ] {
        list(field, names)?;
        for n in names.iter() {
            bytes(&format!("{field} name"), n, MAX_NAME_LEN)?;
        }
    }
    at_most(
        "config",
        json_len(&spec.config) as u64,
        MAX_CONFIG_BYTES as u64,
        "bytes",
    )?;
    // Counts and sizes only: no message may repeat a secret value.
    at_most(
        "secrets",
        spec.secrets.len() as u64,
        MAX_LIST_LEN as u64,
        "entries",
    )?;
    for name in spec.secrets.keys() {
        bytes("secret name", name, MAX_LABEL_BYTES)?;
    }
    at_most(
        "secrets",
        json_len(&spec.secrets) as u64,
        MAX_SECRETS_BYTES as u64,
        "bytes",
    )?;
    at_most(
        "spec",
        json_len(spec) as u64,
        MAX_SPEC_BYTES as u64,
        "bytes",
    )?;
    Ok(())
}

/// Check one command's sizes and counts, as the state machine does before applying it.
/// Messages (events, crash reasons) are not refused for their length: they are cut on apply
/// ([`bounded_message`]).
pub fn check_command(command: &Command) -> Result<(), LimitError> {
    let name = |what: &str, n: &str| bytes(what, n, MAX_NAME_LEN);
    match command {
        Command::RegisterNode {
            address,
            api_address,
            labels,
            capacity,
            kinds,
            ..
        } => {
            bytes("address", address, MAX_ADDRESS_BYTES)?;
            bytes("API address", api_address, MAX_ADDRESS_BYTES)?;
            at_most(
                "labels",
                labels.len() as u64,
                MAX_LIST_LEN as u64,
                "entries",
            )?;
            for (k, v) in labels {
                bytes("label key", k, MAX_LABEL_BYTES)?;
                bytes("label value", v, MAX_LABEL_BYTES)?;
            }
            at_most("capacity", *capacity, MAX_CAPACITY, "")?;
            list("kinds", kinds)?;
            for k in kinds {
                bytes("kind", k, MAX_LABEL_BYTES)?;
            }
            Ok(())
        }
        Command::SetNodeStatus { .. } | Command::RemoveNode { .. } => Ok(()),
        Command::CreateToken {
            id,
            name: n,
            role,
            hash,
            ..
        } => {
            name("token id", id)?;
            name("token name", n)?;
            name("role", role)?;
            bytes("token hash", hash, MAX_LABEL_BYTES)
        }
        Command::RevokeToken { id } => name("token id", id),
        Command::PutSpec { spec } => check_spec(spec),
        Command::ApplySpecs { specs, expected } => {
            at_most(
                "specs in one apply",
                specs.len() as u64,
                MAX_APPLY_SPECS as u64,
                "",
            )?;
            for spec in specs {
                check_spec(spec)?;
            }
            at_most(
                "expected generations",
                expected.len() as u64,
                MAX_APPLY_SPECS as u64,
                "entries",
            )?;
            for n in expected.keys() {
                name("service name", n)?;
            }
            Ok(())
        }
        Command::ScaleSpec {
            name: n, replicas, ..
        } => {
            name("service name", n)?;
            at_most(
                "replicas",
                u64::from(*replicas),
                u64::from(MAX_REPLICAS),
                "",
            )
        }
        Command::DeleteSpec { name: n, .. } | Command::PurgeSpec { name: n } => {
            name("service name", n)
        }
        Command::Place { assign, unassign } => {
            at_most(
                "instances assigned in one placement",
                assign.len() as u64,
                MAX_PLACE_SLOTS as u64,
                "",
            )?;
            at_most(
                "instances unassigned in one placement",
                unassign.len() as u64,
                MAX_PLACE_SLOTS as u64,
                "",
            )?;
            for a in assign.iter().chain(unassign) {
                name("service name", &a.service)?;
            }
            Ok(())
        }
        Command::ReportInstance { service, state, .. } => {
            name("service name", service)?;
            bytes("instance state", state, MAX_LABEL_BYTES)
        }
        Command::ReportInstances { reports, .. } => {
            at_most(
                "instance reports in one command",
                reports.len() as u64,
                MAX_PLACE_SLOTS as u64,
                "",
            )?;
            for r in reports {
                name("service name", &r.service)?;
                bytes("instance state", &r.state, MAX_LABEL_BYTES)?;
                bytes("report move", &r.move_, MAX_LABEL_BYTES)?;
            }
            Ok(())
        }
        Command::FinishMove { service, .. }
        | Command::ReleaseMove { service, .. }
        | Command::FinishRollout { service, .. }
        | Command::NoteUnplaced { service, .. }
        | Command::RestartInstance { service, .. } => name("service name", service),
        Command::RollbackSpec { name: n, .. } => name("service name", n),
        Command::RollInstances { service, slots, .. } => {
            name("service name", service)?;
            at_most(
                "instances replaced in one rollout step",
                slots.len() as u64,
                MAX_PLACE_SLOTS as u64,
                "",
            )
        }
        Command::RecordEvent { kind, service, .. } => {
            bytes("event kind", kind, MAX_LABEL_BYTES)?;
            match service {
                Some(s) => name("service name", s),
                None => Ok(()),
            }
        }
    }
}

/// Instances wanted by all specs together after `spec` replaces the one of its name, when that
/// is over [`MAX_INSTANCES`].
pub fn check_total_instances<'a>(
    spec: &ServiceSpec,
    stored: impl Iterator<Item = &'a ServiceSpec>,
) -> Result<(), LimitError> {
    let others: u64 = stored
        .filter(|s| s.name != spec.name)
        .map(|s| u64::from(s.instances()))
        .sum();
    let total = others + u64::from(spec.instances());
    at_most(
        "instances in the cluster (all services)",
        total,
        MAX_INSTANCES,
        "",
    )
}

/// Instances wanted by all specs together after `specs` replace the stored ones of their
/// names, when that is over [`MAX_INSTANCES`].
pub fn check_total_instances_after<'a>(
    specs: &[ServiceSpec],
    stored: impl Iterator<Item = &'a ServiceSpec>,
) -> Result<(), LimitError> {
    let others: u64 = stored
        .filter(|s| !specs.iter().any(|n| n.name == s.name))
        .map(|s| u64::from(s.instances()))
        .sum();
    let total = others + specs.iter().map(|s| u64::from(s.instances())).sum::<u64>();
    at_most(
        "instances in the cluster (all services)",
        total,
        MAX_INSTANCES,
        "",
    )
}

/// A write of `len` bytes, when that is over [`MAX_WRITE_BYTES`].
pub fn check_write_bytes(len: usize) -> Result<(), LimitError> {
    at_most("write", len as u64, MAX_WRITE_BYTES as u64, "bytes")
}

/// `text` cut to at most [`MAX_MESSAGE_BYTES`] (on a character boundary), with a marker that
/// says how long it was.
pub fn bounded_message(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_MESSAGE_BYTES {
        return std::borrow::Cow::Borrowed(text);
    }
    let marker = format!("… (cut: {} bytes in all)", text.len());
    let mut end = MAX_MESSAGE_BYTES.saturating_sub(marker.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{marker}", &text[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::SlotAssignment;

    fn spec() -> ServiceSpec {
        ServiceSpec::new("web", "exec")
    }

    #[test]
    fn errors_name_the_value_and_the_limit() {
        let mut s = spec();
        s.replicas = u32::MAX;
        assert_eq!(
            check_spec(&s).unwrap_err().to_string(),
            "replicas 4294967295 is over the limit of 50000"
        );
        let mut s = spec();
        s.stop_grace_s = u64::MAX;
        assert_eq!(
            check_spec(&s).unwrap_err().to_string(),
            "stop_grace_s 18446744073709551615 s is over the limit of 3600 s"
        );
        let mut s = spec();
        s.config = serde_json::json!({"pad": "x".repeat(MAX_CONFIG_BYTES)});
        let e = check_spec(&s).unwrap_err().to_string();
        assert!(e.starts_with("config 655"), "{e}");
        assert!(e.ends_with("is over the limit of 65536 bytes"), "{e}");
        assert_eq!(
            check_write_bytes(MAX_WRITE_BYTES + 1)
                .unwrap_err()
                .to_string(),
            "write 1048577 bytes is over the limit of 1048576 bytes"
        );
    }

    #[test]
    fn specs_at_the_limits_pass() {
        let mut s = spec();
        s.replicas = MAX_REPLICAS;
        s.stop_grace_s = MAX_STOP_GRACE_S;
        s.restart.within_s = MAX_RESTART_WINDOW_S;
        s.restart.backoff_max_ms = MAX_BACKOFF_MS;
        s.config = serde_json::json!({"pad": "x".repeat(MAX_CONFIG_BYTES - 20)});
        assert_eq!(check_spec(&s), Ok(()));
        s.anti_affinity = (0..=MAX_LIST_LEN).map(|i| format!("s{i}")).collect();
        assert_eq!(
            check_spec(&s).unwrap_err().to_string(),
            "anti_affinity 65 entries is over the limit of 64 entries"
        );
    }

    #[test]
    fn commands_are_checked_by_kind() {
        let slot = |i| SlotAssignment {
            service: "web".into(),
            slot: i,
            node: 1,
            moving_from: None,
        };
        let place = Command::Place {
            assign: (0..=MAX_PLACE_SLOTS as u32).map(slot).collect(),
            unassign: vec![],
        };
        assert!(check_command(&place).is_err());
        let register = Command::RegisterNode {
            id: 1,
            address: "a:1".into(),
            labels: Default::default(),
            capacity: u64::MAX,
            kinds: vec![],
            incarnation: 1,
            heartbeat_grace_ms: 0,
            api_address: String::new(),
            role: Default::default(),
        };
        assert_eq!(
            check_command(&register).unwrap_err().to_string(),
            "capacity 18446744073709551615 is over the limit of 1000000000000"
        );
        let event = Command::RecordEvent {
            kind: "k".into(),
            message: "m".repeat(10 * MAX_MESSAGE_BYTES),
            service: None,
            node: None,
        };
        assert_eq!(
            check_command(&event),
            Ok(()),
            "long messages are cut, not refused"
        );
    }

    #[test]
    fn the_total_of_all_services_is_bounded() {
        let mut a = spec();
        a.name = "a".into();
        a.replicas = MAX_REPLICAS;
        let mut b = spec();
        b.name = "b".into();
        b.replicas = MAX_REPLICAS;
        assert_eq!(check_total_instances(&b, [&a].into_iter()), Ok(()));
        let mut c = spec();
        c.name = "c".into();
        let e = check_total_instances(&c, [&a, &b].into_iter()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "instances in the cluster (all services) 100001 is over the limit of 100000"
        );
        // Replacing a spec counts it once.
        assert_eq!(check_total_instances(&b, [&a, &b].into_iter()), Ok(()));
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary_with_a_marker() {
        assert_eq!(bounded_message("short"), "short");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = bounded_message(&long);
        assert!(cut.len() <= MAX_MESSAGE_BYTES, "{}", cut.len());
        assert!(cut.ends_with(&format!("(cut: {} bytes in all)", long.len())));
        assert_eq!(json_len("ab"), 4);
    }
}
