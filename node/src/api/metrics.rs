//! `/metrics` in Prometheus text format: this node's Raft metrics, the cluster's state as its
//! replica has it (instances by service, node, state and health; restarts; rollouts; nodes),
//! its build, its process, and the requests its gRPC servers answered ([`GrpcMetricsLayer`]).
//!
//! Everything about the cluster is computed from the replicated state at each scrape, so the
//! series of a removed node or a deleted service are gone from the next scrape. Labels stay
//! bounded: services and nodes are the cluster's, gRPC methods a fixed set (any other path
//! counts as `other`), codes the 17 of gRPC.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::model::state::ClusterState;
use crate::replication::metrics::Histogram;
use crate::replication::ClusterNode;

/// The whole `/metrics` answer of a server.
pub(crate) fn render(node: &ClusterNode) -> String {
    let mut out = node.prometheus();
    node.local_state(|s| cluster_state(s, &mut out));
    process_and_servers("server", &mut out);
    out
}

/// The `/metrics` answer of an agent-only node (it keeps no cluster state).
pub(crate) fn render_agent() -> String {
    let mut out = String::new();
    process_and_servers("agent", &mut out);
    out
}

/// Build, process and gRPC families.
fn process_and_servers(role: &str, out: &mut String) {
    build_info(role, out);
    process(out);
    grpc_stats().render(out);
}

