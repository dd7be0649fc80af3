//! TLS for every connection warmpool makes or accepts, with rustls (ring) and no OpenSSL.
//!
//! Clients ([`client_config`]): the Jenkins REST client, the lease API client behind `run`,
//! `status` and `bench` (https and the wss exec socket), and the agent's hub WebSocket. They
//! trust the platform's root certificates plus, optionally, one PEM CA file (`--ca-file`,
//! `WARMPOOL_CA_FILE`, a Jenkins pool's `caFile`). Certificates are always verified: there is
//! no switch to turn verification off. [`failure`] finds the rustls error under a reqwest or
//! tungstenite error, so a wrong CA reads "TLS certificate verification failed: invalid peer
//! certificate: UnknownIssuer" next to the URL, not "error sending request".
//!
//! Server ([`CertReloader`], [`TlsListener`]): `serve --tls-cert/--tls-key` terminates TLS for
//! the API, `/metrics` and the agent hub. The certificate and key files are checked (a `stat`
//! of each) at every handshake and re-read when either changed, so a renewed certificate
//! (cert-manager, a Secret update, an atomic rename) is used by the next connection without a
//! restart; a new file that does not load keeps the previous certificate and logs an error
//! naming the file. Handshakes run off the accept loop, each with a deadline, so a client that
//! never finishes one holds nothing.
//!
//! This module owns configuration and plumbing only; it never decides what to connect to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// TLS set-up errors; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate file (CA or server) could not be read or parsed.
    #[error("cannot read certificates from {path}: {message}")]
    Certs {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A certificate file holds no `CERTIFICATE` block.
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCerts {
        /// The file.
        path: PathBuf,
    },
    /// The private key could not be read, parsed or used.
    #[error("cannot use the private key in {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The key does not belong to the certificate.
    #[error("the key in {key} does not match the certificate in {cert}: {message}")]
    Mismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls' words.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long a client may take to finish its TLS handshake with `serve`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The platform's root certificates, read once per process.
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let r = rustls_native_certs::load_native_certs();
        for e in &r.errors {
            tracing::warn!(error = %e, "cannot load some of the platform's root certificates");
        }
        if r.certs.is_empty() {
            tracing::warn!(
                "no platform root certificates found: only a --ca-file / caFile CA is trusted"
            );
        }
        r.certs
    })
}

/// Reads every `CERTIFICATE` block of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Certs {
            path: path.into(),
            message: pem_message(e),
        })?;
    if certs.is_empty() {
        return Err(Error::NoCerts { path: path.into() });
    }
    Ok(certs)
}

fn pem_message(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("{other:?}"),
    }
}

/// A client configuration trusting the platform's roots plus the CAs in `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(native_roots().iter().cloned());
    if let Some(path) = ca_file {
        for c in read_certs(path)? {
            roots.add(c).map_err(|e| Error::Certs {
                path: path.into(),
                message: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The client configuration for dialing `url`: [`client_config`], except that a plain `ws://`
/// or `http://` URL with no `ca_file` gets one with no roots, since it never does TLS. Reading
/// and parsing the platform's roots was more than half of a `warmpool agent`'s start-up CPU
/// (9.6 ms with them, 4.4 ms without, medians of 5 on this machine), paid by every agent the
/// process backend starts.
pub fn client_config_for(url: &str, ca_file: Option<&Path>) -> Result<Arc<ClientConfig>> {
    if needs_roots(url, ca_file) {
        return client_config(ca_file);
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Whether dialing `url` needs the platform's roots: a TLS URL, or a `ca_file` given (still
/// read, so a bad one is an error whatever the URL).
fn needs_roots(url: &str, ca_file: Option<&Path>) -> bool {
    let plain = ["ws://", "http://"].iter().any(|p| {
        url.get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
    });
    !plain || ca_file.is_some()
}

/// The client configuration with the platform's roots only (built once).
pub fn default_client_config() -> Arc<ClientConfig> {
    static DEFAULT: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| client_config(None).expect("the ring provider supports the defaults"))
        .clone()
}

/// What `reqwest::ClientBuilder::use_preconfigured_tls` takes.
pub fn for_reqwest(cfg: &Arc<ClientConfig>) -> ClientConfig {
    ClientConfig::clone(cfg)
}

/// A WebSocket over the configured TLS (`wss://`), or plain TCP (`ws://`), Nagle off.
pub async fn connect_ws<R: IntoClientRequest + Unpin>(
    req: R,
    ws: Option<WebSocketConfig>,
    tls: &Arc<ClientConfig>,
) -> Result<
    (
        WebSocketStream<MaybeTlsStream<TcpStream>>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    tokio_tungstenite::connect_async_tls_with_config(
        req,
        ws,
        true,
        Some(Connector::Rustls(tls.clone())),
    )
    .await
}

fn as_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    // `io::Error::source` skips the error it wraps, where tokio-rustls puts rustls' error.
    let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    as_rustls(inner)
}

/// The TLS failure under `e`, in words: "TLS certificate verification failed: invalid peer
/// certificate: UnknownIssuer", or "TLS handshake failed: ...". None when TLS is not the cause.
pub fn failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = as_rustls(err) {
            return Some(match r {
                rustls::Error::InvalidCertificate(_) => {
                    format!("TLS certificate verification failed: {r}")
                }
                _ => format!("TLS handshake failed: {r}"),
            });
        }
        cur = err.source();
    }
    None
}

/// `e` in words for a person: its TLS failure when there is one, else its whole cause chain
/// ("error sending request: ...: connection refused").
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(t) = failure(e) {
        return t;
    }
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = s.source();
    }
    message
}

