//! The signer (`mesh-agent identity serve`): the only holder of the mesh CA key in a cluster.
//! It serves Istio's CA API (`IstioCertificateService/CreateCertificate`) over TLS on 15012 and
//! signs a CSR only for an identity the caller may have:
//!
//! * **Authentication**: the caller's ServiceAccount token (`authorization: Bearer`), checked
//!   with the TokenReview API for the configured audience (default `istio-ca`, as istiod).
//! * **Authorization**, as istiod's node authorizer: a workload may have its own identity; a
//!   node agent (a trusted ServiceAccount, the chart's `mesh-agent`) may ask, with
//!   `ImpersonatedIdentity`, only for identities of pods scheduled on its own node. Which pod
//!   and node the caller is comes from its token (bound to its pod: the TokenReview's
//!   `authentication.kubernetes.io/pod-name` and `pod-uid`) and the pods the signer watches.
//! * **The CSR**: its signature verifies, its key is of an accepted type, its only SAN is the
//!   identity asked for; the lifetime is capped. Nothing else from it is used.
//!
//! It also publishes the trust bundle in a ConfigMap the agents mount, and serves `/metrics`,
//! `/healthz` and `/readyz` on its admin port. Stateless: any number of replicas.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use futures::StreamExt as _;
use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::{ConfigMap, Pod},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::watcher,
};
use prometheus_client::{
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::{
    Identity,
    ca::{self, LocalCa},
    caclient::IMPERSONATED_IDENTITY,
    csr,
    pb::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
    },
};
use crate::config::CaFiles;

/// Istio's CA port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
/// The audience istiod expects, so one projected token works with either CA.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// The ConfigMap key of the trust bundle (Istio's `istio-ca-root-cert` uses the same key).
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// Handshakes and requests that take longer are cut.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request (body included) must be answered within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection is closed gracefully after this long (its client opens a new one).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// Connections open at once from one address.
const MAX_CONNECTIONS_PER_SOURCE: usize = 64;
/// Streams per connection (an agent asks 8 at a time).
const MAX_STREAMS: u32 = 16;
/// A request message is a CSR and a little metadata: a few KiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// TokenReviews in flight at once: a flood of bad tokens cannot flood the API server.
const MAX_REVIEWS: usize = 32;
/// A ServiceAccount token is a JWT of about 1 KiB.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 4096;
/// The serving certificate's lifetime; it is replaced at half of it.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What `mesh-agent identity serve` runs with.
#[derive(Debug, Clone, clap::Args)]
pub struct SignerArgs {
    /// Where to serve the CA API (TLS, gRPC).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Where to serve /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub admin: SocketAddr,
    /// The CA: a directory with ca.crt, ca.key and (optionally) bundle.crt, as the chart's
    /// Secret mounts it.
    #[arg(long)]
    pub ca_dir: PathBuf,
    #[arg(long, default_value = super::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Token audience the TokenReview must confirm (repeatable; any one suffices).
    #[arg(long = "audience", default_values_t = [DEFAULT_AUDIENCE.to_string()])]
    pub audiences: Vec<String>,
    /// ServiceAccounts (`namespace/name`) that may ask for the identities of pods on their
    /// node, as istiod's `CA_TRUSTED_NODE_ACCOUNTS` (comma-separated or repeated).
    #[arg(long = "trusted-node-account", value_delimiter = ',', required = true)]
    pub trusted_node_accounts: Vec<String>,
    /// The longest certificate lifetime it signs, seconds (longer requests are shortened).
    #[arg(long, default_value_t = 24 * 3600)]
    pub max_lifetime_secs: u64,
    /// Names of its serving certificate (DNS names or IP addresses; repeatable), as the agents
    /// address it.
    #[arg(long = "serving-name", required = true)]
    pub serving_names: Vec<String>,
    /// Publish the trust bundle in this ConfigMap (`namespace/name`).
    #[arg(long)]
    pub root_configmap: Option<String>,
    /// kubeconfig (default: in-cluster, then `$KUBECONFIG`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

/// A `namespace/name` pair.
fn ns_name(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, n)) if super::is_dns_label(ns) && super::is_dns_subdomain(n) => Ok((ns.into(), n.into())),
        _ => anyhow::bail!("{s:?} is not namespace/name"),
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// Who called, as the API server vouches for its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to (name, uid), when it is a pod-bound projected token.
    pub pod: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthnError {
    #[error("no bearer token in the authorization header")]
    NoToken,
    #[error("the token was not accepted: {0}")]
    Rejected(String),
    #[error("the token is not for audience {0:?}")]
    Audience(String),
    #[error("the token is not a ServiceAccount's ({0:?})")]
    NotAServiceAccount(String),
    #[error("the token cannot be checked now: {0}")]
    Unavailable(String),
}

