//! Reads who a verified certificate names (see [`super::pki`] for the rule).

use x509_parser::prelude::{FromDer, X509Certificate};

use super::pki::{CLIENT_ORGANIZATION_PREFIX, NODE_NAME_PREFIX, NODE_ORGANIZATION};
use super::{Caller, Proof, Role};

/// The caller a certificate (DER, already verified against the cluster's CA) names.
pub fn identity_of(der: &[u8]) -> Result<Caller, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the certificate cannot be read: {e}"))?;
    let subject = cert.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("the certificate's subject has no common name")?;
    let organizations: Vec<&str> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .collect();
    if let Some(id) = common_name.strip_prefix(NODE_NAME_PREFIX) {
        if !organizations.contains(&NODE_ORGANIZATION) {
            return Err(format!(
                "the certificate names '{common_name}' but not organization '{NODE_ORGANIZATION}': it is not a node certificate"
            ));
        }
        return id
            .parse::<u64>()
            .ok()
            .filter(|id| *id > 0)
            .map(Caller::Node)
            .ok_or_else(|| format!("the certificate names node '{id}', which is not a node id"));
    }
    // A client's highest role among its organizations.
    let role = organizations
        .iter()
        .filter_map(|o| o.strip_prefix(CLIENT_ORGANIZATION_PREFIX))
        .filter_map(|r| Role::parse(r).ok())
        .max()
        .ok_or_else(|| {
            format!(
                "the certificate of '{common_name}' names no mode role: its subject needs organization mode:viewer, mode:operator or mode:admin (make one with `modectl tls cert create --client NAME --role ROLE`)"
            )
        })?;
    Ok(Caller::Client {
        name: common_name.to_string(),
        role,
        proof: Proof::Certificate,
    })
}
