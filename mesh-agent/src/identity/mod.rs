//! Workload identity: SPIFFE IDs, the mesh CA, certificate issuance and renewal.
//!
//! Trust model (see ARCHITECTURE.md): agents hold no CA key in Kubernetes. They make a key and a
//! CSR per identity and ask a CA over Istio's API ([`caclient`]): Switchyard's signer
//! ([`signer`], which signs only identities of pods on the caller's node), istiod or istio-csr.
//! Local mode and the demo sign in-process ([`ca::LocalCa`]) behind the same
//! [`issuer::CertIssuer`].
pub mod ca;
pub mod caclient;
pub mod csr;
pub mod issuer;
pub mod manager;
pub mod signer;

/// What a certificate says of identity: its SPIFFE ID and validity (read by the HBONE server of
/// its peers, and by the agent of what a CA issued it).
///
/// Why a certificate names no usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("unparsable certificate: {0}")]
    Unparsable(String),
    #[error("bad subjectAltName: {0}")]
    BadSan(String),
    #[error("certificate has no subjectAltName")]
    NoSan,
    #[error("certificate has no SPIFFE ID")]
    NoUri,
    #[error("certificate has more than one URI SAN")]
    SeveralUris,
    #[error("certificate URI SAN: {0}")]
    NotSpiffe(String),
}

/// The SPIFFE ID in a certificate: its one and only URI SAN, which must be a `spiffe://` ID
/// (per the X.509-SVID spec; a second URI of any scheme is refused, not ignored).
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<Identity, PeerIdentityError> {
    use PeerIdentityError as E;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| E::Unparsable(e.to_string()))?;
    let san = parsed.subject_alternative_name().map_err(|e| E::BadSan(e.to_string()))?.ok_or(E::NoSan)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next().ok_or(E::NoUri)?;
    if uris.next().is_some() {
        return Err(E::SeveralUris);
    }
    Identity::parse(first).map_err(|e| E::NotSpiffe(e.to_string()))
}

/// A certificate's validity: (not before, not after).
pub fn validity(cert: &CertificateDer<'_>) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Some((at(parsed.validity().not_before), at(parsed.validity().not_after)))
}

/// When a certificate stops being valid.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    validity(cert).map(|(_, after)| after)
}

/// Istio's CA API (`proto/ca.proto`), generated.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("istio.v1.auth");
}

use std::fmt;

use rustls::pki_types::CertificateDer;

/// Default SPIFFE trust domain, as in Kubernetes and Istio.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Suffix of the TLS server name (SNI) a client uses to say which workload identity it expects
/// the HBONE server to present: `<service account>.<namespace>.id.switchyard`.
pub const SNI_SUFFIX: &str = ".id.switchyard";

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a SPIFFE workload ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
pub struct BadSpiffeId(pub String);

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    pub fn parse(uri: &str) -> Result<Self, BadSpiffeId> {
        let bad = || BadSpiffeId(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (td, ns_kw, ns, sa_kw, sa) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next());
        if parts.next().is_some() {
            return Err(bad());
        }
        match (td, ns_kw, ns, sa_kw, sa) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa))
                if is_trust_domain(td) && is_dns_label(ns) && is_dns_subdomain(sa) =>
            {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }

    /// The server name a client sends to ask for this identity's certificate.
    pub fn sni(&self) -> String {
        format!("{}.{}{SNI_SUFFIX}", self.service_account, self.namespace)
    }

    /// Inverse of [`Identity::sni`] (namespaces cannot contain dots; service accounts can).
    pub fn from_sni(sni: &str, trust_domain: &str) -> Option<Self> {
        let rest = sni.strip_suffix(SNI_SUFFIX)?;
        let (sa, ns) = rest.rsplit_once('.')?;
        (is_dns_subdomain(sa) && is_dns_label(ns)).then(|| Identity::new(trust_domain, ns, sa))
    }
}

/// A Kubernetes namespace name: an RFC 1123 label (lowercase letters, digits, '-', at most 63,
/// starting and ending alphanumeric). No dots, which is what makes [`Identity::from_sni`]
/// unambiguous.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A Kubernetes service account (or pod) name: an RFC 1123 subdomain.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A SPIFFE trust domain: lowercase letters, digits, '.', '-', '_'.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_'))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_reject_garbage() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        for bad in [
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/namespace/shop/sa/web",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a b/sa/c",
            "spiffe://cluster.local/ns/Shop/sa/web",
            "spiffe://cluster.local/ns/a.b/sa/c",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/-b",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sni_round_trip() {
        let id = Identity::new("cluster.local", "shop", "web.frontend");
        assert_eq!(id.sni(), "web.frontend.shop.id.switchyard");
        assert_eq!(Identity::from_sni(&id.sni(), "cluster.local"), Some(id));
        assert_eq!(Identity::from_sni("example.com", "cluster.local"), None);
        assert_eq!(Identity::from_sni(".id.switchyard", "cluster.local"), None);
        // Dotted namespaces cannot exist, so an SNI has exactly one reading.
        assert_eq!(Identity::from_sni("c.a.b.id.switchyard", "td").unwrap().namespace, "b");
    }
}