// ---------------------------------------------------------------------------------------------
// Server side

/// The certificate chain and key files of `serve --tls-cert/--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl CertFiles {
    /// Reads both files into a key pair rustls can serve.
    pub fn load(&self) -> Result<CertifiedKey> {
        let chain = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| Error::Key {
            path: self.key.clone(),
            message: pem_message(e),
        })?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| Error::Key {
                path: self.key.clone(),
                message: e.to_string(),
            })?;
        let ck = CertifiedKey::new(chain, signer);
        match ck.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                Ok(ck)
            }
            Err(e) => Err(Error::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                message: e.to_string(),
            }),
        }
    }
}

/// What identifies one version of a file: a rewrite in place or a rename changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: a Secret volume swaps its `..data` link.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

struct Loaded {
    current: Arc<CertifiedKey>,
    seen: (Option<Stamp>, Option<Stamp>),
}

/// Serves the current certificate, re-reading the files when they change.
pub struct CertReloader {
    files: CertFiles,
    state: Mutex<Loaded>,
}

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    /// Loads the files; an error here stops `serve` from starting.
    pub fn new(files: CertFiles) -> Result<Arc<CertReloader>> {
        let seen = (stamp(&files.cert), stamp(&files.key));
        let current = Arc::new(files.load()?);
        Ok(Arc::new(CertReloader {
            files,
            state: Mutex::new(Loaded { current, seen }),
        }))
    }

    /// The certificate to present now, after re-reading the files if they changed since the
    /// last look. A change that does not load keeps the previous certificate (logged once per
    /// change; the next change is tried again).
    pub fn current(&self) -> Arc<CertifiedKey> {
        let now = (stamp(&self.files.cert), stamp(&self.files.key));
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now != st.seen {
            st.seen = now;
            match self.files.load() {
                Ok(k) => {
                    st.current = Arc::new(k);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "the changed TLS certificate does not load; still serving the previous one"
                ),
            }
        }
        st.current.clone()
    }

    /// A server configuration (HTTP/1.1) presenting this reloader's certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A listener for `axum::serve` that hands out connections after their TLS handshake.
///
/// A background task accepts TCP connections (Nagle off) and runs each handshake in its own
/// task with a deadline; finished ones queue for [`axum::serve::Listener::accept`]. Dropping
/// the listener (graceful shutdown) stops the task and the handshakes in flight.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    /// Serves TLS on `listener`; a handshake not finished within `handshake_timeout` is dropped.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        handshake_timeout: Duration,
    ) -> std::io::Result<TlsListener> {
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(config),
            handshake_timeout,
            tx,
        ));
        Ok(TlsListener { rx, addr })
    }
}

type Ready = mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>;

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, deadline: Duration, tx: Ready) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = tx.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::error!(error = %e, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = tx.closed() => return,
                }
            }
        };
        // No Nagle: leases, exec frames and agent messages are small and latency-bound.
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let hs = tokio::time::timeout(deadline, acceptor.accept(tcp));
            tokio::select! {
                r = hs => match r {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(
                        %peer,
                        "TLS handshake not finished within {}s; closing",
                        deadline.as_secs_f64()
                    ),
                },
                _ = tx.closed() => {}
            }
        });
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept loop only ends once this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tls_urls_or_a_ca_file_load_the_platform_roots() {
        let ca = Path::new("/ca.pem");
        assert!(!needs_roots("ws://127.0.0.1:7420/v1/agents/connect", None));
        assert!(!needs_roots("HTTP://h:1/", None));
        assert!(needs_roots("wss://h/v1/agents/connect", None));
        assert!(needs_roots("https://h/", None));
        assert!(needs_roots("ws://h/", Some(ca)));
        assert!(client_config_for("ws://h/", None).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = client_config_for("ws://h/", Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = client_config(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = client_config(Some(&empty)).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
    }

    #[test]
    fn a_rustls_error_inside_an_io_error_is_found() {
        let r = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, r);
        assert_eq!(
            failure(&io).as_deref(),
            Some("TLS certificate verification failed: invalid peer certificate: UnknownIssuer")
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(failure(&plain), None);
        assert_eq!(describe(&plain), "refused");
    }
}
