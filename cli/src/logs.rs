//! `modectl logs`: what an instance (`web#0`) or every instance of a service (`web`, each line
//! prefixed with its instance) wrote to stdout and stderr, as the nodes that run them keep it
//! (the Logs stream, relayed by the node asked). The text is the workload's: control
//! characters in it print as visible escapes.

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
    let mut stream = rpc!(conn, Call::Read, logs, request.clone()).await?;
    let prefixed = slot.is_none();
    loop {
        match stream.message().await {
            Ok(Some(line)) => print_line(&line, prefixed, args.timestamps, json),
            Ok(None) => return Ok(()),
            Err(status) => return Err(Failure::from_status(conn.endpoint(), &status)),
        }
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
