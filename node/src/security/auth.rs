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

use super::identity::identity_of;
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

/// What a layer checks.
#[derive(Clone)]
pub struct Policy {
    surface: Surface,
    /// Off: every caller is the anonymous admin (no TLS: `--dev`, loopback, `--insecure`).
    enabled: bool,
    tokens: Option<TokenLookup>,
}

impl Policy {
    /// Checks for `surface`; `enabled` when the listener has TLS.
    pub fn new(surface: Surface, enabled: bool, tokens: Option<TokenLookup>) -> Policy {
        Policy {
            surface,
            enabled,
            tokens,
        }
    }

    /// The caller of a request with these headers on this connection, if it may call `path`.
    pub fn authorize(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        conn: Option<&ConnInfo>,
    ) -> Result<Caller, Status> {
        if !self.enabled {
            return Ok(Caller::anonymous());
        }
        let transport = conn.map(|c| &c.transport);
        if matches!(transport, Some(Transport::PlainOnTlsListener)) {
            return Err(Status::unauthenticated(
                "this node accepts only TLS connections: connect with TLS (modectl --ca CA.pem with --cert/--key or --token, or MODE_CA...; grpcurl -cacert CA.pem -cert ... -key ...)",
            ));
        }
        let cert = transport.and_then(Transport::peer_cert);
        match self.surface {
            Surface::Peer => {
                let cert = cert.ok_or_else(|| {
                    Status::unauthenticated(
                        "the peer API takes calls from cluster nodes only, with their node certificate",
                    )
                })?;
                match identity_of(cert).map_err(Status::unauthenticated)? {
                    Caller::Node(id) => Ok(Caller::Node(id)),
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
    match transport.and_then(Transport::peer_cert) {
        Some(cert) => identity_of(cert).map(Some),
        None => Ok(None),
    }
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
        | "ListNodes" | "ListEvents" | "WatchEvents" | "ListKinds" | "Graph" | "WhoAmI" => {
            Need::Role(Role::Viewer)
        }
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
        let verdict = self.policy.authorize(
            req.uri().path(),
            req.headers(),
            req.extensions().get::<ConnInfo>(),
        );
        match verdict {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                // The service that was polled ready takes the call; a fresh clone waits.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
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
