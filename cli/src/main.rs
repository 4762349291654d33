//! `modectl`: the command-line client of a mode cluster. Any node can be the endpoint; writes
//! are forwarded to the leader.
//!
//! Exit status: 0 success, 1 other error, 2 usage error, 3 not found, 4 cluster unavailable.

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use mode_proto::v1 as pb;
use mode_proto::v1::control_client::ControlClient;
use serde_json::Value;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument as _;

mod graph;
mod output;
mod svc;

use output::{print_events, print_nodes, print_status};

#[derive(Parser)]
#[command(name = "modectl", version, about = "Control a mode cluster")]
struct Cli {
    /// A node of the cluster (HOST:PORT or http://HOST:PORT).
    #[arg(
        long,
        global = true,
        env = "MODE_ENDPOINT",
        default_value = "127.0.0.1:7070"
    )]
    endpoint: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Give up on a request after this many seconds.
    #[arg(long, global = true, default_value_t = 15)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// The control plane.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Cluster nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Services: apply specs, list, inspect, scale, restart, remove.
    #[command(subcommand)]
    Svc(svc::SvcCmd),
    /// The cluster's event log.
    Events {
        /// Only events about this service.
        #[arg(long)]
        service: Option<String>,
        /// Read from the answering node without asking the leader.
        #[arg(long)]
        stale: bool,
        /// Keep printing new events as they come.
        #[arg(short, long)]
        follow: bool,
    },
    /// The service kinds the nodes offer.
    Kinds,
    /// The combined beacon graph: cluster → nodes → instances → their service trees, and the
    /// dependencies between services. Unreachable nodes are shown with their error.
    Graph(graph::GraphArgs),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, roles, leader, term, commit/applied index, per-member lag and reachability.
    Status {
        /// The answering node's own view instead of the leader's.
        #[arg(long)]
        local: bool,
    },
    /// Snapshot the state and purge the log it covers (on the answering node).
    Compact,
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes.
    Ls {
        /// Read from the answering node without asking the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Remove a node from the cluster.
    Rm {
        /// Node id.
        id: u64,
    },
    /// Move every instance off a node (started elsewhere before stopped here). Refused when
    /// an instance could run nowhere else, unless --force (it then stays on the node).
    Drain {
        /// Node id.
        id: u64,
        /// Drain even if some instances have nowhere else to go.
        #[arg(long)]
        force: bool,
    },
    /// Return a drained node to service.
    Undrain {
        /// Node id.
        id: u64,
    },
}

/// The control API client; every call carries the current trace context.
pub(crate) type Client = ControlClient<InterceptedService<Channel, TracePropagation>>;

/// Puts the W3C trace context of the current span into each request's metadata.
#[derive(Clone, Copy)]
pub(crate) struct TracePropagation;

impl tonic::service::Interceptor for TracePropagation {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        mode::telemetry::inject(req.metadata_mut());
        Ok(req)
    }
}

/// A failure, with the exit status it maps to.
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn from_status(endpoint: &str, status: &tonic::Status) -> Failure {
        let timed_out =
            status.code() == tonic::Code::Cancelled && status.message().contains("Timeout expired");
        let code = match status.code() {
            _ if timed_out => 4,
            tonic::Code::NotFound => 3,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 4,
            tonic::Code::InvalidArgument | tonic::Code::AlreadyExists => 1,
            _ => 1,
        };
        let message = match status.code() {
            tonic::Code::Unavailable if is_connect_error(status) => format!(
                "no mode node answers at {endpoint} ({}): start one with `mode-node`, or point --endpoint / MODE_ENDPOINT at a running node",
                root_cause(status)
            ),
            tonic::Code::Unimplemented => format!("{endpoint} is not a mode node of this version (it does not serve mode.v1.Control)"),
            tonic::Code::DeadlineExceeded => format!("{endpoint} did not answer in time"),
            _ if timed_out => format!(
                "{endpoint} did not answer within --timeout: if this was a change, its outcome is unknown (check with `modectl svc get` or `events`)"
            ),
            _ => status.message().to_string(),
        };
        Failure { code, message }
    }
}

