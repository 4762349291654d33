//! TLS for the node's listeners and its calls to other nodes: rustls on ring, the cluster's
//! CA as the only root, certificates re-read when their files change (no restart needed to
//! rotate them: cert-manager and `modectl tls cert create` just rewrite the files).
//!
//! A TLS listener also accepts plaintext connections, only to refuse every call on them with
//! a message saying what to do (a bare TLS handshake failure tells a user nothing).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

/// How long a connection may take to say what it speaks and finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the certificate files are looked at for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The files a node's TLS is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster's CA certificate (PEM): the only root trusted, for peers and clients.
    pub ca: PathBuf,
    /// This node's certificate (PEM, naming `mode:node:<id>`), for both serving and calling.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// Whether a listener asks its callers for certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCerts {
    /// Every caller must present one (the peer API: only nodes call it).
    Required,
    /// Callers may present one, or authenticate with a token (the public API).
    Optional,
}

/// The process-wide crypto provider (ring), installed once: rustls panics at the first
/// handshake when it cannot tell which to use.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // ring, not aws-lc: it builds with the machine's C compiler alone (no cmake), and
            // rcgen uses it too. rustls marks it deprecated only for lacking post-quantum key
            // exchange.
            #[allow(deprecated)]
            let p = Arc::new(rustls::crypto::ring::default_provider());
            let _ = rustls::crypto::CryptoProvider::install_default((*p).clone());
            p
        })
        .clone()
}

/// The DER of the first certificate in `pem`.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM text")?
        .map(|c| c.to_vec())
        .map_err(|e| format!("not a PEM certificate: {e}"))
}

fn read_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the {what} {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "cannot read a private key from {}: {e} (expected a PEM private key, e.g. from `modectl tls cert create`)",
            path.display()
        )
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("CA certificate", ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("the CA certificate {} is not usable: {e}", ca.display()))?;
    }
    Ok(Arc::new(roots))
}

