//! `modectl`: the command-line client of a mode cluster, on the typed `mode.v1.Control` API.
//! Any server can be the endpoint; writes are forwarded to the leader. `--endpoint a,b,c`
//! names several: a call that reaches none of them moves on to the next (see [`conn`]).
//!
//! Exit status: 0 success, 1 other error, 2 usage error (or an invalid spec), 3 not found,
//! 4 cluster unavailable or outcome unknown, 5 compare-and-set conflict (`--expect-generation`
//! did not match the stored generation; nothing was changed), 6 a rollout failed (`--wait`: a
//! new instance failed, the deadline passed, it was reverted or superseded), 7 `--wait` gave
//! up (the rollout goes on), 8 refused: no or bad credentials, or a role that does not allow
//! the call, 130 interrupted (Ctrl-C).

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use mode_proto::v1 as pb;
use serde_json::json;
use tracing::Instrument as _;

#[macro_use]
mod conn;
mod access;
mod convert;
mod events;
mod graph;
mod json;
mod logs;
mod output;
mod plan;
mod svc;

use conn::{new_request_id, with_request_id, Call, Conn};
use json as js;
use output::{print_nodes, print_status};

#[derive(Parser)]
#[command(
    name = "modectl",
    version,
    about = "Control a mode cluster",
    after_help = "Exit status: 0 success, 1 error, 2 usage error or invalid spec, 3 not found, \
4 cluster unavailable or outcome unknown, 5 compare-and-set conflict (--expect-generation \
did not match; nothing was changed), 6 rollout failed (--wait), 7 --wait gave up (the \
rollout goes on), 8 refused (credentials or role), 130 interrupted (Ctrl-C)."
)]
struct Cli {
    /// Servers of the cluster, comma-separated (HOST:PORT or http://HOST:PORT): a call that
    /// cannot reach one tries the next.
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
    #[command(flatten)]
    credentials: access::CredentialArgs,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    /// Tables for people.
    Table,
    /// Tables with more columns (times, epochs, full reasons).
    Wide,
    /// JSON (streams: one object per line).
    Json,
    /// YAML (streams: one document per record).
    Yaml,
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
        /// Keep printing new events as they come (reconnecting when the stream breaks;
        /// NDJSON with `-o json`).
        #[arg(short, long)]
        follow: bool,
        /// Only the last N events (0: every event kept), after the other filters.
        #[arg(long, default_value_t = 0)]
        tail: u32,
        /// Only events of the last DURATION (e.g. 90s, 10m, 2h), by the leader's clock.
        #[arg(long, value_name = "DURATION", value_parser = mode::daemon::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only events about this node.
        #[arg(long, value_name = "ID")]
        node: Option<u64>,
        /// Only events of this kind (e.g. instance-crashed, node-down, spec-applied).
        #[arg(long)]
        kind: Option<String>,
    },
    /// What an instance (`web#0`) or every instance of a service (`web`) wrote to stdout and
    /// stderr (`exec` instances), as the node that runs it keeps it: the current run, or the
    /// one before the last restart (--previous).
    Logs(logs::LogsArgs),
    /// The service kinds the nodes offer.
    Kinds,
    /// The combined beacon graph: cluster → nodes → instances → their service trees, and the
    /// dependencies between services. Unreachable nodes are shown with their error.
    Graph(graph::GraphArgs),
    /// Certificates: the cluster's CA, node and client certificates (local files).
    #[command(subcommand)]
    Tls(access::TlsCmd),
    /// Bearer tokens for automation (admin).
    #[command(subcommand)]
    Token(access::TokenCmd),
    /// Who the cluster takes you for, and your role.
    Whoami,
    /// This modectl's version, and the version of the node that answers.
    Version,
    /// Print a completion script for a shell: `source <(modectl completion bash)`, or write
    /// it where your shell looks (`modectl completion zsh > ~/.zfunc/_modectl`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
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
    /// Remove a node from the cluster. Refused while the node is up or runs instances that
    /// could run on no other node, unless --force (drain it first: `node drain ID --wait`).
    Rm {
        /// Node id.
        id: u64,
        /// Remove it even though it is up (it stops, its instances start elsewhere) or runs
        /// instances that could run nowhere else (they stay unplaced).
        #[arg(long)]
        force: bool,
    },
    /// Move every instance off a node (started elsewhere before stopped here). Refused when
    /// an instance could run nowhere else, unless --force (it then stays on the node).
    Drain {
        /// Node id.
        id: u64,
        /// Drain even if some instances have nowhere else to go.
        #[arg(long)]
        force: bool,
        /// Wait until every instance that can move runs elsewhere (exit 7 after
        /// --wait-timeout, 130 on Ctrl-C; the drain goes on either way).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
    },
    /// Return a drained node to service.
    Undrain {
        /// Node id.
        id: u64,
    },
}

