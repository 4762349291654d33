//! The control API server: `modectl` and other nodes call it; it answers in domain terms
//! through [`ClusterNode`].

use std::sync::Arc;

use mode_proto::v1 as pb;
use mode_proto::v1::control_server::{Control, ControlServer};
use mode_proto::v1::raft_server::RaftServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use super::inspect::{Inspector, DEFAULT_DEADLINE, MAX_GRAPH_BYTES};
use crate::agent::KindRegistry;
use crate::graph::GraphFilter;
use crate::model::limits;
use crate::model::spec::{parse_specs, validate_set, ServiceSpec, SpecError};
use crate::model::state::Command;
use crate::replication::{status_to_proto, to_status, ClusterNode, FORWARDED, REQUEST_ID};

/// The control API of one node.
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

    /// Check specs against each other, the stored ones, the kinds nodes offer and (for kinds
    /// this node knows) the kinds' config rules.
    fn check_specs(&self, specs: &[ServiceSpec], file: Option<&str>) -> Result<(), SpecError> {
        let (existing, offered) = self.node.local_state(|s| {
            let existing: Vec<ServiceSpec> = s.specs.values().cloned().collect();
            let offered: std::collections::BTreeSet<String> = s
                .nodes
                .values()
                .flat_map(|n| n.kinds.iter().cloned())
                .collect();
            (existing, offered)
        });
        let locate = |e: SpecError| match file {
            Some(f) if e.file.is_none() => e.with_file(f),
            _ => e,
        };
        validate_set(specs, &existing).map_err(locate)?;
        for spec in specs {
            if !offered.contains(&spec.kind) {
                let known: Vec<&str> = offered.iter().map(String::as_str).collect();
                return Err(locate(
                    SpecError::new(format!(
                        "no node offers kind '{}' (offered: {})",
                        spec.kind,
                        if known.is_empty() {
                            "none yet".to_string()
                        } else {
                            known.join(", ")
                        }
                    ))
                    .with_spec(spec.name.clone())
                    .with_field("kind"),
                ));
            }
            if self.kinds.contains(&spec.kind) {
                self.kinds.validate(&spec.kind, &spec.config).map_err(|e| {
                    locate(
                        SpecError::new(e)
                            .with_spec(spec.name.clone())
                            .with_field("config"),
                    )
                })?;
            }
        }
        Ok(())
    }
}

fn may_forward<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED).is_none()
}