/// A server configuration: this node's certificate, callers verified against the CA.
pub fn server_config(files: &TlsFiles, client_certs: ClientCerts) -> Result<ServerConfig, String> {
    let roots = roots(&files.ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let verifier = match client_certs {
        ClientCerts::Required => verifier,
        ClientCerts::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| format!("cannot verify clients with {}: {e}", files.ca.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            read_certs("certificate", &files.cert)?,
            read_key(&files.key)?,
        )
        .map_err(|e| {
            format!(
                "the certificate {} and key {} do not make a usable pair: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client configuration trusting only `ca`, presenting `identity` (certificate and key
/// files) when given.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs("certificate", cert)?, read_key(key)?)
            .map_err(|e| {
                format!(
                    "the certificate {} and key {} do not make a usable pair: {e}",
                    cert.display(),
                    key.display()
                )
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A node's TLS: configurations for its two listeners and for its calls, re-read when the
/// files change (a broken new file is logged and the previous configuration kept).
pub struct NodeTls {
    files: TlsFiles,
    current: RwLock<Configs>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

#[derive(Clone)]
struct Configs {
    public: Arc<ServerConfig>,
    peer: Arc<ServerConfig>,
    /// The HTTP side port's: the public one's, speaking HTTP/1.1 instead of h2.
    http: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl NodeTls {
    /// Load the files (an error names the file and what is wrong with it).
    pub fn load(files: TlsFiles) -> Result<Arc<NodeTls>, String> {
        let current = Self::configs(&files)?;
        let stamps = Self::stamps(&files);
        Ok(Arc::new(NodeTls {
            files,
            current: RwLock::new(current),
            stamps: Mutex::new(stamps),
        }))
    }

    fn configs(files: &TlsFiles) -> Result<Configs, String> {
        let public = server_config(files, ClientCerts::Optional)?;
        let mut http = public.clone();
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Configs {
            public: Arc::new(public),
            http: Arc::new(http),
            peer: Arc::new(server_config(files, ClientCerts::Required)?),
            client: Arc::new(client_config(&files.ca, Some((&files.cert, &files.key)))?),
        })
    }

    fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
        [&files.ca, &files.cert, &files.key]
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// The files.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn get(&self) -> Configs {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The server configuration of a listener.
    pub fn server(&self, client_certs: ClientCerts) -> Arc<ServerConfig> {
        let c = self.get();
        match client_certs {
            ClientCerts::Required => c.peer,
            ClientCerts::Optional => c.public,
        }
    }

    /// The server configuration of the HTTP side port (client certificates optional).
    pub fn http_server(&self) -> Arc<ServerConfig> {
        self.get().http
    }

    /// The configuration of this node's calls to other nodes.
    pub fn client(&self) -> Arc<ClientConfig> {
        self.get().client
    }

    /// Re-read the files if any changed since the last look; true when new ones took effect.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = Self::stamps(&self.files);
        {
            let mut last = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if *last == stamps {
                return false;
            }
            *last = stamps;
        }
        match Self::configs(&self.files) {
            Ok(configs) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = configs;
                tracing::info!(
                    "TLS: loaded the changed certificate files ({}); new connections use them",
                    self.files.cert.display()
                );
                true
            }
            Err(e) => {
                tracing::error!("TLS: the changed certificate files are not usable, keeping the previous ones: {e}");
                false
            }
        }
    }

    /// Look at the files every few seconds until the runtime ends.
    pub fn watch(self: &Arc<Self>) {
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                match tls.upgrade() {
                    Some(tls) => {
                        tls.reload_if_changed();
                    }
                    None => return,
                }
            }
        });
    }
}

/// What a server knows about a connection (in every request's extensions).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The caller's address.
    pub remote: Option<SocketAddr>,
    /// How it is connected.
    pub transport: Transport,
}

/// How a connection reached the server.
#[derive(Clone, Debug)]
pub enum Transport {
    /// Plaintext, on a listener without TLS.
    Plain,
    /// TLS, with the caller's verified certificate chain if it presented one.
    Tls(Option<Arc<PeerChain>>),
    /// Plaintext on a TLS listener: every call is refused with a message saying so.
    PlainOnTlsListener,
}

/// The verified certificate chain a caller presented for its connection, and who its leaf
/// names, read once: parsing a certificate costs more than the rest of a small call, and
/// every call on the connection presents the same one.
#[derive(Debug)]
pub struct PeerChain {
    certs: Vec<CertificateDer<'static>>,
    identity: OnceLock<Result<super::Caller, String>>,
}

impl PeerChain {
    /// The chain as the handshake verified it, leaf first.
    pub fn new(certs: Vec<CertificateDer<'static>>) -> PeerChain {
        PeerChain {
            certs,
            identity: OnceLock::new(),
        }
    }
}

impl Transport {
    /// The caller's own (leaf) certificate, when it presented one over TLS.
    pub fn peer_cert(&self) -> Option<&CertificateDer<'static>> {
        match self {
            Transport::Tls(Some(chain)) => chain.certs.first(),
            _ => None,
        }
    }

    /// Who the caller's certificate names ([`identity_of`](super::identity::identity_of) of
    /// its leaf, read once per connection), when it presented one over TLS.
    pub fn peer_identity(&self) -> Option<Result<super::Caller, String>> {
        match self {
            Transport::Tls(Some(chain)) => {
                let leaf = chain.certs.first()?;
                Some(
                    chain
                        .identity
                        .get_or_init(|| super::identity::identity_of(leaf))
                        .clone(),
                )
            }
            _ => None,
        }
    }
}

enum ServerIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection of a node's listener.
pub struct ServerConn {
    io: ServerIo,
    info: ConnInfo,
}

impl tonic::transport::server::Connected for ServerConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

macro_rules! delegate_io {
    ($ty:ty, $field:ident, $($variant:path),+) => {
        impl AsyncRead for $ty {
            fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match &mut self.$field { $($variant(s) => Pin::new(s).poll_read(cx, buf),)+ }
            }
        }
        impl AsyncWrite for $ty {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match &mut self.$field { $($variant(s) => Pin::new(s).poll_write(cx, buf),)+ }
            }
            fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
                match &mut self.$field { $($variant(s) => Pin::new(s).poll_write_vectored(cx, bufs),)+ }
            }
            fn is_write_vectored(&self) -> bool {
                match &self.$field { $($variant(s) => s.is_write_vectored(),)+ }
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match &mut self.$field { $($variant(s) => Pin::new(s).poll_flush(cx),)+ }
            }
            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match &mut self.$field { $($variant(s) => Pin::new(s).poll_shutdown(cx),)+ }
            }
        }
    };
}

delegate_io!(ServerConn, io, ServerIo::Plain, ServerIo::Tls);

/// What a listener serves, which decides its server configuration.
#[derive(Clone, Copy)]
enum Served {
    /// gRPC (h2), asking callers for certificates as given.
    Grpc(ClientCerts),
    /// The HTTP side port (HTTP/1.1, client certificates optional).
    Http,
}

