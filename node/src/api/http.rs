//! The HTTP side port: `/healthz` (the process is up), `/readyz` (a member of a cluster with a
//! leader, caught up), `/metrics` (Prometheus text), and the web view: `/` (the live cluster
//! graph and the event log), `/api/graph` (JSON), `/api/graph.svg`, `/api/events` (`?tail=N`),
//! and for big clusters `/api/summary` (counts, health, and the instances needing attention)
//! and `/api/service/NAME` (one service's instances, `?per_node=N`).
//!
//! When the node has TLS the port speaks HTTPS with the node's certificate, and the web view
//! and `/api/*` need a client credential (any role): a client certificate, or a token as
//! `Authorization: Bearer` or as the password of Basic auth (a browser asks for it). Health,
//! readiness and metrics stay open for probes and scrapers: they carry no secrets.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;

use super::inspect::{Inspector, DEFAULT_DEADLINE};
use crate::graph::{svg, GraphFilter};
use crate::security::auth::{credentials, TokenLookup};
use crate::security::tls::{ConnInfo, NodeTls, ServerConn, Transport};
use crate::security::Caller;

/// Paths anyone may read, even when auth is on: probes and scrapes, which carry no secrets.
const OPEN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Who may read what on the side port.
#[derive(Clone)]
struct Gate {
    /// Off without TLS (`--dev`, loopback, `--insecure`): everyone reads everything.
    enabled: bool,
    tokens: TokenLookup,
}

/// Lets a request through to its route, or answers it: plaintext on the HTTPS port, and the
/// web view and `/api/*` without a client credential, are refused.
async fn admit(
    State(gate): State<Gate>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    request: Request,
    next: Next,
) -> Response {
    if !gate.enabled {
        return next.run(request).await;
    }
    if matches!(conn.transport, Transport::PlainOnTlsListener) {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONNECTION, "close")],
            "this port speaks HTTPS: use https:// and trust the cluster's CA (curl --cacert ca.pem)\n",
        )
            .into_response();
    }
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let refusal = match credentials(request.headers(), Some(&conn.transport), Some(&gate.tokens)) {
        Ok(Some(Caller::Client { .. })) => return next.run(request).await,
        Ok(Some(node @ Caller::Node(_))) => (
            StatusCode::FORBIDDEN,
            format!("{node}'s certificate is for the peer API, not for the web view: use a client certificate or a token\n"),
        )
            .into_response(),
        Ok(None) => unauthorized(
            "credentials needed: a client certificate, or a token (`modectl token create --role viewer`) as `Authorization: Bearer <token>` or as the password of Basic auth",
        ),
        Err(why) => unauthorized(&why),
    };
    tracing::debug!(
        "refused HTTP {} from {:?}: {}",
        request.uri().path(),
        conn.remote,
        refusal.status()
    );
    refusal
}

/// A 401 saying `why`, asking a browser for a user name and password (the token).
fn unauthorized(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"mode\", charset=\"UTF-8\"",
        )],
        format!("{why}\n"),
    )
        .into_response()
}

/// The side port's connections (HTTPS when the node has TLS), for `axum::serve`.
struct Connections {
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<ServerConn>>,
    local: SocketAddr,
}

impl axum::serve::Listener for Connections {
    type Io = ServerConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ServerConn, SocketAddr) {
        use tonic::transport::server::Connected as _;
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let remote = conn.connect_info().remote.unwrap_or(self.local);
                    return (conn, remote);
                }
                Some(Err(e)) => tracing::debug!("an HTTP connection failed: {e}"),
                // The stream ends only after this listener is dropped: never while accepting.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Connections>>
    for ConnInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Connections>) -> ConnInfo {
        tonic::transport::server::Connected::connect_info(stream.io())
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(inspector): State<Arc<Inspector>>) -> impl IntoResponse {
    match inspector.node().readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The content type of Prometheus text.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(inspector): State<Arc<Inspector>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        super::metrics::render(inspector.node()),
    )
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("index.html"),
    )
}

