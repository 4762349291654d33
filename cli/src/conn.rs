//! The endpoints modectl talks to (`--endpoint a,b,c`) and which calls may move on to the next.
//!
//! A call that never reached a node (connection refused, no route, name not resolved) is tried
//! on the next endpoint: nothing was done. A read that a node could not answer (no leader
//! there yet) is also tried on the next. A write whose outcome is unknown (the node took it,
//! then timed out or lost its leader) is tried again elsewhere only when it carries a request
//! id: the cluster applies a request id once, so a retry cannot apply it twice.

use std::future::Future;
use std::time::Duration;

use mode_proto::v1::control_client::ControlClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::Failure;

/// `say!("...", args)`: a line on stdout (see [`crate::output::say`]).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::say(format_args!($($arg)*))
    };
}

/// `say_err!("...", args)`: a line on stderr (see [`crate::output::say_err`]).
macro_rules! say_err {
    ($($arg:tt)*) => {
        $crate::output::say_err(format_args!($($arg)*))
    };
}

/// `rpc!(conn, Call::Read, method, request)`: [`Conn::call`] of one Control RPC, the request
/// built anew for each endpoint tried.
macro_rules! rpc {
    ($conn:expr, $kind:expr, $method:ident, $request:expr) => {
        $conn.call($kind, |mut c| {
            let request = $request;
            async move { c.$method(request).await }
        })
    };
}

/// The control API client; every call carries the current trace context and the bearer
/// token, if any.
pub(crate) type Client = ControlClient<InterceptedService<Channel, Outgoing>>;

/// How modectl proves who it is: TLS (trusting the cluster's CA, with a client certificate
/// when given) and/or a bearer token.
#[derive(Clone, Default)]
pub(crate) struct Credentials {
    pub(crate) tls: Option<mode::security::tls::ClientTls>,
    pub(crate) token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// Puts the W3C trace context of the current span, and the token, into each request.
#[derive(Clone)]
pub(crate) struct Outgoing {
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Outgoing {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        mode::telemetry::inject(req.metadata_mut());
        if let Some(token) = &self.token {
            req.metadata_mut().insert("authorization", token.clone());
        }
        Ok(req)
    }
}

/// What a call does, which decides where it may be retried.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Call {
    /// Changes nothing: any endpoint may answer it.
    Read,
    /// A change carrying a request id: retried elsewhere even when its outcome is unknown.
    Write,
    /// A change without deduplication: moved on only when no node was reached.
    WriteOnce,
}

/// One endpoint and its (lazily connected) client.
#[derive(Clone)]
struct Target {
    url: String,
    client: Client,
}

/// The endpoints, and the one that answered last (tried first next time). Cloning shares
/// the connections.
#[derive(Clone)]
pub(crate) struct Conn {
    targets: Vec<Target>,
    current: usize,
}

