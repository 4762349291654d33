//! The authentication layer of a node's gRPC listeners: establishes each request's
//! [`Caller`] (from its TLS client certificate or bearer token), refuses what that caller's
//! role does not allow, and puts the caller in the request's extensions for the handlers.
//!
//! Which role each public method needs is one table ([`required_role`]); a method missing
//! from it is refused, so a new RPC is closed until someone decides who may call it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use super::tls::{ConnInfo, Transport};
use super::{Caller, Proof, Role};

/// Which listener a layer guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// The public API: clients with roles.
    Public,
    /// The peer API: cluster nodes only.
    Peer,
}

/// Finds the caller a bearer token stands for (the node's replicated token records).
pub type TokenLookup = Arc<dyn Fn(&str) -> Result<Caller, String> + Send + Sync>;

/// How much one client identity may ask of a node (abuse limits; see [`Limits::default`]).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Changes (operator and admin calls) per second, sustained.
    pub writes_per_s: f64,
    /// Changes allowed at once after a quiet time.
    pub write_burst: f64,
    /// Open watch streams (WatchEvents, WatchService, Logs) at once.
    pub streams: usize,
}

impl Default for Limits {
    /// 50 changes a second (bursts of 200), 32 open watches: far above what people and
    /// deploy scripts do, far below what floods the event log or the leader.
    fn default() -> Self {
        Limits {
            writes_per_s: 50.0,
            write_burst: 200.0,
            streams: 32,
        }
    }
}

/// The use each identity is making of its limits.
#[derive(Default, Debug)]
struct Usage {
    buckets: std::sync::Mutex<std::collections::HashMap<String, Bucket>>,
    streams: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A token bucket: `tokens` left at `at`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

/// What a layer checks.
#[derive(Clone)]
pub struct Policy {
    surface: Surface,
    /// Off: every caller is the anonymous admin (no TLS: `--dev`, loopback, `--insecure`).
    enabled: bool,
    tokens: Option<TokenLookup>,
    limits: Limits,
    usage: Arc<Usage>,
}

impl Policy {
    /// Checks for `surface`; `enabled` when the listener has TLS.
    pub fn new(surface: Surface, enabled: bool, tokens: Option<TokenLookup>) -> Policy {
        Policy {
            surface,
            enabled,
            tokens,
            limits: Limits::default(),
            usage: Arc::default(),
        }
    }

    /// With these abuse limits instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Policy {
        self.limits = limits;
        self
    }

    /// Take one change from `caller`'s bucket, or say how long to wait.
    fn take_write(&self, caller: &str) -> Result<(), Status> {
        let now = std::time::Instant::now();
        let mut buckets = self.usage.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            // Forget identities that have been quiet long enough to have a full bucket.
            let refill = self.limits.write_burst / self.limits.writes_per_s;
            buckets.retain(|_, b| now.duration_since(b.at).as_secs_f64() < refill);
        }
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket {
            tokens: self.limits.write_burst,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * self.limits.writes_per_s).min(self.limits.write_burst);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(Status::resource_exhausted(format!(
                "{caller} makes changes faster than this node takes them from one client ({} a second, bursts of {}): slow down and retry",
                self.limits.writes_per_s, self.limits.write_burst
            )));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// Open one watch stream for `caller`; it closes when the guard is dropped.
    fn open_stream(&self, caller: &str) -> Result<StreamGuard, Status> {
        let mut streams = self.usage.streams.lock().unwrap_or_else(|p| p.into_inner());
        let open = streams.entry(caller.to_string()).or_insert(0);
        if *open >= self.limits.streams {
            return Err(Status::resource_exhausted(format!(
                "{caller} has {open} watch streams open on this node, the most one client may: close some first"
            )));
        }
        *open += 1;
        Ok(StreamGuard {
            usage: self.usage.clone(),
            caller: caller.to_string(),
        })
    }

