//! `modectl logs`: what an instance (`web#0`) or every instance of a service (`web`, each line
//! prefixed with its instance) wrote to stdout and stderr, as the nodes that run them keep it
//! (the Logs stream, relayed by the node asked). The text is the workload's: control
//! characters in it print as visible escapes.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use mode_proto::v1 as pb;
use serde_json::json;

use crate::conn::{Call, Conn};
use crate::convert::format_utc_ms;
use crate::Failure;

#[derive(Args)]
pub(crate) struct LogsArgs {
    /// An instance (`web#0`) or a service (`web`: every instance, each line prefixed with
    /// `[web#N]`).
    name: String,
    /// Keep printing new lines as they are written, until interrupted.
    #[arg(short, long)]
    pub(crate) follow: bool,
    /// The run before the instance's last restart (on the node it runs on now).
    #[arg(short, long, conflicts_with = "follow")]
    previous: bool,
    /// Only the last N lines of each instance (default: all kept, up to 1,000 per run).
    #[arg(long, value_name = "N")]
    tail: Option<u32>,
    /// Only lines of the last DURATION (e.g. 90s, 10m, 2h), by the nodes' clocks.
    #[arg(long, value_name = "DURATION", value_parser = mode::daemon::parse_duration)]
    since: Option<Duration>,
    /// Start each line with when its node read it (UTC).
    #[arg(long)]
    timestamps: bool,
}

/// `web#2` → ("web", Some(2)); `web` → ("web", None).
fn parse_name(name: &str) -> Result<(String, Option<u32>), Failure> {
    let usage = |why: &str| {
        Failure::new(
            2,
            format!("'{name}' {why}: give an instance (`web#0`) or a service (`web`)"),
        )
    };
    match name.split_once('#') {
        None if name.is_empty() => Err(usage("is empty")),
        None => Ok((name.to_string(), None)),
        Some(("", _)) => Err(usage("names no service before '#'")),
        Some((service, slot)) => match slot.parse::<u32>() {
            Ok(slot) => Ok((service.to_string(), Some(slot))),
            Err(_) => Err(usage("has no instance number after '#'")),
        },
    }
}

pub(crate) async fn run(args: &LogsArgs, conn: &mut Conn, json: bool) -> Result<(), Failure> {
    let (service, slot) = parse_name(&args.name)?;
    let max = mode::api::MAX_LOG_TAIL;
    let tail = match args.tail {
        Some(n) if n > max => {
            return Err(Failure::new(
                2,
                format!("--tail {n} is over the limit of {max} lines: ask for fewer"),
            ))
        }
        Some(0) => {
            return Err(Failure::new(
                2,
                "--tail 0 would print nothing: leave --tail out for every line kept",
            ))
        }
        Some(n) => n,
        None => 0,
    };
    let since_ms = args.since.map_or(0, |d| {
        mode::replication::now_ms()
            .saturating_sub(d.as_millis() as u64)
            .max(1)
    });
    let request = pb::LogsRequest {
        service,
        slot,
        previous: args.previous,
        follow: args.follow,
        tail,
        since_ms,
    };
    let prefixed = slot.is_none();
    if args.follow {
        return follow(conn, request, prefixed, args.timestamps, json).await;
    }
    let mut stream = rpc!(conn, Call::Read, logs, request.clone()).await?;
    loop {
        match stream.message().await {
            Ok(Some(line)) => print_line(&line, prefixed, args.timestamps, json),
            Ok(None) => return Ok(()),
            Err(status) => return Err(Failure::from_status(conn.endpoint(), &status)),
        }
    }
}

/// Streams of lines kept per instance at once with `-f`: the node it runs on now and the one
/// it moved from (which may still write its last lines while the new one starts).
const STREAMS_PER_INSTANCE: usize = 2;