fn is_connect_error(status: &tonic::Status) -> bool {
    let m = root_cause(status).to_lowercase();
    status.message().contains("transport error")
        || m.contains("connect")
        || m.contains("refused")
        || m.contains("dns")
        || m.contains("resolve")
}

fn root_cause(status: &tonic::Status) -> String {
    let mut err: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut last = status.message().to_string();
    while let Some(e) = err {
        last = e.to_string();
        err = e.source();
    }
    last
}

fn endpoint_url(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

async fn connect(cli: &Cli) -> Result<Client, Failure> {
    let url = endpoint_url(&cli.endpoint);
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Failure {
            code: 2,
            message: format!("invalid --endpoint '{}': {e}", cli.endpoint),
        })?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(cli.timeout));
    Ok(
        ControlClient::with_interceptor(endpoint.connect_lazy(), TracePropagation)
            .max_decoding_message_size(mode::api::MAX_GRAPH_BYTES),
    )
}

pub(crate) async fn read(
    client: &mut Client,
    endpoint: &str,
    query: &str,
    stale: bool,
) -> Result<Value, Failure> {
    let reply = client
        .read(pb::ReadRequest {
            query: query.to_string(),
            stale,
        })
        .await
        .map_err(|s| Failure::from_status(endpoint, &s))?
        .into_inner();
    decode(endpoint, &reply.result_json)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let endpoint = endpoint_url(&cli.endpoint);
    let mut client = connect(&cli).await?;
    let json = cli.output == Format::Json;
    let fail = |s: tonic::Status| Failure::from_status(&endpoint, &s);
    match &cli.command {
        Cmd::Cluster(ClusterCmd::Status { local }) => {
            let reply = client
                .cluster_status(pb::ClusterStatusRequest { local: *local })
                .await
                .map_err(fail)?
                .into_inner();
            print_status(&reply, json);
        }
        Cmd::Cluster(ClusterCmd::Compact) => {
            let r = client
                .compact(pb::CompactRequest {})
                .await
                .map_err(fail)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"snapshot_index": r.snapshot_index, "purged_index": r.purged_index})
                );
            } else {
                println!(
                    "snapshot at index {}, log purged up to {}",
                    r.snapshot_index, r.purged_index
                );
            }
        }
        Cmd::Node(NodeCmd::Ls { stale }) => {
            let nodes = read(&mut client, &endpoint, "nodes", *stale).await?;
            print_nodes(&nodes, json);
        }
        Cmd::Node(NodeCmd::Rm { id }) => {
            let r = client
                .remove_node(pb::RemoveNodeRequest { id: *id })
                .await
                .map_err(fail)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"removed": id, "message": r.message})
                );
            } else {
                println!("{}", r.message);
            }
        }
        Cmd::Node(NodeCmd::Drain { id, .. }) | Cmd::Node(NodeCmd::Undrain { id }) => {
            let (draining, force) = match &cli.command {
                Cmd::Node(NodeCmd::Drain { force, .. }) => (true, *force),
                _ => (false, false),
            };
            let mut stuck = Vec::new();
            if draining {
                let blockers = read(&mut client, &endpoint, &format!("drain:{id}"), false).await?;
                stuck = blockers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        format!(
                            "{} ({})",
                            b["instance"].as_str().unwrap_or("?"),
                            b["reason"].as_str().unwrap_or("no eligible node")
                        )
                    })
                    .collect();
                if !stuck.is_empty() && !force {
                    return Err(Failure {
                        code: 1,
                        message: format!(
                            "node {id} was not drained: {} could run nowhere else: {}. Add capacity or nodes, or drain with --force (they then stay on node {id} until they can move)",
                            if stuck.len() == 1 { "1 instance" } else { "some instances" },
                            stuck.join("; ")
                        ),
                    });
                }
            }
            let status = if draining { "draining" } else { "up" };
            let command = serde_json::json!({"op": "set_node_status", "id": id, "status": status});
            let r = write(&mut client, &endpoint, command).await?;
            if r["ok"] != true {
                return Err(Failure {
                    code: 3,
                    message: r["message"].as_str().unwrap_or("refused").to_string(),
                });
            }
            if json {
                println!("{r}");
            } else if draining && !stuck.is_empty() {
                println!(
                    "node {id} is draining: its instances start elsewhere, then stop here; these stay on node {id} until they can move: {}",
                    stuck.join("; ")
                );
            } else if draining {
                println!("node {id} is draining: its instances start elsewhere, then stop here");
            } else {
                println!("node {id} is back in service");
            }
        }
        Cmd::Events {
            service,
            stale,
            follow,
        } => {
            let events = read(&mut client, &endpoint, "events", *stale).await?;
            print_events(&events, service.as_deref(), json);
            if *follow {
                let mut last = last_seq(&events);
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let events = read(&mut client, &endpoint, "events", *stale).await?;
                    let fresh: Vec<Value> = events
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|e| last.is_none_or(|l| e["seq"].as_u64().is_some_and(|s| s > l)))
                        .cloned()
                        .collect();
                    if !fresh.is_empty() {
                        last = last_seq(&Value::Array(fresh.clone()));
                        output::print_event_lines(&Value::Array(fresh), service.as_deref(), json);
                    }
                }
            }
        }
        Cmd::Kinds => {
            let kinds = read(&mut client, &endpoint, "kinds", false).await?;
            output::print_kinds(&kinds, json);
        }
        Cmd::Svc(cmd) => svc::run(cmd, &mut client, &endpoint, json).await?,
        Cmd::Graph(args) => graph::run(args, &mut client, &endpoint, json).await?,
    }
    Ok(())
}

