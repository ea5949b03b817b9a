//! The proxy's own span per HTTP request, exported over OTLP/HTTP (protobuf) when an endpoint is
//! configured (`--otlp-endpoint`; off by default).
//!
//! A request's span has the trace id and parent the client sent (or the trace the proxy
//! started), and the span id the proxy put in the `traceparent` it sent upstream, so the
//! server's span is its child. Only sampled traces (flag `01`) are exported.
//!
//! The data plane never waits for the collector: a finished span goes into a bounded queue
//! (full: the span is dropped and counted); one task sends batches of up to [`BATCH`] spans
//! every [`FLUSH`] with the `opentelemetry-otlp` exporter, over the agent's own hyper client.
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanExporter as _},
};
use prometheus_client::{encoding::EncodeLabelSet, metrics::counter::Counter, metrics::family::Family};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Spans waiting to be sent; past this, new spans are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Spans per export request at most.
pub const BATCH: usize = 512;
/// How often queued spans are sent.
pub const FLUSH: Duration = Duration::from_secs(1);
/// One export request's time limit (connect, send, answer).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Where finished spans go.
#[derive(Clone, Debug)]
pub struct Spans {
    tx: mpsc::Sender<SpanData>,
    /// `exported`, `dropped` (queue full or agent stopping), `failed` (the collector refused
    /// or could not be reached).
    pub counts: Family<OutcomeLabels, Counter>,
}

impl Spans {
    /// Starts the exporter task posting to `url` (see [`crate::config::traces_url`]); once
    /// `stop` is cancelled it sends what is queued and ends.
    pub fn start(
        url: &str,
        node: &str,
        stop: CancellationToken,
    ) -> Result<(Spans, tokio::task::JoinHandle<()>), opentelemetry_otlp::ExporterBuildError> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Client)
            .with_endpoint(url.to_string())
            .with_timeout(EXPORT_TIMEOUT)
            .build()?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name("switchyard")
                .with_attributes([
                    KeyValue::new("k8s.node.name", node.to_string()),
                    KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                ])
                .build(),
        );
        let (tx, rx) = mpsc::channel(QUEUE);
        let counts = Family::<OutcomeLabels, Counter>::default();
        for outcome in ["exported", "dropped", "failed"] {
            let _ = counts.get_or_create(&OutcomeLabels { outcome });
        }
        info!(endpoint = %url, "exporting the proxy's HTTP request spans over OTLP");
        let task = tokio::spawn(send_batches(exporter, rx, counts.clone(), url.to_string(), stop));
        Ok((Spans { tx, counts }, task))
    }

    /// Queues a finished span; never waits.
    pub fn record(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.counts.get_or_create(&OutcomeLabels { outcome: "dropped" }).inc();
        }
    }
}