/// `-f`: the lines asked for, then new ones as they are written; and, watching the service,
/// the lines of an instance that moves to another node (or of a new instance of the service,
/// when following all of them) from the node it runs on next.
async fn follow(
    conn: &mut Conn,
    request: pb::LogsRequest,
    prefixed: bool,
    timestamps: bool,
    json: bool,
) -> Result<(), Failure> {
    type Lines = tonic::Streaming<pb::LogLine>;
    let mut watch = rpc!(
        conn,
        Call::Read,
        watch_service,
        pb::WatchServiceRequest {
            name: request.service.clone(),
        }
    )
    .await?;
    // Where each instance followed runs, from the service as it was when the lines began.
    let placed = |s: &pb::Service| -> BTreeMap<u32, u64> {
        s.instances
            .iter()
            .filter(|i| request.slot.is_none_or(|slot| slot == i.slot))
            .map(|i| (i.slot, i.node))
            .collect()
    };
    let mut following = match watch.message().await {
        Ok(Some(s)) => placed(&s),
        _ => BTreeMap::new(),
    };
    // The stream asked for goes on following each instance on the node it ran on then.
    let initial = following.clone();
    let first = rpc!(conn, Call::Read, logs, request.clone()).await?;
    /// What a stream of lines says: `first`: the stream of the request as asked.
    enum Said {
        Line(pb::LogLine),
        Failed { first: bool, status: tonic::Status },
        Ended { first: bool },
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Said>(256);
    let forward = |mut lines: Lines, first: bool| {
        let tx = tx.clone();
        AbortOnDrop(tokio::spawn(async move {
            loop {
                let said = match lines.message().await {
                    Ok(Some(line)) => Said::Line(line),
                    Ok(None) => Said::Ended { first },
                    Err(status) => Said::Failed { first, status },
                };
                let over = !matches!(said, Said::Line(_));
                if tx.send(said).await.is_err() || over {
                    return;
                }
            }
        }))
    };
    let _first = forward(first, true);
    // Per instance, the streams opened after it moved (node, stream), newest last.
    let mut moved: BTreeMap<u32, Vec<(u64, AbortOnDrop)>> = BTreeMap::new();
    let mut watching = true;
    loop {
        tokio::select! {
            said = rx.recv() => match said {
                Some(Said::Line(line)) => print_line(&line, prefixed, timestamps, json),
                Some(Said::Failed { first: true, status }) => {
                    return Err(Failure::from_status(conn.endpoint(), &status))
                }
                Some(Said::Failed { first: false, status }) => {
                    say_err!("modectl: {}", status.message())
                }
                // The server ended the stream asked for (the instances are gone from it):
                // done, unless some moved elsewhere and are followed there.
                Some(Said::Ended { first: true }) if moved.values().all(Vec::is_empty) => {
                    return Ok(())
                }
                Some(Said::Ended { .. }) | None => {}
            },
            service = watch.message(), if watching => {
                let Ok(Some(service)) = service else {
                    // The service is gone (or the watch broke): what is open goes on.
                    watching = false;
                    continue;
                };
                for (slot, node) in placed(&service) {
                    if following.get(&slot) == Some(&node) {
                        continue;
                    }
                    let instance = format!("{}#{slot}", request.service);
                    let streams = moved.entry(slot).or_default();
                    // Back on a node a stream still follows it on: that one carries its lines.
                    let open = initial.get(&slot) != Some(&node)
                        && streams.iter().all(|(n, _)| *n != node);
                    if open {
                        let mut one = request.clone();
                        one.slot = Some(slot);
                        (one.tail, one.since_ms) = (0, 0);
                        match rpc!(conn, Call::Read, logs, one.clone()).await {
                            Ok(lines) => {
                                streams.push((node, forward(lines, false)));
                                if streams.len() > STREAMS_PER_INSTANCE {
                                    streams.remove(0);
                                }
                            }
                            // Tried again on the service's next change.
                            Err(f) => {
                                say_err!("modectl: following {instance} on node {node}: {}", f.message);
                                continue;
                            }
                        }
                    }
                    if following.insert(slot, node).is_some() {
                        say_err!("modectl: {instance} now runs on node {node}: following it there");
                    }
                }
            }
        }
    }
}

/// A task stopped when its handle goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One line: the workload's text (escaped by `say!`), after its instance (`[web#0] `, for a
/// service) and time (`--timestamps`); with `-o json`, one JSON object per line (NDJSON).
fn print_line(line: &pb::LogLine, prefixed: bool, timestamps: bool, json: bool) {
    let instance = format!("{}#{}", line.service, line.slot);
    if json {
        say!(
            "{}",
            json!({
                "instance": instance,
                "service": line.service,
                "slot": line.slot,
                "node": line.node,
                "run": line.run,
                "time_ms": line.time_ms,
                "time": format_utc_ms(line.time_ms),
                "stream": line.stream,
                "text": line.text,
            })
        );
        return;
    }
    let prefix = if prefixed {
        format!("[{instance}] ")
    } else {
        String::new()
    };
    let time = if timestamps {
        format!("{} ", format_utc_ms(line.time_ms))
    } else {
        String::new()
    };
    // A line break in the text is the workload's (none: lines are split at them); `say!`
    // escapes every control character but tabs.
    say!("{prefix}{time}{}", line.text.replace('\n', "\\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_instances_or_services() {
        assert_eq!(parse_name("web#2").unwrap(), ("web".to_string(), Some(2)));
        assert_eq!(parse_name("web").unwrap(), ("web".to_string(), None));
        for bad in ["", "#1", "web#", "web#x", "web#-1"] {
            let e = parse_name(bad).unwrap_err();
            assert_eq!(e.code, 2, "{bad}");
            assert!(e.message.contains("web#0"), "{}", e.message);
        }
    }
}
