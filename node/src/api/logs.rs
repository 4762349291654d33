//! Instance output over gRPC: the public `Logs` call (find the nodes that run the instances
//! asked for, read there, relay) and the peer `InstanceLogs` call every node answers from its
//! own [`OutputLog`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mode_proto::v1 as pb;
use mode_proto::v1::peer_client::PeerClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{StreamExt as _, StreamMap};
use tonic::Status;

use crate::agent::output::{Line, Missing, OutputLog, Selection};
use crate::agent::KindRegistry;
use crate::replication::ClusterNode;

/// The most lines a request may ask for with `tail` (each instance keeps fewer).
pub const MAX_TAIL: u32 = 10_000;

/// The most instances one request reads at once.
pub const MAX_INSTANCES: usize = 256;

/// Lines a stream holds for a client that reads slowly (then the sender waits).
const BUFFER: usize = 256;

/// How long the node asked waits for another node to open its stream of lines.
const OPEN_DEADLINE: Duration = Duration::from_secs(5);

/// A stream of lines as tonic sends it.
pub(crate) type LineStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LogLine, Status>> + Send>>;

/// What a request asks of each instance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask {
    selection: Selection,
    follow: bool,
}

impl Ask {
    /// Checked: `tail` within [`MAX_TAIL`], not `follow` with `previous`.
    pub(crate) fn new(
        previous: bool,
        follow: bool,
        tail: u32,
        since_ms: u64,
    ) -> Result<Ask, Status> {
        if tail > MAX_TAIL {
            return Err(Status::invalid_argument(format!(
                "tail {tail} is over the limit of {MAX_TAIL} lines (a node keeps at most 1,000 lines per run of an instance): ask for fewer, or 0 for all kept"
            )));
        }
        if previous && follow {
            return Err(Status::invalid_argument(
                "previous and follow together: the previous run has ended and gets no new lines; drop one",
            ));
        }
        Ok(Ask {
            selection: Selection {
                previous,
                tail,
                since_ms,
            },
            follow,
        })
    }
}

fn to_proto(service: &str, slot: u32, node: u64, line: Line) -> pb::LogLine {
    pb::LogLine {
        service: service.to_string(),
        slot,
        node,
        time_ms: line.time_ms,
        stream: line.pipe.name().to_string(),
        text: line.text,
        run: line.run,
    }
}

