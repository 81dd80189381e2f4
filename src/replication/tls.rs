//! Authentication and encryption of the replication link: TLS 1.3 (rustls), both ends
//! authenticated, before any replication frame is read. Two ways to trust the peer:
//!
//! - **Certificates** (`--tls-cert`, `--tls-key`, `--tls-ca`, optionally `--tls-peer-name`): each
//!   side presents a certificate chaining to the CA; the primary checks the secondary's name
//!   (the host of `--peer`, or `--tls-peer-name`), the secondary checks the primary's name when
//!   `--tls-peer-name` is given.
//! - **Pre-shared key** (`--tls-psk-file`): both sides derive the same Ed25519 key and the same
//!   self-signed certificate from the secret (HKDF-SHA256), present it, and accept only a peer
//!   presenting exactly that certificate and proving it holds its key (TLS 1.3 CertificateVerify).
//!   Whoever lacks the secret cannot complete the handshake.
//!
//! Plain TCP is only used with `--insecure-link`. A peer that fails the handshake is refused
//! (its bytes are never parsed as frames); TLS 1.3 without early data also makes a replayed
//! capture of an earlier session useless.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::link::Stream;

/// How the link is protected, as the command line says.
#[derive(Debug, Clone)]
pub enum LinkSecurityOptions {
    /// Plain TCP (`--insecure-link`).
    Insecure,
    /// Certificates from a CA.
    Certificates {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        /// The name the peer's certificate must carry (the primary defaults to `--peer`'s host).
        peer_name: Option<String>,
    },
    /// A secret both hosts hold (`--tls-psk-file`).
    PreSharedKey { file: PathBuf },
}

/// A ready-to-use link protection.
#[derive(Clone)]
pub enum LinkSecurity {
    Insecure,
    Tls(Arc<Tls>),
}

impl fmt::Debug for LinkSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkSecurity::Insecure => f.write_str("insecure (plain TCP)"),
            LinkSecurity::Tls(t) => write!(f, "TLS 1.3 ({})", t.mode),
        }
    }
}

/// Both TLS configurations of one endpoint.
pub struct Tls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    /// The name the primary asks for (SNI) and checks.
    server_name: ServerName<'static>,
    mode: &'static str,
}

/// The name the PSK certificate carries.
const PSK_NAME: &str = "colo-blk-psk";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why the link's protection cannot be set up, or a handshake failed. The texts are what
/// operators see; `io::Error` is made where the link's I/O begins ([`LinkSecurity::connect`],
/// [`LinkSecurity::accept`]) or the process's start reports it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file a TLS option names cannot be read.
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A certificate, key, CA or name an option gives is not usable (`what`: the file or the
    /// option).
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    /// The pre-shared key is too short to be a secret.
    #[error(
        "--tls-psk-file: the secret must be at least 16 bytes (e.g. `head -c 32 \
         /dev/urandom | base64`)"
    )]
    ShortSecret,
    /// The TLS library refused a configuration built here (not the operator's input).
    #[error("{0}")]
    Setup(String),
    /// The peer's handshake failed (another key or CA, a peer without TLS).
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("TLS handshake not done within {0:?}")]
    HandshakeTimeout(Duration),
}

impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> io::Error {
        let kind = match &e {
            TlsError::Read { source, .. } => source.kind(),
            TlsError::Invalid { .. } | TlsError::ShortSecret => io::ErrorKind::InvalidInput,
            TlsError::Setup(_) => io::ErrorKind::Other,
            TlsError::Handshake(e) => e.kind(),
            TlsError::HandshakeTimeout(_) => io::ErrorKind::TimedOut,
        };
        io::Error::new(kind, e)
    }
}

/// An unusable `what` (a file or an option), and why.
fn invalid(what: impl fmt::Display, why: impl fmt::Display) -> TlsError {
    TlsError::Invalid {
        what: what.to_string(),
        why: why.to_string(),
    }
}

/// A configuration the TLS library refused.
fn setup(e: impl fmt::Display) -> TlsError {
    TlsError::Setup(e.to_string())
}

