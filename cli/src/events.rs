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
}

async fn fetch(conn: &mut Conn, args: &EventsArgs) -> Result<Vec<pb::Event>, Failure> {
    let reply = rpc!(
        conn,
        Call::Read,
        list_events,
        pb::ListEventsRequest {
            service: args.service.clone(),
            stale: args.stale,
            tail: args.tail,
        }
    )
    .await?;
    Ok(reply.events)
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
                        print_event_line(&e, json);
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
