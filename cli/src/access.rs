//! Who may do what: `modectl tls` (a CA and certificates, made locally), `modectl token`
//! (bearer tokens, made by the cluster) and `modectl whoami`, and the credentials modectl
//! presents (`--ca`, `--cert`, `--key`, `--token`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use mode::security::pki::{self, Subject, Validity};
use mode::security::Role;
use mode_proto::v1 as pb;
use serde_json::json;

use crate::conn::{new_request_id, Call, Conn, Credentials};
use crate::convert::format_utc_ms;
use crate::json as js;
use crate::Failure;

/// The credential flags (global).
#[derive(Args, Clone, Debug)]
pub(crate) struct CredentialArgs {
    /// The cluster's CA certificate (PEM): talk TLS, trusting only this CA.
    #[arg(long, global = true, env = "MODE_CA")]
    pub(crate) ca: Option<PathBuf>,
    /// A client certificate (PEM) naming your role (`modectl tls cert create --client`).
    #[arg(long, global = true, env = "MODE_CERT", requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, global = true, env = "MODE_KEY", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// A bearer token (`modectl token create`); better passed as MODE_TOKEN than on the
    /// command line, where other users of the machine can read it.
    #[arg(long, global = true, env = "MODE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

impl CredentialArgs {
    /// What the flags describe (an unreadable file is a usage error naming it).
    pub(crate) fn credentials(&self) -> Result<Credentials, Failure> {
        let tls = match &self.ca {
            Some(ca) => {
                let identity = match (&self.cert, &self.key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                    _ => None,
                };
                let config = mode::security::tls::client_config(ca, identity)
                    .map_err(|e| Failure::new(2, e))?;
                Some(mode::security::tls::ClientTls::Fixed(Arc::new(config)))
            }
            None if self.cert.is_some() => {
                return Err(Failure::new(
                    2,
                    "--cert needs --ca: the cluster's CA certificate, to check the server's",
                ))
            }
            None => None,
        };
        let token = match &self.token {
            Some(t) if !t.trim().is_empty() => {
                Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                    Failure::new(
                        2,
                        "the token (--token / MODE_TOKEN) holds characters a token never has",
                    )
                })?)
            }
            _ => None,
        };
        Ok(Credentials { tls, token })
    }
}

/// `modectl tls`.
#[derive(Subcommand)]
pub(crate) enum TlsCmd {
    /// Certificate authorities.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Node and client certificates.
    #[command(subcommand)]
    Cert(CertCmd),
}

#[derive(Subcommand)]
pub(crate) enum CaCmd {
    /// Make the cluster's CA: DIR/ca.pem (give it to every node and client) and DIR/ca-key.pem
    /// (keep it secret, offline if you can: whoever holds it can mint any identity).
    Create {
        /// Where to write the files.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "mode cluster CA")]
        name: String,
        /// Valid for this many days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum CertCmd {
    /// Make a certificate signed by the CA in --dir: `--node ID` writes node-ID.pem and
    /// node-ID-key.pem (for `mode-node --tls-cert/--tls-key`), `--client NAME --role ROLE`
    /// writes NAME.pem and NAME-key.pem (for `modectl --cert/--key`).
    Create {
        /// A node certificate for this node id.
        #[arg(long, conflicts_with_all = ["client", "role"], required_unless_present = "client")]
        node: Option<u64>,
        /// A client certificate for this name (shown in events as who made a change).
        #[arg(long, requires = "role")]
        client: Option<String>,
        /// The client's role: viewer, operator or admin.
        #[arg(long)]
        role: Option<String>,
        /// DNS names the node is reached by (repeatable or comma-separated); localhost is
        /// always included.
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// IP addresses the node is reached at (repeatable or comma-separated); 127.0.0.1
        /// and ::1 are always included.
        #[arg(long, value_delimiter = ',')]
        ip: Vec<String>,
        /// Where the CA is (ca.pem, ca-key.pem) and the files are written.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Valid for this many days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// `modectl token`.
#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Make a bearer token (admin). It is printed once: the cluster keeps only its hash.
    Create {
        /// What it is for (events name changes made with it).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Lifetime (e.g. 12h, 30d; default: until revoked).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
    },
    /// List the tokens (ids, names, roles; never the tokens).
    Ls,
    /// Revoke a token: it stops working on every server.
    Revoke {
        /// Its id (see `modectl token ls`).
        id: String,
    },
}

/// `30d`, `12h`, `90m`, `3600s` or plain seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("'{s}' is not a lifetime (e.g. 12h, 30d)"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m, h or d)")),
    };
    Ok(n.saturating_mul(scale).max(1))
}

fn write_file(path: &Path, text: &str, secret: bool, force: bool) -> Result<(), Failure> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(if secret { 0o600 } else { 0o644 });
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Failure::new(
                1,
                format!(
                    "{} exists already: keep it, or give --force to replace it",
                    path.display()
                ),
            )
        } else {
            Failure::new(1, format!("cannot write {}: {e}", path.display()))
        }
    })?;
    file.write_all(text.as_bytes())
        .map_err(|e| Failure::new(1, format!("cannot write {}: {e}", path.display())))
}

fn read_file(path: &Path, what: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            1,
            format!(
                "cannot read the {what} {}: {e} (make the CA with `modectl tls ca create --dir DIR`)",
                path.display()
            ),
        )
    })
}