/// `# HELP` and `# TYPE` of family `name`: each family's once, before its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it (`\`, `"` and newlines escaped).
fn esc(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The families computed from the replicated state `s`.
fn cluster_state(s: &ClusterState, out: &mut String) {
    let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
    for n in s.nodes.values() {
        *by_status.entry(n.status.as_str()).or_default() += 1;
    }
    family(
        out,
        "mode_nodes",
        "gauge",
        "Member nodes by status (up, down, draining), as this server's replica of the cluster state has them.",
    );
    for (status, n) in &by_status {
        let _ = writeln!(out, "mode_nodes{{status=\"{status}\"}} {n}");
    }
    family(
        out,
        "mode_node_status",
        "gauge",
        "1 for each member node (node) and its status (up, down, draining); gone once the node is removed.",
    );
    for n in s.nodes.values() {
        let _ = writeln!(
            out,
            "mode_node_status{{node=\"{}\",status=\"{}\"}} 1",
            n.id,
            n.status.as_str()
        );
    }

    let mut by_state: BTreeMap<(&str, u64, &str), u64> = BTreeMap::new();
    let mut by_health: BTreeMap<(&str, u64, &str), u64> = BTreeMap::new();
    let mut placed = 0u64;
    for (service, slots) in &s.placements {
        for p in slots.values() {
            placed += 1;
            *by_state.entry((service, p.node, &p.state)).or_default() += 1;
            let health = match p.healthy {
                Some(true) => "healthy",
                Some(false) => "unhealthy",
                None => "unknown",
            };
            *by_health.entry((service, p.node, health)).or_default() += 1;
        }
    }
    family(
        out,
        "mode_placements",
        "gauge",
        "Instances placed in the whole cluster.",
    );
    let _ = writeln!(out, "mode_placements {placed}");
    family(
        out,
        "mode_instances",
        "gauge",
        "Placed instances by service, the node they are assigned to, and the state their node last reported (pending, starting, running, crashed, failed, waiting, stopped).",
    );
    for ((service, node, state), n) in &by_state {
        let _ = writeln!(
            out,
            "mode_instances{{service=\"{}\",node=\"{node}\",state=\"{}\"}} {n}",
            esc(service),
            esc(state)
        );
    }
    family(
        out,
        "mode_instances_health",
        "gauge",
        "Placed instances by service, node and health check verdict: healthy, unhealthy, or unknown (no check, no verdict yet, or not running).",
    );
    for ((service, node, health), n) in &by_health {
        let _ = writeln!(
            out,
            "mode_instances_health{{service=\"{}\",node=\"{node}\",health=\"{health}\"}} {n}",
            esc(service)
        );
    }

    family(
        out,
        "mode_service_instances_desired",
        "gauge",
        "Instances each service wants: its replicas (1 for a singleton, 0 while it is being removed).",
    );
    for (name, spec) in &s.specs {
        let wanted = if s.deleting.contains(name) {
            0
        } else if spec.singleton {
            1
        } else {
            spec.replicas
        };
        let _ = writeln!(
            out,
            "mode_service_instances_desired{{service=\"{}\"}} {wanted}",
            esc(name)
        );
    }
    family(
        out,
        "mode_service_restarts_total",
        "counter",
        "Restarts of each service's instances since the service was created: restarts by their node after a crash, plus reschedules after an escalated crash. Moves, scaling and rollouts never lower it.",
    );
    for name in s.specs.keys() {
        let _ = writeln!(
            out,
            "mode_service_restarts_total{{service=\"{}\"}} {}",
            esc(name),
            s.restarts.get(name).copied().unwrap_or(0)
        );
    }
    family(
        out,
        "mode_service_generation",
        "gauge",
        "The generation (version number) of each service's current spec.",
    );
    for (name, spec) in &s.specs {
        let _ = writeln!(
            out,
            "mode_service_generation{{service=\"{}\"}} {}",
            esc(name),
            spec.generation
        );
    }
    family(
        out,
        "mode_service_rollout_status",
        "gauge",
        "1 for how the rollout of each service's current version stands: rolling, succeeded, failed, reverted or superseded.",
    );
    for name in s.specs.keys() {
        if let Some(v) = s.current_version(name) {
            let _ = writeln!(
                out,
                "mode_service_rollout_status{{service=\"{}\",status=\"{}\"}} 1",
                esc(name),
                v.status.as_str()
            );
        }
    }
}

/// `mode_build_info`: what this binary is.
fn build_info(role: &str, out: &mut String) {
    family(
        out,
        "mode_build_info",
        "gauge",
        "Always 1: the build of this node's binary (version, revision when built with MODE_REVISION set, peer protocol) and its role (server or agent).",
    );
    let revision = option_env!("MODE_REVISION")
        .map(|r| format!(",revision=\"{}\"", esc(r)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "mode_build_info{{version=\"{}\"{revision},protocol=\"{}\",role=\"{role}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        crate::protocol::PEER_PROTOCOL
    );
}

/// The standard `process_*` families, read from `/proc/self` (absent where there is none).
fn process(out: &mut String) {
    let Some(p) = ProcessStats::read() else {
        return;
    };
    let mut one = |name: &str, kind: &str, help: &str, value: f64| {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    };
    one(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time the process has spent, in seconds.",
        p.cpu_seconds,
    );
    one(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes,
    );
    one(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_bytes,
    );
    one(
        "process_start_time_seconds",
        "gauge",
        "When the process started, in seconds since the Unix epoch.",
        p.start_time_seconds,
    );
    one(
        "process_open_fds",
        "gauge",
        "Open file descriptors.",
        p.open_fds,
    );
    if let Some(max) = p.max_fds {
        one(
            "process_max_fds",
            "gauge",
            "The most file descriptors the process may open (its soft limit).",
            max,
        );
    }
}

/// What `/proc/self` says about this process.
#[derive(Debug, Clone, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    start_time_seconds: f64,
    open_fds: f64,
    max_fds: Option<f64>,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let mut stats = ProcessStats::parse(&stat, &boot, ticks as f64, page as f64)?;
        stats.open_fds = open_fds;
        stats.max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|soft| soft.parse().ok());
        Some(stats)
    }

    /// From the texts of `/proc/self/stat` and `/proc/stat`, with the clock ticks per second
    /// and the page size.
    fn parse(stat: &str, boot: &str, ticks: f64, page: f64) -> Option<ProcessStats> {
        if ticks <= 0.0 || page <= 0.0 {
            return None;
        }
        // The command name (field 2) may hold spaces and parentheses: fields after the last
        // ')' start with field 3 (state).
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        let boot_time: f64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            start_time_seconds: boot_time + field(22)? / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds: 0.0,
            max_fds: None,
        })
    }
}

