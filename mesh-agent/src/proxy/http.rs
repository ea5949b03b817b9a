//! HTTP for connections to a Service: the downstream connection is served by hyper (HTTP/1.1
//! or HTTP/2, whichever the client speaks) and every request is sent, as received, to an
//! endpoint picked per request, over an upstream connection of the same HTTP version (direct,
//! or through an HBONE tunnel for another node's pod).
//!
//! Per request, in this order:
//! * **limit**: a Service with `switchyard.io/max-connections` N has at most N requests in
//!   flight (each holds one upstream connection); `max-pending-requests` more may wait for a
//!   slot; past that the request fails at once with `503` and `x-switchyard-error:
//!   connection-limit`;
//! * **timeout** (`switchyard.io/timeout`): covers everything up to the response headers,
//!   retries included; past it `504` with `x-switchyard-error: request-timeout`;
//! * **retries**: a request never sent (connect failure, connection closed before it was
//!   written) is retried on another endpoint whatever its method. Once sent, only idempotent
//!   methods (or all, with `switchyard.io/retry-non-idempotent`) whose body was kept (at most
//!   `retry_body_limit` bytes) are retried: on a reset before the response, or on a status in
//!   `switchyard.io/retry-on` (default 503). Each retry after the first attempt must fit the
//!   Service's retry budget (`switchyard.io/retry-budget`, default 20 % of requests over 10 s,
//!   plus a floor of 10 a second): retries never multiply load in an outage;
//! * **outlier detection**: every failure (connect error, reset, timeout, 5xx) and success is
//!   reported to the balancer, which ejects endpoints (see `balance`).
//!
//! Headers, bodies and trailers pass as they are; an HTTP/1.1 upgrade (WebSocket, h2c) is
//! forwarded and, on `101`, the two connections are joined byte for byte.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddrV4,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
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
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, info, warn};

use crate::{
    datapath::Original,
    proxy::{balance, detect::Protocol, pool::Tunnel},
    state::{ServiceEntry, ServicePolicy},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Header on every response the proxy makes itself, saying why.
pub const ERROR_HEADER: &str = "x-switchyard-error";

/// Retries allowed per second whatever the ratio (Linkerd's floor), over the budget window.
const BUDGET_MIN_PER_SEC: u64 = 10;
const BUDGET_WINDOW_SECS: u64 = 10;

/// HTTP resilience counters (registered as `switchyard_http_*`).
#[derive(Debug, Default, Clone)]
pub struct HttpStats {
    pub requests: Counter,
    pub retries: Counter,
    pub budget_exhausted: Counter,
    pub timeouts: Counter,
    pub limit_hits: Counter,
    pub upstream_failures: Counter,
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

/// Node-wide HTTP state: per-Service limits and budgets.
#[derive(Default)]
pub struct Http {
    services: Mutex<HashMap<SocketAddrV4, Arc<ServiceState>>>,
    pub stats: HttpStats,
    /// The latest requests (bounded), for the node dashboard's per-Service latency and errors.
    recent: Mutex<std::collections::VecDeque<RequestRecord>>,
}

/// Requests remembered for the dashboard.
pub const RECENT_REQUESTS: usize = 4096;

/// One finished request, as the dashboard summarizes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestRecord {
    pub at_unix_ms: u64,
    pub source_pod: String,
    /// `namespace/name` of the endpoint's pod, when it is a known pod.
    pub destination_pod: Option<String>,
    pub service: String,
    pub status: u16,
    pub duration_ms: f64,
    pub retries: u32,
}

impl Http {
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
}

struct ServiceState {
    policy: ServicePolicy,
    slots: Option<Arc<Semaphore>>,
    pending: AtomicU32,
    budget: Mutex<Budget>,
}

/// Requests and retries per second over the last [`BUDGET_WINDOW_SECS`].
#[derive(Default)]
struct Budget {
    /// (second, requests, retries)
    buckets: [(u64, u64, u64); BUDGET_WINDOW_SECS as usize],
}

impl Budget {
    fn bucket(&mut self, sec: u64) -> &mut (u64, u64, u64) {
        let b = &mut self.buckets[(sec % BUDGET_WINDOW_SECS) as usize];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }

    fn deposit(&mut self, sec: u64) {
        self.bucket(sec).1 += 1;
    }

    fn try_withdraw(&mut self, sec: u64, percent: u32) -> bool {
        let (requests, retries) =
            self.buckets.iter().filter(|b| b.0 + BUDGET_WINDOW_SECS > sec).fold((0, 0), |(a, b), x| (a + x.1, b + x.2));
        let allowed = BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS + requests * u64::from(percent) / 100;
        if retries < allowed {
            self.bucket(sec).2 += 1;
            true
        } else {
            false
        }
    }
}

fn now_sec() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() + BUDGET_WINDOW_SECS
}