/// The graph filter from a query string (`service=NAME&node=ID&daemon=1`).
fn filter_from_query(query: Option<&str>) -> Result<GraphFilter, String> {
    let mut filter = GraphFilter::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "service" if value.is_empty() => {}
            "service" if crate::model::spec::is_valid_name(value) => {
                filter.service = Some(value.to_string())
            }
            "service" => return Err(format!("'{value}' is not a service name")),
            "node" if value.is_empty() => {}
            "node" => {
                filter.node = Some(
                    value
                        .parse()
                        .map_err(|_| format!("node '{value}' is not a node id"))?,
                )
            }
            "daemon" => filter.daemon = value != "0" && value != "false",
            other => {
                return Err(format!(
                    "unknown parameter '{other}': use service, node or daemon"
                ))
            }
        }
    }
    Ok(filter)
}

async fn graph_for<T: crate::graph::TreeForm>(
    inspector: &Arc<Inspector>,
    uri: &Uri,
) -> Result<crate::graph::ClusterGraph<T>, Response> {
    let filter = filter_from_query(uri.query())
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response())?;
    inspector
        .check_filter(&filter)
        .map_err(|e| (StatusCode::NOT_FOUND, format!("{e}\n")).into_response())?;
    Ok(inspector.graph(&filter, DEFAULT_DEADLINE).await)
}

async fn graph_json(State(inspector): State<Arc<Inspector>>, uri: Uri) -> Response {
    match graph_for::<crate::graph::RawTree>(&inspector, &uri).await {
        Ok(g) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&g).unwrap_or_default(),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn graph_svg(State(inspector): State<Arc<Inspector>>, uri: Uri) -> Response {
    match graph_for::<crate::service::BeaconNode>(&inspector, &uri).await {
        // Megabytes of SVG for a large cluster: drawn off the async threads.
        Ok(g) => match tokio::task::spawn_blocking(move || svg::render(&g)).await {
            Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("drawing the graph failed: {e}\n"),
            )
                .into_response(),
        },
        Err(r) => r,
    }
}

/// `?tail=N`: only the latest N events (the web view asks for a page's worth, not all 10,000).
async fn events(
    State(inspector): State<Arc<Inspector>>,
    uri: Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    let tail = match single_number(uri.query(), "tail") {
        Ok(t) => t,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    match inspector.node().read("events", true, false).await {
        Ok((serde_json::Value::Array(mut events), _)) => {
            if let Some(tail) = tail {
                events.drain(..events.len().saturating_sub(tail));
            }
            json_with_etag(&headers, serde_json::Value::Array(events).to_string())
        }
        Ok((v, _)) => json_with_etag(&headers, v.to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// The value of `key` in a query string that may hold only that key (`None`: absent).
fn single_number(query: Option<&str>, key: &str) -> Result<Option<usize>, String> {
    let mut found = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some((k, v)) if k == key => {
                found = Some(
                    v.parse()
                        .map_err(|_| format!("{key} '{v}' is not a number: use e.g. {key}=200"))?,
                )
            }
            _ => {
                let name = pair.split_once('=').map_or(pair, |(k, _)| k);
                return Err(format!("unknown parameter '{name}': use {key}"));
            }
        }
    }
    Ok(found)
}

/// A JSON body with an `ETag`; `304 Not Modified` when the client already has it (a page
/// polling with `cache: "no-cache"` then moves no body while nothing changed).
fn json_with_etag(headers: &axum::http::HeaderMap, body: String) -> Response {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    let etag = format!("\"{:016x}\"", h.finish());
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if cached {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::ETAG, etag),
        ],
        body,
    )
        .into_response()
}

/// The cluster summed up from this node's replica ([`crate::graph::summary`]): a few KB
/// whatever the number of instances.
async fn summary(
    State(inspector): State<Arc<Inspector>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let node = inspector.node();
    let ctx = node.graph_context();
    let body = node.local_state(|s| {
        serde_json::to_string(&crate::graph::summary::summarize(s, &ctx)).unwrap_or_default()
    });
    json_with_etag(&headers, body)
}

/// Instances of one service listed per node by default (`?per_node=N`, at most
/// [`MAX_PER_NODE`]).
const DEFAULT_PER_NODE: usize = 200;
const MAX_PER_NODE: usize = 5_000;

