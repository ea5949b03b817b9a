//! HTTP for connections to a Service: the downstream connection is served by hyper (HTTP/1.1
//! or HTTP/2, whichever the client speaks) and every request is sent, as received, to an
//! endpoint picked per request, over an upstream connection of the same HTTP version (direct,
//! or through an HBONE tunnel for another node's pod).
//!
//! Per request, in this order (each in its module):
//! * **route**: a fresh snapshot of the pod index routes the request (`proxy::route`);
//! * **limit** (`proxy::upstream::ServiceLimits`, shared with TCP): a Service with
//!   `switchyard.io/max-connections` N has at most N requests in flight (each holds one
//!   upstream connection); `max-pending-requests` more may wait for a slot; past that the
//!   request fails at once with `503` and `x-switchyard-error: connection-limit`;
//! * **timeout** (`switchyard.io/timeout`): covers everything up to the response headers,
//!   retries included; past it `504` with `x-switchyard-error: request-timeout`;
//! * **attempts** (`retry`): per attempt an endpoint, a per-try timeout
//!   (`switchyard.io/per-try-timeout`), retries within the policy and the budget (`policy`:
//!   20 % of requests over 10 s plus 10 a second by default: retries never multiply load in an
//!   outage); every failure and success is reported to the balancer's outlier detection;
//! * **upstream connections** (`upstream`): one per endpoint used, kept for the next request;
//! * **telemetry** (`observe`): written when the response body has been sent.
//!
//! Headers, bodies and trailers pass as they are; an HTTP/1.1 upgrade (WebSocket, h2c) is
//! forwarded and, on `101`, the two connections are joined byte for byte. What the proxy
//! answers itself is a [`ProxyAnswer`].
mod observe;
mod policy;
mod retry;
mod upstream;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Body as _, Incoming},
    header::{HeaderMap, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

pub use observe::{Counted, RequestRecord};
pub use policy::{ERROR_HEADER, ProxyAnswer, response_flags};

use crate::{
    datapath::Original,
    proxy::{
        balance,
        detect::{DetectConfig, Protocol},
        observe::Observe,
        route::{Refusal, Route, RouteConfig, Target},
        upstream::{ConnectError, ServiceLimits, UpstreamIo},
    },
    state::ServicePolicy,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// HTTP resilience counters (registered as `switchyard_http_*`).
#[derive(Debug, Default, Clone)]
pub struct HttpStats {
    pub requests: Counter,
    pub retries: Counter,
    pub budget_exhausted: Counter,
    pub timeouts: Counter,
    pub per_try_timeouts: Counter,
    pub limit_hits: Counter,
    pub upstream_failures: Counter,
    /// Bodies streamed instead of kept for a retry: the node's budget was spent.
    pub body_budget_exhausted: Counter,
}

impl HttpStats {
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register("http_requests", "HTTP requests to Services served by the proxy", self.requests.clone());
        reg.register(
            "http_retries",
            "HTTP request retries (another attempt, maybe on another endpoint)",
            self.retries.clone(),
        );
        reg.register(
            "http_retry_body_budget_exhausted",
            "Request bodies not kept for a retry because the node's body budget (retryBodyBudgetBytes) was spent; sent once, not retried",
            self.body_budget_exhausted.clone(),
        );
        reg.register(
            "http_retry_budget_exhausted",
            "Retries not made because the Service's retry budget was spent",
            self.budget_exhausted.clone(),
        );
        reg.register(
            "http_request_timeouts",
            "HTTP requests answered 504 at the Service's timeout",
            self.timeouts.clone(),
        );
        reg.register(
            "http_per_try_timeouts",
            "HTTP attempts cancelled at the Service's per-try timeout (then retried if allowed)",
            self.per_try_timeouts.clone(),
        );
        reg.register(
            "http_limit_hits",
            "HTTP requests answered 503 at once: the Service's connection limit was reached",
            self.limit_hits.clone(),
        );
        reg.register(
            "http_upstream_failures",
            "Failed attempts (connect error, reset, timeout, 5xx) reported to outlier detection",
            self.upstream_failures.clone(),
        );
    }
}

/// Node-wide HTTP state: per-Service retry budgets, counters, the latest requests.
#[derive(Default)]
pub struct Http {
    services: Mutex<HashMap<SocketAddrV4, Arc<ServiceState>>>,
    pub stats: HttpStats,
    /// The latest requests (bounded), for the node dashboard's per-Service latency and errors.
    recent: Mutex<std::collections::VecDeque<RequestRecord>>,
    /// Bytes of request bodies kept for retries now, node-wide.
    bodies_kept: Arc<std::sync::atomic::AtomicUsize>,
}

/// Bytes of a kept request body, given back to the node's budget when dropped.
struct KeptBody {
    kept: Arc<std::sync::atomic::AtomicUsize>,
    n: usize,
}

impl Drop for KeptBody {
    fn drop(&mut self) {
        self.kept.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// Requests remembered for the dashboard.
pub const RECENT_REQUESTS: usize = 4096;

impl Http {
    /// `n` bytes of the node's body budget (`budget`), or `None` when they do not fit.
    fn keep_body(&self, n: usize, budget: usize) -> Option<KeptBody> {
        let kept = &self.bodies_kept;
        let mut now = kept.load(Ordering::Relaxed);
        loop {
            if now.saturating_add(n) > budget {
                self.stats.body_budget_exhausted.inc();
                return None;
            }
            match kept.compare_exchange_weak(now, now + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(KeptBody { kept: kept.clone(), n }),
                Err(v) => now = v,
            }
        }
    }

    /// Bytes of request bodies kept for retries now.
    pub fn bodies_kept(&self) -> usize {
        self.bodies_kept.load(Ordering::Relaxed)
    }

    fn remember(&self, r: RequestRecord) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_REQUESTS {
            recent.pop_front();
        }
        recent.push_back(r);
    }

    /// The remembered requests, oldest first.
    pub fn recent(&self) -> Vec<RequestRecord> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    fn service(&self, vip: SocketAddrV4, policy: &ServicePolicy) -> Arc<ServiceState> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = services.get(&vip)
            && s.policy == *policy
        {
            return s.clone();
        }
        // New Service or a changed policy: a fresh budget.
        let s = Arc::new(ServiceState { policy: policy.clone(), budget: Mutex::default() });
        services.insert(vip, s.clone());
        s
    }
}

struct ServiceState {
    policy: ServicePolicy,
    budget: Mutex<policy::Budget>,
}

/// What the downstream connection needs from the outbound proxy.
pub trait Upstreams: Send + Sync + 'static {
    /// Routes one request from `orig`'s pod, on a fresh snapshot of the pod index.
    fn route(&self, orig: Original) -> Result<Route, Refusal>;
    /// Opens a transport to `target`, one of `route`'s Service endpoints.
    fn open(&self, route: &Route, target: &Target) -> impl Future<Output = Result<UpstreamIo, ConnectError>> + Send;
    /// Counts a refused route.
    fn refused(&self, r: &Refusal);
    fn balancer(&self) -> &Arc<balance::Balancer>;
    fn http(&self) -> &Http;
    fn limits(&self) -> &ServiceLimits;
    fn route_config(&self) -> &RouteConfig;
    fn settings(&self) -> &DetectConfig;
    fn observe(&self) -> &Observe;
}

