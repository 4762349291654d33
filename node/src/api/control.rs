//! The public API server (`mode.v1.Control`): typed user operations, answered by any
//! server; writes go to the leader through Raft, reads are linearizable unless `stale`.
//! Messages are converted to domain types in [`super::convert`]; every change is a typed
//! state-machine command validated where it is applied, never a raw command from the client.
//! Specs go out through [`convert::spec_for`]: secret values only to a caller who may see them.
//! Also: grpc.health.v1 and server reflection for the public listener ([`public_extras`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mode_proto::v1 as pb;
use mode_proto::v1::control_server::{Control, ControlServer};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::convert;
use super::inspect::{Inspector, DEFAULT_DEADLINE, MAX_GRAPH_BYTES};
use super::peer::{may_forward, request_id};
use crate::agent::KindRegistry;
use crate::graph::GraphFilter;
use crate::model::limits;
use crate::model::spec::{parse_specs, ServiceSpec, SpecError};
use crate::model::state::{Command, CommandResult, NodeStatus, Refusal};
use crate::replication::{status_to_proto, to_status, ClusterNode, WriteOutcome};
use crate::security::{Caller, Proof};

/// How long a rolling restart waits for each restarted instance to run again.
pub const RESTART_WAIT: Duration = Duration::from_secs(60);

/// Events a `WatchEvents` stream holds for a client that reads slowly; beyond that the
/// server waits for the client (events stay in the replicated log meanwhile).
const WATCH_BUFFER: usize = 256;

/// Events read from the log per pass (bounds how long the state lock is held).
const WATCH_BATCH: usize = 512;

/// The public API of one server.
pub struct ControlService {
    node: Arc<ClusterNode>,
    inspector: Arc<Inspector>,
    kinds: KindRegistry,
}

impl ControlService {
    /// Serve the node `inspector` looks at; `kinds` validates the configs of the kinds this
    /// node knows.
    pub fn new(inspector: Arc<Inspector>, kinds: KindRegistry) -> Self {
        ControlService {
            node: inspector.node().clone(),
            inspector,
            kinds,
        }
    }

    /// As a tonic service, with the public API's message limits.
    pub fn into_server(self) -> ControlServer<ControlService> {
        ControlServer::new(self)
            .max_decoding_message_size(limits::MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_GRAPH_BYTES.max(limits::MAX_ANSWER_BYTES))
    }

    /// Commit `command` (through the leader) and fail with the matching status when the state
    /// machine refused it.
    async fn commit(&self, command: Command, asked: Asked) -> Result<WriteOutcome, Status> {
        let out = self
            .node
            .write_request(command, true, asked.id, asked.by)
            .await
            .map_err(|e| to_status(&e))?;
        if out.result.ok {
            Ok(out)
        } else {
            Err(refusal_status(&out.result))
        }
    }

    /// Wait until the local replica may answer a read: at once when `stale`, else once it
    /// reflects every write committed before the request (linearizable).
    async fn barrier(&self, stale: bool) -> Result<u64, Status> {
        self.node
            .read_barrier(stale)
            .await
            .map_err(|e| to_status(&e))
    }

    /// The specs of an apply request ([`checked_specs`]); a file's text is parsed off the
    /// async threads.
    async fn request_specs(
        &self,
        r: &mut pb::ApplyServicesRequest,
    ) -> Result<Vec<ServiceSpec>, Status> {
        let (file, typed, text) = (
            r.file.clone(),
            std::mem::take(&mut r.specs),
            std::mem::take(&mut r.text),
        );
        if text.is_empty() {
            return checked_specs(&file, typed, text, &self.kinds);
        }
        // A big file is CPU work: off the async threads.
        let kinds = self.kinds.clone();
        tokio::task::spawn_blocking(move || checked_specs(&file, typed, text, &kinds))
            .await
            .map_err(|e| Status::internal(format!("parsing the specs failed: {e}")))?
    }

    /// The service's instances now: `(slot, state, epoch)`.
    fn instances(&self, name: &str) -> Vec<(u32, String, u64)> {
        self.node.local_state(|s| {
            s.placements
                .get(name)
                .into_iter()
                .flatten()
                .map(|(slot, p)| (*slot, p.state.clone(), p.epoch))
                .collect()
        })
    }