impl AuthnError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthnError::NoToken => "no_token",
            AuthnError::Rejected(_) => "token_rejected",
            AuthnError::Audience(_) => "token_audience",
            AuthnError::NotAServiceAccount(_) => "not_a_service_account",
            AuthnError::Unavailable(_) => "token_review_unavailable",
        }
    }
}

#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthnError>;
}

/// Checks tokens with the Kubernetes TokenReview API, at most [`MAX_REVIEWS`] at once, after a
/// local look that spares the API server what cannot be a valid token.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audiences: Vec<String>,
    in_flight: tokio::sync::Semaphore,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        TokenReviewer { api: Api::all(client), audiences, in_flight: tokio::sync::Semaphore::new(MAX_REVIEWS) }
    }
}

/// What can be told of a token without its key: a JWT of sane size, not expired, for one of
/// `audiences`. Anything else is refused without asking the API server.
pub fn plausible_token(token: &str, audiences: &[String]) -> Result<(), AuthnError> {
    let bad = |why: &str| Err(AuthnError::Rejected(format!("not a usable ServiceAccount token: {why}")));
    if token.len() > MAX_TOKEN_BYTES {
        return bad("too long");
    }
    if token.split('.').count() != 3 {
        return bad("not a JWT");
    }
    let Some(claims) = jwt_claims(token) else { return bad("not a JWT") };
    if jwt_expiry(token).is_some_and(|exp| exp <= SystemTime::now()) {
        return bad("expired");
    }
    let aud: Vec<&str> = match &claims["aud"] {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => vec![],
    };
    if !aud.is_empty() && !audiences.iter().any(|a| aud.contains(&a.as_str())) {
        return Err(AuthnError::Audience(audiences.join(",")));
    }
    Ok(())
}

/// The caller a TokenReview's answer names, if it is authenticated for one of `audiences`.
pub fn caller_from_review(review: &TokenReview, audiences: &[String]) -> Result<Caller, AuthnError> {
    let status = review.status.as_ref().ok_or_else(|| AuthnError::Rejected("no status in the review".into()))?;
    if let Some(e) = status.error.as_ref().filter(|e| !e.is_empty()) {
        return Err(AuthnError::Rejected(e.clone()));
    }
    if status.authenticated != Some(true) {
        return Err(AuthnError::Rejected("not authenticated".into()));
    }
    // The API server says which of the audiences asked for the token is valid for.
    let granted = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| granted.contains(a)) {
        return Err(AuthnError::Audience(audiences.join(",")));
    }
    let user = status.user.as_ref().ok_or_else(|| AuthnError::Rejected("no user in the review".into()))?;
    let name = user.username.clone().unwrap_or_default();
    let parts: Vec<&str> = name.split(':').collect();
    let (ns, sa) = match parts.as_slice() {
        ["system", "serviceaccount", ns, sa] => (*ns, *sa),
        _ => return Err(AuthnError::NotAServiceAccount(name)),
    };
    let extra = |k: &str| user.extra.as_ref().and_then(|e| e.get(k)).and_then(|v| v.first()).cloned();
    let pod = match (extra("authentication.kubernetes.io/pod-name"), extra("authentication.kubernetes.io/pod-uid")) {
        (Some(n), Some(u)) => Some((n, u)),
        _ => None,
    };
    Ok(Caller { namespace: ns.into(), service_account: sa.into(), pod })
}

#[async_trait::async_trait]
impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthnError> {
        plausible_token(token, &self.audiences)?;
        let _slot = self.in_flight.acquire().await.map_err(|_| AuthnError::Unavailable("stopping".into()))?;
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: Some(self.audiences.clone()) },
            ..Default::default()
        };
        let answer = self.api.create(&PostParams::default(), &review).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 401 || s.code == 403 => {
                AuthnError::Unavailable(format!("the signer may not create TokenReviews: {}", s.message))
            }
            other => AuthnError::Unavailable(other.to_string()),
        })?;
        caller_from_review(&answer, &self.audiences)
    }
}

/// How long an authenticated token is remembered.
const AUTHN_CACHE_TTL: Duration = Duration::from_secs(30);
/// Tokens remembered at most (one per agent and workload that asks).
const AUTHN_CACHE_MAX: usize = 10_000;

/// Remembers authenticated tokens for a short while (as the API server's own authenticator
/// does), so an agent renewing its node's certificates costs one TokenReview, not one per pod.
/// An entry lives at most [`AUTHN_CACHE_TTL`] and never past the token's own `exp`; failures
/// are not remembered. Authorization is still decided per request against the live pods: a
/// deleted pod's token stops impersonating as soon as the pod leaves the index.
pub struct CachedAuthenticator {
    inner: Arc<dyn Authenticator>,
    entries: std::sync::Mutex<HashMap<Vec<u8>, (Caller, Instant)>>,
}

