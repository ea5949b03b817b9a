//! Issuing workload certificates. [`CertIssuer`] is the seam: [`crate::identity::ca::LocalCa`]
//! signs in-process today; a CSR-based issuer can implement the same trait.
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Identity;

/// A freshly issued workload certificate and its private key (generated in memory, never
/// written to disk).
pub struct Issued {
    /// Leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("issuer unavailable: {0}")]
    Unavailable(String),
    #[error("the issued key cannot sign: {0}")]
    Key(rustls::Error),
}

pub trait CertIssuer: Send + Sync + 'static {
    /// Issues a certificate for `id`, valid for `lifetime` from now, usable for TLS client and
    /// server authentication.
    fn issue(&self, id: &Identity, lifetime: Duration) -> Result<Issued, IssueError>;
}