/// The client's request id (metadata `x-mode-request-id`), if it sent one.
fn request_id<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        let forward = may_forward(&request);
        let status = self.node.status(request.into_inner().local, forward).await;
        Ok(Response::new(status_to_proto(&status)))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let forward = may_forward(&request);
        let id = request_id(&request)
            .or_else(|| Some(request.get_ref().request_id.clone()).filter(|id| !id.is_empty()));
        let text = &request.get_ref().command_json;
        limits::check_write_bytes(text.len())
            .map_err(|e| Status::invalid_argument(format!("{e}: send less in one write")))?;
        let command: Command = serde_json::from_str(text)
            .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
        let out = self
            .node
            .write_request(command, forward, id)
            .await
            .map_err(|e| to_status(&e))?;
        let response_json =
            serde_json::to_string(&out.result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::WriteReply {
            response_json,
            log_index: out.log_index,
            leader: out.leader,
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadReply>, Status> {
        let forward = may_forward(&request);
        let r = request.into_inner();
        let (value, applied) = self
            .node
            .read(&r.query, r.stale, forward)
            .await
            .map_err(|e| to_status(&e))?;
        // The event log or a large state is megabytes of JSON: off the async threads.
        let result_json = tokio::task::spawn_blocking(move || value.to_string())
            .await
            .map_err(|e| Status::internal(format!("encoding the answer failed: {e}")))?;
        if result_json.len() > limits::MAX_ANSWER_BYTES {
            return Err(Status::resource_exhausted(format!(
                "the answer to '{}' is {} bytes, over the limit of {} bytes: ask for less (nodes, specs, spec:<name>, placements or events)",
                r.query,
                result_json.len(),
                limits::MAX_ANSWER_BYTES
            )));
        }
        Ok(Response::new(pb::ReadReply {
            result_json,
            applied_index: applied,
            answered_by: self.node.id(),
        }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let forward = may_forward(&request);
        let r = request.into_inner();
        let (voter, message) = self
            .node
            .join_member(r.id, &r.address, r.incarnation, r.rejoin, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::JoinReply { voter, message }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        let forward = may_forward(&request);
        let message = self
            .node
            .remove_member(request.into_inner().id, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::RemoveNodeReply { message }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let forward = may_forward(&request);
        let grant = self
            .node
            .heartbeat(request.into_inner().node, forward)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::HeartbeatReply {
            leader: grant.leader,
            lease_ms: grant.lease.as_millis() as u64,
            lease_index: grant.index,
        }))
    }

    async fn apply_specs(
        &self,
        request: Request<pb::ApplySpecsRequest>,
    ) -> Result<Response<pb::ApplySpecsReply>, Status> {
        let id = request_id(&request);
        let r = request.into_inner();
        let file = if r.file.is_empty() {
            "(spec)"
        } else {
            r.file.as_str()
        };
        let file = file.to_string();
        // A big file is CPU work: off the async threads.
        let parse = move || parse_specs(&file, &r.text).map(|specs| (specs, file));
        let (specs, file) = tokio::task::spawn_blocking(parse)
            .await
            .map_err(|e| Status::internal(format!("parsing the specs failed: {e}")))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let file = file.as_str();
        self.check_specs(&specs, Some(file))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut results = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            // One id per spec of the request, so that a retry of the whole file applies each
            // spec once.
            let id = id.as_ref().map(|id| format!("{id}/{i}"));
            let out = self
                .node
                .write_request(Command::PutSpec { spec }, true, id)
                .await
                .map_err(|e| to_status(&e))?;
            results.push(out.result.message);
        }
        Ok(Response::new(pb::ApplySpecsReply { results }))
    }

    async fn node_beacon(
        &self,
        request: Request<pb::NodeBeaconRequest>,
    ) -> Result<Response<pb::NodeBeaconReply>, Status> {
        let r = request.into_inner();
        let filter = GraphFilter::from_request(r.service, 0, r.daemon);
        // Walking thousands of instance trees is CPU work: off the async threads.
        let inspector = self.inspector.clone();
        let report_json = tokio::task::spawn_blocking(move || {
            serde_json::to_vec(&inspector.local_report(&filter))
        })
        .await
        .map_err(|e| Status::internal(format!("reading this node's beacon failed: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::NodeBeaconReply {
            node: self.node.id(),
            report_json,
        }))
    }

    async fn graph(
        &self,
        request: Request<pb::GraphRequest>,
    ) -> Result<Response<pb::GraphReply>, Status> {
        let r = request.into_inner();
        let filter = GraphFilter::from_request(r.service, r.node, r.daemon);
        let deadline = match r.deadline_ms {
            0 => DEFAULT_DEADLINE,
            ms => std::time::Duration::from_millis(u64::from(ms)),
        };
        self.inspector
            .check_filter(&filter)
            .map_err(Status::not_found)?;
        // Trees pass through as the nodes sent them.
        let graph = self
            .inspector
            .graph::<crate::graph::RawTree>(&filter, deadline)
            .await;
        let graph_json = serde_json::to_vec(&graph).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::GraphReply { graph_json }))
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
}

/// Serve the Raft transport and the control API for the node `inspector` looks at on
/// `listener` until `shutdown`.
pub async fn serve(
    inspector: Arc<Inspector>,
    kinds: KindRegistry,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .trace_fn(crate::telemetry::server_span)
        .add_service(
            RaftServer::new(inspector.node().raft_service())
                .max_decoding_message_size(limits::MAX_RAFT_MESSAGE_BYTES),
        )
        .add_service(
            ControlServer::new(ControlService::new(inspector, kinds))
                .max_decoding_message_size(limits::MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_GRAPH_BYTES.max(limits::MAX_ANSWER_BYTES)),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