/// The connections of a gRPC `listener`, TLS-terminated with `tls` when given (handshakes run
/// concurrently, each bounded by a timeout, so a slow caller holds up nobody else).
pub fn incoming(
    listener: TcpListener,
    tls: Option<(Arc<NodeTls>, ClientCerts)>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerConn>> {
    accept_all(listener, tls.map(|(tls, certs)| (tls, Served::Grpc(certs))))
}

/// [`incoming`] for the HTTP side port: HTTPS with `tls` when given, client certificates
/// optional.
pub fn incoming_http(
    listener: TcpListener,
    tls: Option<Arc<NodeTls>>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerConn>> {
    accept_all(listener, tls.map(|tls| (tls, Served::Http)))
}

fn accept_all(
    listener: TcpListener,
    tls: Option<(Arc<NodeTls>, Served)>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, go on.
                        tracing::warn!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let Some((tls, served)) = tls.clone() else {
                let conn = ServerConn {
                    io: ServerIo::Plain(tcp),
                    info: ConnInfo {
                        remote: Some(remote),
                        transport: Transport::Plain,
                    },
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_tls(tcp, remote, &tls, served))
                    .await
                {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake with {remote} failed: {e}"),
                    Err(_) => tracing::debug!("TLS handshake with {remote} timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_tls(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: &NodeTls,
    served: Served,
) -> io::Result<ServerConn> {
    // A TLS connection starts with a handshake record (0x16); anything else is plaintext,
    // served only to be told that this listener wants TLS.
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed at once",
        ));
    }
    if first[0] != 0x16 {
        return Ok(ServerConn {
            io: ServerIo::Plain(tcp),
            info: ConnInfo {
                remote: Some(remote),
                transport: Transport::PlainOnTlsListener,
            },
        });
    }
    let config = match served {
        Served::Grpc(client_certs) => tls.server(client_certs),
        Served::Http => tls.http_server(),
    };
    let stream = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
    let chain = stream.get_ref().1.peer_certificates().map(|c| {
        Arc::new(PeerChain::new(
            c.iter().map(|c| c.clone().into_owned()).collect(),
        ))
    });
    Ok(ServerConn {
        io: ServerIo::Tls(Box::new(stream)),
        info: ConnInfo {
            remote: Some(remote),
            transport: Transport::Tls(chain),
        },
    })
}

enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A connection a node or modectl made, plaintext or TLS.
pub struct ClientConn {
    io: ClientIo,
}

delegate_io!(ClientConn, io, ClientIo::Plain, ClientIo::Tls);

/// Where a client's TLS configuration comes from: fixed (modectl), or a node's (re-read
/// when its files change).
#[derive(Clone)]
pub enum ClientTls {
    /// This configuration.
    Fixed(Arc<ClientConfig>),
    /// The node's current one.
    Node(Arc<NodeTls>),
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientTls::Fixed(_) => "ClientTls::Fixed",
            ClientTls::Node(_) => "ClientTls::Node",
        })
    }
}

impl ClientTls {
    fn config(&self) -> Arc<ClientConfig> {
        match self {
            ClientTls::Fixed(c) => c.clone(),
            ClientTls::Node(n) => n.client(),
        }
    }
}

/// A lazily connected channel to `address` (HOST:PORT), over TLS when `tls` is given (the
/// server's certificate must name HOST), tuned by `tune` (timeouts, window sizes).
pub fn channel(
    address: &str,
    tls: Option<ClientTls>,
    tune: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> Result<tonic::transport::Channel, String> {
    let address = address
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .and_then(|e| e.user_agent(crate::protocol::user_agent()))
        .map_err(|e| format!("invalid address '{address}': {e}"))?;
    let host = host_of(&address).to_string();
    let server_name = match &tls {
        Some(_) => Some(
            ServerName::try_from(host.clone())
                .map_err(|e| format!("'{host}' cannot be checked against a certificate: {e}"))?,
        ),
        None => None,
    };
    let connector = tower::service_fn(move |_: http::Uri| {
        let (address, tls, server_name) = (address.clone(), tls.clone(), server_name.clone());
        async move {
            let tcp = TcpStream::connect(&address).await?;
            let _ = tcp.set_nodelay(true);
            let io = match (tls, server_name) {
                (Some(tls), Some(name)) => ClientIo::Tls(Box::new(
                    tokio_rustls::TlsConnector::from(tls.config())
                        .connect(name, tcp)
                        .await?,
                )),
                _ => ClientIo::Plain(tcp),
            };
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(ClientConn { io }))
        }
    });
    Ok(tune(endpoint).connect_with_connector_lazy(connector))
}