    /// Apply the abuse limits to a call of `caller` to `path`: a change takes from its
    /// bucket, a watch holds one of its streams until the guard is dropped.
    fn limit(&self, caller: &Caller, path: &str) -> Result<Option<StreamGuard>, Status> {
        if !self.enabled || self.surface != Surface::Public {
            return Ok(None);
        }
        let who = caller.to_string();
        match required_role(path) {
            Need::Role(Role::Operator | Role::Admin) => self.take_write(&who).map(|()| None),
            _ if path.ends_with("/WatchEvents")
                || path.ends_with("/WatchService")
                || path.ends_with("/Logs") =>
            {
                self.open_stream(&who).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The caller of a request with these headers on this connection, if it may call `path`.
    pub fn authorize(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        conn: Option<&ConnInfo>,
    ) -> Result<Caller, Status> {
        let protocol = || {
            let agent = headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok());
            crate::protocol::check_peer(agent)
        };
        if !self.enabled {
            if self.surface == Surface::Peer {
                protocol()?;
            }
            return Ok(Caller::anonymous());
        }
        let transport = conn.map(|c| &c.transport);
        if matches!(transport, Some(Transport::PlainOnTlsListener)) {
            return Err(Status::unauthenticated(
                "this node accepts only TLS connections: connect with TLS (modectl --ca CA.pem with --cert/--key or --token, or MODE_CA...; grpcurl -cacert CA.pem -cert ... -key ...)",
            ));
        }
        match self.surface {
            Surface::Peer => {
                let identity = transport.and_then(Transport::peer_identity).ok_or_else(|| {
                    Status::unauthenticated(
                        "the peer API takes calls from cluster nodes only, with their node certificate",
                    )
                })?;
                match identity.map_err(Status::unauthenticated)? {
                    // Versions are told only to nodes of the cluster.
                    Caller::Node(id) => protocol().map(|()| Caller::Node(id)),
                    client => Err(Status::permission_denied(format!(
                        "the peer API takes calls from cluster nodes only; {client} is a client: use the public API's port"
                    ))),
                }
            }
            Surface::Public => {
                let need = required_role(path);
                let caller = match credentials(headers, transport, self.tokens.as_ref())
                    .map_err(Status::unauthenticated)?
                {
                    Some(caller) => caller,
                    None if need == Need::Anyone => {
                        return Ok(Caller::Client {
                            name: "unauthenticated".into(),
                            role: Role::Viewer,
                            proof: Proof::None,
                        })
                    }
                    None => {
                        return Err(Status::unauthenticated(
                            "no credentials: give a client certificate (modectl --cert/--key, MODE_CERT/MODE_KEY) or a token (modectl --token, MODE_TOKEN)",
                        ))
                    }
                };
                check(&caller, need, path)?;
                Ok(caller)
            }
        }
    }
}

/// The caller a request's credentials name: its token (`Authorization: Bearer <token>`, or
/// `Basic` with the token as the password, what a browser sends) if it has one, else its
/// client certificate; `None` when it carries neither. An error says why the credential it
/// carries does not hold. The gRPC layer and the HTTP side port both ask here.
pub fn credentials(
    headers: &http::HeaderMap,
    transport: Option<&Transport>,
    tokens: Option<&TokenLookup>,
) -> Result<Option<Caller>, String> {
    if let Some(token) = token(headers)? {
        let lookup = tokens.ok_or("this node does not take tokens")?;
        return lookup(&token).map(Some);
    }
    transport.and_then(Transport::peer_identity).transpose()
}

/// What a public method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone, even without credentials (health checks).
    Anyone,
    /// A client holding at least this role.
    Role(Role),
    /// Nobody: a method this table does not know.
    Unknown,
}

/// The role each public method needs (see the module doc).
pub fn required_role(path: &str) -> Need {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Need::Anyone;
    }
    if path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        return Need::Role(Role::Viewer);
    }
    let Some(method) = path.strip_prefix("/mode.v1.Control/") else {
        return Need::Unknown;
    };
    match method {
        "ClusterStatus" | "GetService" | "ListServices" | "ServiceHistory" | "WatchService"
        | "ListNodes" | "ListEvents" | "WatchEvents" | "ListKinds" | "Graph" | "WhoAmI"
        | "Logs" => Need::Role(Role::Viewer),
        "ApplyServices" | "ScaleService" | "RestartService" | "DeleteService"
        | "RollbackService" | "DrainNode" | "UndrainNode" => Need::Role(Role::Operator),
        "RemoveNode" | "Compact" | "CreateToken" | "ListTokens" | "RevokeToken" => {
            Need::Role(Role::Admin)
        }
        _ => Need::Unknown,
    }
}