// ---------------------------------------------------------------- gRPC servers

/// Upper bounds (seconds) of the gRPC latency histogram.
const GRPC_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The methods this build serves, `package.Service/Method`: mode's (from the API's descriptor
/// set, so a new RPC is known without a list to keep), health and reflection.
fn known_methods() -> &'static HashSet<String> {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message as _;
        let mut known: HashSet<String> = [
            "grpc.health.v1.Health/Check",
            "grpc.health.v1.Health/Watch",
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        if let Ok(set) = prost_types::FileDescriptorSet::decode(mode_proto::FILE_DESCRIPTOR_SET) {
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!(
                            "{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        known
    })
}

/// The `method` label of a request path: the method, or `other` for a path this build does
/// not serve (so a client cannot make up series).
fn method_label(path: &str) -> &'static str {
    known_methods()
        .get(path.strip_prefix('/').unwrap_or(path))
        .map_or("other", String::as_str)
}

/// The name of a gRPC status code, as gRPC's other implementations print it.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The `grpc-status` in `headers` (the trailers, or the headers of a trailers-only answer).
fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(tonic::Code::from_i32(value))
}

/// Calls finished, by method and code, and their durations by method (this process's
/// servers, public and peer).
#[derive(Default)]
struct GrpcStats {
    calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    durations: Mutex<BTreeMap<&'static str, Arc<Histogram>>>,
}

fn grpc_stats() -> &'static GrpcStats {
    static STATS: OnceLock<GrpcStats> = OnceLock::new();
    STATS.get_or_init(GrpcStats::default)
}

impl GrpcStats {
    fn record(&self, method: &'static str, code: tonic::Code, took: Duration) {
        *self
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((method, code_label(code)))
            .or_default() += 1;
        let histogram = self
            .durations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(method)
            .or_insert_with(|| Arc::new(Histogram::new(&GRPC_BUCKETS)))
            .clone();
        histogram.observe(took);
    }

    fn render(&self, out: &mut String) {
        family(
            out,
            "mode_grpc_server_requests_total",
            "counter",
            "gRPC calls this node's servers (public and peer API) answered, by method and status code; counted when the answer ends (for a stream: when it ends, Cancelled when the client left first). Paths no method serves count as method \"other\".",
        );
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for ((method, code), n) in calls {
            let _ = writeln!(
                out,
                "mode_grpc_server_requests_total{{method=\"{method}\",code=\"{code}\"}} {n}"
            );
        }
        family(
            out,
            "mode_grpc_server_request_duration_seconds",
            "histogram",
            "Seconds from a gRPC call's arrival until its answer ended, by method (for a stream: its whole life).",
        );
        let durations = self
            .durations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (method, histogram) in durations {
            histogram.render(
                "mode_grpc_server_request_duration_seconds",
                &format!("method=\"{method}\""),
                out,
            );
        }
    }
}

/// A tower layer counting a tonic server's calls and timing them for `/metrics`.
#[derive(Clone, Copy, Default)]
pub(crate) struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] makes.
#[derive(Clone)]
pub(crate) struct GrpcMetrics<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// A call whose answer has not ended yet: recorded once, when it ends or is dropped.
struct Pending {
    method: &'static str,
    started: Instant,
    done: bool,
}