/// `HOST:PORT` or a URL, as a URL.
pub(crate) fn endpoint_url(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

impl Conn {
    /// Clients for a comma-separated endpoint list; requests give up after `timeout` (`None`:
    /// the server bounds the call).
    pub(crate) fn new(
        list: &str,
        timeout: Option<Duration>,
        credentials: &Credentials,
    ) -> Result<Conn, Failure> {
        let mut targets = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let url = endpoint_url(part);
            if url.starts_with("https://") && credentials.tls.is_none() {
                return Err(Failure::new(
                    2,
                    format!("--endpoint '{part}' asks for TLS: give the cluster's CA with --ca (MODE_CA)"),
                ));
            }
            Endpoint::from_shared(url.clone())
                .map_err(|e| Failure::new(2, format!("invalid --endpoint '{part}': {e}")))?;
            let channel = mode::security::tls::channel(&url, credentials.tls.clone(), |e| {
                let e = e.connect_timeout(Duration::from_secs(3));
                match timeout {
                    Some(t) => e.timeout(t),
                    None => e,
                }
            })
            .map_err(|e| Failure::new(2, format!("invalid --endpoint '{part}': {e}")))?;
            let outgoing = Outgoing {
                token: credentials.token.clone(),
            };
            let client = ControlClient::with_interceptor(channel, outgoing)
                .max_decoding_message_size(mode::api::MAX_GRAPH_BYTES);
            let url = match credentials.tls {
                Some(_) => url.replacen("http://", "https://", 1),
                None => url,
            };
            targets.push(Target { url, client });
        }
        if targets.is_empty() {
            return Err(Failure::new(
                2,
                format!("--endpoint '{list}' names no endpoint: give HOST:PORT[,HOST:PORT...]"),
            ));
        }
        Ok(Conn {
            targets,
            current: 0,
        })
    }

    /// The endpoint tried first (the last that answered).
    pub(crate) fn endpoint(&self) -> &str {
        &self.targets[self.current].url
    }

    /// Try the next endpoint first from now on (a stream that broke).
    pub(crate) fn rotate(&mut self) {
        self.current = (self.current + 1) % self.targets.len();
    }

    /// Run `f` on the current endpoint, then on the others while the failure allows (see the
    /// module doc). `f` builds the request anew for each attempt.
    pub(crate) async fn call<T, F, Fut>(&mut self, kind: Call, mut f: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.targets.len();
        let mut unreached = Vec::new();
        let mut last: Option<(String, tonic::Status)> = None;
        for step in 0..n {
            let i = (self.current + step) % n;
            let target = &self.targets[i];
            match f(target.client.clone()).await {
                Ok(reply) => {
                    self.current = i;
                    return Ok(reply.into_inner());
                }
                Err(status) => {
                    let outcome = classify(&status);
                    if outcome == Outcome::NotReached {
                        unreached.push(target.url.clone());
                    }
                    let next = moves_on(kind, &outcome);
                    let url = target.url.clone();
                    if !next || step + 1 == n {
                        if unreached.len() == n {
                            return Err(Failure::unreachable(&unreached, &status));
                        }
                        return Err(Failure::from_status(&url, &status));
                    }
                    last = Some((url, status));
                }
            }
        }
        // Unreachable: the loop returns on its last step; kept for the type checker.
        let (url, status) = last.unwrap_or_else(|| {
            (
                self.endpoint().to_string(),
                tonic::Status::unavailable("no endpoint"),
            )
        });
        Err(Failure::from_status(&url, &status))
    }
}

/// What a failed call tells about the request.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The request never reached a node.
    NotReached,
    /// A node answered that it could not do it (no leader, no quorum) and did nothing.
    NotDone,
    /// A node took it; whether it was done is unknown (timeout, leader lost meanwhile).
    Unknown,
    /// A definite answer (not found, invalid, refused): the same anywhere.
    Answered,
}

/// Whether a call of `kind` that failed so may be tried on the next endpoint.
fn moves_on(kind: Call, outcome: &Outcome) -> bool {
    match outcome {
        // Nothing was done anywhere.
        Outcome::NotReached => true,
        // Refused, not done: a read or an idempotent (request id) write may ask another.
        Outcome::NotDone => kind != Call::WriteOnce,
        // Perhaps done: only a write the cluster deduplicates may be sent again; a read may
        // always be asked again.
        Outcome::Unknown => kind != Call::WriteOnce,
        Outcome::Answered => false,
    }
}

fn classify(status: &tonic::Status) -> Outcome {
    match status.code() {
        // A node that answered "outcome unknown" (its own forwarding failed mid-way) was
        // reached, whatever the words of the error it passes on.
        tonic::Code::Unavailable if status.message().contains("outcome unknown") => {
            Outcome::Unknown
        }
        tonic::Code::Unavailable if is_connect_error(status) => Outcome::NotReached,
        tonic::Code::Unavailable if status.message().contains("unknown") => Outcome::Unknown,
        tonic::Code::Unavailable => Outcome::NotDone,
        // The server's own deadline (a rolling restart that did not finish): its answer.
        tonic::Code::DeadlineExceeded => Outcome::Answered,
        // The client's own timeout, or the connection dropped while the call was in flight.
        tonic::Code::Cancelled => Outcome::Unknown,
        // The connection broke while the call was in flight (the node died).
        tonic::Code::Unknown if status.message().contains("transport error") => Outcome::Unknown,
        _ => Outcome::Answered,
    }
}

/// The client's own `--timeout` ran out.
pub(crate) fn is_timeout(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled && status.message().contains("Timeout expired")
}