/// The host of HOST:PORT (IPv6 without its brackets).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether `address` (an IP address and port) is on the loopback interface.
pub fn is_loopback(address: &SocketAddr) -> bool {
    address.ip().is_loopback()
}

/// A hint for a call that failed at the connection: TLS spoken to a plaintext server, or a
/// certificate the other side refused or that does not verify.
pub fn connection_hint(error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
    if e.contains("invalidcontenttype")
        || e.contains("corrupt message")
        || e.contains("invalid content type")
    {
        Some("the server does not speak TLS: drop --ca/--cert/--key (and https://), or start the node with TLS")
    } else if e.contains("unknownissuer")
        || e.contains("unknown issuer")
        || e.contains("badsignature")
    {
        Some("the server's certificate is not signed by the CA given with --ca: use the cluster's CA")
    } else if e.contains("expired") && (e.contains("certificate") || e.contains("cert")) {
        Some("a certificate has expired: make a new one (`modectl tls cert create`)")
    } else if e.contains("notvalidforname") || e.contains("not valid for name") {
        Some("the server's certificate does not name the address used: connect by a name it lists, or re-issue it with --dns/--ip")
    } else if e.contains("certificate required") || e.contains("certificaterequired") {
        Some("the server wants a client certificate: give --cert and --key")
    } else if e.contains("handshake") || e.contains("alert") {
        Some("the TLS handshake failed: check --ca, --cert and --key against the cluster's CA")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::pki::{create_ca, issue, Subject, Validity};

    fn write_node_cert(dir: &Path, ca: &crate::security::pki::Pem, id: u64) -> TlsFiles {
        let pem = issue(ca, &Subject::Node(id), &[], Validity::days(1)).unwrap();
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node-key.pem"),
        };
        std::fs::write(&files.ca, &ca.cert).unwrap();
        std::fs::write(&files.cert, pem.cert).unwrap();
        std::fs::write(&files.key, pem.key).unwrap();
        files
    }

    #[test]
    fn changed_certificate_files_are_loaded_and_broken_ones_are_not() {
        let dir = std::env::temp_dir().join(format!("mode-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = create_ca("test", Validity::days(1)).unwrap();
        let files = write_node_cert(&dir, &ca, 1);
        let tls = NodeTls::load(files.clone()).unwrap();
        let before = tls.server(ClientCerts::Required);
        assert!(!tls.reload_if_changed(), "nothing changed yet");
        std::thread::sleep(Duration::from_millis(20));
        write_node_cert(&dir, &ca, 1);
        assert!(tls.reload_if_changed(), "a rewritten certificate is loaded");
        assert!(!Arc::ptr_eq(&before, &tls.server(ClientCerts::Required)));
        // A broken file keeps the working configuration.
        let current = tls.server(ClientCerts::Required);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&files.key, "not a key").unwrap();
        assert!(!tls.reload_if_changed());
        assert!(Arc::ptr_eq(&current, &tls.server(ClientCerts::Required)));
        // Loading names the file that is wrong.
        let e = NodeTls::load(files.clone()).err().unwrap();
        assert!(e.contains("node-key.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn calls_between_nodes_carry_the_peer_protocol_versions() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let (_reporter, health) = tonic_health::server::health_reporter();
        let capture = {
            let seen = seen.clone();
            move |req: tonic::Request<()>| {
                *seen.lock().unwrap() = req
                    .metadata()
                    .get("user-agent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Ok(req)
            }
        };
        let server = tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                health, capture,
            ))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        let served = tokio::spawn(server);
        let mut client = tonic_health::pb::health_client::HealthClient::new(
            channel(&address, None, |e| e).unwrap(),
        );
        client
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        let agent = seen.lock().unwrap().clone().expect("a user-agent");
        assert!(agent.contains(&crate::protocol::user_agent()), "{agent}");
        assert!(crate::protocol::check_peer(Some(&agent)).is_ok());
        served.abort();
    }

    #[test]
    fn hints_name_the_tls_problem() {
        assert!(
            connection_hint("received corrupt message of type InvalidContentType")
                .unwrap()
                .contains("does not speak TLS")
        );
        assert!(connection_hint("invalid peer certificate: UnknownIssuer")
            .unwrap()
            .contains("CA"));
        assert!(connection_hint("invalid peer certificate: Expired")
            .unwrap()
            .contains("expired"));
        assert_eq!(connection_hint("connection refused"), None);
        // A call that ran out of time says nothing about certificates.
        assert_eq!(connection_hint("Timeout expired"), None);
        assert!(connection_hint("received fatal alert: CertificateExpired")
            .unwrap()
            .contains("expired"));
    }
}