/// `modectl tls ...`: local files only, no cluster.
pub(crate) fn tls(cmd: &TlsCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        TlsCmd::Ca(CaCmd::Create {
            dir,
            name,
            days,
            force,
        }) => {
            let ca = pki::create_ca(name, Validity::days(*days)).map_err(|e| Failure::new(1, e))?;
            let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
            write_file(&key, &ca.key, true, *force)?;
            write_file(&cert, &ca.cert, false, *force)?;
            report(json, &cert, &key, "the CA; give ca.pem to every node (--tls-ca) and client (--ca), keep ca-key.pem secret");
        }
        TlsCmd::Cert(CertCmd::Create {
            node,
            client,
            role,
            dns,
            ip,
            dir,
            days,
            force,
        }) => {
            let ca = pki::Pem {
                cert: read_file(&dir.join("ca.pem"), "CA certificate")?,
                key: read_file(&dir.join("ca-key.pem"), "CA key")?,
            };
            let (subject, stem) = match (node, client, role) {
                (Some(id), _, _) => (Subject::Node(*id), format!("node-{id}")),
                (None, Some(name), Some(role)) => {
                    let role = Role::parse(role).map_err(|e| Failure::new(2, e))?;
                    pki::check_client_name(name).map_err(|e| Failure::new(2, e))?;
                    (
                        Subject::Client {
                            name: name.clone(),
                            role,
                        },
                        name.clone(),
                    )
                }
                _ => {
                    return Err(Failure::new(
                        2,
                        "give --node ID, or --client NAME --role ROLE",
                    ))
                }
            };
            let hosts: Vec<String> = dns.iter().chain(ip).cloned().collect();
            let pem = pki::issue(&ca, &subject, &hosts, Validity::days(*days))
                .map_err(|e| Failure::new(2, e))?;
            let (cert, key) = (
                dir.join(format!("{stem}.pem")),
                dir.join(format!("{stem}-key.pem")),
            );
            write_file(&key, &pem.key, true, *force)?;
            write_file(&cert, &pem.cert, false, *force)?;
            let what = match subject {
                Subject::Node(id) => format!("node {id}'s certificate: mode-node --tls-ca ca.pem --tls-cert {stem}.pem --tls-key {stem}-key.pem"),
                Subject::Client { name, role } => format!("{name}'s client certificate ({role}): modectl --ca ca.pem --cert {stem}.pem --key {stem}-key.pem"),
            };
            report(json, &cert, &key, &what);
        }
    }
    Ok(())
}

fn report(json: bool, cert: &Path, key: &Path, what: &str) {
    if json {
        js::line(
            &json!({"certificate": cert.display().to_string(), "key": key.display().to_string()}),
        );
    } else {
        say!("wrote {} and {}: {what}", cert.display(), key.display());
    }
}

/// `modectl token ...`.
pub(crate) async fn token(cmd: &TokenCmd, conn: &mut Conn, json: bool) -> Result<(), Failure> {
    match cmd {
        TokenCmd::Create { name, role, ttl } => {
            let request = pb::CreateTokenRequest {
                name: name.clone(),
                role: role.clone(),
                ttl_s: ttl.unwrap_or(0),
            };
            let id = new_request_id();
            let r = rpc!(
                conn,
                Call::WriteOnce,
                create_token,
                crate::conn::with_request_id(request.clone(), &id)
            )
            .await?;
            let info = r.info.unwrap_or_default();
            if json {
                js::line(
                    &json!({"token": r.token, "id": info.id, "name": info.name, "role": info.role, "expires_ms": info.expires_ms}),
                );
            } else {
                say!("{}", r.token);
                say_err!(
                    "token {} for '{}' ({}): shown only now; use it as MODE_TOKEN or `modectl --token`, revoke it with `modectl token revoke {}`",
                    info.id, info.name, info.role, info.id
                );
            }
        }
        TokenCmd::Ls => {
            let r = rpc!(conn, Call::Read, list_tokens, pb::ListTokensRequest {}).await?;
            if json {
                let tokens: Vec<_> = r
                    .tokens
                    .iter()
                    .map(|t| json!({"id": t.id, "name": t.name, "role": t.role, "created_ms": t.created_ms, "expires_ms": t.expires_ms, "created_by": t.created_by}))
                    .collect();
                js::line(&serde_json::Value::Array(tokens));
            } else {
                let rows: Vec<Vec<String>> = r
                    .tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.name.clone(),
                            t.role.clone(),
                            format_utc_ms(t.created_ms),
                            match t.expires_ms {
                                0 => "never".to_string(),
                                ms => format_utc_ms(ms),
                            },
                            t.created_by.clone(),
                        ]
                    })
                    .collect();
                crate::output::table(
                    &[
                        "ID",
                        "NAME",
                        "ROLE",
                        "CREATED (UTC)",
                        "EXPIRES (UTC)",
                        "CREATED BY",
                    ],
                    &rows,
                );
            }
        }
        TokenCmd::Revoke { id } => {
            let r = rpc!(
                conn,
                Call::WriteOnce,
                revoke_token,
                pb::RevokeTokenRequest { id: id.clone() }
            )
            .await?;
            if json {
                js::line(&json!({"revoked": id, "message": r.message}));
            } else {
                say!("{}", r.message);
            }
        }
    }
    Ok(())
}

/// `modectl whoami`.
pub(crate) async fn whoami(conn: &mut Conn, json: bool) -> Result<(), Failure> {
    let r = rpc!(conn, Call::Read, who_am_i, pb::WhoAmIRequest {}).await?;
    if json {
        js::line(&json!({"name": r.name, "role": r.role, "proof": r.proof}));
    } else {
        say!("{} ({}, {})", r.name, r.role, r.proof);
    }
    Ok(())
}
