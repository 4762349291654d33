//! The `mode-node` daemon: flags, and the node's services (Raft, gRPC server, agent) under one
//! Worker.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::agent::{AgentTimings, Kind, KindRegistry};
use crate::api::Inspector;
use crate::control::Liveness;
use crate::model::state::Command;
use crate::replication::{ClusterConfig, ClusterError, ClusterNode};
use crate::service::{Context, Result, Service, ServiceHandle, Strategy, Supervisor};
use crate::worker::{init_logging, LogConfig, LogFormat, Worker, WorkerExit};

mod notify;
pub use notify::{notify, Notifier, ReadyCheck};

/// Flags of `mode-node`; each can also be set by the environment variable named after it.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "mode-node",
    version,
    about = "A mode cluster node: runs services and a member of the Raft control plane",
    long_about = "A mode cluster node. As a server (the default) it is a member of the Raft control plane, serves the public API (mode.v1.Control) on --listen and the peer API (mode.v1.Peer) on --peer-listen, and runs the instances placed on it. As an agent (--role agent --servers A,B,C) it only runs instances: it has no Raft and no public API, serves only the peer API (beacons), and takes its placements from any of the servers, failing over between them."
)]
pub struct NodeArgs {
    /// Run a one-node development cluster (the default when neither --peers nor --join is given).
    #[arg(long, conflicts_with_all = ["peers", "join"])]
    pub dev: bool,
    /// This node's id (a positive integer, unique in the cluster, never reused after its data is lost).
    #[arg(long, env = "MODE_NODE_ID", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub id: u64,
    /// Take the node id from the hostname's trailing ordinal plus BASE: pod `mode-2` of a
    /// StatefulSet with BASE 1 is node 3. Instead of --id.
    #[arg(long, env = "MODE_ID_FROM_ORDINAL", value_name = "BASE", conflicts_with = "id", value_parser = clap::value_parser!(u64).range(1..))]
    pub id_from_ordinal: Option<u64>,
    /// `server` (Raft member, public API and agent) or `agent` (only runs instances; needs
    /// --servers; no Raft, no public API).
    #[arg(long, env = "MODE_ROLE", default_value = "server", value_parser = ["server", "agent"])]
    pub role: String,
    /// For --role agent: the servers' peer addresses (HOST:PORT, comma-separated).
    #[arg(long, env = "MODE_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Address to listen on for the public gRPC API (servers only).
    #[arg(long, env = "MODE_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Address to listen on for the peer API (Raft, forwarding, agents, beacons) (default:
    /// --listen's host, port + 1).
    #[arg(long, env = "MODE_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Address other nodes use for this node's peer API (default: --advertise's host with
    /// --peer-listen's port, else --peer-listen).
    #[arg(long, env = "MODE_ADVERTISE_PEER")]
    pub advertise_peer: Option<String>,
    /// Serve /healthz, /readyz and /metrics (Prometheus) over HTTP on this address.
    #[arg(long, env = "MODE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Address clients use to reach this node's public API (default: --listen).
    #[arg(long, env = "MODE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Bootstrap a static cluster: every member as ID=HOST:PORT (peer addresses),
    /// comma-separated, this one included.
    #[arg(long, env = "MODE_PEERS", value_delimiter = ',', value_parser = parse_peer)]
    pub peers: Vec<(u64, String)>,
    /// Join an existing cluster through any of its servers (its peer address, HOST:PORT).
    #[arg(long, env = "MODE_JOIN")]
    pub join: Option<String>,
    /// When this node's id is not listed in --peers (a StatefulSet scaled past its first
    /// size), join the cluster through the listed peers instead of refusing to start.
    #[arg(long, env = "MODE_JOIN_IF_NEW", requires = "peers")]
    pub join_if_new: bool,
    /// This node's data directory was lost: come back as a new learner, replacing the member
    /// of the same id (which is removed first, so it can never vote with blank data). Only
    /// acts when the data directory is new.
    #[arg(long, env = "MODE_REJOIN")]
    pub rejoin: bool,
    /// Where this node keeps its Raft log and snapshots (default: $XDG_DATA_HOME/mode/node-ID).
    #[arg(long, env = "MODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Joining nodes become voters while the cluster has fewer voters than this.
    #[arg(long, env = "MODE_MAX_VOTERS", default_value_t = 5)]
    pub max_voters: usize,
    /// How long to wait for a leader (or for --join to succeed) before giving up.
    #[arg(long, env = "MODE_BOOTSTRAP_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub bootstrap_timeout: Duration,
    /// Leader heartbeat period.
    #[arg(long, env = "MODE_HEARTBEAT", default_value = "50ms", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Minimum election timeout (the maximum is twice this). A follower that stops hearing
    /// from its leader starts an election after the leader's lease (the maximum) plus a random
    /// timeout in this range: 360–480 ms with the default.
    #[arg(long, env = "MODE_ELECTION_TIMEOUT", default_value = "120ms", value_parser = parse_duration)]
    pub election_timeout: Duration,
    /// Build a snapshot after this many log entries.
    #[arg(long, env = "MODE_SNAPSHOT_EVERY", default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// Labels for placement constraints, KEY=VALUE (repeatable or comma-separated).
    #[arg(long = "label", env = "MODE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A node silent for longer is marked down and its instances move elsewhere. A node's
    /// singletons run only under a lease of 60 % of this, which must end well before the
    /// grace does (checked at start); use the same value on every node.
    #[arg(long, env = "MODE_HEARTBEAT_GRACE", default_value = "1500ms", value_parser = parse_duration)]
    pub heartbeat_grace: Duration,
    /// Capacity units this node offers to placements.
    #[arg(long, env = "MODE_CAPACITY", default_value_t = 100)]
    pub capacity: u64,
    /// The cluster's CA certificate (PEM). With --tls-cert and --tls-key, turns on mutual TLS
    /// on every listener: peers must present node certificates signed by this CA, clients a
    /// client certificate or a bearer token (see `modectl tls` and `modectl token`).
    #[arg(long, env = "MODE_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), naming `mode:node:<id>` (`modectl tls cert create --node ID`).
    /// Re-read when the file changes.
    #[arg(long, env = "MODE_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MODE_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Allow listening beyond loopback without TLS: anyone who reaches the ports can then run
    /// code on every node (the `exec` kind). For isolated test networks only.
    #[arg(long, env = "MODE_INSECURE")]
    pub insecure: bool,
    /// Do not run the leader's control loop (benchmarks that commit synthetic placements).
    #[arg(long, hide = true)]
    pub no_control_loop: bool,
    /// Log level or filter (e.g. info, debug, info,mode=debug).
    #[arg(long, env = "MODE_LOG", default_value = "info")]
    pub log_level: String,
    /// Log format: text or json.
    #[arg(long, env = "MODE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Let `exec` instances run only these programs (comma-separated or repeated): an
    /// absolute path allows that program, `DIR/*` the programs directly in DIR (not in its
    /// subdirectories). A command is matched by where it really is (its directory with links
    /// and `..` resolved, a name looked up in the workload's PATH); any other fails to start,
    /// with a crash reason naming it.
    #[arg(long, env = "MODE_EXEC_ALLOW", value_delimiter = ',', value_name = "PATTERN", value_parser = crate::agent::kinds::check_exec_pattern)]
    pub exec_allow: Vec<String>,
    /// Do not offer the `exec` kind on this node: no `exec` instance is placed here.
    #[arg(long, env = "MODE_NO_EXEC", conflicts_with = "exec_allow")]
    pub no_exec: bool,
}