/// Why a request got no slot.
struct LimitHit;

impl ServiceState {
    /// A slot for one request, waiting only if a pending place is free.
    async fn acquire(&self) -> Result<Option<OwnedSemaphorePermit>, LimitHit> {
        let Some(slots) = &self.slots else { return Ok(None) };
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        let waiting = self.pending.fetch_add(1, Ordering::AcqRel);
        let r = if waiting < self.policy.max_pending_requests {
            slots.clone().acquire_owned().await.map(Some).map_err(|_| LimitHit)
        } else {
            Err(LimitHit)
        };
        self.pending.fetch_sub(1, Ordering::AcqRel);
        r
    }
}

impl Http {
    fn service(&self, vip: SocketAddrV4, policy: &ServicePolicy) -> Arc<ServiceState> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = services.get(&vip)
            && s.policy == *policy
        {
            return s.clone();
        }
        // New Service or a changed policy: fresh limits (requests holding old slots finish).
        let s = Arc::new(ServiceState {
            policy: policy.clone(),
            slots: policy.max_connections.map(|n| Arc::new(Semaphore::new(n as usize))),
            pending: AtomicU32::new(0),
            budget: Mutex::default(),
        });
        services.insert(vip, s.clone());
        s
    }
}

/// An upstream connection's transport.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(Box<Tunnel>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(t) => Pin::new(&mut t.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(t) => Pin::new(&mut t.io).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(t) => Pin::new(&mut t.io).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(t) => Pin::new(&mut t.io).poll_shutdown(cx),
        }
    }
}

/// Why an upstream connection could not be had.
pub struct UpstreamError {
    /// Refused by authorization policy: answer 403, do not retry.
    pub denied: bool,
    pub reason: &'static str,
    pub detail: String,
}

/// What the downstream connection needs from the outbound proxy.
pub trait Upstreams: Send + Sync + 'static {
    /// The Service as it is now (`None`: it went away).
    fn service(&self, vip: SocketAddrV4) -> Option<ServiceEntry>;
    /// Opens a transport from the source pod to `ep`, routed and authorized like a TCP
    /// connection to it.
    fn open(
        &self,
        orig: Original,
        ep: SocketAddrV4,
    ) -> impl Future<Output = Result<(UpstreamIo, Option<String>), UpstreamError>> + Send;
    fn balancer(&self) -> &Arc<balance::Balancer>;
    fn http(&self) -> &Http;
    fn retry_body_limit(&self) -> usize;
    fn connect_timeout(&self) -> Duration;
    /// Propagate W3C trace context (create `traceparent` when absent).
    fn trace_context(&self) -> bool;
    /// Share (0..1) of the traces the proxy starts that are marked sampled.
    fn trace_sample_rate(&self) -> f64;
    /// Where the proxy's spans go (OTLP), if anywhere.
    fn spans(&self) -> Option<&crate::otlp::Spans>;
    /// Whether to write the access-log line of a request (`failed`: 5xx or made by the proxy).
    fn access_log(&self, failed: bool) -> bool;
    fn istio(&self) -> &crate::metrics::IstioMetrics;
    /// Istio labels for a request from `orig`'s pod to the Service `service`, answered by `ep`
    /// (`None`: by the proxy itself).
    fn istio_labels(
        &self,
        orig: Original,
        ep: Option<SocketAddrV4>,
        service: &str,
        protocol: &'static str,
    ) -> crate::metrics::IstioLabels;
    /// The `namespace/name` keys of the source pod and of the pod at `ep`, when known.
    fn pod_keys(&self, orig: Original, ep: Option<SocketAddrV4>) -> (Option<String>, Option<String>);
    /// Records the endpoint of the latest request on the connection record.
    fn note_endpoint(&self, conn: u64, ep: SocketAddrV4, retries: u32);
    /// Records how the latest request's upstream connection is protected.
    fn note_route(&self, conn: u64, orig: Original, ep: SocketAddrV4);
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