impl CachedAuthenticator {
    pub fn new(inner: Arc<dyn Authenticator>) -> Self {
        CachedAuthenticator { inner, entries: Default::default() }
    }
}

/// A JWT's claims, unverified (the API server verifies the token).
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `exp` claim of a JWT, unverified.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(jwt_claims(token)?["exp"].as_u64()?))
}

#[async_trait::async_trait]
impl Authenticator for CachedAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthnError> {
        let key = ca::ring_digest(token.as_bytes());
        let now = Instant::now();
        if let Some((caller, until)) = self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && *until > now
        {
            return Ok(caller.clone());
        }
        let caller = self.inner.authenticate(token).await?;
        let left = match jwt_expiry(token) {
            Some(exp) => exp.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO),
            None => AUTHN_CACHE_TTL,
        };
        if left.is_zero() {
            return Ok(caller);
        }
        let until = now + left.min(AUTHN_CACHE_TTL);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= AUTHN_CACHE_MAX {
            entries.retain(|_, (_, u)| *u > now);
            if entries.len() >= AUTHN_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, (caller.clone(), until));
        Ok(caller)
    }
}

// ---------------------------------------------------------------------------------------------
// Authorization

/// What the authorizer knows of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodEntry {
    uid: String,
    node: Option<String>,
    service_account: String,
}

/// The cluster's pods as the authorizer needs them, kept from a watch.
#[derive(Debug, Default)]
pub struct PodDirectory {
    /// (namespace, name) → pod.
    pods: HashMap<(String, String), PodEntry>,
    /// (node, namespace, service account) → running pods.
    on_node: HashMap<(String, String, String), usize>,
}

impl PodDirectory {
    fn entry(pod: &Pod) -> Option<((String, String), PodEntry)> {
        let meta = &pod.metadata;
        // A mirror pod (a static pod the kubelet reported) is whatever a node's root wrote
        // into its manifests directory: it vouches for no identity.
        if meta.annotations.as_ref().is_some_and(|a| a.contains_key("kubernetes.io/config.mirror")) {
            return None;
        }
        let key = (meta.namespace.clone()?, meta.name.clone()?);
        let spec = pod.spec.as_ref();
        let finished =
            pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
        let entry = PodEntry {
            uid: meta.uid.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()).filter(|_| !finished),
            // No ServiceAccount named: no identity (the API server names `default` itself when
            // it admits an ordinary pod).
            service_account: spec.and_then(|s| s.service_account_name.clone()).filter(|s| !s.is_empty())?,
        };
        Some((key, entry))
    }

    fn count(&mut self, key: &(String, String), e: &PodEntry, delta: isize) {
        let Some(node) = &e.node else { return };
        let k = (node.clone(), key.0.clone(), e.service_account.clone());
        let n = self.on_node.entry(k.clone()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.on_node.remove(&k);
        }
    }

    pub fn apply(&mut self, pod: &Pod) {
        let Some((key, entry)) = Self::entry(pod) else { return };
        if let Some(old) = self.pods.insert(key.clone(), entry.clone()) {
            self.count(&key, &old, -1);
        }
        self.count(&key, &entry, 1);
    }

    pub fn delete(&mut self, pod: &Pod) {
        let Some((key, _)) = Self::entry(pod) else { return };
        if let Some(old) = self.pods.remove(&key) {
            self.count(&key, &old, -1);
        }
    }

    pub fn clear(&mut self) {
        self.pods.clear();
        self.on_node.clear();
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// Why a request is refused after authentication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("the identity is in trust domain {0:?}, not this CA's")]
    ForeignTrustDomain(String),
    #[error("the caller may only have its own identity: it is not a trusted node agent")]
    NotANodeAgent,
    #[error("the caller's token is not bound to a pod, so its node is unknown")]
    TokenNotBoundToPod,
    #[error("the caller's pod {0} is not known (yet)")]
    CallerPodUnknown(String),
    #[error("the caller's pod {0} is not the one its token was made for")]
    CallerPodMismatch(String),
    #[error("the caller's pod {0} is not scheduled on a node")]
    CallerPodNotScheduled(String),
    #[error("no pod of that identity runs on the caller's node {0}")]
    NotOnCallersNode(String),
}

impl Denial {
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::ForeignTrustDomain(_) => "foreign_trust_domain",
            Denial::NotANodeAgent => "not_a_node_agent",
            Denial::TokenNotBoundToPod => "token_not_bound_to_pod",
            Denial::CallerPodUnknown(_) => "caller_pod_unknown",
            Denial::CallerPodMismatch(_) => "caller_pod_mismatch",
            Denial::CallerPodNotScheduled(_) => "caller_pod_not_scheduled",
            Denial::NotOnCallersNode(_) => "not_on_callers_node",
        }
    }
}

