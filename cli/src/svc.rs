//! `modectl svc`: apply specs, list and inspect services, scale, rolling restart, remove.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use clap::Subcommand;
use mode_proto::v1 as pb;
use serde_json::json;

use crate::conn::{new_request_id, with_request_id, Call, Conn};
use crate::convert::{spec_to_proto, wanted};
use crate::output::{printable, table, Breaks};
use crate::{json as js, Failure};

#[derive(Subcommand)]
pub(crate) enum SvcCmd {
    /// Validate and store the specs in a YAML or JSON file (one spec, a list, or documents),
    /// all or none.
    Apply {
        /// The spec file; `-` reads standard input, a directory its *.yaml, *.yml and *.json
        /// files. Repeatable: every spec of every file is applied at once (all or nothing).
        #[arg(short = 'f', long = "file", required = true)]
        file: Vec<std::path::PathBuf>,
        /// Validate against the cluster and print what would change, storing nothing.
        #[arg(long)]
        dry_run: bool,
        /// Compare-and-set: store only if service NAME has generation GEN now (0: it must not
        /// exist yet). Repeatable. A mismatch stores nothing and exits with status 5.
        #[arg(long = "expect-generation", value_name = "NAME=GEN", value_parser = parse_expectation)]
        expect_generation: Vec<(String, u64)>,
        /// Follow the new version's rollout until every instance runs it and is available
        /// (healthy, with a health check), or fail with the failing instance's reason (exit 6).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this many seconds (exit 7; the rollout goes on).
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
    },
    /// What applying a file would change, field by field, and where instances would be
    /// placed or replaced; stores nothing.
    #[command(alias = "diff")]
    Plan {
        /// The spec file; `-`, a directory, and repeated -f as for `apply`.
        #[arg(short = 'f', long = "file", required = true)]
        file: Vec<std::path::PathBuf>,
    },
    /// The kept versions of a service, oldest first, with how each rolled out.
    History {
        /// Service name.
        name: String,
    },
    /// Store an earlier version of a service again (as a new generation, rolled out under its
    /// update policy).
    Rollback {
        /// Service name.
        name: String,
        /// The version (generation) to restore; default: the newest earlier one that rolled
        /// out completely.
        #[arg(long = "to", value_name = "GENERATION")]
        to: Option<u64>,
        /// Follow the rollout (as `apply --wait`).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this many seconds (exit 7).
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
    },
    /// List services.
    Ls,
    /// A service's instances: nodes, states, restart counts, last crash reasons.
    Get {
        /// Service name.
        name: String,
        /// Also its recent events (a describe).
        #[arg(long)]
        events: bool,
    },
    /// Change the number of instances.
    Scale {
        /// Service name.
        name: String,
        /// Instances wanted.
        replicas: u32,
        /// Compare-and-set: scale only if the service has this generation now (exit status 5
        /// otherwise).
        #[arg(long, value_name = "GEN")]
        expect_generation: Option<u64>,
        /// Follow until every wanted instance runs and is available (as `apply --wait`).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this many seconds (exit 7).
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
        /// Scale up even though the cluster cannot place every new instance (they wait,
        /// unplaced, until capacity is added).
        #[arg(long)]
        force: bool,
    },
    /// Restart every instance, one at a time, each once the previous one runs again (or only
    /// one instance with --slot).
    Restart {
        /// Service name.
        name: String,
        /// Only this instance.
        #[arg(long)]
        slot: Option<u32>,
    },
    /// Remove a service. Refused while other services depend on it, unless --force (they
    /// stop first).
    Rm {
        /// Service name.
        name: String,
        /// Remove it even though other services depend on it.
        #[arg(long)]
        force: bool,
        /// Wait until it is gone.
        #[arg(long)]
        wait: bool,
    },
}

fn parse_expectation(s: &str) -> Result<(String, u64), String> {
    let (name, generation) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': write NAME=GENERATION, e.g. web=3"))?;
    let generation = generation
        .parse()
        .map_err(|_| format!("'{s}': the generation must be a whole number, e.g. web=3"))?;
    Ok((name.to_string(), generation))
}

pub(crate) fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure::new(code, message)
}