/// One downstream connection: its upstream connections, one per endpoint used.
pub struct Downstream<U: Upstreams> {
    pub up: Arc<U>,
    pub orig: Original,
    pub vip: SocketAddrV4,
    pub conn: u64,
    pub protocol: Protocol,
    senders: tokio::sync::Mutex<HashMap<SocketAddrV4, Sender>>,
    pub requests: AtomicU64,
    /// Shutting down: HTTP/1 responses carry `Connection: close`, so clients stop reusing the
    /// connection without racing its close.
    draining: std::sync::atomic::AtomicBool,
}

/// On shutdown, how long an HTTP/1 client connection is told `Connection: close` on each
/// response before an idle one is closed.
const H1_DRAIN: Duration = Duration::from_secs(1);

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

    fn replayable(&self) -> bool {
        matches!(self, AttemptBody::Replay(..))
    }
}

fn idempotent(m: &hyper::Method) -> bool {
    use hyper::Method as M;
    [M::GET, M::HEAD, M::OPTIONS, M::PUT, M::DELETE, M::TRACE].contains(m)
}

pub fn error_response(status: StatusCode, reason: &'static str, detail: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(detail + "\n")).map_err(|n: Infallible| match n {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static(reason));
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(hyper::header::UPGRADE)
        && headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
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
    pub async fn serve<S>(
        self: Arc<Self>,
        client: S,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), hyper::Error>
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
                    r = conn.as_mut() => return r,
                    _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
                }
                conn.await
            }
            _ => {
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => return r,
                    _ = stop.cancelled() => self.draining.store(true, Ordering::Relaxed),
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
        let started = Instant::now();
        let started_wall = std::time::SystemTime::now();
        let protocol = if req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        {
            "grpc"
        } else {
            "http"
        };
        let request_bytes = Arc::new(AtomicU64::new(0));
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let version = req.version();
        let req = req.map(|b| Counted { inner: b, bytes: request_bytes.clone() });
        let outcome = Mutex::new(Outcome::default());
        let mut resp = self.request_inner(req, &outcome).await;
        let outcome = outcome.into_inner().unwrap_or_else(|p| p.into_inner());
        if self.draining.load(Ordering::Relaxed) && self.protocol == Protocol::Http1 {
            resp.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        // Istio's request metrics: recorded when the response body has been sent (below).
        let service = self.up.service(self.vip).map(|e| e.service).unwrap_or_default();
        let ep = outcome.endpoint;
        let base = self.up.istio_labels(self.orig, ep, &service, protocol);
        let failed = resp.status().is_server_error() || resp.headers().contains_key(ERROR_HEADER);
        let (src_pod, dst_pod) = self.up.pod_keys(self.orig, ep);
        let src_pod = src_pod.unwrap_or_else(|| "-".into());
        self.up.http().remember(RequestRecord {
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            source_pod: src_pod.clone(),
            destination_pod: dst_pod.clone(),
            service: service.clone(),
            status: resp.status().as_u16(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            retries: outcome.retries,
        });
        // The access-log line is written when the response body has been sent, with its size.
        let access = self.up.access_log(failed).then(|| AccessLine {
            src: src_pod.clone(),
            src_workload: base.source_workload_namespace.clone() + "/" + &base.source_workload,
            src_identity: base.source_principal.clone(),
            service: service.clone(),
            vip: self.vip,
            endpoint: ep,
            dst_pod: dst_pod.clone(),
            dst_workload: base.destination_workload_namespace.clone() + "/" + &base.destination_workload,
            dst_identity: base.destination_principal.clone(),
            security: base.connection_security_policy,
            protocol,
            version,
            method: method.clone(),
            path: path.clone(),
            status: resp.status().as_u16(),
            retries: outcome.retries,
            retry_reasons: outcome.reasons.join(","),
            trace_id: resp_trace(&outcome),
            error: resp.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string(),
            started,
        });
        // The proxy's span, sent when the response body has been.
        let span = match (self.up.spans(), outcome.trace) {
            (Some(spans), Some(hop)) if hop.sampled() => Some((
                spans.clone(),
                crate::otlp::HttpSpan {
                    trace_id: hop.sent.trace_id,
                    span_id: hop.sent.parent_id,
                    parent_id: hop.client_span,
                    tracestate: outcome.tracestate.clone(),
                    start: started_wall,
                    end: started_wall,
                    method: method.to_string(),
                    path: path.clone(),
                    protocol_version: if version == hyper::Version::HTTP_2 { "2" } else { "1.1" },
                    service: if base.destination_service == crate::metrics::UNKNOWN {
                        service.clone()
                    } else {
                        base.destination_service.clone()
                    },
                    service_port: self.vip.port(),
                    endpoint: ep,
                    status: resp.status().as_u16(),
                    error: resp.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string),
                    retries: outcome.retries,
                    retry_reasons: outcome.reasons.clone(),
                    labels: base.clone(),
                },
            )),
            _ => None,
        };
        // Istio's request metrics are recorded when the response has been sent (as Istio does:
        // the duration covers the body, and a gRPC status comes in the trailers).
        let mut base = base;
        base.response_flags = response_flags(
            resp.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()),
            outcome.retries,
            resp.status(),
        );
        let grpc = protocol == "grpc";
        let grpc_response_status = match grpc {
            true => resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_string(),
            false => String::new(),
        };
        let labels =
            crate::metrics::IstioHttpLabels { base, response_code: resp.status().as_u16(), grpc_response_status };
        let done = Done { istio: self.up.istio().clone(), labels, request_bytes, started, grpc };
        let (parts, body) = resp.into_parts();
        let body = Observed { inner: body, bytes: 0, done: Some(done), span, access };
        Response::from_parts(parts, body.boxed_unsync())
    }

    async fn request_inner(&self, mut req: Request<Counted<Incoming>>, outcome: &Mutex<Outcome>) -> Response<Body> {
        let http = self.up.http();
        http.stats.requests.inc();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let Some(entry) = self.up.service(self.vip) else {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-endpoints",
                format!("service {} no longer exists", self.vip),
            );
        };
        let svc = http.service(self.vip, &entry.policy);
        let policy = &svc.policy;
        let deadline = policy.timeout.map(|t| tokio::time::Instant::now() + t);
        let _slot = match svc.acquire_by(deadline).await {
            Ok(p) => p,
            Err(LimitHit) => {
                http.stats.limit_hits.inc();
                warn!(service = %entry.service, vip = %self.vip, "request past the service's connection limit: 503");
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connection-limit",
                    format!(
                        "service {} is at its limit of {} requests in flight (switchyard.io/max-connections) and {} waiting",
                        entry.service,
                        policy.max_connections.unwrap_or(0),
                        policy.max_pending_requests
                    ),
                );
            }
        };
        svc.budget.lock().unwrap_or_else(|p| p.into_inner()).deposit(now_sec());
        let upgrade = is_upgrade(req.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        if self.up.trace_context() {
            let hop = super::trace::continue_or_start(&mut parts.headers, self.up.trace_sample_rate());
            let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
            o.trace = Some(hop);
            if hop.sampled() && self.up.spans().is_some() {
                o.tracestate = parts.headers.get("tracestate").and_then(|v| v.to_str().ok()).map(str::to_string);
            }
        }
        let head = Head { method: parts.method, uri: parts.uri, version: parts.version, headers: parts.headers };
        let may_retry_sent =
            !upgrade && (idempotent(&head.method) || policy.retry_non_idempotent) && policy.retries > 0;
        let limit = self.up.retry_body_limit();
        let mut body = if body.is_end_stream() {
            AttemptBody::Replay(Bytes::new(), None)
        } else if may_retry_sent && body.size_hint().upper().is_some_and(|n| n as usize <= limit) {
            match http_body_util::Limited::new(body, limit).collect().await {
                Ok(c) => {
                    let trailers = c.trailers().cloned();
                    AttemptBody::Replay(c.to_bytes(), trailers)
                }
                Err(e) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "request-body",
                        format!("reading the request body failed: {e}"),
                    );
                }
            }
        } else {
            AttemptBody::Stream(Some(body.map_err(BoxError::from).boxed_unsync()))
        };
        // The endpoint of the attempt in flight: a timeout is its failure.
        let current = Mutex::new(None);
        let result = match deadline {
            Some(d) => {
                match tokio::time::timeout_at(d, self.attempts(&entry, &svc, &head, &mut body, &current, outcome)).await
                {
                    Ok(r) => r,
                    Err(_) => {
                        http.stats.timeouts.inc();
                        if let Some((ep, started)) = current.lock().unwrap_or_else(|p| p.into_inner()).take() {
                            http.stats.upstream_failures.inc();
                            self.up.balancer().failed(ep, &entry.endpoints, Instant::now() - started);
                        }
                        return error_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "request-timeout",
                            format!(
                                "no response from service {} within {:?} (switchyard.io/timeout)",
                                entry.service,
                                policy.timeout.unwrap_or_default()
                            ),
                        );
                    }
                }
            }
            None => self.attempts(&entry, &svc, &head, &mut body, &current, outcome).await,
        };
        match result {
            Ok(mut resp) => {
                // `x-switchyard-error` is the proxy's own word: an upstream cannot set it (and
                // so cannot make its answers look like the proxy's failures).
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
            Err(r) => r,
        }
    }

    /// Attempts until a response to return; `Err` is a response the proxy makes.
    async fn attempts(
        &self,
        entry: &ServiceEntry,
        svc: &ServiceState,
        head: &Head,
        body: &mut AttemptBody,
        current: &Mutex<Option<(SocketAddrV4, Instant)>>,
        outcome: &Mutex<Outcome>,
    ) -> Result<Response<Incoming>, Response<Body>> {
        let http = self.up.http();
        let balancer = self.up.balancer();
        let policy = &svc.policy;
        let retry_sent = (idempotent(&head.method) || policy.retry_non_idempotent) && body.replayable();
        let mut tried: Vec<SocketAddrV4> = Vec::new();
        let mut retries = 0u32;
        loop {
            // Another endpoint than those tried if one is left, else any.
            let exclude = if tried.len() < entry.endpoints.len() { &tried[..] } else { &[] };
            let Some(ep) = balancer.pick(&entry.endpoints, exclude) else {
                return Err(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-endpoints",
                    format!("service {} has no ready endpoint", entry.service),
                ));
            };
            self.up.note_endpoint(self.conn, ep, retries);
            {
                let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
                o.endpoint = Some(ep);
                o.retries = retries;
            }
            tried.push(ep);
            let _in_flight = balancer.start(ep);
            let started = Instant::now();
            *current.lock().unwrap_or_else(|p| p.into_inner()) = Some((ep, started));
            // May another attempt follow this one?
            let can_retry = |retries: u32| -> bool {
                if retries >= policy.retries {
                    return false;
                }
                let ok = svc
                    .budget
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .try_withdraw(now_sec(), policy.retry_budget_percent);
                if !ok {
                    http.stats.budget_exhausted.inc();
                    debug!(service = %entry.service, "retry budget exhausted");
                }
                ok
            };
            let failure = |what: &str, detail: String| {
                current.lock().unwrap_or_else(|p| p.into_inner()).take();
                http.stats.upstream_failures.inc();
                balancer.failed(ep, &entry.endpoints, started.elapsed());
                debug!(service = %entry.service, endpoint = %ep, "{what}: {detail}");
            };
            let mut sender = match self.sender(ep).await {
                Ok(s) => s,
                Err(e) if e.denied => {
                    return Err(error_response(StatusCode::FORBIDDEN, "denied", e.detail));
                }
                Err(e) => {
                    failure(e.reason, e.detail.clone());
                    // Nothing was sent: safe to retry whatever the method.
                    if can_retry(retries) {
                        outcome.lock().unwrap_or_else(|p| p.into_inner()).reasons.push(e.reason.to_string());
                        retries += 1;
                        http.stats.retries.inc();
                        tokio::time::sleep(balance::backoff(retries)).await;
                        continue;
                    }
                    return Err(error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream-unavailable",
                        format!("service {}: endpoint {ep}: {}", entry.service, e.detail),
                    ));
                }
            };
            let Some(b) = body.take() else {
                return Err(error_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream-reset",
                    format!("service {}: the request body was already sent once", entry.service),
                ));
            };
            let mut req = Request::new(b);
            *req.method_mut() = head.method.clone();
            *req.uri_mut() = head.uri.clone();
            *req.version_mut() = head.version;
            *req.headers_mut() = head.headers.clone();
            let sent = match &mut sender {
                Sender::H1(s) => s.try_send_request(req).await,
                Sender::H2(s) => s.try_send_request(req).await,
            };
            match sent {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_server_error() {
                        failure("status", status.to_string());
                    } else {
                        current.lock().unwrap_or_else(|p| p.into_inner()).take();
                        balancer.connected(ep, started.elapsed());
                    }
                    self.keep(ep, sender).await;
                    if retry_sent && policy.retry_on.contains(&status.as_u16()) && can_retry(retries) {
                        outcome
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .reasons
                            .push(format!("status_{}", status.as_u16()));
                        retries += 1;
                        http.stats.retries.inc();
                        drop(resp);
                        tokio::time::sleep(balance::backoff(retries)).await;
                        continue;
                    }
                    return Ok(resp);
                }
                Err(mut e) => {
                    let unsent = e.take_message();
                    let err = e.into_error();
                    failure("request failed", err.to_string());
                    if let Some(req) = unsent {
                        // Never written: retry with the same body, whatever the method.
                        if let AttemptBody::Stream(slot) = body {
                            *slot = Some(req.into_body());
                        }
                        if can_retry(retries) {
                            outcome.lock().unwrap_or_else(|p| p.into_inner()).reasons.push("not_sent".into());
                            retries += 1;
                            http.stats.retries.inc();
                            tokio::time::sleep(balance::backoff(retries)).await;
                            continue;
                        }
                    } else if retry_sent && can_retry(retries) {
                        outcome.lock().unwrap_or_else(|p| p.into_inner()).reasons.push("reset".into());
                        retries += 1;
                        http.stats.retries.inc();
                        tokio::time::sleep(balance::backoff(retries)).await;
                        continue;
                    }
                    return Err(error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream-reset",
                        format!("service {}: endpoint {ep} failed before responding: {err}", entry.service),
                    ));
                }
            }
        }
    }

    /// A ready upstream connection to `ep`: the kept one if it is still good, else a new one.
    async fn sender(&self, ep: SocketAddrV4) -> Result<Sender, UpstreamError> {
        let kept = self.senders.lock().await.remove(&ep);
        match kept {
            Some(Sender::H2(s)) if s.is_ready() => return Ok(Sender::H2(s)),
            Some(Sender::H1(mut s)) if !s.is_closed() => {
                if s.ready().await.is_ok() {
                    return Ok(Sender::H1(s));
                }
            }
            _ => {}
        }
        let timeout = self.up.connect_timeout();
        let (io, _dst_pod) =
            tokio::time::timeout(timeout, self.up.open(self.orig, ep)).await.map_err(|_| UpstreamError {
                denied: false,
                reason: "connect_timeout",
                detail: format!("connecting to {ep} timed out after {timeout:?}"),
            })??;
        self.up.note_route(self.conn, self.orig, ep);
        let io = TokioIo::new(io);
        let handshake_err = |e: hyper::Error| UpstreamError {
            denied: false,
            reason: "handshake",
            detail: format!("HTTP handshake with {ep} failed: {e}"),
        };
        Ok(match self.protocol {
            Protocol::Http2 => {
                let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(handshake_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                Sender::H2(s)
            }
            _ => {
                let (s, conn) = hyper::client::conn::http1::handshake(io).await.map_err(handshake_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "upstream HTTP/1 connection ended");
                    }
                });
                Sender::H1(s)
            }
        })
    }

    /// Keeps an upstream connection for the next request to `ep`.
    async fn keep(&self, ep: SocketAddrV4, s: Sender) {
        let keep = match &s {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
        };
        if keep {
            self.senders.lock().await.insert(ep, s);
        }
    }
}