/// One downstream connection: its upstream connections, one per endpoint used.
pub struct Downstream<U: Upstreams> {
    pub up: Arc<U>,
    pub orig: Original,
    pub vip: SocketAddrV4,
    pub conn: u64,
    pub protocol: Protocol,
    senders: tokio::sync::Mutex<HashMap<SocketAddrV4, upstream::Sender>>,
    pub requests: AtomicU64,
    /// Shutting down: HTTP/1 responses carry `Connection: close`, so clients stop reusing the
    /// connection without racing its close.
    draining: std::sync::atomic::AtomicBool,
}

/// On shutdown, how long an HTTP/1 client connection is told `Connection: close` on each
/// response before an idle one is closed.
const H1_DRAIN: Duration = Duration::from_secs(1);
/// An HTTP/1 client must send a request's whole head within this (hyper's timer runs from the
/// moment it waits for a head, so a kept-alive connection idle this long is closed too).
pub const H1_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// An HTTP/1 request head (request line and headers) larger than this is answered 431.
pub const H1_MAX_HEADER: usize = 64 * 1024;

/// The request minus its body, kept to rebuild it for a retry.
struct Head {
    method: hyper::Method,
    uri: hyper::Uri,
    version: hyper::Version,
    headers: HeaderMap,
}

/// A request body for one attempt.
enum AttemptBody {
    /// Kept in memory: any number of attempts.
    Replay(Bytes, Option<HeaderMap>),
    /// Streamed: one attempt once sent (`None` after that).
    Stream(Option<Body>),
}

