//! `modectl svc`: apply specs, list and inspect services, scale, rolling restart, remove.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Subcommand;
use mode_proto::v1 as pb;
use serde_json::json;

use crate::conn::{new_request_id, with_request_id, Call, Conn};
use crate::convert::{spec_to_proto, wanted};
use crate::output::table;
use crate::{json as js, Failure};

#[derive(Subcommand)]
pub(crate) enum SvcCmd {
    /// Validate and store the specs in a YAML or JSON file (one spec, a list, or documents),
    /// all or none.
    Apply {
        /// The spec file.
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
        /// Validate against the cluster and print what would change, storing nothing.
        #[arg(long)]
        dry_run: bool,
        /// Compare-and-set: store only if service NAME has generation GEN now (0: it must not
        /// exist yet). Repeatable. A mismatch stores nothing and exits with status 5.
        #[arg(long = "expect-generation", value_name = "NAME=GEN", value_parser = parse_expectation)]
        expect_generation: Vec<(String, u64)>,
        /// Wait until every instance runs, showing progress, or fail clearly.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait_timeout: u64,
    },
    /// List services.
    Ls,
    /// A service's instances: nodes, states, restart counts, last crash reasons.
    Get {
        /// Service name.
        name: String,
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

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure::new(code, message)
}

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
            let cannot_read =
                |e: std::io::Error| fail(2, format!("cannot read {}: {e}", file.display()));
            let size = std::fs::metadata(file).map_err(cannot_read)?.len();
            let limit = mode::model::limits::MAX_REQUEST_BYTES as u64;
            if size > limit {
                return Err(fail(
                    2,
                    format!(
                        "{}: the file is {size} bytes, over the limit of {limit} bytes for one apply (and a spec is at most {} bytes): split it",
                        file.display(),
                        mode::model::limits::MAX_SPEC_BYTES
                    ),
                ));
            }
            let text = std::fs::read_to_string(file).map_err(cannot_read)?;
            let file_name = file.display().to_string();
            let specs = mode::model::spec::parse_specs(&file_name, &text)
                .map_err(|e| fail(2, e.to_string()))?;
            for spec in &specs {
                if let Some(at) = mode::api::convert::inexact_number(&spec.config, "config") {
                    return Err(fail(
                        2,
                        format!(
                            "{file_name}: spec '{}': {at} is an integer beyond 2^53, which the API's JSON config (a protobuf Struct of doubles) cannot carry exactly: write it as a string",
                            spec.name
                        ),
                    ));
                }
            }
            let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
            let specs: Vec<pb::ServiceSpec> = specs.iter().map(spec_to_proto).collect();
            let expected: std::collections::HashMap<String, u64> =
                expect_generation.iter().cloned().collect();
            // The last event now: waiting reports only what happened after the apply.
            let since = if *wait && !dry_run {
                last_event_seq(conn).await?
            } else {
                0
            };
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
                wait_running(
                    conn,
                    &names,
                    since,
                    Duration::from_secs(*wait_timeout),
                    json,
                )
                .await?;
                if json {
                    out["running"] = json!(names);
                    js::print(&out);
                }
            } else if json {
                js::print(&js::apply(&reply));
            }
        }
        SvcCmd::Ls => {
            let reply = rpc!(
                conn,
                Call::Read,
                list_services,
                pb::ListServicesRequest { stale: false }
            )
            .await?;
            if json {
                js::print(&js::services(&reply));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = reply
                .services
                .iter()
                .filter_map(|s| {
                    let spec = s.spec.as_ref()?;
                    let restarts: u64 =
                        s.instances.iter().map(|i| u64::from(i.restart_count)).sum();
                    Some(vec![
                        spec.name.clone(),
                        spec.kind.clone(),
                        format!("{}/{}", running(s), wanted(spec)),
                        restarts.to_string(),
                        spec.generation.to_string(),
                    ])
                })
                .collect();
            table(
                &["NAME", "KIND", "RUNNING", "RESTARTS", "GENERATION"],
                &rows,
            );
        }
        SvcCmd::Get { name } => {
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
            let rows: Vec<Vec<String>> = service
                .instances
                .iter()
                .map(|i| {
                    vec![
                        format!("{name}#{}", i.slot),
                        i.node.to_string(),
                        i.state.clone(),
                        i.restart_count.to_string(),
                        i.last_crash.clone(),
                    ]
                })
                .collect();
            table(
                &["INSTANCE", "NODE", "STATE", "RESTARTS", "LAST CRASH"],
                &rows,
            );
        }
        SvcCmd::Scale {
            name,
            replicas,
            expect_generation,
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
                    f
                }
            })?;
            if json {
                say!(
                    "{}",
                    json!({"service": name, "replicas": replicas, "generation": reply.generation, "message": reply.message})
                );
            } else if reply.message.is_empty() {
                say!(
                    "service '{name}' scaled to {replicas} replicas (generation {})",
                    reply.generation
                );
            } else {
                say!("{}", reply.message);
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
                say!("{}", json!({"removed": name, "message": reply.message}));
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
fn running(s: &pb::Service) -> u32 {
    s.instances.iter().filter(|i| i.state == "running").count() as u32
}

/// The newest event's sequence number (0 for none).
async fn last_event_seq(conn: &mut Conn) -> Result<u64, Failure> {
    let reply = rpc!(
        conn,
        Call::Read,
        list_events,
        pb::ListEventsRequest {
            tail: 1,
            ..Default::default()
        }
    )
    .await?;
    Ok(reply.events.last().map_or(0, |e| e.seq))
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
                    eprintln!(
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
    let finished = follow_service(conn, name, deadline, |s| {
        for i in &s.instances {
            if !asked.contains(&i.slot) {
                continue;
            }
            let newer = before.get(&i.slot).is_none_or(|e| i.epoch > *e);
            if newer && announced.insert(i.slot) && !json {
                say!("restarting {name}#{}...", i.slot);
            }
            if newer && i.state == "running" {
                restarted.insert(i.slot);
            }
            if i.state == "failed" {
                return Err(fail(
                    1,
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
    })
    .await
    .map_err(|f| {
        if f.code == 4 {
            fail(
                1,
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
        say!("{}", json!({"service": name, "restarted": reply.slots}));
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

/// Show progress until every instance of `names` runs; fail on an instance that exceeded its
/// restart intensity or on an `unplaced` event (after event `since`) for a service short of
/// instances.
async fn wait_running(
    conn: &mut Conn,
    names: &[String],
    since: u64,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    // Each service's progress once it has been seen.
    let mut progress: BTreeMap<String, String> = BTreeMap::new();
    let mut last_line = String::new();
    for name in names {
        let short = Arc::new(AtomicBool::new(false));
        let short_seen = short.clone();
        // Whether placement failed is in the event log: watch it while instances are short.
        let unplaced = watch_unplaced(conn.clone(), name, since, short);
        let result = follow_service(conn, name, deadline, |s| {
            let spec = s.spec.clone().unwrap_or_default();
            let (running, wanted) = (running(s), wanted(&spec));
            if let Some(i) = s.instances.iter().find(|i| i.state == "failed") {
                return Err(fail(
                    1,
                    format!(
                        "{name}#{} failed on node {}: {}",
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
            short_seen.store((s.instances.len() as u32) < wanted, Ordering::Relaxed);
            progress.insert(name.clone(), format!("{name} {running}/{wanted} running"));
            let line = progress.values().cloned().collect::<Vec<_>>().join(", ");
            if line != last_line && !json {
                say!("{line}");
            }
            last_line = line;
            Ok(running >= wanted)
        });
        let result = tokio::select! {
            r = result => r,
            f = unplaced => Err(f),
        };
        match result {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(fail(
                    3,
                    format!("'{name}' was removed while waiting for it"),
                ))
            }
            Err(f) if f.code == 4 && f.message.starts_with("gave up") => {
                return Err(fail(
                    4,
                    format!("not every instance runs after {timeout:?}: {last_line}"),
                ))
            }
            Err(f) => return Err(f),
        }
    }
    Ok(())
}

/// Resolves (as a failure) at the first `unplaced` event about `name` after event `since`
/// that comes while `short` (fewer instances placed than wanted). Never resolves if the
/// event stream cannot be had: the wait then ends on its own terms.
async fn watch_unplaced(mut conn: Conn, name: &str, since: u64, short: Arc<AtomicBool>) -> Failure {
    let mut after = since;
    loop {
        let opened = rpc!(
            conn,
            Call::Read,
            watch_events,
            pb::WatchEventsRequest {
                after_seq: after,
                service: name.to_string(),
                only_new: false,
            }
        )
        .await;
        // The event and the service's update may come in either order: keep the event
        // until the service is seen short of instances.
        let mut unplaced: Option<String> = None;
        if let Ok(mut stream) = opened {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(e)) => {
                            after = after.max(e.seq);
                            if e.kind == "unplaced" && e.service == name {
                                unplaced = Some(e.message);
                            }
                        }
                        _ => break,
                    },
                    _ = tick.tick() => {}
                }
                if let Some(m) = &unplaced {
                    if short.load(Ordering::Relaxed) {
                        return fail(1, m.clone());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
