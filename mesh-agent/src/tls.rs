//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, one crypto provider (ring).
//!
//! * Server (inbound, port 15008): presents the certificate of the workload the client asked
//!   for by server name ([`Identity::sni`]), requires a client certificate chaining to the trust
//!   bundle, and the caller reads the client's SPIFFE ID with [`peer_identity`].
//! * Client (outbound): presents the source workload's certificate and accepts only a server
//!   certificate that chains to the bundle, is within its validity period, and carries exactly
//!   the expected SPIFFE ID ([`SpiffeServerVerifier`]); SPIFFE IDs are URI SANs, which the stock
//!   verifier (DNS names) cannot check.
use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::identity::{Identity, manager::CertManager};

pub const ALPN_H2: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// HBONE's: ring with ztunnel's cipher suites only (TLS 1.3 AES-256-GCM and AES-128-GCM).
fn hbone_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle certificate {0} is not a usable trust anchor: {1}")]
    Anchor(usize, webpki::Error),
    #[error("trust bundle: {0}")]
    Store(TlsError),
}

/// The roots workload certificates must chain to (several during a CA rotation). Shared and
/// replaceable at run time ([`TrustBundle::replace`]): handshakes after a replacement use the
/// new roots, on both sides.
#[derive(Clone)]
pub struct TrustBundle(Arc<std::sync::RwLock<Arc<Roots>>>);

/// One version of the bundle.
struct Roots {
    /// As given, to tell a changed bundle file from an unchanged one.
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    /// Verifies HBONE clients against these roots.
    clients: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.len())
    }
}

impl Roots {
    fn new(certs: &[CertificateDer<'static>]) -> Result<Self, BundleError> {
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        for (i, c) in certs.iter().enumerate() {
            anchors.push(webpki::anchor_from_trusted_cert(c).map_err(|e| BundleError::Anchor(i, e))?.to_owned());
            roots.add(c.clone()).map_err(BundleError::Store)?;
        }
        let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| BundleError::Store(TlsError::General(e.to_string())))?;
        Ok(Roots { certs: certs.to_vec(), anchors, clients })
    }
}

impl TrustBundle {
    pub fn new(certs: &[CertificateDer<'static>]) -> Result<Self, BundleError> {
        Ok(TrustBundle(Arc::new(std::sync::RwLock::new(Arc::new(Roots::new(certs)?)))))
    }

    fn current(&self) -> Arc<Roots> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the roots (a CA rotation: a root added or removed), for every holder.
    pub fn replace(&self, certs: &[CertificateDer<'static>]) -> Result<(), BundleError> {
        let roots = Arc::new(Roots::new(certs)?);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = roots;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.current().anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-reads `path` every `period` until `stop`; a bundle whose certificates differ from the
    /// current ones replaces them, an unusable one is logged and the current roots kept.
    pub async fn watch(
        self,
        path: std::path::PathBuf,
        period: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        // The file's bytes last looked at: unchanged bytes are not parsed again.
        let mut last: Option<Vec<u8>> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let Ok(bytes) = std::fs::read(&path) else { continue };
            if last.as_ref() == Some(&bytes) {
                continue;
            }
            last = Some(bytes);
            let certs = match crate::identity::ca::load_bundle(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(bundle = %path.display(), error = %e, "the trust bundle is not usable; keeping the current one");
                    continue;
                }
            };
            if certs == self.current().certs {
                continue;
            }
            match self.replace(&certs) {
                Ok(()) => {
                    tracing::info!(bundle = %path.display(), roots = certs.len(), "trust bundle changed: new handshakes use it")
                }
                Err(e) => {
                    tracing::warn!(bundle = %path.display(), error = %e, "the trust bundle is not usable; keeping the current one")
                }
            }
        }
    }
}

/// HBONE client verification against the bundle's roots as they are at the handshake.
#[derive(Debug)]
struct BundleClientVerifier(TrustBundle);

impl ClientCertVerifier for BundleClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // No hints: our clients have one certificate to present.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.0.current().clients.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.current().clients.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.current().clients.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().clients.supported_verify_schemes()
    }
}

pub use crate::identity::{PeerIdentityError, not_after, peer_identity};

fn webpki_to_tls(e: webpki::Error) -> TlsError {
    use webpki::Error as E;
    TlsError::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

#[derive(Debug, thiserror::Error)]
#[error("server presented {got}, expected {expected}")]
pub struct WrongIdentity {
    pub expected: String,
    pub got: String,
}

/// Client-side verification of the HBONE server: chain, validity, expected SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_to_tls)?;
        let roots = self.bundle.current();
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &roots.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_to_tls)?;
        let got = peer_identity(end_entity)
            .map_err(|e| TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e)))))?;
        if got != self.expected {
            return Err(TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                WrongIdentity { expected: self.expected.to_string(), got: got.to_string() },
            )))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Client config for one (source identity, expected destination identity) pair.