impl AttemptBody {
    fn take(&mut self) -> Option<Body> {
        match self {
            AttemptBody::Replay(data, trailers) => {
                let trailers = trailers.clone();
                let full = Full::new(data.clone()).map_err(|n: Infallible| match n {});
                Some(match trailers {
                    Some(t) => full.with_trailers(async move { Some(Ok(t)) }).boxed_unsync(),
                    None => full.boxed_unsync(),
                })
            }
            AttemptBody::Stream(b) => b.take(),
        }
    }

    /// A body the connection gave back unsent.
    fn put_back(&mut self, b: Body) {
        if let AttemptBody::Stream(slot) = self {
            *slot = Some(b);
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, AttemptBody::Replay(..))
    }

    /// Another attempt can carry the body.
    fn available(&self) -> bool {
        matches!(self, AttemptBody::Replay(..) | AttemptBody::Stream(Some(_)))
    }
}

impl<U: Upstreams> Downstream<U> {
    pub fn new(up: Arc<U>, orig: Original, vip: SocketAddrV4, conn: u64, protocol: Protocol) -> Self {
        Downstream {
            up,
            orig,
            vip,
            conn,
            protocol,
            senders: Default::default(),
            requests: AtomicU64::new(0),
            draining: Default::default(),
        }
    }