    /// Wait until instance `name#slot` runs again after the restart committed at `index`.
    async fn wait_running_again(&self, name: &str, slot: u32, index: u64) -> Result<(), Status> {
        let mut applied = self.node.applied_changes();
        let deadline = tokio::time::Instant::now() + RESTART_WAIT;
        loop {
            let now = self.node.local_state(|s| {
                s.placements
                    .get(name)
                    .and_then(|slots| slots.get(&slot))
                    .map(|p| (p.state.clone(), p.epoch, p.last_crash.clone()))
            });
            match now {
                // Gone (scaled down or deleted meanwhile): nothing to wait for.
                None => return Ok(()),
                Some((state, epoch, _)) if epoch >= index && state == "running" => return Ok(()),
                Some((state, epoch, why)) if epoch >= index && state == "failed" => {
                    return Err(Status::failed_precondition(format!(
                        "{name}#{slot} failed after its restart ({}); the instances after it were not restarted",
                        why.unwrap_or_else(|| "no reason reported".into())
                    )))
                }
                Some(_) => {}
            }
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("this server is shutting down")),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "{name}#{slot} did not run again within {RESTART_WAIT:?}; the instances after it were not restarted (see `modectl svc get {name}` and its events)"
                    )))
                }
            }
        }
    }
}

/// The status for a command the state machine refused.
fn refusal_status(r: &CommandResult) -> Status {
    let msg = r.message.clone();
    match r.refusal {
        Some(Refusal::Invalid) => Status::invalid_argument(msg),
        Some(Refusal::NotFound) => Status::not_found(msg),
        Some(Refusal::Conflict) => Status::aborted(msg),
        Some(Refusal::OverLimit) => Status::resource_exhausted(msg),
        Some(Refusal::Precondition) | None => Status::failed_precondition(msg),
    }
}

/// The specs of an apply request, parsed (from `text`, the text of the file named `file`) or
/// converted (from `typed`), and checked against the configuration rules of `kinds` (the
/// kinds this node knows): everything the server does with them before proposing.
pub(crate) fn checked_specs(
    file: &str,
    typed: Vec<pb::ServiceSpec>,
    text: String,
    kinds: &KindRegistry,
) -> Result<Vec<ServiceSpec>, Status> {
    let locate = |e: SpecError| match file {
        f if !f.is_empty() && e.file.is_none() => e.with_file(f.to_string()),
        _ => e,
    };
    let specs = match (typed.is_empty(), text.is_empty()) {
        (false, false) => {
            return Err(Status::invalid_argument(
                "send the specs either typed (`specs`) or as a file's text (`text`), not both",
            ))
        }
        (true, true) => {
            return Err(Status::invalid_argument(
                "no specs: set `specs` or `text` (a YAML or JSON file's text)",
            ))
        }
        (true, false) => {
            let name = if file.is_empty() { "(text)" } else { file };
            parse_specs(name, &text).map_err(|e| Status::invalid_argument(e.to_string()))?
        }
        (false, true) => typed
            .into_iter()
            .map(convert::spec_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(locate(e).to_string()))?,
    };
    for spec in &specs {
        spec.validate()
            .map_err(|e| Status::invalid_argument(locate(e).to_string()))?;
        // Kind configs are node-local knowledge: checked here, before proposing.
        if kinds.contains(&spec.kind) {
            kinds.validate(&spec.kind, &spec.config).map_err(|e| {
                Status::invalid_argument(
                    locate(
                        SpecError::new(e)
                            .with_spec(spec.name.clone())
                            .with_field("config"),
                    )
                    .to_string(),
                )
            })?;
        }
    }
    Ok(specs)
}

/// The request id of a write: the request's field, else the metadata's.
/// What a write carries besides its command: the request id that deduplicates it, and who
/// asked (named by the events it writes).
#[derive(Clone, Debug, Default)]
struct Asked {
    id: Option<String>,
    by: Option<String>,
}

impl Asked {
    /// The same caller, and an id of its own for part `n` of the request.
    fn part(&self, n: impl std::fmt::Display) -> Asked {
        Asked {
            id: self.id.as_ref().map(|id| format!("{id}/{n}")),
            by: self.by.clone(),
        }
    }
}

/// The request id (the message's field, else the `x-mode-request-id` header) and the caller.
fn write_id<T>(request: &Request<T>, field: &str) -> Asked {
    let caller = Caller::of(request);
    Asked {
        id: Some(field.to_string())
            .filter(|id| !id.is_empty())
            .or_else(|| request_id(request)),
        by: (!matches!(
            caller,
            Caller::Client {
                proof: Proof::None,
                ..
            }
        ))
        .then(|| caller.to_string()),
    }
}