/// One service in detail ([`crate::graph::summary::service_detail`]), for the web view when
/// a service is expanded.
async fn service(
    State(inspector): State<Arc<Inspector>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    if !crate::model::spec::is_valid_name(&name) {
        return (
            StatusCode::BAD_REQUEST,
            format!("'{}' is not a service name\n", name.escape_default()),
        )
            .into_response();
    }
    let per_node = match single_number(uri.query(), "per_node") {
        Ok(n) => n.unwrap_or(DEFAULT_PER_NODE).min(MAX_PER_NODE),
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let detail = inspector
        .node()
        .local_state(|s| crate::graph::summary::service_detail(s, &name, per_node));
    match detail {
        Some(d) => json_with_etag(&headers, serde_json::to_string(&d).unwrap_or_default()),
        None => (
            StatusCode::NOT_FOUND,
            format!("no service named '{name}' (see `modectl svc ls`)\n"),
        )
            .into_response(),
    }
}

/// Serve the side port for the node `inspector` looks at on `listener` until `shutdown`; with
/// `tls`, HTTPS, and the web view and `/api/*` only for clients (see the module doc).
pub async fn serve_http(
    inspector: Arc<Inspector>,
    listener: TcpListener,
    tls: Option<Arc<NodeTls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let gate = Gate {
        enabled: tls.is_some(),
        tokens: super::control::token_lookup(inspector.node()),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .route("/api/graph", get(graph_json))
        .route("/api/graph.svg", get(graph_svg))
        .route("/api/events", get(events))
        .route("/api/summary", get(summary))
        .route("/api/service/{name}", get(service))
        .with_state(inspector)
        .layer(axum::middleware::from_fn_with_state(gate, admit));
    let connections = Connections {
        local: listener.local_addr()?,
        incoming: crate::security::tls::incoming_http(listener, tls),
    };
    axum::serve(
        connections,
        app.into_make_service_with_connect_info::<ConnInfo>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The side port of an agent-only node: `/healthz`, `/readyz` (registered with the servers;
/// `ready` says why not) and `/metrics` (its build and process). It keeps no cluster state, so
/// it serves no web view and no metrics of the cluster; with `tls`, HTTPS.
pub async fn serve_agent_http(
    ready: crate::daemon::ReadyCheck,
    listener: TcpListener,
    tls: Option<Arc<NodeTls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(
                |State(ready): State<crate::daemon::ReadyCheck>| async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                },
            ),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                    super::metrics::render_agent(),
                )
            }),
        )
        .with_state(ready)
        // Only open paths here: the gate just turns plaintext on the HTTPS port away.
        .layer(axum::middleware::from_fn_with_state(
            Gate {
                enabled: tls.is_some(),
                tokens: Arc::new(|_: &str| {
                    Err("an agent-only node serves no credentialed paths".to_string())
                }),
            },
            admit,
        ));
    let connections = Connections {
        local: listener.local_addr()?,
        incoming: crate::security::tls::incoming_http(listener, tls),
    };
    axum::serve(
        connections,
        app.into_make_service_with_connect_info::<ConnInfo>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::{filter_from_query, single_number};

    #[test]
    fn a_single_number_parses_from_the_query_string() {
        assert_eq!(single_number(None, "tail"), Ok(None));
        assert_eq!(single_number(Some("tail=200"), "tail"), Ok(Some(200)));
        assert!(single_number(Some("tail=x"), "tail")
            .unwrap_err()
            .contains("not a number"));
        assert!(single_number(Some("tail=1&colour=red"), "tail")
            .unwrap_err()
            .contains("unknown parameter 'colour'"));
    }

    #[test]
    fn graph_filters_parse_from_the_query_string() {
        let f = filter_from_query(Some("service=web&node=2&daemon=1")).unwrap();
        assert_eq!(f.service.as_deref(), Some("web"));
        assert_eq!(f.node, Some(2));
        assert!(f.daemon);
        let f = filter_from_query(Some("service=&node=")).unwrap();
        assert_eq!((f.service, f.node), (None, None));
        assert!(filter_from_query(Some("node=x"))
            .unwrap_err()
            .contains("not a node id"));
        assert!(filter_from_query(Some("service=%3Cb%3E"))
            .unwrap_err()
            .contains("not a service name"));
        assert!(filter_from_query(Some("colour=red"))
            .unwrap_err()
            .contains("unknown parameter"));
    }
}