/// `sni`: name the expected identity in SNI (Switchyard's older dialect, addressed to a node);
/// otherwise no SNI, as ztunnel.
pub fn client_config(
    source_cert: Arc<CertifiedKey>,
    expected: Identity,
    bundle: &TrustBundle,
    sni: bool,
) -> Arc<ClientConfig> {
    let provider = hbone_provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier { bundle: bundle.clone(), expected, provider }))
        .with_client_cert_resolver(Arc::new(FixedClientCert(source_cert)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // As ztunnel: no SNI; the server picks its certificate by the address it was reached on.
    cfg.enable_sni = sni;
    // One handshake per pooled connection; resumption would skip certificate checks on the
    // server's side of later connections.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// Picks the certificate of the identity named by the client's SNI, if this node holds it.
#[derive(Debug)]
struct SniResolver {
    certs: Arc<CertManager>,
    trust_domain: String,
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertManager")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = Identity::from_sni(hello.server_name()?, &self.trust_domain)?;
        self.certs.get(&id).map(|c| c.key.clone())
    }
}

/// Inbound (HBONE server) config.
pub fn server_config(
    certs: Arc<CertManager>,
    trust_domain: &str,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(hbone_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(BundleClientVerifier(bundle.clone())))
        .with_cert_resolver(Arc::new(SniResolver { certs, trust_domain: trust_domain.into() }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A client of the CA API: the CA's serving certificate verified against `roots` (the mesh
/// roots, or the roots of whoever signs istiod's), ALPN `h2`, no client certificate (the caller
/// proves who it is with a token).
/// The HBONE server config for a connection that arrived on a pod's own address: that pod's
/// certificate whatever the client's SNI (ztunnel sends none), everything else as `base`.
pub fn server_config_for_pod(base: &ServerConfig, cert: Arc<CertifiedKey>) -> Arc<ServerConfig> {
    let mut cfg = base.clone();
    cfg.cert_resolver = Arc::new(FixedServerCert(cert));
    Arc::new(cfg)
}

#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

pub fn ca_client_config(roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, BundleError> {
    let mut store = RootCertStore::empty();
    for c in roots {
        store.add(c.clone()).map_err(BundleError::Store)?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(BundleError::Store)?
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// A readable description of a handshake error (rustls shows custom verifier errors with
/// their Debug form; this shows their message).
pub fn describe(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
        Some(TlsError::InvalidCertificate(CertificateError::Other(o))) => format!("invalid peer certificate: {}", o.0),
        Some(t) => t.to_string(),
        None => e.to_string(),
    }
}

/// A short, stable reason for a failed handshake, for logs and metric labels.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        TlsError::InvalidMessage(_) | TlsError::InappropriateMessage { .. } => "not_tls",
        TlsError::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "expired_certificate"
        }
        TlsError::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => {
            "not_yet_valid_certificate"
        }
        TlsError::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        TlsError::InvalidCertificate(CertificateError::BadSignature) => "bad_signature",
        TlsError::InvalidCertificate(CertificateError::Other(o)) if o.0.downcast_ref::<WrongIdentity>().is_some() => {
            "wrong_identity"
        }
        TlsError::InvalidCertificate(_) => "invalid_certificate",
        TlsError::NoCertificatesPresented => "no_client_certificate",
        TlsError::PeerIncompatible(_) => "incompatible",
        TlsError::AlertReceived(_) => "alert_received",
        TlsError::NoApplicationProtocol => "no_alpn",
        _ => "tls_error",
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::identity::{
        ca::{self, LocalCa},
        issuer::Issued,
    };

    fn certified(i: Issued) -> Arc<CertifiedKey> {
        Arc::new(CertifiedKey::new(i.chain, rustls::crypto::ring::sign::any_supported_type(&i.key).unwrap()))
    }

    struct Pki {
        _dir: tempfile::TempDir,
        old: LocalCa,
        new: LocalCa,
        new_paths: ca::CaPaths,
        bundle: TrustBundle,
    }

    /// Two CAs, both in the bundle: the state during a CA rotation.
    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let a = ca::init(&dir.path().join("old"), "cluster.local", Duration::from_secs(3600)).unwrap();
        let b = ca::init(&dir.path().join("new"), "cluster.local", Duration::from_secs(3600)).unwrap();
        let old = LocalCa::load(&a.cert, &a.key).unwrap();
        let new = LocalCa::load(&b.cert, &b.key).unwrap();
        let bundle = TrustBundle::new(&[old.ca_cert().clone(), new.ca_cert().clone()]).unwrap();
        Pki { _dir: dir, old, new, new_paths: b, bundle }
    }

    /// Server holding `server_id`'s certificate (from `server_ca`); a client presenting
    /// `client` expecting `expected`. Returns the client's result and the identity the server
    /// saw.
    async fn handshake(
        p: &Pki,
        server_id: &Identity,
        client: Issued,
        expected: &Identity,
    ) -> (Result<(), String>, Option<Identity>) {
        // The server's certificates come from the new CA.
        let issuer = LocalCa::load(&p.new_paths.cert, &p.new_paths.key).unwrap();
        let m = Arc::new(CertManager::new(Arc::new(issuer), Duration::from_secs(600)));
        m.sync(&[server_id.clone()].into()).await;
        // As the HBONE server serves a connection addressed to a pod: that pod's certificate.
        let cert = m.get(server_id).unwrap().key.clone();
        let server = server_config_for_pod(&server_config(m, "cluster.local", &p.bundle).unwrap(), cert);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await.ok()?;
            let id = tls.get_ref().1.peer_certificates().and_then(|c| peer_identity(&c[0]).ok());
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.ok()?;
            id
        });
        let cfg = client_config(certified(client), expected.clone(), &p.bundle, false);
        // No SNI, as ztunnel: the server's certificate follows the address.
        let name = ServerName::IpAddress(addr.ip().into());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let res = match tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await {
            Ok(mut s) => s.write_all(b"ping").await.map_err(|e| e.to_string()),
            Err(e) => Err(describe(&e)),
        };
        (res, srv.await.unwrap())
    }

    #[tokio::test]
    async fn mutual_tls_with_spiffe_ids_across_a_ca_rotation() {
        let p = pki();
        let client = Identity::new("cluster.local", "shop", "web");
        let server = Identity::new("cluster.local", "shop", "db");
        // Client cert from the old CA, server cert from the new one: both trusted.
        let c = p.old.issue(&client, Duration::from_secs(600)).unwrap();
        let (res, seen) = handshake(&p, &server, c, &server).await;
        assert_eq!(res, Ok(()));
        assert_eq!(seen, Some(client.clone()));
    }

    #[tokio::test]
    async fn wrong_server_identity_and_expired_client_are_refused() {
        let p = pki();
        let client = Identity::new("cluster.local", "shop", "web");
        let server = Identity::new("cluster.local", "shop", "db");
        let c = p.new.issue(&client, Duration::from_secs(600)).unwrap();
        let other = Identity::new("cluster.local", "shop", "cache");
        let (res, _) = handshake(&p, &server, c, &other).await;
        let e = res.unwrap_err();
        assert!(e.contains("server presented spiffe://cluster.local/ns/shop/sa/db, expected spiffe://cluster.local/ns/shop/sa/cache"), "{e}");
        // A client certificate that expired is refused by the server.
        let now = SystemTime::now();
        let old =
            p.new.issue_between(&client, now - Duration::from_secs(7200), now - Duration::from_secs(3600)).unwrap();
        let (_, seen) = handshake(&p, &server, old, &server).await;
        assert_eq!(seen, None, "the server must not accept an expired client certificate");
    }

    #[tokio::test]
    async fn a_replaced_bundle_applies_to_the_next_handshakes_on_both_sides() {
        let p = pki();
        let client = Identity::new("cluster.local", "shop", "web");
        let server = Identity::new("cluster.local", "shop", "db");
        // The old CA removed from the bundle (the end of a rotation): an old-CA client is now
        // refused by the server, without a restart.
        p.bundle.replace(std::slice::from_ref(p.new.ca_cert())).unwrap();
        assert_eq!(p.bundle.len(), 1);
        let c = p.old.issue(&client, Duration::from_secs(600)).unwrap();
        let (_, seen) = handshake(&p, &server, c, &server).await;
        assert_eq!(seen, None, "the removed root no longer verifies clients");
        // The server's certificate is from the new CA: a bundle with only the old root makes
        // the client refuse it.
        p.bundle.replace(std::slice::from_ref(p.old.ca_cert())).unwrap();
        let c = p.old.issue(&client, Duration::from_secs(600)).unwrap();
        let (res, _) = handshake(&p, &server, c, &server).await;
        assert!(res.is_err(), "the client verifies the server against the current roots");
        // Both again: accepted.
        p.bundle.replace(&[p.old.ca_cert().clone(), p.new.ca_cert().clone()]).unwrap();
        let c = p.old.issue(&client, Duration::from_secs(600)).unwrap();
        let (res, seen) = handshake(&p, &server, c, &server).await;
        assert_eq!((res, seen), (Ok(()), Some(client)));
    }

    #[tokio::test]
    async fn the_bundle_file_is_watched_and_a_bad_edit_keeps_the_roots() {
        let p = pki();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root-cert.pem");
        let pem = |c: &CertificateDer<'_>| ca::pem("CERTIFICATE", c);
        std::fs::write(&path, pem(p.old.ca_cert()) + &pem(p.new.ca_cert())).unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(p.bundle.clone().watch(path.clone(), Duration::from_millis(20), stop.clone()));
        std::fs::write(&path, pem(p.new.ca_cert())).unwrap();
        for _ in 0..100 {
            if p.bundle.len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(p.bundle.len(), 1, "the edit was picked up");
        std::fs::write(&path, "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.bundle.len(), 1, "an unusable file keeps the current roots");
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn peer_identity_needs_exactly_one_spiffe_id() {
        let p = pki();
        let i = p.new.issue(&Identity::new("cluster.local", "a", "b"), Duration::from_secs(60)).unwrap();
        assert_eq!(peer_identity(&i.chain[0]).unwrap().to_string(), "spiffe://cluster.local/ns/a/sa/b");
        assert!(peer_identity(p.new.ca_cert()).is_err(), "a CA certificate has no SPIFFE ID");
    }
}