/// Reads a file a TLS option names.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl LinkSecurity {
    /// Loads certificates and keys; `peer` is the primary's `--peer` (for the default name).
    pub fn new(opts: &LinkSecurityOptions, peer: Option<&str>) -> Result<LinkSecurity, TlsError> {
        match opts {
            LinkSecurityOptions::Insecure => Ok(LinkSecurity::Insecure),
            LinkSecurityOptions::Certificates {
                cert,
                key,
                ca,
                peer_name,
            } => {
                let chain = load_certs(cert)?;
                let key = load_key(key)?;
                let mut roots = RootCertStore::empty();
                for c in load_certs(ca)? {
                    roots.add(c).map_err(|e| invalid(ca.display(), e))?;
                }
                let roots = Arc::new(roots);
                let name = match (peer_name, peer) {
                    (Some(n), _) => n.clone(),
                    (None, Some(p)) => host_of(p),
                    (None, None) => String::new(),
                };
                let client = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(setup)?
                    .with_root_certificates(roots.clone())
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .map_err(|e| invalid("--tls-cert/--tls-key", e))?;
                let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| invalid("--tls-ca", e))?;
                let verifier = Arc::new(NamedClientVerifier {
                    inner,
                    name: peer_name.clone(),
                });
                let server = ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(setup)?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain, key)
                    .map_err(|e| invalid("--tls-cert/--tls-key", e))?;
                let server_name = ServerName::try_from(if name.is_empty() {
                    "localhost".to_string()
                } else {
                    name
                })
                .map_err(|e| invalid("--tls-peer-name", e))?;
                Ok(Self::tls(client, server, server_name, "certificates"))
            }
            LinkSecurityOptions::PreSharedKey { file } => {
                let secret = read(file)?;
                let (cert, key) = psk_identity(&secret)?;
                let verifier = Arc::new(PinnedCert {
                    cert: cert.clone(),
                    provider: provider(),
                });
                let client = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(setup)?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier.clone())
                    .with_client_auth_cert(vec![cert.clone()], key.clone_key())
                    .map_err(setup)?;
                let server = ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(setup)?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(vec![cert], key)
                    .map_err(setup)?;
                let name = ServerName::try_from(PSK_NAME).map_err(setup)?;
                Ok(Self::tls(client, server, name, "pre-shared key"))
            }
        }
    }

    fn tls(
        client: ClientConfig,
        server: ServerConfig,
        server_name: ServerName<'static>,
        mode: &'static str,
    ) -> LinkSecurity {
        LinkSecurity::Tls(Arc::new(Tls {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            server_name,
            mode,
        }))
    }

    /// The primary's side: protects a connected stream (handshake within `timeout`).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> io::Result<Box<dyn StreamObj>> {
        let tcp = buffered(tcp);
        match self {
            LinkSecurity::Insecure => Ok(Box::new(tcp)),
            LinkSecurity::Tls(t) => {
                let s = within(timeout, t.connector.connect(t.server_name.clone(), tcp)).await?;
                Ok(Box::new(s))
            }
        }
    }

    /// The secondary's side: authenticates an accepted stream (handshake within `timeout`).
    pub async fn accept(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> io::Result<Box<dyn StreamObj>> {
        let tcp = buffered(tcp);
        match self {
            LinkSecurity::Insecure => Ok(Box::new(tcp)),
            LinkSecurity::Tls(t) => {
                let s = within(timeout, t.acceptor.accept(tcp)).await?;
                Ok(Box::new(s))
            }
        }
    }
}

/// How much a link reads from its socket at once.
const READ_BUFFER: usize = 256 << 10;

/// The socket behind a buffer that reads up to [`READ_BUFFER`] at once: rustls reads about
/// 4 KiB per call and the plain link's frame reader a 40-byte header and then the payload, so
/// without it every 4 KiB of TLS records, or every frame, cost a `recv` (and the window
/// updates that come with small reads). A read at least as large as the buffer (a large
/// payload on a plain link) bypasses it.
fn buffered(tcp: TcpStream) -> BufReader<TcpStream> {
    BufReader::with_capacity(READ_BUFFER, tcp)
}