/// What happened to one request, for its access-log line.
#[derive(Default)]
struct Outcome {
    /// The endpoint of the last attempt.
    endpoint: Option<SocketAddrV4>,
    retries: u32,
    /// Why each retry was made.
    reasons: Vec<String>,
    trace: Option<super::trace::Hop>,
    /// The request's `tracestate`, kept for its span (only when one is exported).
    tracestate: Option<String>,
}

fn resp_trace(o: &Outcome) -> String {
    o.trace.map_or_else(|| "-".into(), |t| format!("{:032x}", t.sent.trace_id))
}

/// A body that counts its data bytes (the request, as it is read from the client).
pub struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The response body on its way to the client: when it ends (or is dropped), the request and
/// response sizes go into Istio's histograms.
struct Observed {
    inner: Body,
    bytes: u64,
    done: Option<Done>,
    /// The request's span, ended and queued for export with the body.
    span: Option<(crate::otlp::Spans, crate::otlp::HttpSpan)>,
    /// The request's access-log line, written with the body's size.
    access: Option<AccessLine>,
}

/// A request's Istio metrics, recorded when its response has been sent.
struct Done {
    istio: crate::metrics::IstioMetrics,
    labels: crate::metrics::IstioHttpLabels,
    request_bytes: Arc<AtomicU64>,
    started: Instant,
    /// A gRPC request: its status is taken from the trailers.
    grpc: bool,
}

