//! The mesh CA from files: a certificate and key to sign with, and a trust bundle (which may
//! hold several roots, so the CA can be rotated by publishing the new root first).
use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};

use super::{
    Identity, csr,
    issuer::{CertIssuer, IssueError, Issued},
};

/// Clock skew tolerated between nodes: certificates are valid from a minute before issuance.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no usable {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: {source}")]
    Pem { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("CA certificate or key in {path} is not usable: {source}")]
    Rcgen { path: PathBuf, source: rcgen::Error },
    #[error("{0} already exists; refusing to overwrite a CA (remove it first)")]
    Exists(PathBuf),
}

/// Paths of a CA written by [`init`].
#[derive(Debug, Clone)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl CaPaths {
    pub fn in_dir(dir: &Path) -> Self {
        CaPaths { cert: dir.join("ca.crt"), key: dir.join("ca.key"), bundle: dir.join("bundle.crt") }
    }
}

fn systime(t: time::OffsetDateTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64)
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Creates a self-signed mesh CA (ECDSA P-256) for local mode and the demo: `ca.crt`, `ca.key`
/// (mode 0600) and `bundle.crt` in `dir`.
pub fn init(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<CaPaths, CaError> {
    let paths = CaPaths::in_dir(dir);
    for p in [&paths.cert, &paths.key] {
        if p.exists() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write { path: dir.into(), source })?;
    let (cert, key) =
        self_signed(trust_domain, lifetime).map_err(|source| CaError::Rcgen { path: paths.cert.clone(), source })?;
    write(&paths.cert, cert.pem().as_bytes(), 0o644)?;
    write(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write(&paths.bundle, cert.pem().as_bytes(), 0o644)?;
    Ok(paths)
}

/// A new self-signed mesh CA certificate (ECDSA P-256) and its key.
fn self_signed(trust_domain: &str, lifetime: Duration) -> Result<(rcgen::Certificate, KeyPair), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "switchyard");
    // A name of its own (from its key), so that two CAs, e.g. old and new during a rotation,
    // are never mistaken for each other when a chain is built.
    let fp: String = ring_digest(key.public_key_pem().as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("switchyard mesh CA {fp} ({trust_domain})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    params.not_before = offset(now - BACKDATE);
    params.not_after = offset(now + lifetime);
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

pub(crate) fn ring_digest(data: &[u8]) -> Vec<u8> {
    // SHA-256 through rustls' provider (ring), to avoid another hashing dependency.
    let provider = rustls::crypto::ring::default_provider();
    let hash = provider.cipher_suites[0].tls13().map(|s| s.common.hash_provider).expect("TLS 1.3 suite");
    hash.hash(data).as_ref().to_vec()
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let werr = |source| CaError::Write { path: path.into(), source };
    let mut f =
        std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(mode).open(path).map_err(werr)?;
    f.write_all(data).map_err(werr)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read { path: path.into(), source })
}

/// DER as PEM (RFC 7468), e.g. `label` "CERTIFICATE": 64 base64 characters a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Every certificate in a PEM bundle.
pub fn load_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CaError::Pem { path: path.into(), source })?;
    if certs.is_empty() {
        return Err(CaError::Empty { path: path.into(), what: "certificate" });
    }
    Ok(certs)
}

/// DER length octets.
fn der_len(n: usize) -> Vec<u8> {
    match n {
        0..=0x7f => vec![n as u8],
        0x80..=0xff => vec![0x81, n as u8],
        _ => vec![0x82, (n >> 8) as u8, n as u8],
    }
}

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(body.len()));
    out.extend_from_slice(body);
    out
}

/// PKCS#8 `PrivateKeyInfo` around a SEC1 `ECPrivateKey` for the curve with DER-encoded OID
/// `curve_oid`.
fn pkcs8_from_sec1(sec1: &[u8], curve_oid: &[u8]) -> Vec<u8> {
    const EC_PUBLIC_KEY_OID: [u8; 9] = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    let alg = der(0x30, &[&EC_PUBLIC_KEY_OID[..], curve_oid].concat());
    der(0x30, &[&[0x02, 0x01, 0x00][..], &alg, &der(0x04, sec1)].concat())
}