/// Whether `caller` may have a certificate for `wanted`. Returns the caller's node when it asked
/// as a node agent (for the log).
pub fn authorize(
    caller: &Caller,
    wanted: &Identity,
    trust_domain: &str,
    trusted_node_accounts: &[(String, String)],
    pods: &PodDirectory,
) -> Result<Option<String>, Denial> {
    if wanted.trust_domain != trust_domain {
        return Err(Denial::ForeignTrustDomain(wanted.trust_domain.clone()));
    }
    if wanted.namespace == caller.namespace && wanted.service_account == caller.service_account {
        return Ok(None);
    }
    if !trusted_node_accounts.iter().any(|(ns, sa)| *ns == caller.namespace && *sa == caller.service_account) {
        return Err(Denial::NotANodeAgent);
    }
    let (name, uid) = caller.pod.as_ref().ok_or(Denial::TokenNotBoundToPod)?;
    let pod_key = format!("{}/{name}", caller.namespace);
    let pod = pods
        .pods
        .get(&(caller.namespace.clone(), name.clone()))
        .ok_or_else(|| Denial::CallerPodUnknown(pod_key.clone()))?;
    if pod.uid != *uid || pod.service_account != caller.service_account {
        return Err(Denial::CallerPodMismatch(pod_key));
    }
    let node = pod.node.as_ref().ok_or(Denial::CallerPodNotScheduled(pod_key))?;
    let key = (node.clone(), wanted.namespace.clone(), wanted.service_account.clone());
    match pods.on_node.get(&key) {
        Some(n) if *n > 0 => Ok(Some(node.clone())),
        _ => Err(Denial::NotOnCallersNode(node.clone())),
    }
}

// ---------------------------------------------------------------------------------------------
// The service

/// The signer's telemetry.
#[derive(Clone)]
pub struct SignerMetrics {
    pub issued: Counter,
    /// Refused requests by reason (authentication, authorization, CSR).
    pub refused: crate::metrics::ByReason,
    pub latency: Histogram,
}

impl Default for SignerMetrics {
    fn default() -> Self {
        let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
        SignerMetrics { issued: Counter::default(), refused: Default::default(), latency: Histogram::new(buckets) }
    }
}

/// The CA API implementation.
pub struct Signer {
    ca: Arc<LocalCa>,
    trust_domain: String,
    trusted_node_accounts: Vec<(String, String)>,
    max_lifetime: Duration,
    authn: Arc<dyn Authenticator>,
    pods: Arc<RwLock<PodDirectory>>,
    pub metrics: SignerMetrics,
}

impl Signer {
    fn refuse(&self, status: Status, reason: &'static str) -> Status {
        self.metrics.refused.inc(reason);
        status
    }

    /// The lifetime to sign for: as asked, at most the cap (0 or less: the cap).
    fn lifetime(&self, asked: i64) -> Duration {
        match u64::try_from(asked) {
            Ok(s) if s > 0 => Duration::from_secs(s).min(self.max_lifetime),
            _ => self.max_lifetime,
        }
    }

    async fn create(&self, req: Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let caller = match token {
            None => Err(AuthnError::NoToken),
            Some(t) => self.authn.authenticate(t).await,
        };
        let caller = caller.map_err(|e| {
            warn!(reason = e.reason(), error = %e, "certificate request refused: authentication");
            let status = match e {
                AuthnError::Unavailable(_) => Status::unavailable(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            };
            self.refuse(status, e.reason())
        })?;
        let req = req.into_inner();
        let impersonated =
            req.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)).and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let wanted = match &impersonated {
            Some(uri) => Identity::parse(uri)
                .map_err(|e| self.refuse(Status::invalid_argument(e.to_string()), "bad_impersonated_identity"))?,
            None => Identity::new(&self.trust_domain, &caller.namespace, &caller.service_account),
        };
        let decision = {
            let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
            authorize(&caller, &wanted, &self.trust_domain, &self.trusted_node_accounts, &pods)
        };
        let node = decision.map_err(|d| {
            let who = format!("{}/{}", caller.namespace, caller.service_account);
            let pod = caller.pod.as_ref().map(|(n, _)| n.as_str()).unwrap_or("-");
            warn!(caller = %who, pod, identity = %wanted, reason = d.reason(), "certificate request denied: {d}");
            self.refuse(Status::permission_denied(format!("{wanted}: {d}")), d.reason())
        })?;
        let checked = csr::check(&req.csr, &wanted)
            .map_err(|e| self.refuse(Status::invalid_argument(e.to_string()), e.reason()))?;
        let lifetime = self.lifetime(req.validity_duration);
        let now = SystemTime::now();
        let chain = self
            .ca
            .certify(&checked, &wanted, now - Duration::from_secs(60), now + lifetime)
            .map_err(|e| self.refuse(Status::internal(e.to_string()), "sign_failed"))?;
        self.metrics.issued.inc();
        debug!(identity = %wanted, node = node.as_deref().unwrap_or("-"), ?lifetime, "certificate signed");
        let cert_chain = chain.iter().map(|c| ca::pem("CERTIFICATE", c)).collect();
        Ok(IstioCertificateResponse { cert_chain })
    }
}