/// Envoy's response flags for what the proxy itself answered (`x-switchyard-error`), or for
/// a 5xx after retries.
fn response_flags(error: Option<&str>, retries: u32, status: StatusCode) -> &'static str {
    match error {
        Some("connection-limit") => "UO",
        Some("request-timeout") => "UT",
        Some("upstream-unavailable") => "UF",
        Some("upstream-reset") => "UC",
        Some("no-endpoints") => "UH",
        _ if retries > 0 && status.is_server_error() => "URX",
        _ => "-",
    }
}

/// One HTTP request's access-log line, waiting for the response body to be sent.
struct AccessLine {
    src: String,
    src_workload: String,
    src_identity: String,
    service: String,
    vip: std::net::SocketAddrV4,
    endpoint: Option<std::net::SocketAddrV4>,
    dst_pod: Option<String>,
    dst_workload: String,
    dst_identity: String,
    security: &'static str,
    protocol: &'static str,
    version: hyper::Version,
    method: hyper::Method,
    path: String,
    status: u16,
    retries: u32,
    retry_reasons: String,
    trace_id: String,
    error: String,
    started: Instant,
}

impl AccessLine {
    fn write(self, request_bytes: u64, response_bytes: u64) {
        info!(
            target: "access",
            direction = "outbound",
            kind = "http",
            src = %self.src,
            src_workload = %self.src_workload,
            src_identity = %self.src_identity,
            service = %self.service,
            vip = %self.vip,
            endpoint = self.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            dst_pod = self.dst_pod.as_deref().unwrap_or("-"),
            dst_workload = %self.dst_workload,
            dst_identity = %self.dst_identity,
            security = self.security,
            protocol = self.protocol,
            version = ?self.version,
            method = %self.method,
            path = %self.path,
            status = self.status,
            request_bytes,
            response_bytes,
            duration_ms = self.started.elapsed().as_millis() as u64,
            retries = self.retries,
            retry_reasons = %self.retry_reasons,
            trace_id = %self.trace_id,
            error = %self.error,
            "http request"
        );
    }
}