/// Read and check a spec file as `apply` sends it: its name and specs.
/// The files `-f` names: `-` (standard input) and files as they are, a directory as its
/// `*.yaml`, `*.yml` and `*.json` files in name order (not its subdirectories).
fn spec_files(given: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>, Failure> {
    let mut files = Vec::new();
    for path in given {
        if path.as_os_str() == "-" || !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let listed = std::fs::read_dir(path)
            .map_err(|e| fail(2, format!("cannot read directory {}: {e}", path.display())))?;
        let mut found: Vec<std::path::PathBuf> = listed
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
            })
            .collect();
        if found.is_empty() {
            return Err(fail(
                2,
                format!(
                    "{}: a directory with no *.yaml, *.yml or *.json files",
                    path.display()
                ),
            ));
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// Read and check the specs of every file `-f` names, as one apply: the files' names joined,
/// and all their specs (a service in two files is refused).
pub(crate) fn read_specs(
    given: &[std::path::PathBuf],
) -> Result<(String, Vec<mode::model::spec::ServiceSpec>), Failure> {
    let limit = mode::model::limits::MAX_REQUEST_BYTES;
    let mut names = Vec::new();
    let mut all: Vec<mode::model::spec::ServiceSpec> = Vec::new();
    let mut from: std::collections::HashMap<String, String> = Default::default();
    let mut total = 0usize;
    let mut stdin_read = false;
    for file in spec_files(given)? {
        let stdin = file.as_os_str() == "-";
        let file_name = if stdin {
            if std::mem::replace(&mut stdin_read, true) {
                return Err(fail(2, "-f - is given twice: standard input is read once"));
            }
            "(stdin)".to_string()
        } else {
            file.display().to_string()
        };
        let cannot_read = |e: std::io::Error| fail(2, format!("cannot read {file_name}: {e}"));
        let over = |size: usize| {
            let what = if names.is_empty() {
                format!("the file is {size} bytes")
            } else {
                format!("with the files before it, the specs come to {size} bytes")
            };
            fail(
                2,
                format!(
                    "{file_name}: {what}, over the limit of {limit} bytes for one apply (and a spec is at most {} bytes): split it",
                    mode::model::limits::MAX_SPEC_BYTES
                ),
            )
        };
        if !stdin {
            // Before reading it: a file far over the limit is refused without loading it.
            let size = std::fs::metadata(&file).map_err(cannot_read)?.len() as usize;
            if total + size > limit {
                return Err(over(total + size));
            }
        }
        let text = if stdin {
            use std::io::Read as _;
            let mut text = String::new();
            std::io::stdin()
                .take(limit as u64 + 1)
                .read_to_string(&mut text)
                .map_err(cannot_read)?;
            text
        } else {
            std::fs::read_to_string(&file).map_err(cannot_read)?
        };
        total += text.len();
        if total > limit {
            return Err(over(total));
        }
        let specs = mode::model::spec::parse_specs(&file_name, &text)
            .map_err(|e| fail(2, e.to_string()))?;
        for spec in specs {
            if let Some(at) = mode::api::convert::inexact_number(&spec.config, "config") {
                return Err(fail(
                    2,
                    format!(
                        "{file_name}: spec '{}': {at} is an integer beyond 2^53, which the API's JSON config (a protobuf Struct of doubles) cannot carry exactly: write it as a string",
                        spec.name
                    ),
                ));
            }
            if let Some(first) = from.insert(spec.name.clone(), file_name.clone()) {
                let whence = if first == file_name {
                    format!("twice in {file_name}")
                } else {
                    format!("in both {first} and {file_name}")
                };
                return Err(fail(
                    2,
                    format!("service '{}' is {whence}: keep one", spec.name),
                ));
            }
            all.push(spec);
        }
        names.push(file_name);
    }
    Ok((names.join(", "), all))
}

/// Exit status of a rollout that failed (an instance failed, the deadline passed, it was
/// reverted or superseded).
pub(crate) const EXIT_ROLLOUT_FAILED: u8 = 6;
/// Exit status of a `--wait` that gave up (the rollout goes on).
pub(crate) const EXIT_WAIT_TIMEOUT: u8 = 7;
/// Exit status after Ctrl-C (as a shell reports SIGINT).
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// How long to wait for a service (a rolling restart, a removal).
const SERVICE_WAIT: Duration = Duration::from_secs(60);

async fn get(conn: &mut Conn, name: &str) -> Result<pb::Service, Failure> {
    rpc!(
        conn,
        Call::Read,
        get_service,
        pb::GetServiceRequest {
            name: name.to_string(),
            stale: false,
        }
    )
    .await
}

pub(crate) async fn run(cmd: &SvcCmd, conn: &mut Conn, json: bool) -> Result<(), Failure> {
    match cmd {
        SvcCmd::Apply {
            file,
            dry_run,
            expect_generation,
            wait,
            wait_timeout,
        } => {
            let (file_name, specs) = read_specs(file)?;
            let specs: Vec<pb::ServiceSpec> = specs.iter().map(spec_to_proto).collect();
            let expected: std::collections::HashMap<String, u64> =
                expect_generation.iter().cloned().collect();
            let request_id = new_request_id();
            let reply = rpc!(
                conn,
                Call::Write,
                apply_services,
                with_request_id(
                    pb::ApplyServicesRequest {
                        specs: specs.clone(),
                        file: file_name.clone(),
                        expected_generations: expected.clone(),
                        dry_run: *dry_run,
                        request_id: request_id.clone(),
                        ..Default::default()
                    },
                    &request_id,
                )
            )
            .await
            .map_err(|f| {
                // An invalid file is the user's to fix, like a file that does not parse.
                if f.grpc == Some(tonic::Code::InvalidArgument) {
                    Failure { code: 2, ..f }
                } else {
                    f
                }
            })?;
            if !json {
                print_changes(&reply);
            }
            if *wait && !dry_run {
                let mut out = js::apply(&reply);
                let targets: Vec<(String, u64)> = reply
                    .changes
                    .iter()
                    .map(|c| (c.name.clone(), c.generation))
                    .collect();
                let rollouts =
                    wait_rollouts(conn, &targets, Duration::from_secs(*wait_timeout), json).await?;
                if json {
                    out["rollouts"] = json!(rollouts.iter().map(js::rollout).collect::<Vec<_>>());
                    js::print(&out);
                }
            } else if json {
                js::print(&js::apply(&reply));
            }
        }
        SvcCmd::Plan { file } => crate::plan::run(conn, file, json).await?,
        SvcCmd::History { name } => history(conn, name, json).await?,
        SvcCmd::Rollback {
            name,
            to,
            wait,
            wait_timeout,
        } => {
            let request_id = new_request_id();
            let reply = rpc!(
                conn,
                Call::Write,
                rollback_service,
                with_request_id(
                    pb::RollbackServiceRequest {
                        name: name.clone(),
                        to_generation: to.unwrap_or(0),
                        expected_generation: 0,
                        request_id: request_id.clone(),
                    },
                    &request_id,
                )
            )
            .await?;
            if !json {
                say!("{}", reply.message);
            }
            let mut out = json!({
                "service": name,
                "generation": reply.generation,
                "restored": reply.restored,
                "message": reply.message,
            });
            if *wait {
                let targets = [(name.clone(), reply.generation)];
                let rollouts =
                    wait_rollouts(conn, &targets, Duration::from_secs(*wait_timeout), json).await?;
                out["rollout"] = rollouts.first().map(js::rollout).unwrap_or_default();
            }
            if json {
                js::print(&out);
            }
        }
        SvcCmd::Ls => {
            let reply = rpc!(
                conn,
                Call::Read,
                list_services,
                // The table shows counts only: no instance crosses the wire for it (JSON
                // keeps every instance, as scripts read them).
                pb::ListServicesRequest {
                    stale: false,
                    summary: !json
                }
            )
            .await?;
            if json {
                js::print(&js::services(&reply));
                return Ok(());
            }
            let wide = crate::output::wide();
            let rows: Vec<Vec<String>> = reply
                .services
                .iter()
                .filter_map(|s| {
                    let spec = s.spec.as_ref()?;
                    // Since it was created: moves and scaling down do not lower it.
                    let restarts = s.restarts_total;
                    let mut row = vec![
                        spec.name.clone(),
                        spec.kind.clone(),
                        format!("{}/{}", s.running, wanted(spec)),
                        restarts.to_string(),
                        spec.generation.to_string(),
                    ];
                    if wide {
                        row.extend([
                            if spec.singleton { "yes" } else { "-" }.to_string(),
                            if spec.depends_on.is_empty() {
                                "-".to_string()
                            } else {
                                spec.depends_on.join(",")
                            },
                            match s.unplaced {
                                0 => "-".to_string(),
                                n => format!("{n}: {}", s.unplaced_reason),
                            },
                        ]);
                    }
                    Some(row)
                })
                .collect();
            let mut header = vec!["NAME", "KIND", "RUNNING", "RESTARTS", "GENERATION"];
            if wide {
                header.extend(["SINGLETON", "DEPENDS ON", "UNPLACED"]);
            }
            table(&header, &rows);
        }
        SvcCmd::Get { name, events } => {
            let service = get(conn, name).await?;
            if json {
                js::print(&js::service(&service));
                return Ok(());
            }
            let spec = service.spec.clone().unwrap_or_default();
            say!(
                "service {name}: kind {}, generation {}{}",
                spec.kind,
                spec.generation,
                if service.deleting {
                    " (being removed)"
                } else {
                    ""
                }
            );
            if let Some(r) = &service.rollout {
                say!("rollout: {}", describe_rollout(r));
            }
            print_instances(name, &service, wanted(&spec));
            if *events {
                let reply = rpc!(
                    conn,
                    Call::Read,
                    list_events,
                    pb::ListEventsRequest {
                        service: name.clone(),
                        tail: SERVICE_EVENTS,
                        ..Default::default()
                    }
                )
                .await?;
                say!("");
                say!("events (the last {SERVICE_EVENTS}):");
                crate::output::print_events(&reply.events, false);
            }
        }
        SvcCmd::Scale {
            name,
            replicas,
            expect_generation,
            wait,
            wait_timeout,
            force,
        } => {
            let request_id = new_request_id();
            let reply = rpc!(
                conn,
                Call::Write,
                scale_service,
                with_request_id(
                    pb::ScaleServiceRequest {
                        name: name.clone(),
                        replicas: *replicas,
                        expected_generation: expect_generation.unwrap_or(0),
                        request_id: request_id.clone(),
                        force: *force,
                    },
                    &request_id,
                )
            )
            .await
            .map_err(|f| {
                // Scaling a singleton is asking for the impossible: a usage error.
                if f.grpc == Some(tonic::Code::InvalidArgument)
                    || f.grpc == Some(tonic::Code::FailedPrecondition)
                        && f.message.contains("singleton")
                {
                    Failure { code: 2, ..f }
                } else {
                    crate::force_hint(f, &format!("`modectl svc scale {name} {replicas} --force`"))
                }
            })?;
            if json {
                let mut out = json!({"service": name, "replicas": replicas, "generation": reply.generation, "message": reply.message});
                if *wait {
                    let targets = [(name.clone(), reply.generation)];
                    let rollouts =
                        wait_rollouts(conn, &targets, Duration::from_secs(*wait_timeout), true)
                            .await?;
                    out["rollout"] = rollouts.first().map(js::rollout).unwrap_or_default();
                }
                js::line(&out);
            } else {
                if reply.message.is_empty() {
                    say!(
                        "service '{name}' scaled to {replicas} replicas (generation {})",
                        reply.generation
                    );
                } else {
                    say!("{}", reply.message);
                }
                if *wait {
                    let targets = [(name.clone(), reply.generation)];
                    wait_rollouts(conn, &targets, Duration::from_secs(*wait_timeout), false)
                        .await?;
                }
            }
        }
        SvcCmd::Restart { name, slot } => restart(conn, name, *slot, json).await?,
        SvcCmd::Rm { name, wait, force } => {
            let request_id = new_request_id();
            let reply = rpc!(
                conn,
                Call::Write,
                delete_service,
                with_request_id(
                    pb::DeleteServiceRequest {
                        name: name.clone(),
                        force: *force,
                        request_id: request_id.clone(),
                    },
                    &request_id,
                )
            )
            .await?;
            if *wait {
                wait_gone(conn, name).await?;
            }
            if json {
                js::line(&json!({"removed": name, "message": reply.message}));
            } else {
                say!("{}", reply.message);
            }
        }
    }
    Ok(())
}

fn print_changes(reply: &pb::ApplyServicesReply) {
    for c in &reply.changes {
        let line = if c.message.is_empty() {
            let verb = if reply.dry_run { "would be" } else { "was" };
            let changed = if c.changed_fields.is_empty() {
                String::new()
            } else {
                format!("; changed: {}", c.changed_fields.join(", "))
            };
            format!(
                "service '{}' {verb} {} (generation {}){changed}",
                c.name, c.action, c.generation
            )
        } else {
            c.message.clone()
        };
        let prefix = if reply.dry_run && !c.message.starts_with("dry run") {
            "dry run: "
        } else {
            ""
        };
        say!("{prefix}{line}");
    }
    if reply.dry_run {
        say!("dry run: nothing was stored");
    }
}

/// Instances in state `running`.
/// Events `svc get --events` shows.
const SERVICE_EVENTS: u32 = 10;

/// Unplaced instances listed one by one at most (then counted).
const UNPLACED_ROWS: usize = 10;

/// `svc get`'s table: every instance with what it does, restarts, age and last crash, then
/// the instances that could not be placed (and why), and what the others wait for.
fn print_instances(name: &str, service: &pb::Service, wanted: u32) {
    let wide = crate::output::wide();
    let now = mode::replication::now_ms();
    let mut rows: Vec<Vec<String>> = service
        .instances
        .iter()
        .map(|i| {
            let status = if i.status.is_empty() {
                &i.state
            } else {
                &i.status
            };
            let mut row = vec![
                format!("{name}#{}", i.slot),
                i.node.to_string(),
                status.clone(),
                if i.health.is_empty() {
                    "-".to_string()
                } else {
                    i.health.clone()
                },
                restarts(i),
                match i.running_since_ms {
                    0 => "-".to_string(),
                    since => crate::convert::age(now.saturating_sub(since)),
                },
                i.generation.to_string(),
                last_crash(i, now),
            ];
            if wide {
                row.insert(7, i.epoch.to_string());
                row.push(if i.waiting_for.is_empty() {
                    "-".to_string()
                } else {
                    i.waiting_for.clone()
                });
            }
            row
        })
        .collect();
    let placed: BTreeSet<u32> = service.instances.iter().map(|i| i.slot).collect();
    let missing: Vec<u32> = (0..wanted).filter(|slot| !placed.contains(slot)).collect();
    for slot in missing.iter().take(UNPLACED_ROWS) {
        let mut row = vec![format!("{name}#{slot}"), "-".into(), "unplaced".into()];
        row.extend(std::iter::repeat_n("-".to_string(), 4));
        row.push(String::new());
        if wide {
            row.insert(7, "-".into());
            row.push(service.unplaced_reason.clone());
        }
        rows.push(row);
    }
    let mut header = vec![
        "INSTANCE",
        "NODE",
        "STATUS",
        "HEALTH",
        "RESTARTS",
        "AGE",
        "GENERATION",
        "LAST CRASH",
    ];
    if wide {
        header.insert(7, "EPOCH");
        header.push("WAITING FOR");
    }
    table(&header, &rows);
    if missing.len() > UNPLACED_ROWS {
        say!("… and {} more unplaced", missing.len() - UNPLACED_ROWS);
    }
    if service.unplaced > 0 && !service.deleting {
        say!(
            "unplaced: {} of {} instance{} could not be placed: {}",
            service.unplaced,
            wanted,
            if wanted == 1 { "" } else { "s" },
            printable(&service.unplaced_reason, Breaks::Escape)
        );
    }
    if !wide {
        for i in service
            .instances
            .iter()
            .filter(|i| !i.waiting_for.is_empty())
        {
            say!(
                "{name}#{} waits for {}",
                i.slot,
                printable(&i.waiting_for, Breaks::Escape)
            );
        }
    }
}

/// Restarts in total, across moves (each move after an escalated crash counts one), and the
/// moves: `4`, `4 (1 move)`.
fn restarts(i: &pb::Instance) -> String {
    let total = i.restarts_total.max(i.restart_count);
    match i.reschedules {
        0 => total.to_string(),
        1 => format!("{total} (1 move)"),
        n => format!("{total} ({n} moves)"),
    }
}

/// `12s ago, generation 3: exit status 1 (last stderr line: boom)`.
fn last_crash(i: &pb::Instance, now: u64) -> String {
    if i.last_crash.is_empty() {
        return String::new();
    }
    let reason = i.last_crash.clone();
    match i.last_crash_ms {
        0 => reason,
        at => format!(
            "{} ago, generation {}: {reason}",
            crate::convert::age(now.saturating_sub(at)),
            i.last_crash_generation
        ),
    }
}

/// Follow `name` (WatchService) until `done` holds for it; a broken stream is reopened (on the
/// next endpoint if this one is gone). `None` when the service is gone.
async fn follow_service(
    conn: &mut Conn,
    name: &str,
    deadline: Instant,
    mut done: impl FnMut(&pb::Service) -> Result<bool, Failure>,
) -> Result<Option<pb::Service>, Failure> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let opened = tokio::time::timeout(
            left,
            rpc!(
                conn,
                Call::Read,
                watch_service,
                pb::WatchServiceRequest {
                    name: name.to_string(),
                }
            ),
        )
        .await;
        let mut stream = match opened {
            Err(_) => return Err(fail(4, format!("gave up waiting for '{name}'"))),
            Ok(Err(f)) if f.code == 3 => return Ok(None),
            Ok(Err(f)) => return Err(f),
            Ok(Ok(s)) => s,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.message()).await {
                Err(_) => return Err(fail(4, format!("gave up waiting for '{name}'"))),
                Ok(Ok(Some(service))) => {
                    if done(&service)? {
                        return Ok(Some(service));
                    }
                }
                // The service is gone.
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => return Ok(None),
                Ok(Err(s)) => {
                    say_err!(
                        "warning: the watch of '{name}' broke ({}); reconnecting",
                        s.message()
                    );
                    conn.rotate();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

/// Rolling restart: ask, then follow the service until every slot asked has been restarted
/// (a newer epoch) and runs again.
async fn restart(
    conn: &mut Conn,
    name: &str,
    slot: Option<u32>,
    json: bool,
) -> Result<(), Failure> {
    let before: BTreeMap<u32, u64> = get(conn, name)
        .await?
        .instances
        .iter()
        .map(|i| (i.slot, i.epoch))
        .collect();
    let request_id = new_request_id();
    let reply = rpc!(
        conn,
        Call::Write,
        restart_service,
        with_request_id(
            pb::RestartServiceRequest {
                name: name.to_string(),
                slot,
                request_id: request_id.clone(),
            },
            &request_id,
        )
    )
    .await?;
    let asked: BTreeSet<u32> = reply.slots.iter().copied().collect();
    let mut announced = BTreeSet::new();
    let mut restarted = BTreeSet::new();
    let deadline = Instant::now() + SERVICE_WAIT * (asked.len().max(1) as u32);
    let followed = follow_service(conn, name, deadline, |s| {
        for i in &s.instances {
            if !asked.contains(&i.slot) {
                continue;
            }
            let newer = before.get(&i.slot).is_none_or(|e| i.epoch > *e);
            if newer && announced.insert(i.slot) && !json {
                say!("restarting {name}#{}...", i.slot);
            }
            // With a health check, running is not enough: it must pass again.
            let checked = s.spec.as_ref().is_some_and(|sp| sp.health.is_some());
            let healthy = if checked {
                i.health == "healthy"
            } else {
                i.health != "unhealthy"
            };
            if newer && i.state == "running" && healthy {
                restarted.insert(i.slot);
            }
            if newer && i.state == "failed" {
                return Err(fail(
                    EXIT_ROLLOUT_FAILED,
                    format!(
                        "{name}#{} failed on node {} after its restart: {}",
                        i.slot,
                        i.node,
                        if i.last_crash.is_empty() {
                            "unknown reason"
                        } else {
                            &i.last_crash
                        }
                    ),
                ));
            }
        }
        Ok(restarted.len() == asked.len())
    });
    let followed = tokio::select! {
        r = followed => r,
        _ = tokio::signal::ctrl_c() => {
            return Err(fail(
                EXIT_INTERRUPTED,
                format!("interrupted: stopped waiting; instances asked to restart restart anyway (follow them with `modectl svc get {name}`)"),
            ));
        }
    };
    let finished = followed.map_err(|f| {
        if f.code == 4 && f.message.starts_with("gave up") {
            fail(
                EXIT_WAIT_TIMEOUT,
                format!(
                    "{name} was not restarted in time: {} of {} instances run again",
                    restarted.len(),
                    asked.len()
                ),
            )
        } else {
            f
        }
    })?;
    if finished.is_none() {
        return Err(fail(3, format!("'{name}' was removed during its restart")));
    }
    if json {
        js::line(&json!({"service": name, "restarted": reply.slots}));
    } else {
        say!("{name} restarted");
    }
    Ok(())
}

/// Wait until `name` no longer exists.
async fn wait_gone(conn: &mut Conn, name: &str) -> Result<(), Failure> {
    let deadline = Instant::now() + SERVICE_WAIT;
    match follow_service(conn, name, deadline, |_| Ok(false)).await {
        Ok(_) => Ok(()),
        Err(f) if f.code == 4 => Err(fail(
            1,
            format!(
                "'{name}' was not removed within {}s",
                SERVICE_WAIT.as_secs()
            ),
        )),
        Err(f) => Err(f),
    }
}

/// One line about a rollout: `generation 5 rolling: 2/3 updated, 1/3 available`.
pub(crate) fn describe_rollout(r: &pb::Rollout) -> String {
    let mut line = format!(
        "generation {} {}: {}/{} updated, {}/{} available",
        r.generation, r.status, r.updated, r.wanted, r.available, r.wanted
    );
    if !r.reason.is_empty() {
        line.push_str(&format!(" ({})", r.reason));
    }
    if !r.unplaced.is_empty() {
        line.push_str(&format!("; {}", r.unplaced));
    }
    line
}

/// How one followed rollout stands.
enum Verdict {
    Rolling(String),
    Done(pb::Rollout),
    Failed(String),
}

/// What service `s` says about the rollout of its version `generation`.
fn verdict(name: &str, generation: u64, s: &pb::Service) -> Verdict {
    let spec = s.spec.clone().unwrap_or_default();
    let Some(r) = s.rollout.clone() else {
        // Stored before versions were kept: every instance running is all there is to know.
        let (running, wanted) = (s.running, wanted(&spec));
        return if running >= wanted {
            Verdict::Done(pb::Rollout {
                generation: spec.generation,
                status: "succeeded".into(),
                wanted,
                updated: wanted,
                available: running,
                ..Default::default()
            })
        } else {
            Verdict::Rolling(format!("{name} {running}/{wanted} running"))
        };
    };
    if r.generation > generation {
        return Verdict::Failed(if r.revert_of == generation {
            format!(
                "{name}: the rollout of generation {generation} failed and was reverted: {}",
                r.change
            )
        } else {
            format!(
                "{name}: generation {generation} was superseded by generation {} ({}) before it rolled out",
                r.generation, r.change
            )
        });
    }
    if r.generation < generation {
        // The answering replica has not applied the change yet.
        return Verdict::Rolling(format!("{name}: waiting for generation {generation}"));
    }
    match r.status.as_str() {
        "succeeded" => Verdict::Done(r),
        "rolling" if !r.unplaced.is_empty() => {
            Verdict::Failed(format!("{name} generation {generation}: {}", r.unplaced))
        }
        "rolling" => Verdict::Rolling(format!("{name} {}", describe_rollout(&r))),
        _ => Verdict::Failed(format!(
            "{name}: the rollout of generation {generation} {}: {}",
            r.status,
            if r.reason.is_empty() {
                "no reason given"
            } else {
                &r.reason
            }
        )),
    }
}

/// Progress on a terminal: one line rewritten in place; piped: a line per change.
struct ProgressView {
    terminal: bool,
    quiet: bool,
    last: String,
}

impl ProgressView {
    fn new(quiet: bool) -> Self {
        use std::io::IsTerminal as _;
        ProgressView {
            terminal: std::io::stdout().is_terminal(),
            quiet,
            last: String::new(),
        }
    }

    fn show(&mut self, line: String) {
        if self.quiet || line == self.last {
            return;
        }
        if self.terminal {
            // Written in place, past `say`: made printable here (it holds the cluster's text).
            let line = printable(&line, Breaks::Escape);
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K{line}");
            let _ = out.flush();
        } else {
            say!("{line}");
        }
        self.last = line;
    }

    fn end(&mut self) {
        if self.terminal && !self.quiet && !self.last.is_empty() {
            say!("");
        }
        self.last.clear();
    }
}

/// `--wait`: follow each service's version (name, generation) until its rollout succeeded —
/// every wanted instance runs that version and is available — or fail: exit 6 when it failed
/// (with the failing instance's reason), was reverted or superseded, 7 when `timeout` passed,
/// 130 on Ctrl-C (the rollout goes on in the cluster either way).
pub(crate) async fn wait_rollouts(
    conn: &mut Conn,
    targets: &[(String, u64)],
    timeout: Duration,
    json: bool,
) -> Result<Vec<pb::Rollout>, Failure> {
    let deadline = Instant::now() + timeout;
    let mut view = ProgressView::new(json);
    let mut done = Vec::new();
    for (name, generation) in targets {
        let mut outcome: Option<Result<pb::Rollout, Failure>> = None;
        let mut last = String::new();
        let followed = follow_service(conn, name, deadline, |s| {
            match verdict(name, *generation, s) {
                Verdict::Rolling(line) => {
                    last = line.clone();
                    view.show(line);
                    return Ok(false);
                }
                Verdict::Done(r) => outcome = Some(Ok(r)),
                Verdict::Failed(why) => outcome = Some(Err(fail(EXIT_ROLLOUT_FAILED, why))),
            }
            Ok(true)
        });
        let result = tokio::select! {
            r = followed => r,
            _ = tokio::signal::ctrl_c() => {
                view.end();
                return Err(fail(
                    EXIT_INTERRUPTED,
                    format!("interrupted: stopped waiting, but the rollout of {name} generation {generation} goes on in the cluster (follow it with `modectl svc get {name}`)"),
                ));
            }
        };
        view.end();
        match result {
            Ok(Some(_)) => {
                match outcome {
                    Some(Ok(r)) => {
                        if !json {
                            say!("{name}: generation {generation} rolled out ({} instances available)", r.available);
                        }
                        done.push(r);
                    }
                    Some(Err(f)) => return Err(f),
                    None => return Err(fail(1, format!("lost track of '{name}'"))),
                }
            }
            Ok(None) => {
                return Err(fail(
                    3,
                    format!("'{name}' was removed while waiting for it"),
                ))
            }
            Err(f) if f.code == 4 && f.message.starts_with("gave up") => {
                return Err(fail(
                    EXIT_WAIT_TIMEOUT,
                    format!(
                        "gave up waiting after {}s; the rollout goes on in the cluster: {}",
                        timeout.as_secs(),
                        if last.is_empty() {
                            "no progress seen".to_string()
                        } else {
                            last
                        }
                    ),
                ))
            }
            Err(f) => return Err(f),
        }
    }
    Ok(done)
}

/// `node drain --wait`: until no instance but the `stranded` ones (`web#2`) is on node `id`
/// or moving away from it (a moved instance is released once it runs on its new node).
pub(crate) async fn wait_drained(
    conn: &mut Conn,
    id: u64,
    stranded: &[String],
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let mut view = ProgressView::new(json);
    let watch = async {
        loop {
            let reply = rpc!(
                conn,
                Call::Read,
                list_services,
                pb::ListServicesRequest {
                    stale: false,
                    summary: false
                }
            )
            .await?;
            let left: Vec<String> = reply
                .services
                .iter()
                .flat_map(|s| s.instances.iter())
                .filter(|i| i.node == id || i.moving_from == id)
                .map(|i| format!("{}#{}", i.service, i.slot))
                .filter(|label| !stranded.contains(label))
                .collect();
            if left.is_empty() {
                return Ok::<(), Failure>(());
            }
            view.show(format!(
                "node {id}: {} instance{} still to move",
                left.len(),
                if left.len() == 1 { "" } else { "s" }
            ));
            if Instant::now() >= deadline {
                return Err(fail(
                    EXIT_WAIT_TIMEOUT,
                    format!(
                        "gave up waiting after {}s; the drain goes on: still on node {id}: {}",
                        timeout.as_secs(),
                        left.join(", ")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let result = tokio::select! {
        r = watch => r,
        _ = tokio::signal::ctrl_c() => Err(fail(
            EXIT_INTERRUPTED,
            format!("interrupted: stopped waiting, but node {id} goes on draining"),
        )),
    };
    view.end();
    result?;
    if !json {
        say!("node {id} is drained");
    }
    Ok(())
}

/// `svc history NAME`.
async fn history(conn: &mut Conn, name: &str, json: bool) -> Result<(), Failure> {
    let reply = rpc!(
        conn,
        Call::Read,
        service_history,
        pb::ServiceHistoryRequest {
            name: name.to_string(),
        }
    )
    .await?;
    if json {
        let versions: Vec<serde_json::Value> = reply
            .versions
            .iter()
            .map(|v| {
                json!({
                    "spec": v.spec.as_ref().map(js::spec),
                    "rollout": v.rollout.as_ref().map(js::rollout),
                })
            })
            .collect();
        js::print(&json!({"service": name, "versions": versions}));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = reply
        .versions
        .iter()
        .filter_map(|v| {
            let r = v.rollout.as_ref()?;
            let mut status = r.status.clone();
            if !r.reason.is_empty() {
                status.push_str(&format!(": {}", r.reason));
            }
            Some(vec![
                r.generation.to_string(),
                crate::convert::format_utc_ms(r.applied_at_ms),
                status,
                r.change.clone(),
            ])
        })
        .collect();
    table(&["GENERATION", "APPLIED", "ROLLOUT", "CHANGE"], &rows);
    Ok(())
}