fn parse_peer(s: &str) -> std::result::Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not ID=HOST:PORT (e.g. 1=127.0.0.1:7070)"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("'{id}' in '{s}' is not a node id"))?;
    if id == 0 {
        return Err("node ids start at 1".into());
    }
    crate::replication::check_address(&format!("address of peer {id}"), addr.trim())
        .map_err(|e| e.to_string())?;
    Ok((id, addr.trim().to_string()))
}

fn parse_label(s: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label '{s}' is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("label '{s}' has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// `250ms`, `2s`, `1m`, or plain seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 250ms, 2s, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// The ordinal a StatefulSet gives its pods: the number after the hostname's last `-`
/// (`mode-2` is 2; a fully qualified name counts by its first label).
fn ordinal_of(hostname: &str) -> std::result::Result<u64, String> {
    let pod = hostname.split('.').next().unwrap_or(hostname);
    pod.rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .ok_or_else(|| {
            format!(
                "hostname '{hostname}' does not end in -N (a StatefulSet pod's ordinal), so --id-from-ordinal cannot take a node id from it: give --id instead"
            )
        })
}

/// The host's name: `HOSTNAME` (Kubernetes sets it to the pod's name), else the kernel's.
fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// `$XDG_DATA_HOME/mode/node-ID`, else `~/.local/share/mode/node-ID`, else `./mode-data/node-ID`.
pub fn default_data_dir(id: u64) -> PathBuf {
    // The XDG spec treats an empty variable as unset.
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let base = set("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|b| b.join("mode"))
        .unwrap_or_else(|| PathBuf::from("mode-data"));
    base.join(format!("node-{id}"))
}

impl NodeArgs {
    /// Settle what the flags leave to the environment: the id from the hostname's ordinal
    /// (--id-from-ordinal), then `{id}` in the TLS and data paths.
    pub fn resolve(&mut self, hostname: Option<&str>) -> std::result::Result<(), String> {
        if let Some(base) = self.id_from_ordinal {
            let host = hostname.ok_or(
                "--id-from-ordinal needs the hostname (HOSTNAME, or the kernel's): none is set",
            )?;
            let ordinal = ordinal_of(host)?;
            self.id = base.checked_add(ordinal).ok_or_else(|| {
                format!("--id-from-ordinal {base} + ordinal {ordinal} is not a node id")
            })?;
        }
        let id = self.id.to_string();
        for path in [&mut self.tls_cert, &mut self.tls_key, &mut self.data_dir]
            .into_iter()
            .flatten()
        {
            if let Some(text) = path.to_str().filter(|t| t.contains("{id}")) {
                *path = PathBuf::from(text.replace("{id}", &id));
            }
        }
        Ok(())
    }

    /// Whether this node is agent-only.
    pub fn is_agent(&self) -> bool {
        self.role == "agent"
    }

    /// The peer listener: --peer-listen, else --listen's port + 1.
    pub fn peer_listen(&self) -> std::result::Result<SocketAddr, String> {
        match self.peer_listen {
            Some(a) => Ok(a),
            None => {
                let port = self.listen.port().checked_add(1).ok_or_else(|| {
                    format!(
                        "--listen {} leaves no port for the peer API: give --peer-listen",
                        self.listen
                    )
                })?;
                Ok(SocketAddr::new(self.listen.ip(), port))
            }
        }
    }

    /// The peer address others reach this node at.
    pub fn advertise_peer(&self) -> std::result::Result<String, String> {
        if let Some(a) = &self.advertise_peer {
            return Ok(a.clone());
        }
        let listen = self.peer_listen()?;
        if let Some((host, _)) = self.advertise.as_deref().and_then(|a| a.rsplit_once(':')) {
            return Ok(format!("{host}:{}", listen.port()));
        }
        if listen.ip().is_unspecified() {
            return Err(format!(
                "--peer-listen {listen} accepts any address; also give --advertise-peer HOST:PORT, the address other nodes reach this one at"
            ));
        }
        Ok(listen.to_string())
    }

    /// The public API address clients reach this server at.
    pub fn advertise_api(&self) -> std::result::Result<String, String> {
        match &self.advertise {
            Some(a) => Ok(a.clone()),
            None if self.listen.ip().is_unspecified() => Err(format!(
                "--listen {} accepts any address; also give --advertise HOST:PORT, the address clients reach this one at",
                self.listen
            )),
            None => Ok(self.listen.to_string()),
        }
    }

    /// The node's TLS files, when given.
    pub fn tls_files(&self) -> Option<crate::security::tls::TlsFiles> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(crate::security::tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    /// Refuse to listen beyond loopback without TLS unless --insecure: an open port is remote
    /// code execution on every node.
    pub fn transport_checks(&self) -> std::result::Result<(), String> {
        if self.tls_files().is_some() || self.insecure {
            return Ok(());
        }
        let mut open = Vec::new();
        if !self.is_agent() && !self.listen.ip().is_loopback() {
            open.push(format!("--listen {}", self.listen));
        }
        let peer = self.peer_listen()?;
        if !peer.ip().is_loopback() {
            open.push(format!("--peer-listen {peer}"));
        }
        if let Some(http) = self.http_listen.filter(|a| !a.ip().is_loopback()) {
            open.push(format!("--http-listen {http}"));
        }
        if open.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} listens beyond loopback without TLS: anyone reaching it could run programs on every node. Give --tls-ca, --tls-cert and --tls-key (make them with `modectl tls ca create` and `modectl tls cert create --node {}`), or --insecure on an isolated test network",
            open.join(", "),
            self.id
        ))
    }

    /// Apply `--no-exec` and `--exec-allow` to `kinds`; what the node says about it in its
    /// log, if anything.
    fn limit_exec(&self, kinds: &mut KindRegistry) -> std::result::Result<Option<String>, String> {
        if self.no_exec {
            kinds.disable("exec", "--no-exec");
            return Ok(Some(
                "exec is off on this node (--no-exec): no exec instance is placed here".into(),
            ));
        }
        if self.exec_allow.is_empty() {
            return Ok(None);
        }
        let allow = crate::agent::kinds::AllowList::new(&self.exec_allow)?;
        let said = format!(
            "exec instances on this node may run only {}",
            allow.describe()
        );
        kinds.restrict_exec(allow);
        Ok(Some(said))
    }

    /// The flags of an agent-only node make sense.
    pub fn agent_checks(&self) -> std::result::Result<(), String> {
        if self.servers.is_empty() {
            return Err("--role agent needs --servers: the peer addresses of the cluster's servers (HOST:PORT, comma-separated)".into());
        }
        if !self.peers.is_empty() || self.join.is_some() || self.dev {
            return Err("--role agent takes no --peers, --join or --dev: it joins no Raft group; name the servers with --servers".into());
        }
        for s in &self.servers {
            crate::replication::check_address("--servers address", s).map_err(|e| e.to_string())?;
        }
        self.advertise_peer()?;
        if self.heartbeat_grace < Duration::from_secs(1) {
            return Err(format!(
                "--heartbeat-grace {:?} is too short: it must be at least 1s (and the cluster's)",
                self.heartbeat_grace
            ));
        }
        Ok(())
    }

    /// The cluster configuration these flags describe.
    pub fn cluster_config(&self) -> std::result::Result<ClusterConfig, String> {
        self.advertise_api()?;
        let advertise = self.advertise_peer()?;
        let mut peers = BTreeMap::new();
        for (id, addr) in &self.peers {
            if let Some(previous) = peers.insert(*id, addr.clone()) {
                return Err(format!(
                    "--peers lists node {id} twice ({previous} and {addr})"
                ));
            }
        }
        let mut config = ClusterConfig::new(
            self.id,
            advertise,
            self.data_dir
                .clone()
                .unwrap_or_else(|| default_data_dir(self.id)),
        );
        if self.join_if_new && !peers.contains_key(&self.id) {
            // Only ids past the listed ones: a pod whose id moved below them (a renamed
            // StatefulSet, another --id-from-ordinal) is a mistake, not a new member.
            let highest = peers.keys().next_back().copied().unwrap_or(0);
            if self.id < highest {
                return Err(format!(
                    "--join-if-new: node {} is not in --peers but below its highest id ({highest}): only nodes added after the listed ones join this way; check --id / --id-from-ordinal",
                    self.id
                ));
            }
            config.join_seeds = std::mem::take(&mut peers).into_values().collect();
        }
        config.peers = peers;
        config.join = self.join.clone();
        config.max_voters = self.max_voters.max(1);
        config.heartbeat = self.heartbeat;
        config.election_timeout = (self.election_timeout, self.election_timeout * 2);
        config.snapshot_every = self.snapshot_every.max(10);
        config.rejoin = self.rejoin;
        config.lease = self.heartbeat_grace.mul_f64(0.6);
        if self.heartbeat >= self.election_timeout {
            return Err(format!(
                "--heartbeat ({:?}) must be shorter than --election-timeout ({:?})",
                self.heartbeat, self.election_timeout
            ));
        }
        if self.heartbeat_grace < Duration::from_secs(1) {
            return Err(format!(
                "--heartbeat-grace {:?} is too short: nodes heartbeat every 250 ms, so it must be at least 1s",
                self.heartbeat_grace
            ));
        }
        config.check_timings(self.heartbeat_grace)?;
        Ok(config)
    }
}

/// A node binary: the stock `mode-node`, or your own with more service kinds.
///
/// ```no_run
/// use mode::agent::InstanceSpec;
/// use mode::service::{Context, Result, Service, ServiceHandle};
///
/// struct Greeter;
/// impl Service for Greeter {
///     async fn on_start(&mut self, _ctx: &Context) -> Result<()> {
///         tracing::info!("hello from a custom kind");
///         Ok(())
///     }
/// }
///
/// fn main() -> std::process::ExitCode {
///     mode::Node::builder()
///         .kind_fn("greeter", |instance: &InstanceSpec| {
///             Ok(ServiceHandle::builder(Greeter).label(instance.label()).build())
///         })
///         .run()
/// }
/// ```
pub struct Node;

impl Node {
    /// A node with the stock kinds (`exec`, `ticker`, `counter`, `crasher`, `webapp`).
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            kinds: KindRegistry::stock(),
        }
    }
}