fn no_service(name: &str) -> Status {
    Status::not_found(format!("no service named '{name}' (see `modectl svc ls`)"))
}

type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        let forward = may_forward(&request);
        let status = self.node.status(request.into_inner().local, forward).await;
        let mut reply = status_to_proto(&status);
        reply.agents = self.node.local_state(|s| {
            s.nodes
                .keys()
                .filter(|id| !status.members.iter().any(|m| m.id == **id))
                .count() as u32
        });
        Ok(Response::new(reply))
    }

    async fn compact(
        &self,
        _request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactReply>, Status> {
        let (snapshot_index, purged_index) =
            self.node.compact().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::CompactReply {
            snapshot_index,
            purged_index,
        }))
    }

    async fn apply_services(
        &self,
        mut request: Request<pb::ApplyServicesRequest>,
    ) -> Result<Response<pb::ApplyServicesReply>, Status> {
        let id = write_id(&request, &request.get_ref().request_id);
        let specs = self.request_specs(request.get_mut()).await?;
        let r = request.into_inner();
        let expected: BTreeMap<String, u64> = r.expected_generations.into_iter().collect();
        let prefix = |s: Status| match r.file.is_empty() || s.code() == tonic::Code::Unavailable {
            true => s,
            false if s.message().starts_with(&r.file) => s,
            false => Status::new(s.code(), format!("{}: {}", r.file, s.message())),
        };
        if r.dry_run {
            self.barrier(false).await?;
            let (changes, plan) = self
                .node
                .local_state(|s| {
                    s.plan_apply(&specs, &expected)
                        .map(|changes| (changes, s.plan_placements(&specs)))
                })
                .map_err(|refused| prefix(refusal_status(&refused)))?;
            return Ok(Response::new(pb::ApplyServicesReply {
                changes: changes.iter().map(convert::change_to_proto).collect(),
                dry_run: true,
                log_index: 0,
                plan: plan.iter().map(convert::planned_to_proto).collect(),
            }));
        }
        let out = self
            .commit(Command::ApplySpecs { specs, expected }, id)
            .await
            .map_err(prefix)?;
        Ok(Response::new(pb::ApplyServicesReply {
            changes: out
                .result
                .changes
                .iter()
                .map(convert::change_to_proto)
                .collect(),
            dry_run: false,
            log_index: out.log_index,
            plan: Vec::new(),
        }))
    }

    async fn get_service(
        &self,
        request: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let applied = self.barrier(r.stale).await?;
        self.node
            .local_state(|s| service_view(s, &r.name, applied, &caller))
            .map(Response::new)
            .ok_or_else(|| no_service(&r.name))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesReply>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let applied = self.barrier(r.stale).await?;
        let services = self.node.local_state(|s| {
            let reasons = s.unplaced_reasons();
            s.specs
                .keys()
                .filter_map(|name| {
                    convert::service_to_proto(
                        s,
                        name,
                        applied,
                        crate::replication::now_ms(),
                        &caller,
                        Some(&reasons),
                        !r.summary,
                    )
                })
                .collect()
        });
        Ok(Response::new(pb::ListServicesReply {
            services,
            applied_index: applied,
        }))
    }

    async fn scale_service(
        &self,
        request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::ScaleServiceReply>, Status> {
        let id = write_id(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        if !r.force {
            self.barrier(false).await?;
            let (shortfall, now) = self.node.local_state(|s| {
                (
                    s.scale_shortfall(&r.name, r.replicas),
                    s.specs.get(&r.name).map_or(0, |spec| spec.instances()),
                )
            });
            if let Some((n, why)) = shortfall {
                return Err(Status::failed_precondition(format!(
                    "'{}' was not scaled to {}: {n} of the {} new instances could not be placed ({why}). Add nodes or capacity, or scale with force (they then wait, unplaced, until they fit)",
                    r.name,
                    r.replicas,
                    r.replicas.saturating_sub(now)
                )));
            }
        }
        let out = self
            .commit(
                Command::ScaleSpec {
                    name: r.name,
                    replicas: r.replicas,
                    expected_generation: r.expected_generation,
                },
                id,
            )
            .await?;
        Ok(Response::new(pb::ScaleServiceReply {
            generation: out.result.generation.unwrap_or(0),
            message: out.result.message,
        }))
    }

    async fn service_history(
        &self,
        request: Request<pb::ServiceHistoryRequest>,
    ) -> Result<Response<pb::ServiceHistoryReply>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.barrier(false).await?;
        let now = crate::replication::now_ms();
        self.node
            .local_state(|s| {
                let spec = s.specs.get(&r.name)?;
                let empty = BTreeMap::new();
                let placed = s.placements.get(&r.name).unwrap_or(&empty);
                let versions = s
                    .versions
                    .get(&r.name)
                    .map(|vs| {
                        vs.iter()
                            .map(|v| {
                                let current = v.spec.generation == spec.generation;
                                pb::ServiceVersion {
                                    spec: Some(convert::spec_for(&caller, &v.spec)),
                                    rollout: Some(convert::rollout_to_proto(
                                        v,
                                        current.then(|| {
                                            crate::model::rollout::progress(spec, placed, now)
                                        }),
                                    )),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(pb::ServiceHistoryReply { versions })
            })
            .map(Response::new)
            .ok_or_else(|| no_service(&r.name))
    }

    /// Without a version: the newest kept one before the current that rolled out completely
    /// (else the one before the current).
    async fn rollback_service(
        &self,
        request: Request<pb::RollbackServiceRequest>,
    ) -> Result<Response<pb::RollbackServiceReply>, Status> {
        let id = write_id(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        self.barrier(false).await?;
        let (current, to) = self
            .node
            .local_state(|s| {
                let current = s.specs.get(&r.name)?.generation;
                if r.to_generation != 0 {
                    return Some((current, Some(r.to_generation)));
                }
                let older: Vec<&crate::model::rollout::SpecVersion> = s
                    .versions
                    .get(&r.name)
                    .map(|vs| vs.iter().filter(|v| v.spec.generation < current).collect())
                    .unwrap_or_default();
                let good = older
                    .iter()
                    .rev()
                    .find(|v| v.status == crate::model::rollout::RolloutStatus::Succeeded)
                    .or(older.last())
                    .map(|v| v.spec.generation);
                Some((current, good))
            })
            .ok_or_else(|| no_service(&r.name))?;
        let Some(to) = to else {
            return Err(Status::failed_precondition(format!(
                "service '{}' has no earlier version kept to roll back to (see `modectl svc history {}`)",
                r.name, r.name
            )));
        };
        let expected = if r.expected_generation != 0 {
            r.expected_generation
        } else {
            current
        };
        let out = self
            .commit(
                Command::RollbackSpec {
                    name: r.name,
                    to_generation: to,
                    expected_generation: expected,
                    revert_of: None,
                    reason: None,
                },
                id,
            )
            .await?;
        Ok(Response::new(pb::RollbackServiceReply {
            generation: out.result.generation.unwrap_or(0),
            restored: to,
            message: out.result.message,
        }))
    }

    /// One instance: asked to restart, answered at once. Every instance: one at a time, each
    /// restarted only once the one before runs again (an instance that was not running is
    /// restarted without waiting); fails when one does not run again within
    /// [`RESTART_WAIT`], leaving the rest as they were.
    async fn restart_service(
        &self,
        request: Request<pb::RestartServiceRequest>,
    ) -> Result<Response<pb::RestartServiceReply>, Status> {
        let id = write_id(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        self.barrier(false).await?;
        if !self.node.local_state(|s| s.specs.contains_key(&r.name)) {
            return Err(no_service(&r.name));
        }
        let instances = self.instances(&r.name);
        let rolling = r.slot.is_none();
        let targets: Vec<(u32, String, u64)> = match r.slot {
            Some(slot) => match instances.into_iter().find(|(s, _, _)| *s == slot) {
                Some(i) => vec![i],
                None => {
                    return Err(Status::not_found(format!(
                        "service '{}' has no instance {slot} placed",
                        r.name
                    )))
                }
            },
            None => instances,
        };
        let mut slots = Vec::new();
        for (slot, state, _) in targets {
            // One id per instance, so that a retried request restarts each once.
            let id = id.part(slot);
            let out = self
                .commit(
                    Command::RestartInstance {
                        service: r.name.clone(),
                        slot,
                    },
                    id,
                )
                .await?;
            slots.push(slot);
            if rolling && state == "running" {
                self.wait_running_again(&r.name, slot, out.log_index)
                    .await?;
            }
        }
        let message = match (rolling, slots.len()) {
            (_, 0) => format!("service '{}' has no instances to restart", r.name),
            (false, _) => format!("{}#{} restart requested", r.name, slots[0]),
            (true, n) => format!(
                "service '{}' restarted ({n} instances, one at a time)",
                r.name
            ),
        };
        Ok(Response::new(pb::RestartServiceReply { slots, message }))
    }

    async fn delete_service(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceReply>, Status> {
        let id = write_id(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let out = self
            .commit(
                Command::DeleteSpec {
                    name: r.name,
                    force: r.force,
                },
                id,
            )
            .await?;
        Ok(Response::new(pb::DeleteServiceReply {
            message: out.result.message,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesReply>, Status> {
        let applied = self.barrier(request.into_inner().stale).await?;
        let members = self.node.graph_context().members;
        let nodes = self.node.local_state(|s| {
            let counts = convert::instances_per_node(s);
            s.nodes
                .values()
                .map(|n| {
                    convert::node_to_proto(n, &members, counts.get(&n.id).copied().unwrap_or(0))
                })
                .collect()
        });
        Ok(Response::new(pb::ListNodesReply {
            nodes,
            applied_index: applied,
        }))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeReply>, Status> {
        let id = write_id(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        self.barrier(false).await?;
        let blockers = self
            .node
            .local_state(|s| s.drain_blockers(r.id))
            .map_err(|e| Status::not_found(e.to_string()))?;
        let stranded: Vec<String> = blockers
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                format!(
                    "{}: {}",
                    b["instance"].as_str().unwrap_or("?"),
                    b["reason"].as_str().unwrap_or("no eligible node")
                )
            })
            .collect();
        let node = r.id;
        if !stranded.is_empty() && !r.force {
            return Err(Status::failed_precondition(format!(
                "node {node} was not drained: {} could run nowhere else: {}. Add capacity or nodes, or drain with force (they then stay on node {node} until they can move)",
                if stranded.len() == 1 { "1 instance" } else { "some instances" },
                stranded.join("; ")
            )));
        }
        self.commit(
            Command::SetNodeStatus {
                id: node,
                status: NodeStatus::Draining,
            },
            id,
        )
        .await?;
        let message = if stranded.is_empty() {
            format!("node {node} is draining: its instances start elsewhere, then stop here")
        } else {
            format!(
                "node {node} is draining: its instances start elsewhere, then stop here; these stay on node {node} until they can move: {}",
                stranded.join("; ")
            )
        };
        Ok(Response::new(pb::DrainNodeReply { message, stranded }))
    }

    async fn undrain_node(
        &self,
        request: Request<pb::UndrainNodeRequest>,
    ) -> Result<Response<pb::UndrainNodeReply>, Status> {
        let id = write_id(&request, &request.get_ref().request_id);
        let node = request.into_inner().id;
        self.commit(
            Command::SetNodeStatus {
                id: node,
                status: NodeStatus::Up,
            },
            id,
        )
        .await?;
        Ok(Response::new(pb::UndrainNodeReply {
            message: format!("node {node} is back in service"),
        }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        let asked = write_id(&request, "");
        let r = request.into_inner();
        let id = r.id;
        if !r.force {
            self.barrier(false).await?;
            let known = self.node.graph_context().members.contains_key(&id);
            match self.node.local_state(|s| s.removal_hazards(id)) {
                Ok(None) => {}
                Ok(Some(why)) => {
                    return Err(Status::failed_precondition(format!(
                        "node {id} was not removed: {why}. Drain it first (its instances start elsewhere before they stop), or remove it with force"
                    )))
                }
                // A Raft member that never registered as a node: nothing runs there.
                Err(_) if known => {}
                Err(e) => {
                    return Err(Status::not_found(format!(
                        "{e} in the cluster (see `modectl node ls`)"
                    )))
                }
            }
        }
        if self.node.graph_context().members.contains_key(&id) {
            // A Raft member leaves the voters (or learners) and the node table.
            let message = self
                .node
                .remove_member(id, true)
                .await
                .map_err(|e| to_status(&e))?;
            return Ok(Response::new(pb::RemoveNodeReply { message }));
        }
        self.barrier(false).await?;
        if !self.node.local_state(|s| s.nodes.contains_key(&id)) {
            return Err(Status::not_found(format!(
                "no node {id} in the cluster (see `modectl node ls`)"
            )));
        }
        let out = self.commit(Command::RemoveNode { id }, asked).await?;
        Ok(Response::new(pb::RemoveNodeReply {
            message: out.result.message,
        }))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsReply>, Status> {
        let r = request.into_inner();
        let applied = self.barrier(r.stale).await?;
        let events = self.node.local_state(|s| {
            let service = (!r.service.is_empty()).then_some(r.service.as_str());
            let mut events: Vec<pb::Event> = s
                .events
                .iter()
                .filter(|e| service.is_none() || e.service.as_deref() == service)
                .map(convert::event_to_proto)
                .collect();
            if let Some(name) = service {
                if events.is_empty() && !s.specs.contains_key(name) {
                    return Err(no_service(name));
                }
            }
            if r.tail != 0 && events.len() > r.tail as usize {
                events.drain(..events.len() - r.tail as usize);
            }
            Ok(events)
        })?;
        Ok(Response::new(pb::ListEventsReply {
            events,
            applied_index: applied,
        }))
    }

    async fn list_kinds(
        &self,
        _request: Request<pb::ListKindsRequest>,
    ) -> Result<Response<pb::ListKindsReply>, Status> {
        self.barrier(false).await?;
        let kinds = self.node.local_state(convert::kinds_to_proto);
        Ok(Response::new(pb::ListKindsReply { kinds }))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIReply>, Status> {
        let reply = match Caller::of(&request) {
            Caller::Client { name, role, proof } => pb::WhoAmIReply {
                name,
                role: role.to_string(),
                proof: match proof {
                    Proof::None => "none".to_string(),
                    Proof::Certificate => "certificate".to_string(),
                    Proof::Token(id) => format!("token {id}"),
                },
            },
            Caller::Node(id) => pb::WhoAmIReply {
                name: format!("node {id}"),
                role: String::new(),
                proof: "certificate".to_string(),
            },
        };
        Ok(Response::new(reply))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenReply>, Status> {
        let asked = write_id(&request, "");
        let r = request.into_inner();
        crate::security::Role::parse(&r.role).map_err(Status::invalid_argument)?;
        crate::security::pki::check_client_name(&r.name)
            .map_err(|e| Status::invalid_argument(e.replace("client name", "token name")))?;
        let (id, token) = crate::security::tokens::generate().map_err(Status::internal)?;
        let expires_ms = match r.ttl_s {
            0 => 0,
            ttl => crate::replication::now_ms().saturating_add(ttl.saturating_mul(1000)),
        };
        self.commit(
            Command::CreateToken {
                id: id.clone(),
                name: r.name,
                role: r.role,
                hash: crate::security::tokens::hash(&token),
                expires_ms,
            },
            asked,
        )
        .await?;
        self.barrier(false).await?;
        let info = self
            .node
            .local_state(|s| s.tokens.get(&id).map(convert::token_to_proto));
        Ok(Response::new(pb::CreateTokenReply { token, info }))
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensReply>, Status> {
        self.barrier(false).await?;
        let tokens = self
            .node
            .local_state(|s| s.tokens.values().map(convert::token_to_proto).collect());
        Ok(Response::new(pb::ListTokensReply { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenReply>, Status> {
        let asked = write_id(&request, "");
        let id = request.into_inner().id;
        let out = self.commit(Command::RevokeToken { id }, asked).await?;
        Ok(Response::new(pb::RevokeTokenReply {
            message: out.result.message,
        }))
    }

    async fn graph(
        &self,
        request: Request<pb::GraphRequest>,
    ) -> Result<Response<pb::ClusterGraph>, Status> {
        let r = request.into_inner();
        let filter = GraphFilter::from_request(r.service, r.node, r.daemon);
        let deadline = match r.deadline_ms {
            0 => DEFAULT_DEADLINE,
            ms => Duration::from_millis(u64::from(ms)),
        };
        self.inspector
            .check_filter(&filter)
            .map_err(Status::not_found)?;
        let graph = self
            .inspector
            .graph::<crate::service::BeaconNode>(&filter, deadline)
            .await;
        // Thousands of instance trees: off the async threads.
        let graph = tokio::task::spawn_blocking(move || convert::graph_to_proto(&graph))
            .await
            .map_err(|e| Status::internal(format!("converting the graph failed: {e}")))?;
        Ok(Response::new(graph))
    }

    type WatchServiceStream = Stream<pb::Service>;

    async fn watch_service(
        &self,
        request: Request<pb::WatchServiceRequest>,
    ) -> Result<Response<Self::WatchServiceStream>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().name;
        self.barrier(false).await?;
        let node = self.node.clone();
        let mut applied = node.applied_changes();
        let first = node
            .local_state(|s| service_view(s, &name, node.applied_index(), &caller))
            .ok_or_else(|| no_service(&name))?;
        // One message in flight: a slow client sees the latest state, not every one between.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let mut next_view = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() {
                        let _ = tx.send(Err(Status::unavailable("this server is shutting down; watch again elsewhere"))).await;
                        return;
                    },
                    _ = tx.closed() => return,
                }
                // A view of a short service runs a plan of the whole cluster under the
                // state's lock: at most one per WATCH_SERVICE_EVERY, of the latest state
                // (thousands of reports a second at scale do not each cost one).
                tokio::time::sleep_until(next_view).await;
                next_view = tokio::time::Instant::now() + WATCH_SERVICE_EVERY;
                let index = *applied.borrow_and_update();
                let Some(now) = node.local_state(|s| service_view(s, &name, index, &caller)) else {
                    // Purged: the watch ends.
                    return;
                };
                let same = pb::Service {
                    applied_index: last.applied_index,
                    ..now.clone()
                } == last;
                if !same {
                    last = now.clone();
                    if tx.send(Ok(now)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type WatchEventsStream = Stream<pb::Event>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = request.into_inner();
        self.barrier(false).await?;
        let node = self.node.clone();
        let applied = node.applied_changes();
        let from = if r.only_new {
            node.local_state(|s| s.next_event_seq)
        } else if r.after_seq == 0 {
            0
        } else {
            r.after_seq.saturating_add(1)
        };
        let service = (!r.service.is_empty()).then_some(r.service);
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(follow_events(node, applied, from, service, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type LogsStream = super::logs::LineStream;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        super::logs::logs(&self.node, &self.kinds, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// Send the events from sequence number `from` on (those still kept, then each new one as it
/// is applied) to `tx`, until the client goes away. The first event sent says `gap` when
/// some after `from` were dropped from the bounded log before the watch began. A client so
/// slow that the log drops events it has not read yet gets its stream ended with
/// RESOURCE_EXHAUSTED, saying where to resume.
async fn follow_events(
    node: Arc<ClusterNode>,
    mut applied: tokio::sync::watch::Receiver<u64>,
    mut from: u64,
    service: Option<String>,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
) {
    // Nothing read from the log yet; a gap found then is flagged on the first event sent.
    let mut first = true;
    let mut pending_gap = false;
    loop {
        applied.borrow_and_update();
        loop {
            // (events, oldest kept seq, next seq)
            let (batch, oldest, next) = node.local_state(|s| {
                let oldest = s.events.front().map_or(s.next_event_seq, |e| e.seq);
                let skip = from.saturating_sub(oldest) as usize;
                let batch: Vec<crate::model::state::Event> = s
                    .events
                    .iter()
                    .skip(skip)
                    .take(WATCH_BATCH)
                    .cloned()
                    .collect();
                (batch, oldest, s.next_event_seq)
            });
            let gap = from < oldest && from < next;
            if gap && !first {
                let _ = tx
                    .send(Err(Status::resource_exhausted(format!(
                        "this watcher fell behind: events {from}..{oldest} were dropped from the bounded event log before it read them; watch again with after_seq {} to go on (the first event will say `gap`)",
                        from.saturating_sub(1)
                    ))))
                    .await;
                return;
            }
            if gap {
                pending_gap = true;
            }
            first = false;
            let empty = batch.is_empty();
            for e in batch {
                from = e.seq + 1;
                if service
                    .as_deref()
                    .is_some_and(|s| e.service.as_deref() != Some(s))
                {
                    continue;
                }
                let mut event = convert::event_to_proto(&e);
                event.gap = std::mem::take(&mut pending_gap);
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if empty || from >= next {
                break;
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() {
                let _ = tx.send(Err(Status::unavailable("this server is shutting down; watch again with after_seq set to the last event seen"))).await;
                return;
            },
            _ = tx.closed() => return,
        }
    }
}

/// The public listener's extra services: grpc.health.v1 (`""` and `mode.v1.Control` SERVING
/// while this node is ready, as `/readyz` says, NOT_SERVING otherwise) and server reflection
/// (v1 and v1alpha) listing `mode.v1.Control`, the health service and reflection itself.
/// The health status follows readiness for as long as the returned task runs (abort it when
/// the server stops).
pub fn public_extras(
    node: Arc<ClusterNode>,
) -> (
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    tokio::task::JoinHandle<()>,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    let follow = tokio::spawn(async move {
        let mut applied = node.applied_changes();
        let mut leaders = node.leader_changes();
        let mut last: Option<bool> = None;
        loop {
            let ready = node.readiness().is_ok();
            if last != Some(ready) {
                let status = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                for name in ["", CONTROL_SERVICE] {
                    reporter.set_service_status(name, status).await;
                }
                last = Some(ready);
            }
            // Readiness follows Raft's state and the applied index; also look now and then
            // (a refusal by peers is no Raft metric).
            let pause = tokio::time::sleep(Duration::from_millis(500));
            tokio::select! {
                Ok(()) = applied.changed() => {}
                Ok(()) = leaders.changed() => {}
                _ = pause => {}
            }
        }
    });
    let names = [
        CONTROL_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mode_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in names {
            b = b.with_service_name(name);
        }
        b
    };
    // The descriptors are compiled in: building from them fails only if the build is broken.
    let v1 = builder()
        .build_v1()
        .expect("the compiled-in descriptor sets are valid");
    let v1alpha = builder()
        .build_v1alpha()
        .expect("the compiled-in descriptor sets are valid");
    (health, v1, v1alpha, follow)
}

/// Calls one client connection may have open at once on the public listener.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// Finds the caller a bearer token stands for among `node`'s replicated token records (what
/// the public API and the HTTP side port accept).
pub(super) fn token_lookup(node: &Arc<ClusterNode>) -> crate::security::auth::TokenLookup {
    let node = node.clone();
    Arc::new(move |token: &str| {
        let now = crate::replication::now_ms();
        node.local_state(|s| crate::security::caller_for_token(&s.tokens, token, now))
    })
}

/// The public API's gRPC service name.
pub const CONTROL_SERVICE: &str = "mode.v1.Control";

/// Serve the public API of the node `inspector` looks at on `listener` until `shutdown`,
/// with health and reflection ([`public_extras`]). With `tls`, connections are TLS and every
/// call is authenticated (client certificate or bearer token) and authorised by role. The
/// peer API has its own listener ([`super::peer::serve_peer`]).
pub async fn serve(
    inspector: Arc<Inspector>,
    kinds: KindRegistry,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<crate::security::tls::NodeTls>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    use crate::security::auth::{AuthLayer, Policy, Surface};
    use crate::security::tls::ClientCerts;
    let tokens = token_lookup(inspector.node());
    let policy = Policy::new(Surface::Public, tls.is_some(), Some(tokens));
    let incoming =
        crate::security::tls::incoming(listener, tls.map(|t| (t, ClientCerts::Optional)));
    let (health, reflection, reflection_alpha, follow) = public_extras(inspector.node().clone());
    let served = tonic::transport::Server::builder()
        .trace_fn(crate::telemetry::server_span)
        // One client connection may not hold more calls open at once than this (watches
        // included); beyond it, HTTP/2 makes the client wait.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // Outside the auth layer: refused calls are counted too.
        .layer(super::metrics::GrpcMetricsLayer)
        .layer(AuthLayer::new(policy))
        .add_service(ControlService::new(inspector, kinds).into_server())
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    follow.abort();
    served
}

#[cfg(test)]
mod tests;

/// How often a `WatchService` stream looks at the state at most.
const WATCH_SERVICE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Service `name` as a client sees it, now, with why its unplaced instances are unplaced
/// (a plan of the cluster, run only when it has fewer instances placed than wanted).
fn service_view(
    s: &crate::model::state::ClusterState,
    name: &str,
    applied: u64,
    caller: &Caller,
) -> Option<pb::Service> {
    let reasons = s
        .short_services()
        .any(|n| n == name)
        .then(|| s.unplaced_reasons());
    convert::service_to_proto(
        s,
        name,
        applied,
        crate::replication::now_ms(),
        caller,
        reasons.as_ref(),
        true,
    )
}
