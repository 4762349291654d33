//! The HTTP side port: `/healthz` (the process is up), `/readyz` (a member of a cluster with a
//! leader, caught up) and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::cluster::ClusterNode;

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(node): State<Arc<ClusterNode>>) -> impl IntoResponse {
    match node.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(node): State<Arc<ClusterNode>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        node.prometheus(),
    )
}

/// Serve the side port for `node` on `listener` until `shutdown`.
pub async fn serve_http(
    node: Arc<ClusterNode>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(node);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