async fn send_batches(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    counts: Family<OutcomeLabels, Counter>,
    url: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        // Everything queued, in batches; at shutdown one last round.
        loop {
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            match exporter.export(std::mem::take(&mut batch)).await {
                Ok(()) => {
                    counts.get_or_create(&OutcomeLabels { outcome: "exported" }).inc_by(n);
                }
                Err(e) => {
                    counts.get_or_create(&OutcomeLabels { outcome: "failed" }).inc_by(n);
                    // One warning a minute at most: a collector that is down is one problem.
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        warn!(endpoint = %url, spans = n, error = %e, "OTLP span export failed; spans dropped");
                        last_warning = Some(std::time::Instant::now());
                    }
                    break;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// What a finished HTTP request contributes to its span.
pub struct HttpSpan {
    pub trace_id: u128,
    /// The proxy's span id: the parent id in the `traceparent` sent upstream.
    pub span_id: u64,
    /// The client's span (the parent id it sent), if it sent a valid `traceparent`.
    pub parent_id: Option<u64>,
    pub tracestate: Option<String>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: String,
    pub path: String,
    /// `1.1` or `2`.
    pub protocol_version: &'static str,
    pub service: String,
    pub service_port: u16,
    pub endpoint: Option<std::net::SocketAddrV4>,
    pub status: u16,
    /// The proxy's own error (`x-switchyard-error`), if it answered itself.
    pub error: Option<String>,
    pub retries: u32,
    pub retry_reasons: Vec<String>,
    pub labels: crate::metrics::IstioLabels,
}

impl HttpSpan {
    pub fn into_span_data(self) -> SpanData {
        let l = &self.labels;
        let mut attributes = vec![
            KeyValue::new("http.request.method", self.method.clone()),
            KeyValue::new("url.path", self.path),
            KeyValue::new("http.response.status_code", i64::from(self.status)),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", self.protocol_version),
            KeyValue::new("server.address", self.service.clone()),
            KeyValue::new("server.port", i64::from(self.service_port)),
            KeyValue::new("source.workload", l.source_workload.clone()),
            KeyValue::new("source.namespace", l.source_workload_namespace.clone()),
            KeyValue::new("source.principal", l.source_principal.clone()),
            KeyValue::new("destination.workload", l.destination_workload.clone()),
            KeyValue::new("destination.namespace", l.destination_workload_namespace.clone()),
            KeyValue::new("destination.principal", l.destination_principal.clone()),
            KeyValue::new("connection_security_policy", l.connection_security_policy),
            KeyValue::new("switchyard.retries", i64::from(self.retries)),
        ];
        if let Some(ep) = self.endpoint {
            attributes.push(KeyValue::new("network.peer.address", ep.ip().to_string()));
            attributes.push(KeyValue::new("network.peer.port", i64::from(ep.port())));
        }
        if !self.retry_reasons.is_empty() {
            attributes.push(KeyValue::new("switchyard.retry_reasons", self.retry_reasons.join(",")));
        }
        let status = match &self.error {
            Some(e) => {
                attributes.push(KeyValue::new("switchyard.error", e.clone()));
                Status::error(e.clone())
            }
            None if self.status >= 500 => Status::error(format!("HTTP {}", self.status)),
            None => Status::Unset,
        };
        let trace_state = self.tracestate.and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(self.trace_id),
                SpanId::from(self.span_id),
                TraceFlags::SAMPLED,
                false,
                trace_state,
            ),
            parent_span_id: self.parent_id.map_or(SpanId::INVALID, SpanId::from),
            parent_span_is_remote: self.parent_id.is_some(),
            span_kind: SpanKind::Client,
            name: format!("{} {}", self.method, self.service).into(),
            start_time: self.start,
            end_time: self.end,
            attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status,
            instrumentation_scope: scope(),
        }
    }
}

fn scope() -> InstrumentationScope {
    static SCOPE: std::sync::OnceLock<InstrumentationScope> = std::sync::OnceLock::new();
    SCOPE
        .get_or_init(|| {
            InstrumentationScope::builder("switchyard-proxy").with_version(env!("CARGO_PKG_VERSION")).build()
        })
        .clone()
}

/// The exporter's HTTP client: one plain HTTP/1.1 connection per export (once a second at
/// most), so nothing lingers between exports.
#[derive(Debug, Clone, Copy)]
struct Client;

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let exchange = async {
            let (mut parts, body) = request.into_parts();
            let host = parts.uri.host().ok_or("no host in the OTLP endpoint")?.to_string();
            let port = parts.uri.port_u16().unwrap_or(80);
            let authority = parts.uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.clone());
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            parts.uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse()?;
            parts.headers.insert(hyper::header::HOST, authority.parse()?);
            let resp = send.send_request(hyper::Request::from_parts(parts, Full::new(body))).await?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, 64 * 1024).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        tokio::time::timeout(EXPORT_TIMEOUT, exchange).await.map_err(|_| HttpError::from("timed out"))?
    }
}

/// Exported for `/metrics` under the switchyard prefix.
pub fn register(spans: &Spans, reg: &mut prometheus_client::registry::Registry) {
    reg.register(
        "trace_spans",
        "Proxy spans by outcome: exported over OTLP, dropped (queue full), failed (collector error)",
        spans.counts.clone(),
    );
}

/// The sampled flag of a trace the proxy starts: `rate` of them (0..1).
pub fn sample(rate: f64) -> bool {
    rate >= 1.0 || (rate > 0.0 && fastrand::f64() < rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_keeps_the_clients_trace_and_parent_and_marks_errors() {
        let labels = crate::metrics::IstioLabels::unknown("source", "http");
        let span = HttpSpan {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x1111,
            parent_id: Some(0x00f067aa0ba902b7),
            tracestate: Some("congo=t61rcWkgMzE".into()),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH + Duration::from_millis(3),
            method: "GET".into(),
            path: "/x".into(),
            protocol_version: "1.1",
            service: "web.shop".into(),
            service_port: 80,
            endpoint: Some("10.0.0.2:8080".parse().unwrap()),
            status: 504,
            error: Some("request-timeout".into()),
            retries: 1,
            retry_reasons: vec!["503".into()],
            labels,
        }
        .into_span_data();
        assert_eq!(span.span_context.trace_id(), TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128));
        assert_eq!(span.span_context.span_id(), SpanId::from(0x1111u64));
        assert_eq!(span.parent_span_id, SpanId::from(0x00f067aa0ba902b7u64));
        assert_eq!(span.span_context.trace_state().header(), "congo=t61rcWkgMzE");
        assert_eq!(span.name, "GET web.shop");
        assert!(matches!(span.status, Status::Error { .. }));
        let attr = |k: &str| span.attributes.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.to_string());
        assert_eq!(attr("http.response.status_code").as_deref(), Some("504"));
        assert_eq!(attr("switchyard.retry_reasons").as_deref(), Some("503"));
        assert_eq!(attr("network.peer.address").as_deref(), Some("10.0.0.2"));
    }

    #[test]
    fn sampling_rates() {
        assert!(sample(1.0) && !sample(0.0));
        let n = (0..10_000).filter(|_| sample(0.1)).count();
        assert!((700..1300).contains(&n), "{n}");
    }
}
