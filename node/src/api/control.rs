//! The public API server (`mode.v1.Control`): typed user operations, answered by any
//! server; writes go to the leader. The protobuf <-> domain conversion happens here.

use std::sync::Arc;

use mode_proto::v1 as pb;
use mode_proto::v1::control_server::{Control, ControlServer};
use tonic::{Request, Response, Status};

use super::inspect::{Inspector, MAX_GRAPH_BYTES};
use super::peer::may_forward;
use crate::agent::KindRegistry;
use crate::model::limits;
use crate::replication::{status_to_proto, to_status, ClusterNode};

/// The public API of one server.
pub struct ControlService {
    node: Arc<ClusterNode>,
    #[allow(dead_code)]
    inspector: Arc<Inspector>,
    #[allow(dead_code)]
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
        Ok(Response::new(status_to_proto(&status)))
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
        _request: Request<pb::ApplyServicesRequest>,
    ) -> Result<Response<pb::ApplyServicesReply>, Status> {
        Err(Status::unimplemented("apply_services: not built yet"))
    }

    async fn get_service(
        &self,
        _request: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        Err(Status::unimplemented("get_service: not built yet"))
    }

    async fn list_services(
        &self,
        _request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesReply>, Status> {
        Err(Status::unimplemented("list_services: not built yet"))
    }

    async fn scale_service(
        &self,
        _request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::ScaleServiceReply>, Status> {
        Err(Status::unimplemented("scale_service: not built yet"))
    }

    async fn restart_service(
        &self,
        _request: Request<pb::RestartServiceRequest>,
    ) -> Result<Response<pb::RestartServiceReply>, Status> {
        Err(Status::unimplemented("restart_service: not built yet"))
    }

    async fn delete_service(
        &self,
        _request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceReply>, Status> {
        Err(Status::unimplemented("delete_service: not built yet"))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesReply>, Status> {
        Err(Status::unimplemented("list_nodes: not built yet"))
    }

    async fn drain_node(
        &self,
        _request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeReply>, Status> {
        Err(Status::unimplemented("drain_node: not built yet"))
    }

    async fn undrain_node(
        &self,
        _request: Request<pb::UndrainNodeRequest>,
    ) -> Result<Response<pb::UndrainNodeReply>, Status> {
        Err(Status::unimplemented("undrain_node: not built yet"))
    }

    async fn list_events(
        &self,
        _request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsReply>, Status> {
        Err(Status::unimplemented("list_events: not built yet"))
    }

    async fn list_kinds(
        &self,
        _request: Request<pb::ListKindsRequest>,
    ) -> Result<Response<pb::ListKindsReply>, Status> {
        Err(Status::unimplemented("list_kinds: not built yet"))
    }

    async fn graph(
        &self,
        _request: Request<pb::GraphRequest>,
    ) -> Result<Response<pb::ClusterGraph>, Status> {
        Err(Status::unimplemented("graph: not built yet"))
    }

    type WatchServiceStream = Stream<pb::Service>;

    async fn watch_service(
        &self,
        _request: Request<pb::WatchServiceRequest>,
    ) -> Result<Response<Self::WatchServiceStream>, Status> {
        Err(Status::unimplemented("watch_service: not built yet"))
    }

    type WatchEventsStream = Stream<pb::Event>;

    async fn watch_events(
        &self,
        _request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("watch_events: not built yet"))
    }

    async fn remove_node(
        &self,
        _request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        Err(Status::unimplemented("remove_node: not built yet"))
    }
}

/// Serve the public API of the node `inspector` looks at on `listener` until `shutdown` (the
/// peer API has its own listener: [`super::peer::serve_peer`]).
pub async fn serve(
    inspector: Arc<Inspector>,
    kinds: KindRegistry,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .trace_fn(crate::telemetry::server_span)
        .add_service(ControlService::new(inspector, kinds).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