/// Adds service kinds, then runs the node with the process's command-line flags.
pub struct NodeBuilder {
    kinds: KindRegistry,
}

impl NodeBuilder {
    /// Offer a service kind.
    pub fn kind(mut self, name: impl Into<String>, kind: impl Kind) -> Self {
        self.kinds.register(name, kind);
        self
    }

    /// Offer a service kind built by a closure (any config is accepted).
    pub fn kind_fn<F>(mut self, name: impl Into<String>, create: F) -> Self
    where
        F: Fn(&crate::agent::InstanceSpec) -> std::result::Result<ServiceHandle, String>
            + Send
            + Sync
            + 'static,
    {
        self.kinds.register_fn(name, create);
        self
    }

    /// Run with the process's arguments (see `mode-node --help`); returns the exit status.
    pub fn run(self) -> ExitCode {
        self.run_with_args(std::env::args_os())
    }

    /// Run with these arguments (the first is the program name).
    pub fn run_with_args(self, args: impl IntoIterator<Item = OsString>) -> ExitCode {
        run_node(self.kinds, args)
    }
}

/// Run the stock `mode-node` with these command-line arguments; returns the exit status.
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    Node::builder().run_with_args(args)
}

fn run_node(mut kinds: KindRegistry, args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let mut args = match NodeArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if let Err(e) = args.resolve(hostname().as_deref()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let exec = match args.limit_exec(&mut kinds) {
        Ok(said) => said,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let config = if args.is_agent() {
        args.agent_checks().map(|()| None)
    } else {
        args.cluster_config().map(Some)
    };
    let config = match config.and_then(|c| args.transport_checks().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match args.tls_files().map(crate::security::tls::NodeTls::load) {
        None => None,
        Some(Ok(tls)) => Some(tls),
        Some(Err(e)) => {
            eprintln!("error: TLS: {e}");
            return ExitCode::from(2);
        }
    };
    let log = LogConfig {
        level: Some(args.log_level.clone()),
        format: args.log_format,
        file: None,
        otel_service: Some("mode-node".to_string()),
        otel_no_retry: false,
        otel_attributes: vec![("mode.node.id".to_string(), args.id.to_string())],
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The trace exporter's gRPC client runs on the runtime.
    let logging = {
        let _in_runtime = rt.enter();
        init_logging(&log)
    };
    if let Err(e) = logging {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(exec) = exec {
        tracing::info!("{exec}");
    }
    let code = rt.block_on(async {
        match &tls {
            Some(tls) => tls.watch(),
            None if args.insecure => tracing::warn!(
                "INSECURE: --insecure and no TLS: anyone who reaches this node's ports can change the cluster and run programs on every node. Use --tls-ca/--tls-cert/--tls-key beyond an isolated test network"
            ),
            None => {}
        }
        let code = match config {
            Some(mut config) => {
                config.tls = tls.clone().map(crate::security::tls::ClientTls::Node);
                run(args, config, kinds, tls).await
            }
            None => run_agent(args, kinds, tls).await,
        };
        crate::telemetry::shutdown(Duration::from_secs(3)).await;
        code
    });
    rt.shutdown_timeout(Duration::from_millis(200));
    ExitCode::from(code)
}

async fn run(
    args: NodeArgs,
    config: ClusterConfig,
    kinds: KindRegistry,
    tls: Option<Arc<crate::security::tls::NodeTls>>,
) -> u8 {
    let data_dir = config.data_dir.clone();
    let node = match ClusterNode::open(config).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return match e {
                ClusterError::Config(_) => 2,
                _ => 1,
            };
        }
    };
    tracing::info!(
        "mode-node {} listening on {} (advertised as {}), data in {}",
        args.id,
        args.listen,
        node.config().advertise,
        data_dir.display()
    );
    // Before anything runs: what a killed previous run left behind goes first.
    kinds.open_process_ledger(&data_dir);
    let labels: BTreeMap<String, String> = args.labels.iter().cloned().collect();
    let raft = ServiceHandle::builder(RaftService { node: node.clone() })
        .label("Raft")
        .build();
    // Instances run under a supervisor that gives up on one whose own supervisor escalated:
    // the control plane moves it, the rest of the node carries on.
    let instances = Supervisor::new(Strategy::ForfeitOneForOne)
        .label("Instances")
        .build();
    let inspector = Inspector::new(node.clone(), Some(instances.clone()));
    let grpc = ServiceHandle::builder(GrpcServer {
        inspector: inspector.clone(),
        kinds: kinds.clone(),
        listen: args.listen,
        tls: tls.clone(),
    })
    .label("GrpcServer")
    .build();
    let peer_listen = match args.peer_listen() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let peer_grpc = ServiceHandle::builder(PeerServer {
        service: Some(crate::api::PeerService::new(inspector.clone(), &kinds)),
        listen: peer_listen,
        tls: tls.clone(),
    })
    .label("PeerServer")
    .build();
    let agent = ServiceHandle::builder(Agent {
        node: node.clone(),
        bootstrap_timeout: args.bootstrap_timeout,
        labels,
        capacity: args.capacity,
        kinds,
        instances: instances.clone(),
        heartbeat_grace: args.heartbeat_grace,
        api_address: args.advertise_api().unwrap_or_default(),
        registered: Default::default(),
    })
    .label("Agent")
    .build();
    let control = ServiceHandle::builder(ControlLoop {
        node: node.clone(),
        liveness: Liveness {
            grace: args.heartbeat_grace,
            ..Liveness::default()
        },
    })
    .label("ControlLoop")
    .build();
    let mut services = vec![raft, peer_grpc, grpc];
    if let Some(addr) = args.http_listen {
        services.push(
            ServiceHandle::builder(HttpServer {
                side: SidePort::Server(inspector.clone()),
                listen: addr,
                tls: tls.clone(),
            })
            .label("HttpServer")
            .build(),
        );
    }
    services.extend([instances, agent]);
    if !args.no_control_loop {
        services.push(control);
    }
    let ready: ReadyCheck = {
        let node = node.clone();
        Arc::new(move || node.readiness())
    };
    services.push(
        ServiceHandle::builder(Notifier {
            ready,
            status: format!("server {} serving on {}", args.id, args.listen),
        })
        .label("Notifier")
        .build(),
    );
    inspector.set_daemon_services(services.clone());
    let exit = Worker::with_services(services)
        .without_logging()
        .run_async()
        .await;
    if matches!(exit, WorkerExit::Crashed(_) | WorkerExit::StartFailed(_)) {
        // The worker printed the reason; make sure Raft is down before exiting.
        node.shutdown().await;
    }
    exit.code()
}

/// Owns the Raft node: logs leadership changes, shuts Raft down last.
struct RaftService {
    node: Arc<ClusterNode>,
}

impl Service for RaftService {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let mut metrics = self.node.leader_changes();
        let me = self.node.id();
        let (c, node) = (ctx.clone(), self.node.clone());
        ctx.spawn("leader-watch", async move {
            let mut last = (None, 0);
            let mut was_member = false;
            loop {
                let (now, fatal, member) = {
                    let m = metrics.borrow_and_update();
                    (
                        (m.current_leader, m.current_term),
                        m.running_state.as_ref().err().map(|e| e.to_string()),
                        m.membership_config.membership().get_node(&me).is_some(),
                    )
                };
                // Fail-stop: a node whose Raft stopped (a storage error, a full disk) must not
                // go on running instances that the rest of the cluster reschedules.
                if let Some(fatal) = fatal {
                    return Err(format!(
                        "Raft stopped on this node: {fatal}. Stopping its instances and exiting; fix the cause (e.g. free disk space in the data directory) and start it again"
                    )
                    .into());
                }
                if member {
                    was_member = true;
                }
                if (!member && was_member) || node.removed_by_peers() {
                    return Err(format!(
                        "node {me} was removed from the cluster: it stops its instances, no longer takes part in elections, and exits. To bring it back, move its data directory away and start it with --join"
                    )
                    .into());
                }
                if now.0 != last.0 {
                    if now.0.is_some() {
                        node.note_leader_change();
                    }
                    match now.0 {
                        Some(l) if l == me => {
                            tracing::info!("this node ({me}) is the leader (term {})", now.1)
                        }
                        Some(l) => tracing::info!("node {l} is the leader (term {})", now.1),
                        None => tracing::info!("no leader (term {})", now.1),
                    }
                }
                last = now;
                let changed = tokio::select! {
                    changed = c.wait(metrics.changed()) => changed,
                    // Refusals by peers are not Raft metrics: look now and then.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => Some(Ok(())),
                };
                match changed {
                    None => return Ok(()),
                    Some(Ok(())) => {}
                    Some(Err(_)) => {
                        return Err("Raft stopped on this node; exiting".to_string().into())
                    }
                }
            }
        });
        Ok(())
    }

    async fn on_shutdown(&mut self, _ctx: &Context) -> Result<()> {
        self.node.shutdown().await;
        Ok(())
    }
}

/// Serves the public API.
struct GrpcServer {
    inspector: Arc<Inspector>,
    kinds: KindRegistry,
    listen: SocketAddr,
    tls: Option<Arc<crate::security::tls::NodeTls>>,
}

impl Service for GrpcServer {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(self.listen).await.map_err(|e| {
            format!("cannot listen on {}: {e} (is another mode-node using this port? choose another --listen)", self.listen)
        })?;
        let (inspector, kinds, c) = (self.inspector.clone(), self.kinds.clone(), ctx.clone());
        let tls = self.tls.clone();
        ctx.spawn("serve", async move {
            let shutdown = {
                let c = c.clone();
                async move { c.stopped().await }
            };
            crate::api::serve(inspector, kinds, listener, tls, shutdown).await?;
            Ok(())
        });
        Ok(())
    }
}

/// Serves the peer API on its own listener.
struct PeerServer {
    service: Option<crate::api::PeerService>,
    listen: SocketAddr,
    tls: Option<Arc<crate::security::tls::NodeTls>>,
}

impl Service for PeerServer {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(self.listen).await.map_err(|e| {
            format!("cannot listen on {} for the peer API: {e} (is another mode-node using this port? choose another --peer-listen)", self.listen)
        })?;
        let service = self
            .service
            .take()
            .ok_or("the peer API server cannot be started twice")?;
        let (c, tls) = (ctx.clone(), self.tls.clone());
        ctx.spawn("serve", async move {
            let shutdown = {
                let c = c.clone();
                async move { c.stopped().await }
            };
            crate::api::serve_peer(service, listener, tls, shutdown).await?;
            Ok(())
        });
        Ok(())
    }
}

