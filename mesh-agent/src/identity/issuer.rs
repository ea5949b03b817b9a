//! Issuing workload certificates. [`CertIssuer`] is the seam: the agent makes the key and a CSR
//! (the key never leaves the node) and an issuer signs the CSR: [`crate::identity::ca::LocalCa`]
//! in-process (local mode, the demo, tests), [`crate::identity::caclient::CaClient`] over
//! Istio's CA API (Switchyard's signer, istiod, istio-csr).
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Identity, csr::CsrError};

/// A freshly issued workload certificate and its private key (generated in memory, never
/// written to disk).
pub struct Issued {
    /// Leaf first, then any intermediates (not the root: the peer has it).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CSR was refused: {0}")]
    Csr(#[from] CsrError),
    #[error("cannot reach the CA at {address}: {detail}")]
    Unreachable { address: String, detail: String },
    #[error("the CA refused: {code}: {message}")]
    Refused { code: &'static str, message: String },
    #[error("the CA's answer is not usable: {0}")]
    BadResponse(String),
    #[error("the CA issued a certificate that is not for {wanted}: {got}")]
    WrongIdentity { wanted: String, got: String },
    #[error("cannot read the token for the CA from {path}: {detail}")]
    Token { path: String, detail: String },
    #[error("the issued key cannot sign: {0}")]
    Key(rustls::Error),
}

impl IssueError {
    /// A label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            IssueError::Generate(_) | IssueError::Key(_) => "local_error",
            IssueError::Csr(e) => e.reason(),
            IssueError::Unreachable { .. } => "ca_unreachable",
            IssueError::Refused { code, .. } => code,
            IssueError::BadResponse(_) => "bad_response",
            IssueError::WrongIdentity { .. } => "wrong_identity",
            IssueError::Token { .. } => "token_unreadable",
        }
    }
}

#[async_trait::async_trait]
pub trait CertIssuer: Send + Sync + 'static {
    /// Signs `csr_pem` (a PEM PKCS#10 request naming `id`) for `lifetime` from now. Returns the
    /// chain leaf first; the root last if the CA sends it (Istio's API does).
    async fn sign(
        &self,
        id: &Identity,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IssueError>;
}