/// The lines node `node` keeps of `service`'s instances `slots` (see [`Ask`]), oldest first
/// for each instance, then (with `follow`) new ones as they are written, until the receiver
/// goes away. With one slot, an instance or a previous run not kept here is an error; with
/// several, such instances send nothing.
pub(crate) fn local(
    log: &OutputLog,
    node: u64,
    service: &str,
    slots: &[u32],
    ask: Ask,
) -> Result<LineStream, Status> {
    let kept = kept(log, node, service, slots, ask)?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let (log, service) = (log.clone(), service.to_string());
    tokio::spawn(async move {
        let mut last = BTreeMap::new();
        for (slot, lines, last_seq) in kept {
            for line in lines {
                if tx
                    .send(Ok(to_proto(&service, slot, node, line)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            last.insert(slot, last_seq);
        }
        if ask.follow {
            follow(&log, node, &service, last, &tx).await;
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// What [`local`] sends first: for each slot, its kept lines and the last sequence number
/// written.
pub(crate) fn kept(
    log: &OutputLog,
    node: u64,
    service: &str,
    slots: &[u32],
    ask: Ask,
) -> Result<Vec<(u32, Vec<Line>, u64)>, Status> {
    if slots.len() > MAX_INSTANCES {
        return Err(Status::resource_exhausted(format!(
            "{} instances asked for at once, over the limit of {MAX_INSTANCES}: name fewer",
            slots.len()
        )));
    }
    let single = slots.len() == 1;
    let mut kept = Vec::with_capacity(slots.len());
    for &slot in slots {
        match log.read(service, slot, ask.selection) {
            Ok(k) => kept.push((slot, k.lines, k.last_seq)),
            Err(Missing::PreviousRun { current }) if single => {
                return Err(Status::failed_precondition(format!(
                    "{service}#{slot} has no previous run kept on node {node}, where it runs: it has not restarted there{} (a run on another node, before it moved, is not kept here)",
                    if current > 1 { " since its earlier runs were forgotten" } else { "" }
                )))
            }
            Err(Missing::Instance) if single && !ask.follow => {
                return Err(Status::failed_precondition(format!(
                    "node {node} keeps no output of {service}#{slot}: it has not started there yet (or stopped there so long ago that it was forgotten); follow it with --follow to see its first lines"
                )))
            }
            Err(_) => kept.push((slot, Vec::new(), 0)),
        }
    }
    Ok(kept)
}

/// Send the lines of each instance in `last` written after the sequence number there, as
/// they come, until the receiver goes away (or every instance is forgotten here).
async fn follow(
    log: &OutputLog,
    node: u64,
    service: &str,
    mut last: BTreeMap<u32, u64>,
    tx: &mpsc::Sender<Result<pb::LogLine, Status>>,
) {
    let mut changes = StreamMap::new();
    for &slot in last.keys() {
        changes.insert(slot, WatchStream::new(log.watch(service, slot)));
    }
    loop {
        // Woken by one instance (or, at first, for all: a line may have come meanwhile).
        let Some((slot, _)) = (tokio::select! {
            next = changes.next() => next,
            _ = tx.closed() => return,
        }) else {
            return;
        };
        let seen = last.get(&slot).copied().unwrap_or(0);
        let Some((lines, newest)) = log.after(service, slot, seen) else {
            continue;
        };
        for line in lines {
            if tx
                .send(Ok(to_proto(service, slot, node, line)))
                .await
                .is_err()
            {
                return;
            }
        }
        last.insert(slot, newest.max(seen));
    }
}

/// Where the instances asked for are read: node → (its peer address, the slots there).
pub(crate) type Sources = BTreeMap<u64, (String, Vec<u32>)>;

/// The public `Logs` call on `node`: which nodes run the instances asked for, by this node's
/// replica of the cluster state; their lines, read here or asked of those nodes.
pub(crate) async fn logs(
    node: &Arc<ClusterNode>,
    kinds: &KindRegistry,
    r: pb::LogsRequest,
) -> Result<LineStream, Status> {
    let ask = Ask::new(r.previous, r.follow, r.tail, r.since_ms)?;
    let service = r.service;
    if service.is_empty() {
        return Err(Status::invalid_argument(
            "no service named: give a service (`web`) or an instance (`web#0`)",
        ));
    }
    let sources = node.local_state(|s| sources(s, kinds, &service, r.slot))?;
    let me = node.id();
    // Every source opens first, so that a node that cannot be reached (or refuses) is the
    // call's answer rather than the end of a stream already under way.
    let mut opening = tokio::task::JoinSet::new();
    for (id, (address, slots)) in sources {
        if id == me {
            let stream = local(kinds.output(), me, &service, &slots, ask);
            opening.spawn(async move { stream });
            continue;
        }
        let request = pb::InstanceLogsRequest {
            node: id,
            service: service.clone(),
            slots,
            previous: r.previous,
            follow: r.follow,
            tail: r.tail,
            since_ms: r.since_ms,
        };
        let peers = node.peers().clone();
        let span = tracing::Span::current();
        opening.spawn(tracing::Instrument::instrument(
            async move { open_remote(&peers, id, &address, request).await },
            span,
        ));
    }
    let mut streams = Vec::new();
    while let Some(opened) = opening.join_next().await {
        let opened = opened
            .map_err(|e| Status::internal(format!("opening a stream of lines failed: {e}")))?;
        streams.push(opened?);
    }
    if streams.len() == 1 {
        if let Some(only) = streams.pop() {
            return Ok(only);
        }
    }
    let (tx, rx) = mpsc::channel(BUFFER);
    for mut stream in streams {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = tx.closed() => return,
                };
                let Some(item) = item else { return };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
    }
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// The nodes to read `service` (instance `slot`, or all) from, per `state`; NOT_FOUND for an
/// unknown service or instance, FAILED_PRECONDITION for a kind that keeps no output or an
/// instance on no node.
pub(crate) fn sources(
    state: &crate::model::state::ClusterState,
    kinds: &KindRegistry,
    service: &str,
    slot: Option<u32>,
) -> Result<Sources, Status> {
    let placements = state.placements.get(service);
    let Some(spec) = state.specs.get(service) else {
        return Err(match placements {
            Some(_) => Status::failed_precondition(format!(
                "service '{service}' is being deleted: its instances are stopping"
            )),
            None => Status::not_found(format!(
                "no service named '{service}' (see `modectl svc ls`)"
            )),
        });
    };
    if !kinds.keeps_output(&spec.kind) {
        return Err(Status::failed_precondition(format!(
            "'{service}' is of kind `{}`, whose instances run inside their node's own process: they have no output of their own to show (what they log is in their node's log; `modectl graph --service {service}` shows their state); only `exec` instances' output is kept",
            spec.kind
        )));
    }
    let empty = BTreeMap::new();
    let placements = placements.unwrap_or(&empty);
    let wanted: Vec<u32> = match slot {
        Some(slot) => {
            if !placements.contains_key(&slot) {
                let known = if placements.is_empty() {
                    "it has none placed now".to_string()
                } else {
                    let names: Vec<String> = placements
                        .keys()
                        .take(8)
                        .map(|s| format!("{service}#{s}"))
                        .collect();
                    let more = if placements.len() > 8 { ", ..." } else { "" };
                    format!("its instances: {}{more}", names.join(", "))
                };
                return Err(if slot < spec.replicas {
                    Status::failed_precondition(format!(
                        "{service}#{slot} is placed on no node yet (see `modectl svc get {service}`)"
                    ))
                } else {
                    Status::not_found(format!(
                        "service '{service}' has no instance {service}#{slot} ({known})"
                    ))
                });
            }
            vec![slot]
        }
        None => placements.keys().copied().collect(),
    };
    if wanted.len() > MAX_INSTANCES {
        return Err(Status::resource_exhausted(format!(
            "'{service}' has {} instances, over the {MAX_INSTANCES} one request reads at once: name one (`{service}#0`)",
            wanted.len()
        )));
    }
    let mut sources = Sources::new();
    for slot in wanted {
        let p = &placements[&slot];
        // While it moves, the node it leaves runs it until the new one does.
        let id = match p.moving_from {
            Some(from) if p.state != "running" => from,
            _ => p.node,
        };
        let address = state
            .nodes
            .get(&id)
            .map(|n| n.address.clone())
            .unwrap_or_default();
        sources
            .entry(id)
            .or_insert_with(|| (address, Vec::new()))
            .1
            .push(slot);
    }
    Ok(sources)
}

/// Ask node `id` at `address` for its lines.
async fn open_remote(
    peers: &crate::replication::Peers,
    id: u64,
    address: &str,
    request: pb::InstanceLogsRequest,
) -> Result<LineStream, Status> {
    let instances = names(&request.service, &request.slots);
    let unreachable = |why: String| {
        Status::unavailable(format!(
            "node {id}, which runs {instances}, cannot be reached: {why}"
        ))
    };
    if address.is_empty() {
        return Err(unreachable("it has no known address".into()));
    }
    let channel = peers.side_channel(address).map_err(unreachable)?;
    let mut client = PeerClient::new(channel);
    let mut req = tonic::Request::new(request);
    crate::telemetry::inject(req.metadata_mut());
    let opened = tokio::time::timeout(OPEN_DEADLINE, client.instance_logs(req))
        .await
        .map_err(|_| {
            unreachable(format!(
                "no answer from {address} within {} s",
                OPEN_DEADLINE.as_secs()
            ))
        })?;
    let stream = match opened {
        Ok(reply) => reply.into_inner(),
        Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => {
            return Err(unreachable(crate::replication::describe_status(address, &s)))
        }
        // A build from before instance logs (a rolling upgrade under way).
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            return Err(Status::failed_precondition(format!(
                "node {id} ({address}), which runs {instances}, runs a build that keeps no instance output: upgrade it"
            )))
        }
        // Its own answer (no previous run there, ...): as it said it.
        Err(s) => return Err(Status::new(s.code(), s.message().to_string())),
    };
    let address = address.to_string();
    Ok(Box::pin(stream.map(move |item| {
        item.map_err(|s| {
            Status::unavailable(format!(
                "the stream of lines from node {id} ({address}) broke: {}",
                s.message()
            ))
        })
    })))
}

/// `web#0`, or `web#0, web#2`.
fn names(service: &str, slots: &[u32]) -> String {
    let names: Vec<String> = slots
        .iter()
        .take(4)
        .map(|s| format!("{service}#{s}"))
        .collect();
    let more = if slots.len() > 4 { ", ..." } else { "" };
    format!("{}{more}", names.join(", "))
}