/// An agent-only node: the peer listener (beacons), the instances, and the agent fed by the
/// servers.
async fn run_agent(
    args: NodeArgs,
    kinds: KindRegistry,
    tls: Option<Arc<crate::security::tls::NodeTls>>,
) -> u8 {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| default_data_dir(args.id));
    let incarnation = match crate::agent::agent_incarnation(&data_dir, args.id) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let (peer_listen, advertise) = match (args.peer_listen(), args.advertise_peer()) {
        (Ok(l), Ok(a)) => (l, a),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let servers = match crate::agent::Servers::new(
        args.servers.clone(),
        tls.clone().map(crate::security::tls::ClientTls::Node),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    tracing::info!(
        "mode-node {} (agent only) serving the peer API on {peer_listen} (advertised as {advertise}), servers {}, data in {}",
        args.id,
        args.servers.join(","),
        data_dir.display()
    );
    kinds.open_process_ledger(&data_dir);
    let instances = Supervisor::new(Strategy::ForfeitOneForOne)
        .label("Instances")
        .build();
    let beacon = crate::api::AgentBeacon::new(args.id, instances.clone());
    let peer_grpc = ServiceHandle::builder(PeerServer {
        service: Some(crate::api::PeerService::agent(beacon.clone(), &kinds)),
        listen: peer_listen,
        tls: tls.clone(),
    })
    .label("PeerServer")
    .build();
    let register = crate::agent::register_request(
        args.id,
        advertise,
        args.labels.iter().cloned().collect(),
        args.capacity,
        kinds.names(),
        incarnation,
        args.heartbeat_grace,
    );
    let registered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let servers_for_ready = servers.clone();
    let agent = ServiceHandle::builder(crate::agent::RemoteAgent {
        servers,
        register,
        kinds,
        instances: instances.clone(),
        incarnation,
        registered: registered.clone(),
    })
    .label("Agent")
    .build();
    let ready: ReadyCheck = {
        let (servers, grace) = (servers_for_ready, args.heartbeat_grace);
        Arc::new(move || {
            if !registered.load(std::sync::atomic::Ordering::Acquire) {
                return Err("not registered with the servers yet".to_string());
            }
            // Ready while a server keeps granting it leases: an agent cut off from the
            // servers (or removed) stops its instances and says so.
            match servers.since_last_lease() {
                Some(age) if age < grace => Ok(()),
                Some(age) => Err(format!(
                    "no lease from the servers for {:.1} s (grace {:.1} s)",
                    age.as_secs_f64(),
                    grace.as_secs_f64()
                )),
                None => Err("no lease from the servers yet".to_string()),
            }
        })
    };
    let mut services = vec![peer_grpc, instances, agent];
    if let Some(addr) = args.http_listen {
        services.push(
            ServiceHandle::builder(HttpServer {
                side: SidePort::Agent(ready.clone()),
                listen: addr,
                tls: tls.clone(),
            })
            .label("HttpServer")
            .build(),
        );
    }
    services.push(
        ServiceHandle::builder(Notifier {
            ready,
            status: format!("agent {} running instances", args.id),
        })
        .label("Notifier")
        .build(),
    );
    beacon.set_daemon_services(services.clone());
    Worker::with_services(services)
        .without_logging()
        .run_async()
        .await
        .code()
}

/// What a node's HTTP side port serves.
#[derive(Clone)]
enum SidePort {
    /// A server's: health, readiness, metrics and the web view of the node `Inspector` sees.
    Server(Arc<Inspector>),
    /// An agent-only node's: health, and readiness as this says.
    Agent(ReadyCheck),
}

/// Serves the HTTP side port.
struct HttpServer {
    side: SidePort,
    listen: SocketAddr,
    /// HTTPS with this, and the web view only for clients.
    tls: Option<Arc<crate::security::tls::NodeTls>>,
}

impl Service for HttpServer {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on {} for HTTP: {e} (choose another --http-listen)",
                    self.listen
                )
            })?;
        tracing::info!(
            "[{}]: {} on {} ({})",
            ctx.handle().log_prefix(),
            if self.tls.is_some() { "HTTPS" } else { "HTTP" },
            self.listen,
            match self.side {
                SidePort::Server(_) => "/, /api/graph, /healthz, /readyz, /metrics",
                SidePort::Agent(_) => "/healthz, /readyz",
            }
        );
        let (side, c, tls) = (self.side.clone(), ctx.clone(), self.tls.clone());
        ctx.spawn("serve", async move {
            let shutdown = {
                let c = c.clone();
                async move { c.stopped().await }
            };
            match side {
                SidePort::Server(inspector) => {
                    crate::api::serve_http(inspector, listener, tls, shutdown).await?
                }
                SidePort::Agent(ready) => {
                    crate::api::serve_agent_http(ready, listener, tls, shutdown).await?
                }
            }
            Ok(())
        });
        Ok(())
    }
}

