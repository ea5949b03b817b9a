//! A client of Istio's CA API (`istio.v1.auth.IstioCertificateService/CreateCertificate`), as
//! ztunnel is one: the agent sends a CSR for a pod's identity (`ImpersonatedIdentity`), with its
//! own ServiceAccount token as `authorization: Bearer`, and gets the chain back. Switchyard's
//! signer (`mesh-agent identity serve`), istiod and cert-manager's istio-csr all serve this.
//!
//! One HTTP/2 connection to the CA, over TLS verified against the mesh root, opened on first use
//! and again after it fails. The token is re-read for every request (projected tokens rotate).
use std::{
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{
    Identity, ca,
    issuer::{CertIssuer, IssueError},
    pb::{IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient},
};

/// The metadata key a node agent names the identity it asks for with (Istio's).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Where the CA is and how to prove who we are to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaClientConfig {
    /// `https://host:port` (istiod: `https://istiod.istio-system.svc:15012`).
    pub address: String,
    /// PEM roots that verify the CA's serving certificate.
    pub root_cert: PathBuf,
    /// The agent's projected ServiceAccount token (audience `istio-ca` by default).
    pub token_file: PathBuf,
    /// Sent as the `clusterid` header when not empty (istiod uses it to pick the cluster
    /// whose API server checks the token).
    pub cluster_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("the CA address {0:?} is not https://host:port")]
    Address(String),
}

pub struct CaClient {
    config: CaClientConfig,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    origin: http::Uri,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<SendRequest<tonic::body::Body>>>,
}

impl CaClient {
    pub fn new(config: CaClientConfig, timeout: Duration) -> Result<Self, CaClientError> {
        let bad = || CaClientError::Address(config.address.clone());
        let origin: http::Uri = config.address.parse().map_err(|_| bad())?;
        if origin.scheme_str() != Some("https") {
            return Err(bad());
        }
        let authority = origin.authority().ok_or_else(bad)?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = authority.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        Ok(CaClient { config, host, port, server_name, origin, timeout, conn: tokio::sync::Mutex::default() })
    }

    fn unreachable(&self, detail: impl ToString) -> IssueError {
        IssueError::Unreachable { address: self.config.address.clone(), detail: detail.to_string() }
    }

    /// The open connection, or a new one.
    async fn channel(&self) -> Result<SendRequest<tonic::body::Body>, IssueError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        // The roots are read again for every connection: the bundle changes during a CA rotation.
        let roots = ca::load_bundle(&self.config.root_cert).map_err(|e| self.unreachable(e))?;
        let tls = crate::tls::ca_client_config(&roots).map_err(|e| self.unreachable(e))?;
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| self.unreachable(e))?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| self.unreachable(crate::tls::describe(&e)))?;
            let (send, driver) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| self.unreachable(e))?;
            Ok::<_, IssueError>((send, driver))
        };
        let (send, driver) =
            tokio::time::timeout(self.timeout, connect).await.map_err(|_| self.unreachable("connect timed out"))??;
        let address = self.config.address.clone();
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                debug!(%address, error = %e, "connection to the CA ended");
            }
        });
        info!(address = %self.config.address, "connected to the CA");
        *conn = Some(send.clone());
        Ok(send)
    }

    fn token(&self) -> Result<String, IssueError> {
        let token_err =
            |detail: String| IssueError::Token { path: self.config.token_file.display().to_string(), detail };
        let t = std::fs::read_to_string(&self.config.token_file).map_err(|e| token_err(e.to_string()))?;
        let t = t.trim();
        if t.is_empty() {
            return Err(token_err("the file is empty".into()));
        }
        Ok(t.to_string())
    }
}

#[async_trait::async_trait]
impl CertIssuer for CaClient {
    async fn sign(
        &self,
        id: &Identity,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IssueError> {
        let token = self.token()?;
        let metadata = prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
            )]
            .into(),
        };
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: lifetime.as_secs().max(1) as i64,
            metadata: Some(metadata),
        });
        let bad_header = |_| IssueError::Token {
            path: self.config.token_file.display().to_string(),
            detail: "the token is not a valid header value".into(),
        };
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().map_err(bad_header)?);
        if !self.config.cluster_id.is_empty() {
            let v = self.config.cluster_id.parse().map_err(|_| IssueError::BadResponse("bad cluster id".into()))?;
            req.metadata_mut().insert("clusterid", v);
        }
        req.set_timeout(self.timeout);
        let send = self.channel().await?;
        let mut client = IstioCertificateServiceClient::with_origin(H2(send), self.origin.clone());
        let answer = match tokio::time::timeout(self.timeout, client.create_certificate(req)).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => {
                let code = code_label(status.code());
                if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal) {
                    // Perhaps the connection: the next request opens a new one.
                    self.conn.lock().await.take();
                }
                if status.code() == tonic::Code::Unavailable {
                    return Err(self.unreachable(status.message()));
                }
                return Err(IssueError::Refused { code, message: status.message().to_string() });
            }
            Err(_) => {
                self.conn.lock().await.take();
                return Err(self.unreachable("no answer in time"));
            }
        };
        let mut chain = Vec::new();
        for pem in &answer.cert_chain {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(cert.map_err(|e| IssueError::BadResponse(format!("a certificate is not PEM: {e}")))?);
            }
        }
        if chain.is_empty() {
            return Err(IssueError::BadResponse("no certificate in the answer".into()));
        }
        Ok(chain)
    }
}

/// A gRPC status code as a metric label.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// hyper's HTTP/2 client as the tower service tonic's generated client calls.
#[derive(Clone)]
struct H2(SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// Shared by the manager and the readiness check: an issuer behind an `Arc`.
pub type SharedIssuer = Arc<dyn CertIssuer>;