impl Pending {
    fn finish(&mut self, code: tonic::Code) {
        if !self.done {
            self.done = true;
            grpc_stats().record(self.method, code, self.started.elapsed());
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // The answer was dropped before it ended: the client went away (or the server
        // shut down) mid-call.
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that records its call when its trailers (the gRPC status) go out.
struct Recorded {
    body: tonic::body::Body,
    call: Pending,
}

mod bytes_of {
    pub type Bytes = <tonic::body::Body as http_body::Body>::Data;
}

impl http_body::Body for Recorded {
    type Data = bytes_of::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc_code(trailers).unwrap_or(tonic::Code::Unknown);
                    self.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.call.finish(status.code()),
            // Ended without a status: not a well-formed gRPC answer.
            Poll::Ready(None) => self.call.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<S, B> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut call = Pending {
            method: method_label(req.uri().path()),
            started: Instant::now(),
            done: false,
        };
        // The service that was polled ready takes the call; a fresh clone waits.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let answer = inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            // A trailers-only answer (an error, a refusal) carries its status in the headers.
            if let Some(code) = grpc_code(response.headers()) {
                call.finish(code);
                return Ok(response);
            }
            Ok(response.map(|body| tonic::body::Body::new(Recorded { body, call })))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_the_served_methods_or_other() {
        assert_eq!(
            method_label("/mode.v1.Control/GetService"),
            "mode.v1.Control/GetService"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert!(known_methods()
            .iter()
            .any(|m| m.starts_with("mode.v1.Peer/")));
        for made_up in ["/mode.v1.Control/Nope", "/x", "", "/mode.v1.Control/"] {
            assert_eq!(method_label(made_up), "other", "{made_up}");
        }
    }

    #[test]
    fn process_stats_parse_from_proc_texts() {
        let stat = "4242 (mode (node)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 1000 123456789 300 18446744073709551615";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let p = ProcessStats::parse(stat, boot, 100.0, 4096.0).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.virtual_bytes, 123_456_789.0);
        assert_eq!(p.resident_bytes, 300.0 * 4096.0);
        assert!(ProcessStats::parse("garbage", boot, 100.0, 4096.0).is_none());
        assert!(ProcessStats::parse(stat, "no btime", 100.0, 4096.0).is_none());
    }

    #[test]
    fn cluster_state_series_come_and_go_with_nodes_and_services() {
        use crate::model::state::{Command, Proposal, SlotAssignment};
        let apply = |s: &mut ClusterState, command| {
            let r = s.apply(&Proposal {
                trace: None,
                at_ms: 1,
                command,
                request_id: None,
                by: None,
            });
            assert!(r.ok, "{}", r.message);
        };
        let mut s = ClusterState::default();
        apply(
            &mut s,
            Command::RegisterNode {
                id: 7,
                address: "127.0.0.1:7".into(),
                labels: Default::default(),
                capacity: 10,
                kinds: vec!["ticker".into()],
                incarnation: 0,
                heartbeat_grace_ms: 0,
                api_address: String::new(),
                role: Default::default(),
            },
        );
        let mut spec = crate::model::spec::ServiceSpec::new("web", "ticker");
        spec.config = serde_json::json!({"every_ms": 100});
        apply(&mut s, Command::PutSpec { spec });
        apply(
            &mut s,
            Command::Place {
                assign: vec![SlotAssignment {
                    service: "web".into(),
                    slot: 0,
                    node: 7,
                    moving_from: None,
                }],
                unassign: vec![],
            },
        );
        let mut out = String::new();
        cluster_state(&s, &mut out);
        for line in [
            "mode_node_status{node=\"7\",status=\"up\"} 1",
            "mode_instances{service=\"web\",node=\"7\",state=\"pending\"} 1",
            "mode_instances_health{service=\"web\",node=\"7\",health=\"unknown\"} 1",
            "mode_service_restarts_total{service=\"web\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
        apply(
            &mut s,
            Command::DeleteSpec {
                name: "web".into(),
                force: false,
            },
        );
        apply(&mut s, Command::PurgeSpec { name: "web".into() });
        apply(&mut s, Command::RemoveNode { id: 7 });
        let mut out = String::new();
        cluster_state(&s, &mut out);
        assert!(!out.contains("web") && !out.contains("node=\"7\""), "{out}");
    }
}