/// The request never reached a node (tonic reports it as UNAVAILABLE from the transport).
pub(crate) fn is_connect_error(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    // A status a server sent (no error behind it) is its answer, even when it says that it
    // could not reach another node.
    let from_transport = std::error::Error::source(status).is_some();
    let m = root_cause(status).to_lowercase();
    status.message().contains("transport error")
        || status.message().contains("tcp connect error")
        || (from_transport
            && (m.contains("connect")
                || m.contains("refused")
                || m.contains("dns")
                || m.contains("resolve")))
}

/// The innermost error of a status (the OS error behind a transport error).
pub(crate) fn root_cause(status: &tonic::Status) -> String {
    let mut err: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut last = status.message().to_string();
    while let Some(e) = err {
        last = e.to_string();
        err = e.source();
    }
    last
}

/// A fresh request id (`modectl-<time>-<hash>`): the cluster applies a write once, however
/// often a node forwards it or modectl retries it.
pub(crate) fn new_request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    format!("modectl-{nanos:x}-{:x}", h.finish())
}

/// `message` as a request carrying `id` in its metadata (`x-mode-request-id`) too.
pub(crate) fn with_request_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Ok(v) = id.parse() {
        req.metadata_mut().insert(mode::replication::REQUEST_ID, v);
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_is_not_reached_and_a_lost_leader_is_unknown() {
        let refused = tonic::Status::unavailable("tcp connect error");
        assert_eq!(classify(&refused), Outcome::NotReached);
        let unknown = tonic::Status::unavailable("the leader changed: outcome unknown");
        assert_eq!(classify(&unknown), Outcome::Unknown);
        let no_leader = tonic::Status::unavailable("no leader yet");
        assert_eq!(classify(&no_leader), Outcome::NotDone);
        let reset = tonic::Status::unknown("transport error");
        assert_eq!(classify(&reset), Outcome::Unknown);
        let missing = tonic::Status::not_found("no service named 'x'");
        assert_eq!(classify(&missing), Outcome::Answered);
        // A node that was reached, whose own forwarding to the leader failed mid-way.
        let relayed = tonic::Status::unavailable(
            "cluster unavailable: outcome unknown: forwarding to node 1 failed (tcp connect error)",
        );
        assert_eq!(classify(&relayed), Outcome::Unknown);
        // A node that was reached, saying that another node cannot be: its answer.
        let other = tonic::Status::unavailable(
            "node 2, which runs web#0, cannot be reached: 127.0.0.1:9 is unreachable: Connection refused (os error 111)",
        );
        assert_eq!(classify(&other), Outcome::NotDone);
        let dropped = tonic::Status::cancelled("operation was canceled");
        assert_eq!(classify(&dropped), Outcome::Unknown);
    }

    #[test]
    fn a_write_of_unknown_outcome_moves_on_only_with_its_request_id() {
        assert!(moves_on(Call::WriteOnce, &Outcome::NotReached));
        assert!(!moves_on(Call::WriteOnce, &Outcome::Unknown));
        assert!(!moves_on(Call::WriteOnce, &Outcome::NotDone));
        assert!(moves_on(Call::Write, &Outcome::Unknown));
        assert!(moves_on(Call::Read, &Outcome::NotDone));
        for kind in [Call::Read, Call::Write, Call::WriteOnce] {
            assert!(!moves_on(kind, &Outcome::Answered), "{kind:?}");
        }
    }

    #[tokio::test]
    async fn every_unreachable_endpoint_is_tried_and_named() {
        // Two ports nothing listens on.
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .unwrap_or(1)
            })
            .collect();
        let list = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
        let mut conn =
            Conn::new(&list, Some(Duration::from_secs(2)), &Credentials::default()).unwrap();
        let mut tried = 0;
        let err = conn
            .call(Call::Read, |mut c| {
                tried += 1;
                async move { c.list_kinds(mode_proto::v1::ListKindsRequest {}).await }
            })
            .await
            .err()
            .unwrap();
        assert_eq!(tried, 2, "both endpoints tried");
        assert_eq!(err.code, 4);
        for p in &ports {
            assert!(err.message.contains(&p.to_string()), "{}", err.message);
        }
    }

    #[test]
    fn an_empty_endpoint_list_is_a_usage_error() {
        let err = Conn::new(" , ", Some(Duration::from_secs(1)), &Credentials::default())
            .err()
            .unwrap();
        assert_eq!(err.code, 2);
    }
}