impl Observed {
    fn finish(&mut self) {
        let mut request_size = 0;
        if let Some(d) = self.done.take() {
            request_size = d.request_bytes.load(Ordering::Relaxed);
            d.istio.requests.get_or_create(&d.labels).inc();
            d.istio.request_duration.get_or_create(&d.labels).observe(d.started.elapsed().as_secs_f64() * 1000.0);
            d.istio.request_bytes.get_or_create(&d.labels).observe(request_size as f64);
            d.istio.response_bytes.get_or_create(&d.labels).observe(self.bytes as f64);
        }
        if let Some(line) = self.access.take() {
            line.write(request_size, self.bytes);
        }
        if let Some((spans, mut span)) = self.span.take() {
            span.end = std::time::SystemTime::now();
            spans.record(span.into_span_data());
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if let (Some(t), Some(done)) = (f.trailers_ref(), self.done.as_mut())
                    && done.grpc
                    && let Some(status) = t.get("grpc-status").and_then(|v| v.to_str().ok())
                {
                    done.labels.grpc_response_status = status.to_string();
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl ServiceState {
    /// [`Self::acquire`], giving up at `deadline` like the request would.
    async fn acquire_by(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<OwnedSemaphorePermit>, LimitHit> {
        match deadline {
            Some(d) => tokio::time::timeout_at(d, self.acquire()).await.unwrap_or(Err(LimitHit)),
            None => self.acquire().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_share_of_requests_plus_a_floor() {
        let mut b = Budget::default();
        let sec = 100;
        for _ in 0..1000 {
            b.deposit(sec);
        }
        let allowed = (0..10_000).take_while(|_| b.try_withdraw(sec, 20)).count();
        assert_eq!(allowed, 200 + (BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS) as usize);
        assert!(!b.try_withdraw(sec + 5, 20), "still spent within the window");
        assert!(b.try_withdraw(sec + BUDGET_WINDOW_SECS, 20), "the window moved on");
        let mut none = Budget::default();
        assert_eq!((0..1000).take_while(|_| none.try_withdraw(7, 0)).count(), 100, "the floor alone");
    }

    #[test]
    fn idempotent_methods_and_upgrades() {
        assert!(idempotent(&hyper::Method::GET) && idempotent(&hyper::Method::DELETE));
        assert!(!idempotent(&hyper::Method::POST) && !idempotent(&hyper::Method::PATCH));
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert("connection", HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }
}