/// Bootstraps or joins the cluster, registers this node (labels, capacity, kinds), then runs
/// the instances placed here.
struct Agent {
    node: Arc<ClusterNode>,
    bootstrap_timeout: Duration,
    labels: BTreeMap<String, String>,
    capacity: u64,
    kinds: KindRegistry,
    instances: ServiceHandle,
    heartbeat_grace: Duration,
    api_address: String,
    /// Set once the node's registration is committed: a clean shutdown then says it leaves.
    registered: Arc<std::sync::atomic::AtomicBool>,
}

impl Service for Agent {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let node = self.node.clone();
        let timeout = self.bootstrap_timeout;
        let register = Command::RegisterNode {
            id: node.id(),
            address: node.config().advertise.clone(),
            labels: self.labels.clone(),
            capacity: self.capacity,
            kinds: self.kinds.names(),
            incarnation: node.incarnation(),
            heartbeat_grace_ms: self.heartbeat_grace.as_millis() as u64,
            api_address: self.api_address.clone(),
            role: crate::model::state::NodeRole::Server,
        };
        let (kinds, instances) = (self.kinds.clone(), self.instances.clone());
        let timings = AgentTimings::for_grace(self.heartbeat_grace);
        let (c, registered) = (ctx.clone(), self.registered.clone());
        ctx.spawn("register", async move {
            match c.wait(node.bootstrap(timeout)).await {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(())) => {}
            }
            let mut delay = Duration::from_millis(100);
            loop {
                match c.wait(node.write(register.clone(), true)).await {
                    None => return Ok(()),
                    Some(Ok(out)) if out.result.ok => {
                        tracing::info!("{}", out.result.message);
                        registered.store(true, std::sync::atomic::Ordering::Release);
                        break;
                    }
                    Some(Ok(out)) => return Err(out.result.message.into()),
                    Some(Err(ClusterError::Unavailable(e))) => {
                        tracing::warn!("registering this node: {e}; retrying")
                    }
                    Some(Err(e)) => return Err(e.into()),
                }
                if !c.sleep(delay).await {
                    return Ok(());
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            let (me, incarnation) = (node.id(), node.incarnation());
            let link = crate::agent::Link::Local(node);
            crate::agent::run(c, link, me, incarnation, kinds, instances, timings).await;
            Ok(())
        });
        Ok(())
    }