    /// Serves the client connection until it ends or `stop` asks for a graceful end: HTTP/2
    /// GOAWAY at once; HTTP/1 answers `Connection: close` for [`H1_DRAIN`], then an idle
    /// connection is closed (a request in flight finishes first).
    pub async fn serve<S>(self: Arc<Self>, client: S, stop: crate::proxy::idle::StopHandle) -> Result<(), hyper::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(client);
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.request(req).await) }
        });
        match self.protocol {
            Protocol::Http2 => {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc);
                tokio::pin!(conn);
                tokio::select! {
                    biased;
                    r = conn.as_mut() => return r,
                    _ = stop.cancel.cancelled() => conn.as_mut().graceful_shutdown(),
                }
                conn.await
            }
            _ => {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(H1_HEADER_READ_TIMEOUT)
                    .max_header_size(H1_MAX_HEADER)
                    .serve_connection(io, svc)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    biased;
                    r = conn.as_mut() => return r,
                    _ = stop.cancel.cancelled() => self.draining.store(true, Ordering::Relaxed),
                }
                tokio::select! {
                    r = conn.as_mut() => return r,
                    _ = tokio::time::sleep(H1_DRAIN) => conn.as_mut().graceful_shutdown(),
                }
                conn.await
            }
        }
    }

    async fn request(&self, req: Request<Incoming>) -> Response<Body> {
        let grpc = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let info = observe::RequestInfo {
            started: Instant::now(),
            started_wall: std::time::SystemTime::now(),
            protocol: if grpc { "grpc" } else { "http" },
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            version: req.version(),
            request_bytes: Arc::new(AtomicU64::new(0)),
        };
        let req = req.map(|b| Counted { inner: b, bytes: info.request_bytes.clone() });
        let outcome = Mutex::new(observe::Outcome::default());
        // One snapshot for the whole request, all its attempts included.
        let route = self.up.route(self.orig);
        let mut resp = match &route {
            Ok(r) if r.service().is_some() => self.request_inner(r, req, &outcome).await,
            Ok(_) => ProxyAnswer::NoEndpoints.respond(format!("service {} no longer exists", self.vip)),
            Err(refusal) => {
                self.up.refused(refusal);
                ProxyAnswer::UpstreamUnavailable.respond(refusal.to_string())
            }
        };
        if self.draining.load(Ordering::Relaxed) && self.protocol == Protocol::Http1 {
            resp.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        let cx = observe::Env {
            observe: self.up.observe(),
            http: self.up.http(),
            settings: self.up.settings(),
            cfg: self.up.route_config(),
            route: route.as_ref().ok(),
            vip: self.vip,
        };
        observe::observe(cx, info, outcome.into_inner().unwrap_or_else(|p| p.into_inner()), resp)
    }

    async fn request_inner(
        &self,
        route: &Route,
        mut req: Request<Counted<Incoming>>,
        outcome: &Mutex<observe::Outcome>,
    ) -> Response<Body> {
        let http = self.up.http();
        http.stats.requests.inc();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let entry = &route.service().expect("checked by the caller").entry;
        let svc = http.service(self.vip, &entry.policy);
        let policy = &svc.policy;
        let deadline = policy.timeout.map(|t| tokio::time::Instant::now() + t);
        let _slot = match self.up.limits().acquire(self.vip, policy, deadline).await {
            Ok(p) => p,
            Err(hit) => {
                http.stats.limit_hits.inc();
                warn!(service = %entry.service, vip = %self.vip, "request past the service's connection limit: 503");
                return ProxyAnswer::ConnectionLimit.respond(format!(
                    "service {} is at its limit of {} requests in flight (switchyard.io/max-connections) and {} waiting",
                    entry.service, hit.limit, hit.pending
                ));
            }
        };
        svc.budget.lock().unwrap_or_else(|p| p.into_inner()).deposit(policy::now_sec());
        let upgrade = policy::is_upgrade(req.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let settings = self.up.settings();
        if settings.trace_context {
            let hop = super::trace::continue_or_start(&mut parts.headers, settings.trace_sample_rate);
            let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
            o.trace = Some(hop);
            if hop.sampled() && settings.spans.is_some() {
                o.tracestate = parts.headers.get("tracestate").and_then(|v| v.to_str().ok()).map(str::to_string);
            }
        }
        let head = Head { method: parts.method, uri: parts.uri, version: parts.version, headers: parts.headers };
        let may_retry_sent =
            !upgrade && (policy::idempotent(&head.method) || policy.retry_non_idempotent) && policy.retries > 0;
        let limit = settings.retry_body_limit;
        let upper = body.size_hint().upper().map(|n| n as usize).filter(|n| *n <= limit);
        // Kept for retries within the node's budget, given back when this request is done.
        let _kept = match upper {
            Some(n) if may_retry_sent && !body.is_end_stream() => http.keep_body(n, settings.retry_body_budget),
            _ => None,
        };
        let mut body = if body.is_end_stream() {
            AttemptBody::Replay(Bytes::new(), None)
        } else if _kept.is_some() {
            match http_body_util::Limited::new(body, limit).collect().await {
                Ok(c) => {
                    let trailers = c.trailers().cloned();
                    AttemptBody::Replay(c.to_bytes(), trailers)
                }
                Err(e) => return ProxyAnswer::RequestBody.respond(format!("reading the request body failed: {e}")),
            }
        } else {
            AttemptBody::Stream(Some(body.map_err(BoxError::from).boxed_unsync()))
        };
        // The endpoint of the attempt in flight: a timeout is its failure.
        let current = Mutex::new(None);
        let attempts = self.attempts(route, &svc, &head, &mut body, &current, outcome);
        let result = match deadline {
            Some(d) => match tokio::time::timeout_at(d, attempts).await {
                Ok(r) => r,
                Err(_) => {
                    http.stats.timeouts.inc();
                    if let Some((ep, started)) = current.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        http.stats.upstream_failures.inc();
                        self.up.balancer().failed(ep, &entry.endpoints, Instant::now() - started);
                    }
                    return ProxyAnswer::RequestTimeout.respond(format!(
                        "no response from service {} within {:?} (switchyard.io/timeout)",
                        entry.service,
                        policy.timeout.unwrap_or_default()
                    ));
                }
            },
            None => attempts.await,
        };
        match result {
            Ok(resp) => self.pass(resp, downstream_upgrade),
            Err(r) => r,
        }
    }

    /// The upstream's response on its way to the client; a `101` joins the two connections.
    fn pass(
        &self,
        mut resp: Response<Incoming>,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        // `x-switchyard-error` is the proxy's own word: an upstream cannot set it.
        resp.headers_mut().remove(ERROR_HEADER);
        if let Some(down) = downstream_upgrade
            && resp.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(down, up) {
                    Ok((d, u)) => {
                        let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                        let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            });
        }
        resp.map(|b| b.map_err(BoxError::from).boxed_unsync())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_kept_for_retries_within_the_node_budget_and_given_back() {
        let http = Http::default();
        let a = http.keep_body(10, 15).expect("fits");
        assert!(http.keep_body(10, 15).is_none(), "past the budget: streamed, not kept");
        assert_eq!(http.stats.body_budget_exhausted.get(), 1);
        let b = http.keep_body(5, 15).expect("what is left fits");
        assert_eq!(http.bodies_kept(), 15);
        drop((a, b));
        assert_eq!(http.bodies_kept(), 0, "given back when the request is done");
        assert!(http.keep_body(15, 15).is_some());
    }
}