/// A gRPC error answer without running the service.
fn grpc_error(status: Status) -> http::Response<tonic::body::Body> {
    status.into_http()
}

/// The generated service trait over an `Arc<Signer>`.
struct Service(Arc<Signer>);

#[async_trait::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let r = self.0.create(request).await;
        self.0.metrics.latency.observe(started.elapsed().as_secs_f64());
        r.map(Response::new)
    }
}

// ---------------------------------------------------------------------------------------------
// Serving

/// The serving certificate, replaced at half its life.
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn serving_key(ca: &LocalCa, names: &[String]) -> anyhow::Result<Arc<CertifiedKey>> {
    let issued = ca.serving(names, SERVING_LIFETIME)?;
    let key = rustls::crypto::ring::sign::any_supported_type(&issued.key)?;
    Ok(Arc::new(CertifiedKey::new(issued.chain, key)))
}

/// Runs the signer until `stop`.
pub async fn serve(args: SignerArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let files = CaFiles::in_dir(&args.ca_dir);
    let ca = Arc::new(LocalCa::load(&files.cert, &files.key)?);
    let bundle_path = files.bundle.clone().filter(|b| b.exists()).unwrap_or(files.cert.clone());
    let bundle = std::fs::read_to_string(&bundle_path)
        .map_err(|e| anyhow::anyhow!("cannot read the trust bundle {}: {e}", bundle_path.display()))?;
    ca::load_bundle(&bundle_path)?;
    let trusted = args.trusted_node_accounts.iter().map(|a| ns_name(a)).collect::<anyhow::Result<Vec<_>>>()?;
    let root_configmap = args.root_configmap.as_deref().map(ns_name).transpose()?;
    let client = crate::app::kube_client(args.kubeconfig.as_deref()).await?;
    let pods = Arc::new(RwLock::new(PodDirectory::default()));
    let (synced_tx, synced) = watch::channel(false);
    let signer = Arc::new(Signer {
        ca: ca.clone(),
        trust_domain: args.trust_domain.clone(),
        trusted_node_accounts: trusted,
        // At most a year, and never past the CA's own expiry (see `LocalCa::certify`).
        max_lifetime: Duration::from_secs(args.max_lifetime_secs.clamp(60, 366 * 86_400)),
        authn: Arc::new(CachedAuthenticator::new(Arc::new(TokenReviewer::new(client.clone(), args.audiences.clone())))),
        pods: pods.clone(),
        metrics: SignerMetrics::default(),
    });
    let serving = Arc::new(ServingCert(RwLock::new(serving_key(&ca, &args.serving_names)?)));
    let listener =
        TcpListener::bind(args.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let admin =
        TcpListener::bind(args.admin).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.admin))?;
    info!(listen = %listener.local_addr()?, admin = %admin.local_addr()?, trust_domain = %args.trust_domain,
          audiences = ?args.audiences, trusted = ?args.trusted_node_accounts, "signer serving Istio's CA API");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(watch_pods(Api::all(client.clone()), pods, synced_tx, stop.clone()));
    tasks.spawn(renew_serving(ca.clone(), args.serving_names.clone(), serving.clone(), stop.clone()));
    let (published_tx, published) = watch::channel(root_configmap.is_none());
    if let Some((ns, name)) = root_configmap {
        tasks.spawn(publish_bundle(Api::namespaced(client, &ns), name, bundle, published_tx, stop.clone()));
    }
    let mut registry = Registry::with_prefix("switchyard_signer");
    registry.register("certificates_issued", "Certificates signed", signer.metrics.issued.clone());
    signer.metrics.refused.register(&mut registry, "requests_refused", "Certificate requests refused, by reason");
    registry.register_with_unit(
        "request_duration",
        "Time to answer a certificate request",
        prometheus_client::registry::Unit::Seconds,
        signer.metrics.latency.clone(),
    );
    let registry = Arc::new(registry);
    tasks.spawn(serve_admin(admin, registry, synced.clone(), published, stop.clone()));
    let mut tls = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    tls.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
    let svc = IstioCertificateServiceServer::new(Service(signer))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    serve_grpc(listener, Arc::new(tls), svc, stop.clone()).await;
    tasks.shutdown().await;
    Ok(())
}

