//! Certificate signing requests. The agent makes one per identity, so its private keys never
//! leave the node ([`generate`]); a CA checks one before it signs it ([`check`]).
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, string::Ia5String};
use rustls::pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};
use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    prelude::FromDer as _,
    public_key::PublicKey,
};

use super::Identity;

/// A new key and a CSR for it that names one identity.
pub struct KeyAndCsr {
    pub key: PrivateKeyDer<'static>,
    /// PEM, as Istio's CA API carries it.
    pub csr_pem: String,
}

/// An ECDSA P-256 key (as ztunnel and istio-agent make) and a CSR with one URI SAN, the SPIFFE
/// ID, and an empty subject.
pub fn generate(id: &Identity) -> Result<KeyAndCsr, rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string())?)];
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndCsr { key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())), csr_pem: csr.pem()? })
}

/// Why a CSR is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not a PEM-encoded PKCS#10 certificate request")]
    NotPem,
    #[error("the CSR cannot be parsed")]
    Malformed,
    #[error(
        "the CSR's signature does not verify with its own key, or it asks for an extension a workload certificate cannot have"
    )]
    BadSignature,
    #[error("the CSR's key is {0}; accepted: ECDSA P-256 or P-384, RSA of 2048 to 4096 bits, Ed25519")]
    KeyType(String),
    #[error("the CSR names {found:?}, not the identity asked for ({wanted}): it must name exactly that one URI")]
    SanMismatch { found: Vec<String>, wanted: String },
}

impl CsrError {
    /// A label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::NotPem | CsrError::Malformed => "malformed_csr",
            CsrError::BadSignature => "bad_csr_signature",
            CsrError::KeyType(_) => "csr_key_type",
            CsrError::SanMismatch { .. } => "csr_san_mismatch",
        }
    }
}

/// A CSR that passed [`check`]: its public key, to be certified. Nothing else from the CSR is
/// used (not its subject, not its extensions): the certificate's contents are the CA's.
pub struct CheckedCsr {
    pub public_key: rcgen::PublicKey,
}

/// Parses `pem`, verifies the CSR's signature (it proves possession of the key), checks the key
/// type and that its SANs are exactly `wanted`'s SPIFFE ID.
pub fn check(pem: &str, wanted: &Identity) -> Result<CheckedCsr, CsrError> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|_| CsrError::NotPem)?;
    let (_, parsed) = X509CertificationRequest::from_der(&der).map_err(|_| CsrError::Malformed)?;
    key_type(&parsed)?;
    let mut found = Vec::new();
    for ext in parsed.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            found.extend(san.general_names.iter().map(|n| match n {
                GeneralName::URI(u) => u.to_string(),
                other => other.to_string(),
            }));
        }
    }
    let want = wanted.to_string();
    if found != [want.as_str()] {
        return Err(CsrError::SanMismatch { found, wanted: want });
    }
    // rcgen verifies the signature and refuses extensions it does not know.
    let params = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|_| CsrError::BadSignature)?;
    Ok(CheckedCsr { public_key: params.public_key })
}

fn key_type(csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    const P256: &str = "1.2.840.10045.3.1.7";
    const P384: &str = "1.3.132.0.34";
    let spki = &csr.certification_request_info.subject_pki;
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            match curve.as_deref() {
                Some(P256 | P384) => Ok(()),
                other => Err(CsrError::KeyType(format!("ECDSA on curve {}", other.unwrap_or("(none)")))),
            }
        }
        Ok(PublicKey::RSA(rsa)) => match rsa.key_size() {
            2048..=4096 => Ok(()),
            bits => Err(CsrError::KeyType(format!("RSA of {bits} bits"))),
        },
        Ok(PublicKey::Unknown(_)) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Ok(()),
        Ok(_) => Err(CsrError::KeyType(format!("of algorithm {}", spki.algorithm.algorithm.to_id_string()))),
        Err(_) => Err(CsrError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa)
    }

    fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s.to_string()).unwrap())
    }

    #[test]
    fn a_generated_csr_passes_for_its_identity_only() {
        let made = generate(&id("web")).unwrap();
        assert!(check(&made.csr_pem, &id("web")).is_ok());
        let e = check(&made.csr_pem, &id("db")).err().unwrap();
        assert_eq!(e.reason(), "csr_san_mismatch", "{e}");
    }

    #[test]
    fn each_bad_csr_is_refused_with_its_reason() {
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        // Not PEM, not a CSR.
        assert_eq!(check("hello", &id("web")).err(), Some(CsrError::NotPem));
        let junk = "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8=\n-----END CERTIFICATE REQUEST-----\n";
        assert_eq!(check(junk, &id("web")).err(), Some(CsrError::Malformed));
        // No SAN, an extra SAN, a DNS name.
        for sans in [
            vec![],
            vec![uri(web), uri("spiffe://cluster.local/ns/shop/sa/db")],
            vec![uri(web), SanType::DnsName("web.shop".try_into().unwrap())],
        ] {
            let e = check(&csr_with(&p256, sans), &id("web")).err().unwrap();
            assert_eq!(e.reason(), "csr_san_mismatch", "{e}");
        }
        // Another trust domain.
        let e = check(&csr_with(&p256, vec![uri("spiffe://evil.example/ns/shop/sa/web")]), &id("web")).err().unwrap();
        assert_eq!(e.reason(), "csr_san_mismatch");
        // P-384 and Ed25519 keys are fine.
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let k = KeyPair::generate_for(alg).unwrap();
            assert!(check(&csr_with(&k, vec![uri(web)]), &id("web")).is_ok(), "{alg:?}");
        }
        // A signature that does not verify: the CSR's body tampered with after signing.
        let good = csr_with(&p256, vec![uri(web)]);
        let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap().as_ref().to_vec();
        let at = der.windows(3).position(|w| w == b"web").unwrap();
        der[at] = b'w';
        der[at + 2] = b'x';
        let pem = crate::identity::ca::pem("CERTIFICATE REQUEST", &der);
        let e = check(&pem, &Identity::new("cluster.local", "shop", "wex")).err().unwrap();
        assert_eq!(e, CsrError::BadSignature);
    }
}
