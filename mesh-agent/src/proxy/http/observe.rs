//! One HTTP request's telemetry: Istio's request metrics, the access-log line, the OTLP span and
//! the dashboard's record, all written when the response body has been sent (or dropped).
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::Response;
use tracing::info;

use super::{Body, BoxError, policy::ProxyAnswer};

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

/// What happened to one request.
#[derive(Default)]
pub(super) struct Outcome {
    /// The endpoint of the last attempt, and how it was reached (`None`: refused).
    pub endpoint: Option<std::net::SocketAddrV4>,
    pub path: Option<crate::proxy::route::Path>,
    pub retries: u32,
    /// Why each retry was made.
    pub reasons: Vec<std::borrow::Cow<'static, str>>,
    pub trace: Option<crate::proxy::trace::Hop>,
    /// The request's `tracestate`, kept for its span (only when one is exported).
    pub tracestate: Option<String>,
}

/// The request as it came, for its telemetry.
pub(super) struct RequestInfo {
    pub started: Instant,
    pub started_wall: SystemTime,
    /// `grpc` or `http`.
    pub protocol: &'static str,
    pub method: hyper::Method,
    pub path: String,
    pub version: hyper::Version,
    pub request_bytes: Arc<AtomicU64>,
}

/// Everything telemetry needs of the downstream connection.
pub(super) struct Env<'a> {
    pub observe: &'a crate::proxy::observe::Observe,
    pub http: &'a super::Http,
    pub settings: &'a crate::proxy::detect::DetectConfig,
    pub cfg: &'a crate::proxy::route::RouteConfig,
    pub route: Option<&'a crate::proxy::route::Route>,
    pub vip: std::net::SocketAddrV4,
}

/// Wraps `resp` so that the request's metrics, access-log line and span are written when its
/// body has been sent; remembers the request for the dashboard now.
pub(super) fn observe(cx: Env<'_>, req: RequestInfo, outcome: Outcome, resp: Response<Body>) -> Response<Body> {
    let service = cx.route.and_then(|r| r.service()).map(|s| s.entry.service.clone()).unwrap_or_default();
    let ep = outcome.endpoint;
    let base = match cx.route {
        Some(r) => r.istio_labels(cx.cfg, ep, outcome.path.as_ref(), req.protocol),
        None => crate::metrics::IstioLabels::unknown("source", req.protocol),
    };
    let answer = resp.extensions().get::<ProxyAnswer>().copied();
    let failed = resp.status().is_server_error() || answer.is_some();
    let src_pod = cx.route.map_or_else(|| "-".to_string(), |r| r.source.pod.clone());
    let dst_pod = ep.zip(cx.route).and_then(|(ep, r)| r.pod_at(ep));
    let status = resp.status().as_u16();
    cx.http.remember(RequestRecord {
        at_unix_ms: SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        source_pod: src_pod.clone(),
        destination_pod: dst_pod.clone(),
        service: service.clone(),
        status,
        duration_ms: req.started.elapsed().as_secs_f64() * 1000.0,
        retries: outcome.retries,
    });
    let error = answer.map(ProxyAnswer::header);
    let access = cx.settings.access_log.wants(failed).then(|| AccessLine {
        src: src_pod,
        src_workload: base.source_workload_namespace.clone() + "/" + &base.source_workload,
        src_identity: base.source_principal.clone(),
        service: service.clone(),
        vip: cx.vip,
        endpoint: ep,
        dst_pod,
        dst_workload: base.destination_workload_namespace.clone() + "/" + &base.destination_workload,
        dst_identity: base.destination_principal.clone(),
        security: base.connection_security_policy,
        protocol: req.protocol,
        version: req.version,
        method: req.method.clone(),
        path: req.path.clone(),
        status,
        retries: outcome.retries,
        retry_reasons: outcome.reasons.join(","),
        trace_id: outcome.trace.map_or_else(|| "-".into(), |t| format!("{:032x}", t.sent.trace_id)),
        error: error.unwrap_or("-"),
        started: req.started,
    });
    let span = match (&cx.settings.spans, outcome.trace) {
        (Some(spans), Some(hop)) if hop.sampled() => Some((
            spans.clone(),
            crate::otlp::HttpSpan {
                trace_id: hop.sent.trace_id,
                span_id: hop.sent.parent_id,
                parent_id: hop.client_span,
                tracestate: outcome.tracestate.clone(),
                start: req.started_wall,
                end: req.started_wall,
                method: req.method.to_string(),
                path: req.path.clone(),
                protocol_version: if req.version == hyper::Version::HTTP_2 { "2" } else { "1.1" },
                service: if base.destination_service == crate::metrics::UNKNOWN {
                    service.clone()
                } else {
                    base.destination_service.clone()
                },
                service_port: cx.vip.port(),
                endpoint: ep,
                status,
                error: error.map(str::to_string),
                retries: outcome.retries,
                retry_reasons: outcome.reasons.iter().map(|r| r.to_string()).collect(),
                labels: base.clone(),
            },
        )),
        _ => None,
    };
    // Istio's request metrics are recorded when the response has been sent (as Istio does:
    // the duration covers the body, and a gRPC status comes in the trailers).
    let mut base = base;
    base.response_flags = super::policy::response_flags(answer, outcome.retries, resp.status());
    let grpc = req.protocol == "grpc";
    let grpc_response_status = match grpc {
        true => resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_string(),
        false => String::new(),
    };
    let labels = crate::metrics::IstioHttpLabels { base, response_code: status, grpc_response_status };
    let done =
        Done { istio: cx.observe.istio.clone(), labels, request_bytes: req.request_bytes, started: req.started, grpc };
    let (parts, body) = resp.into_parts();
    let body = Observed { inner: body, bytes: 0, done: Some(done), span, access };
    Response::from_parts(parts, body.boxed_unsync())
}

/// A body that counts its data bytes (the request, as it is read from the client).
pub struct Counted<B> {
    pub(super) inner: B,
    pub(super) bytes: Arc<AtomicU64>,
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
    error: &'static str,
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
            error = self.error,
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
            span.end = SystemTime::now();
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