async fn serve_grpc(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    svc: IstioCertificateServiceServer<Service>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_source = crate::proxy::inbound::SourceSlots::with_limit(MAX_CONNECTIONS_PER_SOURCE);
    loop {
        let Some(permit) = crate::accept::slot(&limit, &stop).await else { return };
        let Some((tcp, peer)) = crate::accept::next(&stop, "signer", || listener.accept(), || ()).await else {
            return;
        };
        let Some(slot) = per_source.take(peer.ip()) else {
            debug!(%peer, "connection refused: too many from this address");
            continue;
        };
        // An answer is several writes (headers, data, trailers): no Nagle delay between them.
        let _ = tcp.set_nodelay(true);
        let (acceptor, svc, stop) = (acceptor.clone(), svc.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = (permit, slot);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut svc = svc.clone();
                async move {
                    // No bearer token: refused before the body is read.
                    let bearer = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("Bearer ") && v.len() <= MAX_TOKEN_BYTES + 7);
                    if !bearer {
                        return Ok::<_, Infallible>(grpc_error(Status::unauthenticated(
                            AuthnError::NoToken.to_string(),
                        )));
                    }
                    match tokio::time::timeout(REQUEST_TIMEOUT, tower_service::Service::call(&mut svc, req)).await {
                        Ok(r) => Ok(r.unwrap_or_else(|e| match e {})),
                        Err(_) => Ok(grpc_error(Status::deadline_exceeded("the request took too long"))),
                    }
                }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "connection ended with an error") },
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
                _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, conn).await;
                }
            }
        });
    }
}

async fn watch_pods(
    api: Api<Pod>,
    pods: Arc<RwLock<PodDirectory>>,
    synced: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let config = watcher::Config::default().any_semantic();
    let mut events = std::pin::pin!(watcher(api, config));
    let mut fresh: Option<PodDirectory> = None;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = events.next() => match ev { Some(e) => e, None => return },
        };
        match ev {
            Ok(watcher::Event::Init) => fresh = Some(PodDirectory::default()),
            Ok(watcher::Event::InitApply(p)) => fresh.get_or_insert_with(PodDirectory::default).apply(&p),
            Ok(watcher::Event::InitDone) => {
                let new = fresh.take().unwrap_or_default();
                info!(pods = new.len(), "pods synced");
                *pods.write().unwrap_or_else(|p| p.into_inner()) = new;
                synced.send_replace(true);
            }
            Ok(watcher::Event::Apply(p)) => pods.write().unwrap_or_else(|p| p.into_inner()).apply(&p),
            Ok(watcher::Event::Delete(p)) => pods.write().unwrap_or_else(|p| p.into_inner()).delete(&p),
            Err(e) => {
                warn!(error = %e, "pod watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn renew_serving(ca: Arc<LocalCa>, names: Vec<String>, cert: Arc<ServingCert>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SERVING_LIFETIME / 2) => {}
        }
        match serving_key(&ca, &names) {
            Ok(k) => *cert.0.write().unwrap_or_else(|p| p.into_inner()) = k,
            Err(e) => warn!(error = %e, "cannot renew the serving certificate"),
        }
    }
}