/// A refusal that a `--force` would override says the command that does it: the server says
/// what to do in its API's words.
pub(crate) fn force_hint(mut f: Failure, with_modectl: &str) -> Failure {
    if f.grpc == Some(tonic::Code::FailedPrecondition) && !f.message.contains("--force") {
        f.message = format!("{} (with modectl: {with_modectl})", f.message.trim_end());
    }
    f
}

/// A failure, with the exit status it maps to.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
    /// The gRPC status code it came from, if any.
    pub(crate) grpc: Option<tonic::Code>,
}

impl Failure {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            grpc: None,
        }
    }

    pub(crate) fn from_status(endpoint: &str, status: &tonic::Status) -> Failure {
        let timed_out = conn::is_timeout(status);
        let code = match status.code() {
            _ if timed_out => 4,
            tonic::Code::NotFound => 3,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 4,
            tonic::Code::Aborted => 5,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => 8,
            _ => 1,
        };
        let message = match status.code() {
            tonic::Code::Unavailable if conn::is_connect_error(status) => {
                let cause = conn::root_cause(status);
                match mode::security::tls::connection_hint(&cause) {
                    Some(_) => format!("cannot talk to {endpoint} ({cause})"),
                    None => format!(
                        "no mode node answers at {endpoint} ({cause}): start one with `mode-node`, or point --endpoint / MODE_ENDPOINT at a running node"
                    ),
                }
            }
            tonic::Code::Unimplemented => format!(
                "{endpoint} does not serve this call ({}): is it a mode server of this version?",
                status.message()
            ),
            tonic::Code::DeadlineExceeded => format!("{endpoint} did not answer in time"),
            tonic::Code::Aborted => format!(
                "{} (compare-and-set conflict: nothing was changed; read the current generation with `modectl svc get`)",
                status.message()
            ),
            _ if timed_out => format!(
                "{endpoint} did not answer within --timeout: if this was a change, its outcome is unknown (check with `modectl svc get` or `events`)"
            ),
            _ => status.message().to_string(),
        };
        // A TLS problem says what to do about it, whatever status carried it.
        let cause = format!("{} {}", status.message(), conn::root_cause(status));
        let message = match mode::security::tls::connection_hint(&cause) {
            Some(hint) if !message.contains(hint) => format!("{message}: {hint}"),
            _ => message,
        };
        Failure {
            code,
            message,
            grpc: Some(status.code()),
        }
    }

    /// None of `endpoints` could be reached.
    pub(crate) fn unreachable(endpoints: &[String], last: &tonic::Status) -> Failure {
        let message = if endpoints.len() == 1 {
            return Failure::from_status(&endpoints[0], last);
        } else {
            format!(
                "no mode node answers at any of {} (last: {}): start one with `mode-node`, or point --endpoint / MODE_ENDPOINT at running nodes",
                endpoints.join(", "),
                conn::root_cause(last)
            )
        };
        Failure {
            code: 4,
            message,
            grpc: Some(tonic::Code::Unavailable),
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // A rolling restart answers once every instance runs again: the server bounds each
    // instance's wait (RESTART_WAIT), not --timeout.
    let rolling = matches!(
        &cli.command,
        Cmd::Svc(svc::SvcCmd::Restart { slot: None, .. })
    );
    let timeout = (!rolling).then(|| Duration::from_secs(cli.timeout));
    let json = matches!(cli.output, Format::Json | Format::Yaml);
    output::set_style(cli.output == Format::Yaml, cli.output == Format::Wide);
    if let Cmd::Tls(cmd) = &cli.command {
        return access::tls(cmd, json);
    }
    if let Cmd::Completion { shell } = &cli.command {
        use clap::CommandFactory as _;
        // Written as generated (a script may hold tabs, which `say!` would escape).
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut Cli::command(), "modectl", &mut script);
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        return match out.write_all(&script).and_then(|()| out.flush()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure {
                code: 1,
                message: format!("writing to stdout: {e}"),
                grpc: None,
            }),
            _ => Ok(()),
        };
    }
    let credentials = cli.credentials.credentials()?;
    let mut conn = Conn::new(&cli.endpoint, timeout, &credentials)?;
    match &cli.command {
        Cmd::Cluster(ClusterCmd::Status { local }) => {
            let local = *local;
            let reply = rpc!(
                conn,
                Call::Read,
                cluster_status,
                pb::ClusterStatusRequest { local }
            )
            .await?;
            print_status(&reply, json);
        }
        Cmd::Cluster(ClusterCmd::Compact) => {
            let r = rpc!(conn, Call::WriteOnce, compact, pb::CompactRequest {}).await?;
            if json {
                js::line(
                    &json!({"snapshot_index": r.snapshot_index, "purged_index": r.purged_index}),
                );
            } else {
                say!(
                    "snapshot at index {}, log purged up to {}",
                    r.snapshot_index,
                    r.purged_index
                );
            }
        }
        Cmd::Node(NodeCmd::Ls { stale }) => {
            let stale = *stale;
            let reply = rpc!(conn, Call::Read, list_nodes, pb::ListNodesRequest { stale }).await?;
            print_nodes(&reply, json);
        }
        Cmd::Node(NodeCmd::Rm { id, force }) => {
            let (id, force) = (*id, *force);
            let request_id = new_request_id();
            let r = rpc!(
                conn,
                Call::WriteOnce,
                remove_node,
                with_request_id(pb::RemoveNodeRequest { id, force }, &request_id)
            )
            .await
            .map_err(|f| {
                force_hint(
                    f,
                    &format!("`modectl node drain {id} --wait`, then `modectl node rm {id}`; or `modectl node rm {id} --force`"),
                )
            })?;
            if json {
                js::line(&json!({"removed": id, "message": r.message}));
            } else {
                say!("{}", r.message);
            }
        }
        Cmd::Node(NodeCmd::Drain {
            id,
            force,
            wait,
            wait_timeout,
        }) => {
            let (id, force) = (*id, *force);
            let request_id = new_request_id();
            let r = rpc!(
                conn,
                Call::Write,
                drain_node,
                with_request_id(
                    pb::DrainNodeRequest {
                        id,
                        force,
                        request_id: request_id.clone(),
                    },
                    &request_id,
                )
            )
            .await
            .map_err(|f| force_hint(f, &format!("`modectl node drain {id} --force`")))?;
            if json {
                js::line(
                    &json!({"node": id, "draining": true, "message": r.message, "stranded": r.stranded}),
                );
            } else if !r.stranded.is_empty() {
                say!(
                    "node {id} is draining: its instances start elsewhere, then stop here; these stay on node {id} until they can move: {}",
                    r.stranded.join("; ")
                );
            } else {
                say!("node {id} is draining: its instances start elsewhere, then stop here");
            }
            if *wait {
                let stranded: Vec<String> = r
                    .stranded
                    .iter()
                    .map(|s| s.split(':').next().unwrap_or_default().to_string())
                    .collect();
                svc::wait_drained(
                    &mut conn,
                    id,
                    &stranded,
                    Duration::from_secs(*wait_timeout),
                    json,
                )
                .await?;
            }
        }
        Cmd::Node(NodeCmd::Undrain { id }) => {
            let id = *id;
            let request_id = new_request_id();
            let r = rpc!(
                conn,
                Call::Write,
                undrain_node,
                with_request_id(
                    pb::UndrainNodeRequest {
                        id,
                        request_id: request_id.clone(),
                    },
                    &request_id,
                )
            )
            .await?;
            if json {
                js::line(&json!({"node": id, "draining": false, "message": r.message}));
            } else {
                say!("node {id} is back in service");
            }
        }
        Cmd::Events {
            service,
            stale,
            follow,
            tail,
            since,
            node,
            kind,
        } => {
            let args = events::EventsArgs {
                service: service.clone().unwrap_or_default(),
                stale: *stale,
                tail: *tail,
                filter: events::Filter::new(*since, *node, kind.clone()),
            };
            if *follow {
                events::follow(&mut conn, &args, json).await?;
            } else {
                events::list(&mut conn, &args, json).await?;
            }
        }
        Cmd::Logs(args) => logs::run(args, &mut conn, json).await?,
        Cmd::Kinds => {
            let reply = rpc!(conn, Call::Read, list_kinds, pb::ListKindsRequest {}).await?;
            output::print_kinds(&reply, json);
        }
        Cmd::Svc(cmd) => svc::run(cmd, &mut conn, json).await?,
        Cmd::Graph(args) => graph::run(args, &mut conn, json).await?,
        Cmd::Token(cmd) => access::token(cmd, &mut conn, json).await?,
        Cmd::Whoami => access::whoami(&mut conn, json).await?,
        Cmd::Version => {
            let client = env!("CARGO_PKG_VERSION");
            let answer = rpc!(
                conn,
                Call::Read,
                cluster_status,
                pb::ClusterStatusRequest { local: true }
            )
            .await;
            match answer {
                Ok(s) => {
                    let server = if s.version.is_empty() {
                        "unknown (a build older than 0.1.0's version field)".to_string()
                    } else {
                        s.version.clone()
                    };
                    if json {
                        js::line(
                            &json!({"client": client, "server": {"node": s.answered_by, "endpoint": conn.endpoint(), "version": server}}),
                        );
                    } else {
                        say!("client: modectl {client}");
                        say!(
                            "server: mode-node {server} (node {}, {})",
                            s.answered_by,
                            conn.endpoint()
                        );
                    }
                }
                Err(f) => {
                    say!("client: modectl {client}");
                    return Err(f);
                }
            }
        }
        Cmd::Tls(_) | Cmd::Completion { .. } => {
            unreachable!("answered above without a connection")
        }
    }
    Ok(())
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
        Cmd::Logs(args) => args.follow,
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
            otel_no_retry: true,
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
            say_err!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