/// A protected stream, whatever protects it.
pub trait StreamObj: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> StreamObj for T {}

// `Box<dyn StreamObj>` is a `link::Stream` through the blanket impl.
const _: fn() = || {
    fn is_stream<S: Stream>() {}
    is_stream::<Box<dyn StreamObj>>();
};

async fn within<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, TlsError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(TlsError::Handshake),
        Err(_) => Err(TlsError::HandshakeTimeout(timeout)),
    }
}

/// `HOST` of `HOST:PORT` (`[v6]:PORT` too).
fn host_of(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(path.display(), e))?;
    if certs.is_empty() {
        return Err(invalid(path.display(), "no PEM certificate in it"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    rustls_pemfile::private_key(&mut &data[..])
        .map_err(|e| invalid(path.display(), e))?
        .ok_or_else(|| invalid(path.display(), "no PEM private key in it"))
}

/// The certificate and key both holders of `secret` derive: an Ed25519 key from
/// HKDF-SHA256(secret) and a self-signed certificate with fixed fields over it (Ed25519
/// signatures are deterministic, so both sides get the same bytes).
fn psk_identity(
    secret: &[u8],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let secret = trim_newline(secret);
    if secret.len() < 16 {
        return Err(TlsError::ShortSecret);
    }
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"colo-blk replication link");
    let prk = salt.extract(secret);
    let mut seed = [0u8; 32];
    prk.expand(&[b"ed25519 identity"], SeedLen)
        .and_then(|okm| okm.fill(&mut seed))
        .map_err(|_| setup("HKDF failed"))?;
    // PKCS#8 v1 of an Ed25519 key: a fixed prefix and the 32-byte seed (RFC 8410).
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&seed);
    let key_der = PrivatePkcs8KeyDer::from(pkcs8);
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519)
        .map_err(setup)?;
    let mut params = rcgen::CertificateParams::new(vec![PSK_NAME.to_string()]).map_err(setup)?;
    params.serial_number = Some(rcgen::SerialNumber::from(1u64));
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(9999, 12, 31);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, PSK_NAME);
    let cert = params.self_signed(&key).map_err(setup)?;
    Ok((
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(key_der.clone_key()),
    ))
}

struct SeedLen;
impl ring::hkdf::KeyType for SeedLen {
    fn len(&self) -> usize {
        32
    }
}

fn trim_newline(s: &[u8]) -> &[u8] {
    let mut s = s;
    while let [rest @ .., b'\n' | b'\r'] = s {
        s = rest;
    }
    s
}

/// Accepts exactly one certificate (the PSK identity), on both sides.
#[derive(Debug)]
struct PinnedCert {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl PinnedCert {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PinnedCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The CA's client verifier, plus a check of the primary's name when one is configured.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: Option<String>,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(name) = &self.name {
            let want = ServerName::try_from(name.as_str())
                .map_err(|_| rustls::Error::General(format!("bad --tls-peer-name {name}")))?;
            let cert = webpki::EndEntityCert::try_from(end_entity)
                .map_err(|e| rustls::Error::General(format!("client certificate: {e}")))?;
            cert.verify_is_valid_for_subject_name(&want).map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            })?;
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn psk(dir: &Path, name: &str, secret: &str) -> LinkSecurity {
        let f = dir.join(name);
        std::fs::write(&f, secret).unwrap();
        LinkSecurity::new(&LinkSecurityOptions::PreSharedKey { file: f }, None).unwrap()
    }