/// Keeps the trust bundle in the ConfigMap (server-side apply, again every minute, so an edit
/// or a deletion is repaired).
async fn publish_bundle(
    api: Api<ConfigMap>,
    name: String,
    bundle: String,
    published: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "switchyard"}},
        "data": {ROOT_CERT_KEY: bundle},
    });
    let params = PatchParams::apply("switchyard-signer").force();
    loop {
        match api.patch(&name, &params, &Patch::Apply(&cm)).await {
            Ok(_) => {
                if !*published.borrow() {
                    info!(configmap = %name, "trust bundle published");
                }
                published.send_replace(true);
            }
            Err(e) => warn!(configmap = %name, error = %e, "cannot publish the trust bundle; retrying"),
        }
        let wait = if *published.borrow() { Duration::from_secs(60) } else { Duration::from_secs(2) };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn serve_admin(
    listener: TcpListener,
    registry: Arc<Registry>,
    synced: watch::Receiver<bool>,
    published: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(crate::admin::MAX_CONNECTIONS));
    loop {
        let Some(permit) = crate::accept::slot(&slots, &stop).await else { return };
        let Some((tcp, _)) = crate::accept::next(&stop, "signer admin", || listener.accept(), || ()).await else {
            return;
        };
        let (registry, synced, published) = (registry.clone(), synced.clone(), published.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (registry, synced, published) = (registry.clone(), synced.clone(), published.clone());
                async move {
                    let (code, body) = match req.uri().path() {
                        "/metrics" => {
                            let mut body = String::new();
                            let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                            (200, body)
                        }
                        "/healthz" => (200, "ok\n".into()),
                        "/readyz" if *synced.borrow() && *published.borrow() => (200, "ready\n".into()),
                        "/readyz" => (503, "not ready: pods not synced or trust bundle not published\n".into()),
                        _ => (404, "not found\n".into()),
                    };
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .status(code)
                            .body(Full::new(Bytes::from(body)))
                            .expect("valid response"),
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    fn agent(pod: &str, uid: &str) -> Caller {
        Caller {
            namespace: "switchyard".into(),
            service_account: "mesh-agent".into(),
            pod: Some((pod.into(), uid.into())),
        }
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    #[test]
    fn the_node_authorizer_decision_table() {
        let mut pods = PodDirectory::default();
        pods.apply(&pod("switchyard", "agent-a", "uid-a", "mesh-agent", Some("node-a")));
        pods.apply(&pod("switchyard", "agent-b", "uid-b", "mesh-agent", Some("node-b")));
        pods.apply(&pod("switchyard", "agent-p", "uid-p", "mesh-agent", None));
        pods.apply(&pod("shop", "web-1", "w1", "web", Some("node-a")));
        pods.apply(&pod("shop", "db-1", "d1", "db", Some("node-b")));
        // A mirror pod (written by a node's root into the kubelet's manifests) and a pod
        // naming no ServiceAccount vouch for no identity.
        let mut mirror = pod("kube-system", "etcd-node-a", "m1", "admin", Some("node-a"));
        mirror.metadata.annotations = Some([("kubernetes.io/config.mirror".to_string(), "x".to_string())].into());
        pods.apply(&mirror);
        let mut no_sa = pod("kube-system", "static-a", "s1", "", Some("node-a"));
        no_sa.spec.as_mut().unwrap().service_account_name = None;
        pods.apply(&no_sa);
        let trusted = vec![("switchyard".to_string(), "mesh-agent".to_string())];
        let decide = |c: &Caller, w: &Identity| authorize(c, w, "cluster.local", &trusted, &pods);
        let reason = |r: Result<Option<String>, Denial>| r.map_err(|d| d.reason());

        // A node agent: identities of pods on its node only.
        assert_eq!(decide(&agent("agent-a", "uid-a"), &id("shop", "web")), Ok(Some("node-a".into())));
        assert_eq!(reason(decide(&agent("agent-a", "uid-a"), &id("shop", "db"))), Err("not_on_callers_node"));
        assert_eq!(decide(&agent("agent-b", "uid-b"), &id("shop", "db")), Ok(Some("node-b".into())));
        for (ns, sa) in [("kube-system", "admin"), ("kube-system", "default"), ("kube-system", "")] {
            let r = reason(decide(&agent("agent-a", "uid-a"), &Identity::new("cluster.local", ns, sa)));
            assert_eq!(r, Err("not_on_callers_node"), "{ns}/{sa}");
        }
        // The token's pod must be the pod the signer knows (a deleted and re-created pod of the
        // same name has another uid), scheduled, of the same ServiceAccount.
        assert_eq!(reason(decide(&agent("agent-a", "uid-old"), &id("shop", "web"))), Err("caller_pod_mismatch"));
        assert_eq!(reason(decide(&agent("agent-x", "uid-x"), &id("shop", "web"))), Err("caller_pod_unknown"));
        assert_eq!(reason(decide(&agent("agent-p", "uid-p"), &id("shop", "web"))), Err("caller_pod_not_scheduled"));
        let unbound = Caller { pod: None, ..agent("agent-a", "uid-a") };
        assert_eq!(reason(decide(&unbound, &id("shop", "web"))), Err("token_not_bound_to_pod"));
        // Not a trusted account: only its own identity, wherever it runs.
        let web = Caller {
            namespace: "shop".into(),
            service_account: "web".into(),
            pod: Some(("web-1".into(), "w1".into())),
        };
        assert_eq!(decide(&web, &id("shop", "web")), Ok(None));
        assert_eq!(reason(decide(&web, &id("shop", "db"))), Err("not_a_node_agent"));
        assert_eq!(reason(decide(&web, &Identity::new("other.td", "shop", "web"))), Err("foreign_trust_domain"));
        // Pods that move or finish: the index follows.
        pods.delete(&pod("shop", "web-1", "w1", "web", Some("node-a")));
        let decide = |c: &Caller, w: &Identity| authorize(c, w, "cluster.local", &trusted, &pods);
        assert_eq!(
            decide(&agent("agent-a", "uid-a"), &id("shop", "web")).map_err(|d| d.reason()),
            Err("not_on_callers_node")
        );
        let mut done = pod("shop", "db-1", "d1", "db", Some("node-b"));
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        pods.apply(&done);
        let decide = |c: &Caller, w: &Identity| authorize(c, w, "cluster.local", &trusted, &pods);
        assert_eq!(
            decide(&agent("agent-b", "uid-b"), &id("shop", "db")).map_err(|d| d.reason()),
            Err("not_on_callers_node")
        );
    }

    #[test]
    fn token_reviews_are_read_as_the_api_server_writes_them() {
        let review = |v: serde_json::Value| -> TokenReview { serde_json::from_value(v).unwrap() };
        let aud = vec!["istio-ca".to_string()];
        let ok = review(serde_json::json!({
            "spec": {"token": "t"},
            "status": {"authenticated": true, "audiences": ["istio-ca"],
                "user": {"username": "system:serviceaccount:switchyard:mesh-agent",
                         "groups": ["system:serviceaccounts"],
                         "extra": {"authentication.kubernetes.io/pod-name": ["agent-a"],
                                   "authentication.kubernetes.io/pod-uid": ["uid-a"]}}}
        }));
        assert_eq!(caller_from_review(&ok, &aud), Ok(agent("agent-a", "uid-a")));
        let mut wrong_aud = ok.clone();
        wrong_aud.status.as_mut().unwrap().audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        assert_eq!(caller_from_review(&wrong_aud, &aud).map_err(|e| e.reason()), Err("token_audience"));
        let no = review(
            serde_json::json!({"spec": {"token": "t"}, "status": {"authenticated": false, "error": "token expired"}}),
        );
        assert_eq!(caller_from_review(&no, &aud), Err(AuthnError::Rejected("token expired".into())));
        let mut user = ok.clone();
        user.status.as_mut().unwrap().user.as_mut().unwrap().username = Some("alice".into());
        assert_eq!(caller_from_review(&user, &aud).map_err(|e| e.reason()), Err("not_a_service_account"));
    }

    #[test]
    fn what_cannot_be_a_token_is_refused_without_asking_the_api_server() {
        use base64::Engine as _;
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let jwt = |claims: String| format!("{}.{}.sig", b("{}"), b(&claims));
        let aud = vec!["istio-ca".to_string()];
        assert!(plausible_token(&jwt(format!(r#"{{"exp":{},"aud":["istio-ca"]}}"#, now + 60)), &aud).is_ok());
        assert!(plausible_token(&jwt(format!(r#"{{"exp":{},"aud":"istio-ca"}}"#, now + 60)), &aud).is_ok());
        for bad in [
            "garbage".to_string(),
            "a.b".to_string(),
            "x".repeat(MAX_TOKEN_BYTES + 1),
            jwt(format!(r#"{{"exp":{}}}"#, now - 1)),
        ] {
            assert!(
                matches!(plausible_token(&bad, &aud), Err(AuthnError::Rejected(_))),
                "{}",
                &bad[..bad.len().min(40)]
            );
        }
        let other = jwt(format!(r#"{{"exp":{},"aud":["vault"]}}"#, now + 60));
        assert!(matches!(plausible_token(&other, &aud), Err(AuthnError::Audience(_))));
    }

    #[test]
    fn lifetimes_are_capped() {
        let s = Signer {
            ca: Arc::new(LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap()),
            trust_domain: "cluster.local".into(),
            trusted_node_accounts: vec![],
            max_lifetime: Duration::from_secs(3600),
            authn: Arc::new(Never),
            pods: Default::default(),
            metrics: Default::default(),
        };
        assert_eq!(s.lifetime(60), Duration::from_secs(60));
        assert_eq!(s.lifetime(86400 * 365), Duration::from_secs(3600));
        assert_eq!(s.lifetime(0), Duration::from_secs(3600));
        assert_eq!(s.lifetime(-5), Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn authenticated_tokens_are_remembered_briefly_and_never_past_their_expiry() {
        use base64::Engine as _;
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counting(AtomicUsize);
        #[async_trait::async_trait]
        impl Authenticator for Counting {
            async fn authenticate(&self, token: &str) -> Result<Caller, AuthnError> {
                self.0.fetch_add(1, Ordering::SeqCst);
                if token.starts_with("bad") {
                    return Err(AuthnError::Rejected("no".into()));
                }
                Ok(agent("a", "u"))
            }
        }
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        let c = CachedAuthenticator::new(inner.clone());
        let jwt = |exp: u64| {
            let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            format!("{}.{}.sig", b("{}"), b(&format!("{{\"exp\":{exp}}}")))
        };
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let long = jwt(now + 3600);
        for _ in 0..5 {
            c.authenticate(&long).await.unwrap();
        }
        assert_eq!(inner.0.load(Ordering::SeqCst), 1, "one review for five requests");
        // A token that has expired is reviewed again (and the API server refuses it).
        let expired = jwt(now - 1);
        c.authenticate(&expired).await.unwrap();
        c.authenticate(&expired).await.unwrap();
        assert_eq!(inner.0.load(Ordering::SeqCst), 3);
        // Failures are not remembered.
        assert!(c.authenticate("bad").await.is_err());
        assert!(c.authenticate("bad").await.is_err());
        assert_eq!(inner.0.load(Ordering::SeqCst), 5);
    }

    struct Never;

    #[async_trait::async_trait]
    impl Authenticator for Never {
        async fn authenticate(&self, _: &str) -> Result<Caller, AuthnError> {
            Err(AuthnError::Rejected("test".into()))
        }
    }
}