/// PKCS#8 `PrivateKeyInfo` around a PKCS#1 `RSAPrivateKey`.
fn pkcs8_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    // rsaEncryption, NULL parameters.
    const RSA_ALG: [u8; 15] =
        [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    der(0x30, &[&[0x02, 0x01, 0x00][..], &RSA_ALG, &der(0x04, pkcs1)].concat())
}

/// A key pair from PEM, EC or RSA: PKCS#8 (`PRIVATE KEY`) as rcgen reads it; SEC1 (`EC PRIVATE
/// KEY`, as openssl `ecparam` and Helm's `genPrivateKey "ecdsa"` write it) and PKCS#1 (`RSA
/// PRIVATE KEY`, as `openssl genrsa -traditional` writes it and Istio's self-signed CA
/// is), which ring cannot read directly and which are rewrapped as PKCS#8 (P-256 or P-384;
/// RSA signing with SHA-256).
fn key_pair_from_pem(pem: &str) -> Result<KeyPair, rcgen::Error> {
    let err = match KeyPair::from_pem(pem) {
        Ok(k) => return Ok(k),
        Err(e) => e,
    };
    if let Ok(PrivateKeyDer::Pkcs1(pkcs1)) = PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
        let der = PrivatePkcs8KeyDer::from(pkcs8_from_pkcs1(pkcs1.secret_pkcs1_der()));
        return KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256);
    }
    let Ok(PrivateKeyDer::Sec1(sec1)) = PrivateKeyDer::from_pem_slice(pem.as_bytes()) else { return Err(err) };
    const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    for (oid, alg) in [(&P256[..], &rcgen::PKCS_ECDSA_P256_SHA256), (&P384[..], &rcgen::PKCS_ECDSA_P384_SHA384)] {
        let der = PrivatePkcs8KeyDer::from(pkcs8_from_sec1(sec1.secret_sec1_der(), oid));
        if let Ok(k) = KeyPair::from_pkcs8_der_and_sign_algo(&der, alg) {
            return Ok(k);
        }
    }
    Err(err)
}

/// Signs workload certificates in-process with the CA key.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and any above it up to the root, as in `ca.crt`.
    ca_chain: Vec<CertificateDer<'static>>,
    /// No certificate it signs outlives it.
    ca_not_after: SystemTime,
}

/// When a certificate expires (the far future if it cannot be read: the chain check decides).
fn expiry(cert: &CertificateDer<'_>) -> SystemTime {
    super::not_after(cert).unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64))
}

/// A random positive serial number (RFC 5280: unique per CA, at most 20 bytes).
fn serial() -> rcgen::SerialNumber {
    let mut b: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    b[0] &= 0x7f;
    b[0] |= 0x01;
    rcgen::SerialNumber::from(b)
}

impl LocalCa {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let key_pair = key_pair_from_pem(&key_pem).map_err(|source| CaError::Rcgen { path: key.into(), source })?;
        let ca_chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CaError::Pem { path: cert.into(), source })?;
        if ca_chain.is_empty() {
            return Err(CaError::Empty { path: cert.into(), what: "certificate" });
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
            .map_err(|source| CaError::Rcgen { path: cert.into(), source })?;
        let ca_not_after = expiry(&ca_chain[0]);
        Ok(LocalCa { issuer, ca_chain, ca_not_after })
    }

    /// A new CA that lives in memory only (in-process tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn generate(trust_domain: &str, lifetime: Duration) -> Result<Self, rcgen::Error> {
        let (cert, key) = self_signed(trust_domain, lifetime)?;
        let ca_chain = vec![cert.der().clone()];
        let issuer = Issuer::from_ca_cert_pem(&cert.pem(), key)?;
        let ca_not_after = expiry(&ca_chain[0]);
        Ok(LocalCa { issuer, ca_chain, ca_not_after })
    }

    /// The signing CA's certificate.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_chain[0]
    }

    /// The certificate for the key of a checked CSR: `id` as its only SAN, for TLS client and
    /// server authentication, valid from `not_before` to `not_after` (tests use this for expired
    /// certificates). Leaf first, then the CA's chain (its root last).
    pub fn certify(
        &self,
        csr: &csr::CheckedCsr,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IssueError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(rcgen::string::Ia5String::try_from(id.to_string())?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial());
        params.not_before = offset(not_before);
        params.not_after = offset(not_after.min(self.ca_not_after));
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(std::iter::once(cert.der().clone()).chain(self.ca_chain.iter().cloned()).collect())
    }

    /// A key and certificate for `id` made here, with explicit validity bounds (tests use this
    /// for expired certificates).
    pub fn issue_between(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, IssueError> {
        let made = csr::generate(id)?;
        let checked = csr::check(&made.csr_pem, id)?;
        let mut chain = self.certify(&checked, id, not_before, not_after)?;
        chain.truncate(1);
        Ok(Issued { chain, key: made.key, not_before: truncate(not_before), not_after: truncate(not_after) })
    }

    /// A key and certificate for `id` made here, valid for `lifetime` from now.
    pub fn issue(&self, id: &Identity, lifetime: Duration) -> Result<Issued, IssueError> {
        let now = SystemTime::now();
        self.issue_between(id, now - BACKDATE, now + lifetime)
    }

    /// A TLS serving certificate for `names` (DNS names or IP addresses), for the signer.
    pub fn serving(&self, names: &[String], lifetime: Duration) -> Result<Issued, IssueError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial());
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset((now + lifetime).min(self.ca_not_after));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            chain: std::iter::once(cert.der().clone()).chain(self.ca_chain.iter().cloned()).collect(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: systime(params.not_before),
            not_after: systime(params.not_after),
        })
    }
}