    /// Runs a handshake: the secondary side with `server`, the primary with `client`; on
    /// success a byte goes through. Returns the two results.
    async fn handshake(
        server: LinkSecurity,
        client: LinkSecurity,
    ) -> (io::Result<()>, io::Result<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(10);
        let srv = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut s = server.accept(tcp, t).await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            assert_eq!(b, [42]);
            s.write_all(&[43]).await?;
            s.flush().await?;
            Ok::<(), io::Error>(())
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let c = async {
            let mut s = client.connect(tcp, t).await?;
            s.write_all(&[42]).await?;
            s.flush().await?;
            // The answer comes back only through an accepted session (a refused client
            // learns it on this read).
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            if b == [43] {
                Ok(())
            } else {
                Err(io::Error::other(format!("got {b:?}, not the answer")))
            }
        }
        .await;
        (srv.await.unwrap(), c)
    }

    #[tokio::test]
    async fn psk_peers_with_the_same_secret_connect_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = psk(dir.path(), "a", "correct horse battery staple\n");
        let b = psk(dir.path(), "b", "correct horse battery staple");
        let (s, c) = handshake(a.clone(), b).await;
        s.unwrap();
        c.unwrap();
        let wrong = psk(dir.path(), "w", "incorrect horse battery staple");
        let (s, c) = handshake(a.clone(), wrong).await;
        assert!(s.is_err() && c.is_err(), "a wrong secret must be refused");
        let (s, _) = handshake(a, LinkSecurity::Insecure).await;
        let e = s.unwrap_err();
        assert!(e.to_string().contains("TLS handshake failed"), "{e}");
    }

    #[test]
    fn a_short_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "short").unwrap();
        let e =
            LinkSecurity::new(&LinkSecurityOptions::PreSharedKey { file: f }, None).unwrap_err();
        assert!(e.to_string().contains("at least 16 bytes"), "{e}");
    }

    #[test]
    fn hosts_of_peer_addresses() {
        assert_eq!(host_of("10.0.0.2:7790"), "10.0.0.2");
        assert_eq!(host_of("[::1]:7790"), "::1");
        assert_eq!(host_of("secondary.example:7790"), "secondary.example");
    }

    /// A CA and a certificate for `name` it signed, as PEM files in `dir`.
    pub(crate) fn make_ca(dir: &Path, ca_name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca = p.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{ca_name}.pem")), ca.pem()).unwrap();
        (ca, key)
    }

    fn issue(dir: &Path, ca: &(rcgen::Certificate, rcgen::KeyPair), name: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn certs(dir: &Path, me: &str, ca: &str, peer_name: Option<&str>) -> LinkSecurity {
        LinkSecurity::new(
            &LinkSecurityOptions::Certificates {
                cert: dir.join(format!("{me}.crt")),
                key: dir.join(format!("{me}.key")),
                ca: dir.join(format!("{ca}.pem")),
                peer_name: peer_name.map(str::to_string),
            },
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn certificates_of_the_ca_with_the_right_names_connect() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = make_ca(d, "ca");
        let other = make_ca(d, "other-ca");
        issue(d, &ca, "primary.colo");
        issue(d, &ca, "secondary.colo");
        issue(d, &other, "intruder.colo");
        let secondary = || certs(d, "secondary.colo", "ca", Some("primary.colo"));
        // The right pair.
        let (s, c) = handshake(
            secondary(),
            certs(d, "primary.colo", "ca", Some("secondary.colo")),
        )
        .await;
        s.unwrap();
        c.unwrap();
        // A client certificate from another CA.
        let (s, c) = handshake(
            secondary(),
            certs(d, "intruder.colo", "ca", Some("secondary.colo")),
        )
        .await;
        assert!(
            s.is_err() && c.is_err(),
            "another CA's certificate was accepted"
        );
        // The right CA but not the expected primary's name.
        let (s, c) = handshake(
            secondary(),
            certs(d, "secondary.colo", "ca", Some("secondary.colo")),
        )
        .await;
        assert!(
            s.is_err() && c.is_err(),
            "a wrong primary name was accepted"
        );
        // The primary expects another secondary name.
        let (s, c) = handshake(
            secondary(),
            certs(d, "primary.colo", "ca", Some("other.colo")),
        )
        .await;
        assert!(
            s.is_err() && c.is_err(),
            "a wrong secondary name was accepted"
        );
    }
}
