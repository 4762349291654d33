//! Who may do what: the identity of a caller (a node or a client, from its TLS certificate or
//! a bearer token), the roles clients hold, and the checks the APIs make with them.
//!
//! Every gRPC request on a node's listeners carries a [`Caller`] in its extensions, put there
//! by the authentication layer before any handler runs. With authentication off (a `--dev`
//! node, or `--insecure` without TLS) every caller is the anonymous admin.

use std::fmt;

pub mod auth;
pub mod identity;
pub mod pki;
pub mod tls;
pub mod tokens;

/// What a client may do. Ordered: each role may do everything the ones below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads everything but secret values.
    Viewer,
    /// Also changes services (apply, scale, restart, delete, rollback) and drains nodes.
    Operator,
    /// Also changes membership (remove nodes), and manages tokens.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// Its name: `viewer`, `operator` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role named `s` (`viewer`, `operator` or `admin`).
    pub fn parse(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role '{s}': use viewer, operator or admin"))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Authentication is off on this node (`--dev`, or `--insecure` without TLS).
    None,
    /// A client certificate signed by the cluster's CA.
    Certificate,
    /// A bearer token (its id).
    Token(String),
}

/// Who made a request, as the authentication layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A client (a person or automation) holding a role.
    Client {
        /// Its name (the certificate's common name, or the token's name).
        name: String,
        /// What it may do.
        role: Role,
        /// How it proved it.
        proof: Proof,
    },
    /// A cluster node, by the node id its certificate names.
    Node(u64),
}

impl Caller {
    /// The caller when authentication is off: everyone is the admin.
    pub fn anonymous() -> Caller {
        Caller::Client {
            name: "anonymous".to_string(),
            role: Role::Admin,
            proof: Proof::None,
        }
    }

    /// The caller of `request`, as the authentication layer recorded it. A request it never
    /// saw (which would be a wiring bug) counts as an unauthenticated viewer, never as more.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Client {
                name: "unauthenticated".to_string(),
                role: Role::Viewer,
                proof: Proof::None,
            })
    }

    /// The client role this caller holds (nodes hold none).
    pub fn role(&self) -> Option<Role> {
        match self {
            Caller::Client { role, .. } => Some(*role),
            Caller::Node(_) => None,
        }
    }

    /// Whether it may read secret values (operators and admins may; they can write them too).
    pub fn sees_secrets(&self) -> bool {
        self.role().is_some_and(|r| r >= Role::Operator)
    }
}

impl fmt::Display for Caller {
    /// `alice (operator, certificate)`, `ci (admin, token t-1f2e)`, `anonymous`, `node 3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Client {
                name,
                proof: Proof::None,
                ..
            } => f.write_str(name),
            Caller::Client {
                name,
                role,
                proof: Proof::Certificate,
            } => write!(f, "{name} ({role}, certificate)"),
            Caller::Client {
                name,
                role,
                proof: Proof::Token(id),
            } => write!(f, "{name} ({role}, token {id})"),
            Caller::Node(id) => write!(f, "node {id}"),
        }
    }
}

/// The caller a bearer token stands for, among the cluster's token `records`, at `now_ms`.
pub fn caller_for_token(
    records: &std::collections::BTreeMap<String, crate::model::state::TokenRecord>,
    token: &str,
    now_ms: u64,
) -> Result<Caller, String> {
    let id = tokens::id_of(token)
        .ok_or("the bearer token is not a mode token (mode-<id>-<secret>): make one with `modectl token create`")?;
    let record = records
        .get(id)
        .filter(|r| tokens::matches(token, &r.hash))
        .ok_or_else(|| {
            format!("token {id} is unknown or revoked (`modectl token ls` lists the valid ones)")
        })?;
    if record.expires_ms != 0 && now_ms >= record.expires_ms {
        return Err(format!(
            "token {id} ('{}') has expired: make a new one",
            record.name
        ));
    }
    let role = Role::parse(&record.role)?;
    Ok(Caller::Client {
        name: record.name.clone(),
        role,
        proof: Proof::Token(id.to_string()),
    })
}