/// A time as a certificate holds it (whole seconds).
fn truncate(t: SystemTime) -> SystemTime {
    systime(offset(t))
}

#[async_trait::async_trait]
impl CertIssuer for LocalCa {
    async fn sign(
        &self,
        id: &Identity,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IssueError> {
        let checked = csr::check(csr_pem, id)?;
        let now = SystemTime::now();
        self.certify(&checked, id, now - BACKDATE, now + lifetime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA as the Helm chart generates it (`genPrivateKey "ecdsa"` + `genCAWithKey`: a SEC1
    /// "EC PRIVATE KEY" and a v3 CA certificate); a throwaway made for this test only.
    #[test]
    fn a_ca_generated_by_the_helm_chart_loads_and_issues() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let ca = LocalCa::load(&dir.join("helm-ca.crt"), &dir.join("helm-ca.key")).expect("helm CA loads");
        let issued = ca.issue(&Identity::new("cluster.local", "shop", "web"), Duration::from_secs(60)).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(ca.ca_cert()).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key())).expect("signed by the chart's CA key");
    }

    /// An RSA CA as Istio's self-signed one is (RSA 2048, `O=cluster.local`), its key in PKCS#1
    /// (`openssl genrsa -traditional`) and in PKCS#8: both load, and what they sign verifies.
    #[test]
    fn an_rsa_ca_loads_from_pkcs1_and_pkcs8_and_issues() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for key in ["rsa-ca.key", "rsa-ca-pkcs8.key"] {
            let ca = LocalCa::load(&dir.join("rsa-ca.crt"), &dir.join(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
            let issued = ca.issue(&Identity::new("cluster.local", "shop", "web"), Duration::from_secs(60)).unwrap();
            let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
            let (_, root) = x509_parser::parse_x509_certificate(ca.ca_cert()).unwrap();
            leaf.verify_signature(Some(root.public_key())).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }

    #[test]
    fn init_load_and_issue() {
        let dir = tempfile::tempdir().unwrap();
        let paths = init(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&paths.key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(init(dir.path(), "cluster.local", Duration::from_secs(1)), Err(CaError::Exists(_))));
        let ca = LocalCa::load(&paths.cert, &paths.key).unwrap();
        assert_eq!(load_bundle(&paths.bundle).unwrap(), vec![ca.ca_cert().clone()]);
        let id = Identity::new("cluster.local", "shop", "web");
        let issued = ca.issue(&id, Duration::from_secs(30)).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, vec!["spiffe://cluster.local/ns/shop/sa/web"]);
        let life = issued.not_after.duration_since(issued.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(90), "30 s lifetime plus 60 s backdating");
    }

    #[test]
    fn bad_ca_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pem");
        std::fs::write(&p, "not a pem").unwrap();
        let e = load_bundle(&p).unwrap_err().to_string();
        assert!(e.contains("no usable certificate"), "{e}");
        let e = LocalCa::load(&p, &p).err().unwrap().to_string();
        assert!(e.contains("x.pem"), "{e}");
        let e = LocalCa::load(&dir.path().join("missing"), &p).err().unwrap().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