fn check(caller: &Caller, need: Need, path: &str) -> Result<(), Status> {
    let method = path.rsplit('/').next().unwrap_or(path);
    match (need, caller) {
        (Need::Anyone, _) => Ok(()),
        (Need::Unknown, _) => Err(Status::permission_denied(format!(
            "{method} is not a call this node serves to clients"
        ))),
        (Need::Role(_), Caller::Node(id)) => Err(Status::permission_denied(format!(
            "{method}: node {id}'s certificate is for the peer API, not for client calls; use a client certificate or token"
        ))),
        (Need::Role(need), Caller::Client { role, .. }) if *role >= need => Ok(()),
        (Need::Role(need), Caller::Client { role, .. }) => Err(Status::permission_denied(
            format!("{method} needs role {need}; {caller} holds {role}"),
        )),
    }
}

/// The token of an `authorization` header: `Bearer <token>`, or `Basic` whose password (or,
/// with an empty password, user name) is the token.
fn token(headers: &http::HeaderMap) -> Result<Option<String>, String> {
    use base64::Engine as _;
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the authorization header is not text")?;
    const FORMS: &str = "the authorization header must be `Bearer <token>`, or `Basic` with the token as the password";
    let (scheme, rest) = value.split_once(' ').ok_or(FORMS)?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some(rest.trim().to_string()));
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(FORMS.to_string());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or("the Basic credentials are not base64 of `user:password`")?;
    let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
    let token = if password.is_empty() { user } else { password };
    Ok(Some(token.trim().to_string()))
}

/// A tower layer applying a [`Policy`] to every request of a tonic server.
#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    /// Apply `policy`.
    pub fn new(policy: Policy) -> AuthLayer {
        AuthLayer {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// One open watch stream of a caller (see [`Policy::open_stream`]).
#[derive(Debug)]
struct StreamGuard {
    usage: Arc<Usage>,
    caller: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self.usage.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = streams.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.caller);
            }
        }
    }
}