fn last_seq(events: &Value) -> Option<u64> {
    events
        .as_array()
        .and_then(|a| a.iter().filter_map(|e| e["seq"].as_u64()).max())
}

/// Commit a state-machine command; returns its result (`ok`, `message`).
pub(crate) async fn write(
    client: &mut Client,
    endpoint: &str,
    command: Value,
) -> Result<Value, Failure> {
    let reply = client
        .write(with_request_id(pb::WriteRequest {
            command_json: command.to_string(),
            ..Default::default()
        }))
        .await
        .map_err(|s| Failure::from_status(endpoint, &s))?
        .into_inner();
    decode(endpoint, &reply.response_json)
}

/// A request carrying a fresh request id (`x-mode-request-id`): the cluster applies a write
/// once, however often a node forwards or retries it.
pub(crate) fn with_request_id<T>(message: T) -> tonic::Request<T> {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    let id = format!("modectl-{nanos:x}-{:x}", h.finish());
    let mut req = tonic::Request::new(message);
    if let Ok(v) = id.parse() {
        req.metadata_mut().insert(mode::replication::REQUEST_ID, v);
    }
    req
}

/// Parse a JSON answer from `endpoint`.
fn decode(endpoint: &str, text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| Failure {
        code: 1,
        message: format!("undecodable answer from {endpoint}: {e}"),
    })
}

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // `svc apply`, `graph`, ...: the trace's root span is named after the command.
    let mut command = Vec::new();
    let mut m = &matches;
    while let Some((name, sub)) = m.subcommand() {
        command.push(name);
        m = sub;
    }
    let command = command.join(" ");
    let mut cli = cli;
    if let Cmd::Graph(args) = &cli.command {
        cli.timeout = cli.timeout.max(args.timeout_s());
    }
    // What runs until interrupted traces each step instead (never one endless root span).
    let endless = match &cli.command {
        Cmd::Graph(args) => args.watching(),
        Cmd::Events { follow, .. } => *follow,
        _ => false,
    };
    // One worker thread: the trace exporter sends from its own thread through the runtime.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let traced = mode::telemetry::configured();
    if traced {
        let _in_runtime = rt.enter();
        let log = mode::worker::LogConfig {
            level: Some("warn".to_string()),
            otel_service: Some("modectl".to_string()),
            ..Default::default()
        };
        if let Err(e) = mode::worker::init_logging(&log) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let span = if endless {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            target: mode::telemetry::TARGET,
            "modectl",
            otel.name = %format!("modectl {command}"),
            otel.kind = "client",
            endpoint = %cli.endpoint,
        )
    };
    let outcome = rt.block_on(async {
        let outcome = run(cli).instrument(span).await;
        if traced {
            // A collector that is down must not hold up a CLI for long.
            mode::telemetry::shutdown(Duration::from_secs(1)).await;
        }
        outcome
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
