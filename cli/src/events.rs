//! `modectl events`: the event log (ListEvents), or followed live (`--follow`, the WatchEvents
//! stream), reconnecting after the last sequence number printed so that nothing is printed
//! twice and nothing the log still holds is missed.

use std::time::Duration;

use mode_proto::v1 as pb;

use crate::conn::{Call, Conn};
use crate::output::{print_event_line, print_events};
use crate::Failure;

/// What `events` asks for.
pub(crate) struct EventsArgs {
    /// Only events about this service ("" for all).
    pub(crate) service: String,
    pub(crate) stale: bool,
    pub(crate) tail: u32,
    pub(crate) filter: Filter,
}

/// The filters `events` applies itself (`--since`, `--node`, `--kind`).
#[derive(Debug, Default)]
pub(crate) struct Filter {
    /// Only events at or after this time (ms since the Unix epoch).
    since_ms: Option<u64>,
    node: Option<u64>,
    kind: Option<String>,
}

impl Filter {
    pub(crate) fn new(since: Option<Duration>, node: Option<u64>, kind: Option<String>) -> Self {
        let now_ms = mode::replication::now_ms();
        Filter {
            since_ms: since.map(|d| now_ms.saturating_sub(d.as_millis() as u64)),
            node,
            kind,
        }
    }

    fn is_empty(&self) -> bool {
        self.since_ms.is_none() && self.node.is_none() && self.kind.is_none()
    }

    /// Whether `e` passes.
    pub(crate) fn keeps(&self, e: &pb::Event) -> bool {
        self.since_ms.is_none_or(|t| e.time_ms >= t)
            && self.node.is_none_or(|n| e.node == n)
            && self.kind.as_deref().is_none_or(|k| e.kind == k)
    }
}

async fn fetch(conn: &mut Conn, args: &EventsArgs) -> Result<Vec<pb::Event>, Failure> {
    // With filters of its own, modectl takes the whole log and keeps the last `tail` of what
    // passes (the server's tail would count the events filtered out).
    let filtered = !args.filter.is_empty();
    let reply = rpc!(
        conn,
        Call::Read,
        list_events,
        pb::ListEventsRequest {
            service: args.service.clone(),
            stale: args.stale,
            tail: if filtered { 0 } else { args.tail },
        }
    )
    .await?;
    let mut events = reply.events;
    if filtered {
        events.retain(|e| args.filter.keeps(e));
        if args.tail > 0 {
            let skip = events.len().saturating_sub(args.tail as usize);
            events.drain(..skip);
        }
    }
    Ok(events)
}

/// The kept events, as a table or a JSON list.
pub(crate) async fn list(conn: &mut Conn, args: &EventsArgs, json: bool) -> Result<(), Failure> {
    let events = fetch(conn, args).await?;
    print_events(&events, json);
    Ok(())
}

/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The kept events, then each new one, until interrupted. With `-o json` every line is one
/// event object (NDJSON); notes about reconnecting go to stderr.
pub(crate) async fn follow(conn: &mut Conn, args: &EventsArgs, json: bool) -> Result<(), Failure> {
    let kept = fetch(conn, args).await?;
    if json {
        for e in &kept {
            print_event_line(e, true);
        }
    } else {
        print_events(&kept, false);
    }
    // The last sequence number printed (None: none yet; `after_seq` 0 then replays all).
    let mut last: Option<u64> = kept.last().map(|e| e.seq);
    let shown = |last: Option<u64>| last.map_or("none".to_string(), |l| l.to_string());
    let mut backoff = Duration::from_millis(200);
    // Why the last stream broke, or the last attempt failed (said once one works again).
    let mut broken: Option<String> = None;
    loop {
        let opened = rpc!(
            conn,
            Call::Read,
            watch_events,
            pb::WatchEventsRequest {
                after_seq: last.unwrap_or(0),
                service: args.service.clone(),
                only_new: false,
            }
        )
        .await;
        let mut stream = match opened {
            Ok(s) => s,
            // A service that does not exist stays so: say it, like `events --service`.
            Err(f)
                if f.code == 3 || f.code == 2 || f.grpc == Some(tonic::Code::InvalidArgument) =>
            {
                return Err(f)
            }
            Err(f) => {
                say_err!(
                    "modectl: cannot follow events through {} ({}); retrying in {backoff:?}",
                    conn.endpoint(),
                    f.message
                );
                broken.get_or_insert(f.message);
                conn.rotate();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if let Some(why) = broken.take() {
            say_err!(
                "modectl: reconnected to {} after the event stream broke ({why}); resuming after event {}",
                conn.endpoint(),
                shown(last)
            );
        }
        backoff = Duration::from_millis(200);
        loop {
            match stream.message().await {
                Ok(Some(e)) => {
                    if e.gap {
                        say_err!(
                            "modectl: events after {} up to {} were dropped from the bounded log before they could be shown",
                            shown(last),
                            e.seq
                        );
                    }
                    // `after_seq` 0 replays from the start: never print an event twice.
                    if last.is_none_or(|l| e.seq > l) {
                        if args.filter.keeps(&e) {
                            print_event_line(&e, json);
                        }
                        last = Some(e.seq);
                    }
                }
                Ok(None) => {
                    broken = Some("the server ended it".to_string());
                    break;
                }
                Err(s) => {
                    broken = Some(s.message().to_string());
                    break;
                }
            }
        }
        // The node that served the stream may be going away: try the next one first.
        conn.rotate();
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    fn event(time_ms: u64, node: u64, kind: &str) -> pb::Event {
        pb::Event {
            time_ms,
            node,
            kind: kind.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn filters_keep_only_what_matches_each_given_one() {
        let all = Filter::default();
        assert!(all.is_empty() && all.keeps(&event(0, 0, "x")));
        let f = Filter {
            since_ms: Some(1_000),
            node: Some(2),
            kind: Some("node-down".into()),
        };
        assert!(f.keeps(&event(1_000, 2, "node-down")));
        assert!(!f.keeps(&event(999, 2, "node-down")), "too old");
        assert!(!f.keeps(&event(1_000, 3, "node-down")), "another node");
        assert!(!f.keeps(&event(1_000, 2, "node-up")), "another kind");
        let recent = Filter::new(Some(Duration::from_secs(60)), None, None);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(recent.keeps(&event(now, 0, "x")));
        assert!(!recent.keeps(&event(now - 120_000, 0, "x")));
    }
}