    async fn on_shutdown(&mut self, _ctx: &Context) -> Result<()> {
        if self.registered.load(std::sync::atomic::Ordering::Acquire) {
            let (me, incarnation) = (self.node.id(), self.node.incarnation());
            let link = crate::agent::Link::Local(self.node.clone());
            crate::agent::leave_cleanly(&link, me, incarnation, &self.instances).await;
        }
        Ok(())
    }
}

/// The leader's control loop (failure detection, scheduling, drains, removals).
struct ControlLoop {
    node: Arc<ClusterNode>,
    liveness: Liveness,
}

impl Service for ControlLoop {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let (node, liveness, c) = (self.node.clone(), self.liveness, ctx.clone());
        ctx.spawn("reconcile", async move {
            crate::control::run_control_loop(node, liveness, async move { c.stopped().await })
                .await;
            Ok(())
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
    }

    #[test]
    fn a_statefulset_pod_takes_its_id_from_its_ordinal_and_fills_in_its_paths() {
        let mut args = NodeArgs::try_parse_from([
            "mode-node",
            "--id-from-ordinal",
            "1",
            "--tls-ca",
            "/tls/ca.pem",
            "--tls-cert",
            "/tls/node-{id}.pem",
            "--tls-key",
            "/tls/node-{id}-key.pem",
            "--data-dir",
            "/var/lib/mode/{id}",
        ])
        .unwrap();
        args.resolve(Some("mode-2")).unwrap();
        assert_eq!(args.id, 3);
        assert_eq!(args.tls_cert.as_deref(), Some("/tls/node-3.pem".as_ref()));
        assert_eq!(
            args.tls_key.as_deref(),
            Some("/tls/node-3-key.pem".as_ref())
        );
        assert_eq!(args.tls_ca.as_deref(), Some("/tls/ca.pem".as_ref()));
        assert_eq!(args.data_dir.as_deref(), Some("/var/lib/mode/3".as_ref()));

        let mut agent =
            NodeArgs::try_parse_from(["mode-node", "--id-from-ordinal", "1000"]).unwrap();
        agent
            .resolve(Some("mode-agent-12.mode-agents.default.svc"))
            .unwrap();
        assert_eq!(agent.id, 1012);

        let mut bad = NodeArgs::try_parse_from(["mode-node", "--id-from-ordinal", "1"]).unwrap();
        let e = bad.resolve(Some("worker")).unwrap_err();
        assert!(
            e.contains("'worker' does not end in -N") && e.contains("--id"),
            "{e}"
        );
        assert!(bad.resolve(None).unwrap_err().contains("hostname"));
        let both = NodeArgs::try_parse_from(["mode-node", "--id", "2", "--id-from-ordinal", "1"]);
        assert!(
            both.is_err(),
            "--id and --id-from-ordinal exclude each other"
        );
    }

    #[test]
    fn a_node_missing_from_its_peers_joins_through_them_only_when_told_to() {
        let peers = "1=mode-0.p:7071,2=mode-1.p:7071,3=mode-2.p:7071";
        let flags = |extra: &[&str]| {
            let mut a = vec![
                "mode-node",
                "--id",
                "4",
                "--peers",
                peers,
                "--advertise-peer",
                "mode-3.p:7071",
            ];
            a.extend_from_slice(extra);
            NodeArgs::try_parse_from(a)
                .unwrap()
                .cluster_config()
                .unwrap()
        };
        let joining = flags(&["--join-if-new"]);
        assert!(joining.peers.is_empty());
        assert_eq!(
            joining.join_seeds,
            ["mode-0.p:7071", "mode-1.p:7071", "mode-2.p:7071"]
        );
        assert!(joining.joins());
        // Without the flag the node is refused when it opens (a typo in --id must not join).
        let strict = flags(&[]);
        assert!(strict.join_seeds.is_empty() && strict.peers.len() == 3);
        // A listed node bootstraps as before.
        let listed = NodeArgs::try_parse_from([
            "mode-node",
            "--id",
            "2",
            "--peers",
            peers,
            "--advertise-peer",
            "mode-1.p:7071",
            "--join-if-new",
        ])
        .unwrap()
        .cluster_config()
        .unwrap();
        assert!(listed.join_seeds.is_empty() && !listed.joins());
        // An id below the listed ones is a mistake, not a new member.
        let below = NodeArgs::try_parse_from([
            "mode-node",
            "--id",
            "2",
            "--peers",
            "1=mode-0.p:7071,3=mode-2.p:7071",
            "--advertise-peer",
            "mode-1.p:7071",
            "--join-if-new",
        ])
        .unwrap()
        .cluster_config()
        .unwrap_err();
        assert!(below.contains("below its highest id (3)"), "{below}");
    }

    #[test]
    fn peers_and_labels_are_validated() {
        assert_eq!(
            parse_peer("2=10.0.0.2:7070").unwrap(),
            (2, "10.0.0.2:7070".to_string())
        );
        assert!(parse_peer("2").unwrap_err().contains("ID=HOST:PORT"));
        assert!(parse_peer("0=a:1").unwrap_err().contains("start at 1"));
        assert!(parse_peer("x=a:1").unwrap_err().contains("not a node id"));
        assert_eq!(parse_label("zone=a").unwrap(), ("zone".into(), "a".into()));
        assert!(parse_label("=a").is_err());
    }

    #[test]
    fn exec_flags_parse_check_their_patterns_and_exclude_each_other() {
        let args =
            NodeArgs::try_parse_from(["mode-node", "--exec-allow", "/usr/bin/sleep,/opt/app/*"])
                .unwrap();
        assert_eq!(args.exec_allow, ["/usr/bin/sleep", "/opt/app/*"]);
        let mut kinds = KindRegistry::stock();
        let said = args.limit_exec(&mut kinds).unwrap().unwrap();
        assert!(
            said.contains("may run only /usr/bin/sleep, /opt/app/*"),
            "{said}"
        );
        assert!(kinds.names().contains(&"exec".to_string()));

        let bad = NodeArgs::try_parse_from(["mode-node", "--exec-allow", "sleep"]).unwrap_err();
        assert!(bad.to_string().contains("is not an absolute path"), "{bad}");
        let both = NodeArgs::try_parse_from(["mode-node", "--no-exec", "--exec-allow", "/x"]);
        assert!(both.is_err());

        let args = NodeArgs::try_parse_from(["mode-node", "--no-exec"]).unwrap();
        let mut kinds = KindRegistry::stock();
        assert!(args.limit_exec(&mut kinds).unwrap().is_some());
        assert!(!kinds.names().contains(&"exec".to_string()));
        let plain = NodeArgs::try_parse_from(["mode-node"]).unwrap();
        assert_eq!(plain.limit_exec(&mut KindRegistry::stock()), Ok(None));
    }

    #[test]
    fn a_wildcard_listen_address_needs_an_advertised_one() {
        let args = NodeArgs::try_parse_from(["mode-node", "--listen", "0.0.0.0:7070"]).unwrap();
        assert!(args.cluster_config().unwrap_err().contains("--advertise"));
        let args = NodeArgs::try_parse_from([
            "mode-node",
            "--listen",
            "0.0.0.0:7070",
            "--advertise",
            "mode-0.mode:7070",
        ])
        .unwrap();
        // Raft and the other servers use the peer address: --advertise's host, the peer port.
        assert_eq!(args.cluster_config().unwrap().advertise, "mode-0.mode:7071");
        assert_eq!(args.advertise_api().unwrap(), "mode-0.mode:7070");
        let agent = NodeArgs::try_parse_from(["mode-node", "--role", "agent"]).unwrap();
        assert!(agent.agent_checks().unwrap_err().contains("--servers"));
        let dup = NodeArgs::try_parse_from(["mode-node", "--peers", "1=a:1,1=b:2"]).unwrap();
        assert!(dup.cluster_config().unwrap_err().contains("twice"));
    }
}