/// A response body that holds a [`StreamGuard`] for as long as it is sent.
struct Guarded {
    body: tonic::body::Body,
    _guard: StreamGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes_of::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

mod bytes_of {
    pub type Bytes = <tonic::body::Body as http_body::Body>::Data;
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let verdict = self
            .policy
            .authorize(
                req.uri().path(),
                req.headers(),
                req.extensions().get::<ConnInfo>(),
            )
            .and_then(|caller| {
                let guard = self.policy.limit(&caller, req.uri().path())?;
                Ok((caller, guard))
            });
        match verdict {
            Ok((caller, guard)) => {
                req.extensions_mut().insert(caller);
                // The service that was polled ready takes the call; a fresh clone waits.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let call = inner.call(req);
                Box::pin(async move {
                    let response = call.await?;
                    Ok(match guard {
                        Some(guard) => response.map(|body| {
                            tonic::body::Body::new(Guarded {
                                body,
                                _guard: guard,
                            })
                        }),
                        None => response,
                    })
                })
            }
            Err(status) => {
                tracing::debug!(
                    "refused {} from {:?}: {}",
                    req.uri().path(),
                    req.extensions().get::<ConnInfo>().and_then(|c| c.remote),
                    status.message()
                );
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_public_method_has_a_role() {
        let proto = include_str!("../../../proto/mode/v1/control.proto");
        let methods: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        assert!(methods.len() > 15, "{methods:?}");
        for m in methods {
            assert_ne!(
                required_role(&format!("/mode.v1.Control/{m}")),
                Need::Unknown,
                "{m} has no role in the table"
            );
        }
        assert_eq!(required_role("/mode.v1.Peer/AppendEntries"), Need::Unknown);
    }

    #[test]
    fn each_identity_has_a_write_rate_and_a_number_of_streams() {
        let policy = Policy::new(Surface::Public, true, None).with_limits(Limits {
            writes_per_s: 0.001,
            write_burst: 3.0,
            streams: 2,
        });
        let alice = Caller::Client {
            name: "alice".into(),
            role: Role::Admin,
            proof: Proof::Certificate,
        };
        let bob = Caller::Client {
            name: "bob".into(),
            role: Role::Admin,
            proof: Proof::Certificate,
        };
        let apply = "/mode.v1.Control/ApplyServices";
        for _ in 0..3 {
            assert!(policy.limit(&alice, apply).is_ok());
        }
        let e = policy.limit(&alice, apply).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // Reads are not counted; another identity has its own bucket.
        assert!(policy
            .limit(&alice, "/mode.v1.Control/ListServices")
            .is_ok());
        assert!(policy.limit(&bob, apply).is_ok());
        let watch = "/mode.v1.Control/WatchEvents";
        let first = policy.limit(&alice, watch).unwrap();
        let _second = policy.limit(&alice, watch).unwrap();
        assert!(policy.limit(&alice, watch).is_err());
        drop(first);
        assert!(policy.limit(&alice, watch).unwrap().is_some());
        // A logs stream (followed or not) holds one as well.
        let logs = policy.limit(&alice, "/mode.v1.Control/Logs").unwrap();
        assert!(logs.is_some());
        assert!(policy.limit(&alice, watch).is_err());
        // Off (no TLS): no limits.
        let off = Policy::new(Surface::Public, false, None);
        for _ in 0..1000 {
            assert!(off.limit(&alice, apply).is_ok());
        }
    }

    #[test]
    fn roles_are_checked() {
        let policy = Policy::new(Surface::Public, true, None);
        let headers = http::HeaderMap::new();
        // No connection info and no token: no credentials.
        let e = policy
            .authorize("/mode.v1.Control/ListServices", &headers, None)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // Health needs nothing.
        assert!(policy
            .authorize("/grpc.health.v1.Health/Check", &headers, None)
            .is_ok());
        let viewer = Caller::Client {
            name: "v".into(),
            role: Role::Viewer,
            proof: Proof::Certificate,
        };
        let e = check(
            &viewer,
            required_role("/mode.v1.Control/ApplyServices"),
            "/mode.v1.Control/ApplyServices",
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("needs role operator"),
            "{}",
            e.message()
        );
        // Reading instance output is a viewer's, as pods/log is in Kubernetes' view role.
        assert!(check(&viewer, required_role("/mode.v1.Control/Logs"), "x").is_ok());
        let operator = Caller::Client {
            name: "o".into(),
            role: Role::Operator,
            proof: Proof::Certificate,
        };
        assert!(check(&operator, required_role("/mode.v1.Control/DrainNode"), "x").is_ok());
        let e = check(&operator, required_role("/mode.v1.Control/RemoveNode"), "x").unwrap_err();
        assert!(e.message().contains("needs role admin"));
        assert!(check(
            &Caller::Node(1),
            required_role("/mode.v1.Control/ListNodes"),
            "x"
        )
        .is_err());
        // Off: everyone is the admin.
        let off = Policy::new(Surface::Public, false, None);
        assert_eq!(
            off.authorize("/mode.v1.Control/RemoveNode", &headers, None)
                .unwrap(),
            Caller::anonymous()
        );
    }

    #[test]
    fn tokens_come_as_bearer_or_as_the_basic_password() {
        use base64::Engine as _;
        let with = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            token(&headers)
        };
        let basic = |text: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(text)
            )
        };
        assert_eq!(token(&http::HeaderMap::new()), Ok(None));
        assert_eq!(with("Bearer mode-1-x"), Ok(Some("mode-1-x".into())));
        assert_eq!(with(&basic("me:mode-1-x")), Ok(Some("mode-1-x".into())));
        // Pasted into the user name field of a browser's prompt.
        assert_eq!(with(&basic("mode-1-x:")), Ok(Some("mode-1-x".into())));
        assert!(with("Digest x").unwrap_err().contains("Bearer <token>"));
        assert!(with("Basic !!").unwrap_err().contains("base64"));
    }
}
