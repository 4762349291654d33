//! Certificates without a PKI team: a cluster CA, and node and client certificates signed by
//! it, as PEM (what `modectl tls` writes). The identity is in the subject, the way Kubernetes
//! reads client certificates: a node's common name is `mode:node:<id>` in organization
//! `mode:nodes`; a client's common name is its name, in organization `mode:<role>`. A CA of
//! your own (cert-manager, Vault) works the same when its certificates follow that rule.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::Role;

/// The organization of node certificates.
pub const NODE_ORGANIZATION: &str = "mode:nodes";
/// The common-name prefix of node certificates (`mode:node:3`).
pub const NODE_NAME_PREFIX: &str = "mode:node:";
/// The organization prefix of client certificates (`mode:operator`).
pub const CLIENT_ORGANIZATION_PREFIX: &str = "mode:";

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Pem {
    /// The certificate (`-----BEGIN CERTIFICATE-----`).
    pub cert: String,
    /// Its private key (PKCS#8). Keep it secret: write it with mode 0600.
    pub key: String,
}

/// Whom a certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A cluster node.
    Node(u64),
    /// A client holding a role.
    Client {
        /// Its name (shown in events as who made a change).
        name: String,
        /// What it may do.
        role: Role,
    },
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// From.
    pub not_before: SystemTime,
    /// Until.
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (clocks differ a little) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A new CA certificate and key, named `name`.
pub fn create_ca(name: &str, validity: Validity) -> Result<Pem, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&[(DnType::CommonName, name)]);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, validity);
    let key = KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cannot sign the CA certificate: {e}"))?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A certificate for `subject`, signed by `ca`. `hosts` (DNS names or IP addresses) become
/// its subject alternative names: the names clients and peers reach a node by. A node's
/// certificate always also names `localhost`, 127.0.0.1 and ::1.
pub fn issue(
    ca: &Pem,
    subject: &Subject,
    hosts: &[String],
    validity: Validity,
) -> Result<Pem, String> {
    let ca_key = KeyPair::from_pem(&ca.key)
        .map_err(|e| format!("the CA key is not a usable PEM private key: {e}"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)
        .map_err(|e| format!("the CA certificate is not a usable PEM certificate: {e}"))?;
    let mut params = CertificateParams::default();
    let mut names: Vec<String> = Vec::new();
    match subject {
        Subject::Node(id) => {
            params.distinguished_name = dn(&[
                (DnType::CommonName, &format!("{NODE_NAME_PREFIX}{id}")),
                (DnType::OrganizationName, NODE_ORGANIZATION),
            ]);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
        }
        Subject::Client { name, role } => {
            check_client_name(name)?;
            params.distinguished_name = dn(&[
                (DnType::CommonName, name),
                (
                    DnType::OrganizationName,
                    &format!("{CLIENT_ORGANIZATION_PREFIX}{role}"),
                ),
            ]);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    names.extend(hosts.iter().map(|h| h.trim().to_string()));
    names.dedup();
    for host in names.iter().filter(|h| !h.is_empty()) {
        params.subject_alt_names.push(san(host)?);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    let key = KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| format!("cannot sign the certificate: {e}"))?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A client name: what events show as who made a change.
pub fn check_client_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("client name '{name}' must be 1-64 characters"));
    }
    if name.starts_with(NODE_NAME_PREFIX) {
        return Err(format!(
            "client name '{name}' looks like a node's: choose another"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(format!(
            "client name '{name}' may use only letters, digits and - _ . @"
        ));
    }
    Ok(())
}

fn dn(parts: &[(DnType, &str)]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (ty, value) in parts {
        dn.push(ty.clone(), *value);
    }
    dn
}

fn san(host: &str) -> Result<SanType, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let mut labels = host.split('.');
    let first_ok = labels.next().is_some_and(|l| l == "*" || label_ok(l));
    if !first_ok || !labels.all(label_ok) || host.len() > 253 {
        return Err(format!(
            "'{host}' is neither an IP address nor a DNS name (letters, digits and '-' between dots)"
        ));
    }
    host.to_string()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|e| format!("'{host}' is neither an IP address nor a DNS name: {e}"))
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_subject() {
        let ca = create_ca("test CA", Validity::days(1)).unwrap();
        let node = issue(
            &ca,
            &Subject::Node(7),
            &["mode-0.mode".into()],
            Validity::days(1),
        )
        .unwrap();
        assert!(node.cert.contains("BEGIN CERTIFICATE"));
        assert!(node.key.contains("PRIVATE KEY"));
        let der = super::super::tls::first_cert_der(&node.cert).unwrap();
        assert_eq!(
            super::super::identity::identity_of(&der).unwrap(),
            super::super::Caller::Node(7)
        );
        let client = issue(
            &ca,
            &Subject::Client {
                name: "alice".into(),
                role: Role::Operator,
            },
            &[],
            Validity::days(1),
        )
        .unwrap();
        let der = super::super::tls::first_cert_der(&client.cert).unwrap();
        assert_eq!(
            super::super::identity::identity_of(&der).unwrap(),
            super::super::Caller::Client {
                name: "alice".into(),
                role: Role::Operator,
                proof: super::super::Proof::Certificate
            }
        );
        assert!(issue(
            &ca,
            &Subject::Node(1),
            &["not a name!".into()],
            Validity::days(1)
        )
        .is_err());
        assert!(check_client_name("mode:node:3").is_err());
    }
}
