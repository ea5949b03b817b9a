//! The admin server, apart from the data plane, on two surfaces (as ztunnel's):
//! * admin (127.0.0.1:15000, and the agent's Unix socket): `/metrics`, `/healthz`, `/readyz`,
//!   the dashboard and the JSON debug views of pods, connections and the datapath. They list
//!   every pod of the cluster, so they are the node's, not the network's;
//! * stats (0.0.0.0:15020): `/metrics`, `/healthz` and `/readyz` only, for Prometheus and
//!   load balancers.
//!
//! Each listener serves at most [`MAX_CONNECTIONS`] connections at once (more wait in its
//! accept queue), each with a header read timeout and a lifetime bound, so a flood of silent
//! connections cannot hold the admin thread. Views clone what they read (the pod index is an
//! `Arc`) instead of holding the data plane's locks while they serialize.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::Arc,
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    datapath::Datapath,
    proxy::{conns::Connections, http::RequestRecord, inbound::InboundMetrics},
    state::PodIndex,
};

pub struct Admin {
    pub registry: Registry,
    pub pods: watch::Receiver<Arc<PodIndex>>,
    pub conns: Arc<Connections>,
    pub datapath: Arc<std::sync::Mutex<Option<Datapath>>>,
    pub ready: watch::Receiver<bool>,
    pub node_name: String,
    /// The mesh's SPIFFE trust domain (the dashboard's identities).
    pub trust_domain: String,
    pub certs: Option<Arc<crate::identity::manager::CertManager>>,
    pub pool: Option<Arc<crate::proxy::pool::Pool>>,
    /// Endpoint state (latency, in flight, ejection) for `/debug/services`.
    pub balancer: Arc<crate::proxy::balance::Balancer>,
    /// HTTP counters and recent requests, for the dashboard.
    pub http: Arc<crate::proxy::http::Http>,
    /// Denials, handshake failures and rejected streams, by reason, for the dashboard.
    pub reasons: InboundMetrics,
}

/// The node dashboard: one self-contained page (no CDN, nothing fetched but this agent's
/// own `/debug/summary`), embedded in the binary.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The dashboard's rates and latencies per pod and per peer are over this much of the latest
/// requests.
const WINDOW_MS: u64 = 10_000;

type Resp = Response<Full<Bytes>>;

/// Connections served at once per listener.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// No admin connection lives longer (keep-alive included).
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Which paths a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything.
    Admin,
    /// `/metrics`, `/healthz`, `/readyz`.
    Stats,
}

/// `/debug/authz?pod=..&from=..&ip=..&port=..`: the policies that apply to a pod of this node,
/// and with a source and port the decision.
fn authz_query(idx: &crate::state::PodIndex, query: &str) -> Result<serde_json::Value, String> {
    let param = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='));
    let pod = param("pod").ok_or("pod=<namespace/name> is required")?;
    let p = idx.pods.iter().find(|p| p.key == pod && idx.is_local(p)).ok_or(format!("no pod {pod} on this node"))?;
    let port: u16 = match param("port") {
        Some(v) => v.parse().map_err(|_| format!("port={v} is not a port"))?,
        None => 0,
    };
    let dst = p.workload.authz_destination(port);
    let applies: Vec<&str> = idx.authz.iter().filter(|r| r.selects(dst)).map(|r| r.name.as_str()).collect();
    let mut out = serde_json::json!({"pod": pod, "applies": applies});
    if let Some(from) = param("from") {
        let id = crate::identity::Identity::parse(from).map_err(|e| e.to_string())?;
        let ip = match param("ip") {
            Some(v) => Some(v.parse::<std::net::Ipv4Addr>().map_err(|_| format!("ip={v} is not an IPv4 address"))?),
            None => None,
        };
        let decision = crate::authz::evaluate(&idx.authz, crate::authz::Peer { identity: &id, ip }, dst);
        let mut d = serde_json::json!({"result": decision.reason()});
        if let crate::authz::Decision::Denied(policy) = &decision {
            d["policy"] = serde_json::json!(policy);
        }
        out["from"] = serde_json::json!(from);
        out["ip"] = serde_json::json!(ip.map(|i| i.to_string()).unwrap_or_else(|| "not verified".into()));
        out["port"] = serde_json::json!(port);
        out["decision"] = d;
    }
    Ok(out)
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json<T: serde::Serialize>(v: &T) -> Resp {
    match serde_json::to_vec_pretty(v) {
        Ok(b) => respond(StatusCode::OK, "application/json", b),
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
    }
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, surface: Surface, stop: CancellationToken) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Some(permit) = crate::accept::slot(&slots, &stop).await else { return };
            let Some((stream, _)) = crate::accept::next(&stop, "admin", || listener.accept(), || ()).await else {
                return;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                this.serve_connection(stream, surface).await
            });
        }
    }

    /// The same endpoint on a Unix socket of this process's own (`adminSocket`): what the
    /// kubelet's exec probes ask (`mesh-agent probe`), so that while two agents share the admin
    /// port during a rolling update (SO_REUSEPORT), each pod's probes reach its own agent.
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener, stop: CancellationToken) {
        loop {
            let Some((stream, _)) = crate::accept::next(&stop, "admin socket", || listener.accept(), || ()).await
            else {
                return;
            };
            tokio::spawn(self.clone().serve_connection(stream, Surface::Admin));
        }
    }

    async fn serve_connection<S>(self: Arc<Self>, stream: S, surface: Surface)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.route(req, surface)) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), svc);
        match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
            Ok(Err(e)) => debug!(error = %e, "admin connection error"),
            Err(_) => debug!("admin connection closed: lifetime over"),
            Ok(Ok(())) => {}
        }
    }

    fn route(&self, req: Request<hyper::body::Incoming>, surface: Surface) -> Resp {
        if req.method() != Method::GET {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        if surface == Surface::Stats && !matches!(req.uri().path(), "/metrics" | "/healthz" | "/readyz") {
            return respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not here: this port serves /metrics, /healthz and /readyz; the dashboard and debug views are on the node's 127.0.0.1:15000 (`mesh-agent dashboard` opens them)\n",
            );
        }
        match req.uri().path() {
            "/metrics" => {
                let mut body = String::new();
                let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) if crate::metrics::wants_openmetrics(accept) => {
                        respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
                    }
                    Ok(()) => respond(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        crate::metrics::prometheus_text(&body),
                    ),
                    Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
                }
            }
            "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => {
                // Ready once serving, and holding a certificate for every meshed pod of the node.
                let missing = self.certs.as_ref().map_or_else(Vec::new, |c| {
                    let idx = self.pods.borrow().clone();
                    c.missing(&idx.wanted_identities(&self.trust_domain))
                });
                if !*self.ready.borrow() {
                    respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
                } else if !missing.is_empty() {
                    let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
                    let body = format!("not ready: no certificate yet for {}\n", list.join(", "));
                    respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body)
                } else {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                }
            }
            "/debug/pods" => {
                let idx = self.pods.borrow().clone();
                json(&idx.pods)
            }
            // The policies enforced here and what became of each Istio policy read; with
            // `?pod=ns/name[&from=<spiffe id>&port=<n>[&ip=<a.b.c.d>]]`, those that apply to
            // that pod and how such a connection would be decided.
            "/debug/authz" => {
                let idx = self.pods.borrow().clone();
                match req.uri().query() {
                    None => json(&serde_json::json!({"policies": idx.authz, "reports": idx.authz_reports})),
                    Some(q) => match authz_query(&idx, q) {
                        Ok(v) => json(&v),
                        Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                    },
                }
            }
            // Service virtual addresses and the ready endpoints the proxy balances over.
            // With each endpoint's latency estimate, requests in flight and ejection.
            "/debug/services" => {
                let idx = self.pods.borrow().clone();
                let view: BTreeMap<String, ServiceView> = idx
                    .services
                    .iter()
                    .map(|(vip, e)| {
                        let view = ServiceView {
                            service: &e.service,
                            protocol: e.protocol,
                            policy: &e.policy,
                            endpoints: &e.endpoints,
                            endpoint_state: self.balancer.view(&e.endpoints),
                        };
                        (vip.to_string(), view)
                    })
                    .collect();
                json(&view)
            }
            "/" => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
            "/debug/summary" => match self.summary() {
                Ok(b) => respond(StatusCode::OK, "application/json", b),
                Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            },
            "/debug/connections" => json(&self.conns.snapshot()),
            "/debug/certs" => json(&self.certs.as_ref().map(|c| c.status()).unwrap_or_default()),
            "/debug/pool" => json(&self.pool.as_ref().map(|p| p.snapshot()).unwrap_or_default()),
            "/debug/datapath" => {
                let guard = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
                json(&DatapathView::of(guard.as_ref()))
            }
            "/debug" => respond(
                StatusCode::OK,
                "text/plain",
                format!(
                    "switchyard mesh-agent on node {}\n\n/ (dashboard)\n/metrics\n/healthz\n/readyz\n/debug/summary\n/debug/pods\n/debug/authz\n/debug/services\n/debug/connections\n/debug/datapath\n/debug/certs\n/debug/pool\n",
                    self.node_name
                ),
            ),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// `/debug/datapath` and the dashboard's eBPF panel.
#[derive(Serialize)]
struct DatapathView<'a> {
    attached: bool,
    #[serde(flatten)]
    detail: Option<DatapathDetail<'a>>,
}

#[derive(Serialize)]
struct DatapathDetail<'a> {
    cgroup_root: &'a std::path::Path,
    sockmap_acceleration: &'a crate::datapath::AccelState,
    pinned: bool,
    superseded: bool,
    maps: crate::datapath::MapUsage,
    map_capacity: BTreeMap<&'static str, u32>,
    programs: BTreeMap<&'static str, bool>,
    events: BTreeMap<&'static str, u64>,
}

impl<'a> DatapathView<'a> {
    fn of(dp: Option<&'a Datapath>) -> Self {
        DatapathView {
            attached: dp.is_some(),
            detail: dp.map(|dp| DatapathDetail {
                cgroup_root: dp.cgroup_root(),
                sockmap_acceleration: dp.accel_state(),
                pinned: dp.pinned(),
                superseded: dp.superseded(),
                maps: dp.map_usage(),
                map_capacity: dp.map_capacity().into_iter().collect(),
                programs: dp.programs().into_iter().collect(),
                events: dp.stats().iter().map(|(s, v)| (s.name(), *v)).collect(),
            }),
        }
    }
}

/// One Service address in `/debug/services`.
#[derive(Serialize)]
struct ServiceView<'a> {
    service: &'a str,
    protocol: Option<crate::state::ProtocolHint>,
    policy: &'a crate::state::ServicePolicy,
    endpoints: &'a [std::net::SocketAddrV4],
    /// Each endpoint's latency estimate, requests in flight and ejection.
    endpoint_state: Vec<crate::proxy::balance::EndpointView>,
}

/// Everything the dashboard shows, in one JSON document (it polls `/debug/summary`).
#[derive(Serialize)]
struct Summary<'a> {
    node: &'a str,
    ready: bool,
    now_unix_ms: u64,
    agent: AgentStats,
    totals: Totals,
    /// The span the windowed rates are over.
    window_ms: u64,
    /// Denials, handshake failures and rejected streams by reason, from their counters.
    reasons: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    services: Vec<ServiceStats<'a>>,
    peers: Vec<PeerStats>,
    pods: Vec<PodStats<'a>>,
    /// Recent connection errors by message.
    errors: BTreeMap<String, u64>,
    /// Connections denied, by the DENY policy that denied them (policies that exist now).
    denials_by_policy: BTreeMap<String, u64>,
    ebpf: DatapathView<'a>,
}

#[derive(Serialize)]
struct AgentStats {
    cpu_seconds: f64,
    rss_bytes: u64,
    open_fds: u64,
}

#[derive(Serialize)]
struct Totals {
    http_requests: u64,
    http_retries: u64,
    retry_budget_exhausted: u64,
    timeouts: u64,
    limit_hits: u64,
    upstream_failures: u64,
    ejections: u64,
    connections_closed: u64,
    connections_active: usize,
}

/// A Service over the remembered requests.
#[derive(Serialize)]
struct ServiceStats<'a> {
    service: &'a str,
    requests: usize,
    errors: usize,
    retries: u64,
    p50_ms: f64,
    p99_ms: f64,
    last_unix_ms: u64,
}

/// Rates and latencies over the window.
#[derive(Serialize)]
struct WindowStats {
    requests_per_s: f64,
    errors_per_s: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

impl WindowStats {
    fn of(rs: &[&RequestRecord], span_ms: u64) -> Self {
        let d = sorted_durations(rs);
        let per_s = |n: usize| n as f64 * 1000.0 / span_ms as f64;
        WindowStats {
            requests_per_s: per_s(rs.len()),
            errors_per_s: per_s(rs.iter().filter(|r| r.status >= 500).count()),
            p50_ms: (!d.is_empty()).then(|| percentile(&d, 0.5)),
            p99_ms: (!d.is_empty()).then(|| percentile(&d, 0.99)),
        }
    }
}

/// A source and destination workload pair: connections (live and remembered), requests
/// (window).
#[derive(Serialize)]
struct PeerStats {
    source: String,
    destination: String,
    connections: u64,
    bytes: u64,
    errors: u64,
    security: String,
    #[serde(flatten)]
    window: WindowStats,
}

/// A pod of this node.
#[derive(Serialize)]
struct PodStats<'a> {
    pod: &'a str,
    workload: String,
    ip: std::net::Ipv4Addr,
    identity: String,
    meshed: bool,
    redirected: bool,
    reason: crate::state::MeshReason,
    mtls_mode: crate::state::MtlsMode,
    fail_mode: &'static str,
    cert_expires_in_secs: Option<i64>,
    connections_out: u64,
    bytes_out: u64,
    requests_out: usize,
    #[serde(flatten)]
    window: WindowStats,
}

/// The requests' durations, ascending (for [`percentile`]).
fn sorted_durations(rs: &[&RequestRecord]) -> Vec<f64> {
    let mut d: Vec<f64> = rs.iter().map(|r| r.duration_ms).collect();
    d.sort_by(|a, b| a.total_cmp(b));
    d
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The remembered requests, and the window of them the rates are over: the last
/// [`WINDOW_MS`], or fewer if the request buffer does not reach that far back (then over what
/// it holds).
struct Requests {
    recent: Vec<RequestRecord>,
    window_start: u64,
    span_ms: u64,
}

impl Requests {
    fn new(recent: Vec<RequestRecord>, now_ms: u64) -> Self {
        let window_start = now_ms.saturating_sub(WINDOW_MS);
        let span_ms = match recent.first() {
            Some(oldest) if recent.len() == crate::proxy::http::RECENT_REQUESTS && oldest.at_unix_ms > window_start => {
                (now_ms - oldest.at_unix_ms).max(1)
            }
            _ => WINDOW_MS,
        };
        Requests { recent, window_start, span_ms }
    }

    fn windowed(&self) -> impl Iterator<Item = &RequestRecord> {
        self.recent.iter().filter(|r| r.at_unix_ms >= self.window_start)
    }

    fn services(&self) -> Vec<ServiceStats<'_>> {
        let mut by_service: BTreeMap<&str, Vec<&RequestRecord>> = BTreeMap::new();
        for r in &self.recent {
            by_service.entry(&r.service).or_default().push(r);
        }
        by_service
            .into_iter()
            .map(|(service, rs)| {
                let d = sorted_durations(&rs);
                ServiceStats {
                    service,
                    requests: rs.len(),
                    errors: rs.iter().filter(|r| r.status >= 500).count(),
                    retries: rs.iter().map(|r| u64::from(r.retries)).sum(),
                    p50_ms: percentile(&d, 0.5),
                    p99_ms: percentile(&d, 0.99),
                    last_unix_ms: rs.last().map_or(0, |r| r.at_unix_ms),
                }
            })
            .collect()
    }
}

/// Pods by key → `namespace/workload` (Istio's grouping), for the peers.
struct Workloads(HashMap<String, String>);

impl Workloads {
    fn of(idx: &PodIndex) -> Self {
        Workloads(
            idx.pods
                .iter()
                .map(|p| (p.key.clone(), format!("{}/{}", p.workload.namespace, p.workload.workload_name())))
                .collect(),
        )
    }

    fn get(&self, pod: Option<&str>) -> Option<String> {
        pod.and_then(|p| self.0.get(p).cloned())
    }
}

#[derive(Default)]
struct Peer<'a> {
    connections: u64,
    bytes: u64,
    errors: u64,
    security: String,
    requests: Vec<&'a RequestRecord>,
}

fn peers(snap: &crate::proxy::conns::Snapshot, reqs: &Requests, wl: &Workloads) -> Vec<PeerStats> {
    let mut peers: BTreeMap<(String, String), Peer> = BTreeMap::new();
    for c in snap.recent.iter().chain(&snap.active) {
        let src = wl
            .get(c.source_pod.as_deref())
            .or_else(|| c.source_identity.clone())
            .unwrap_or_else(|| c.client.ip().to_string());
        let dst = wl.get(c.destination_pod.as_deref()).unwrap_or_else(|| c.original_dst.to_string());
        let e = peers.entry((src, dst)).or_default();
        e.connections += 1;
        e.bytes += c.bytes_sent + c.bytes_received;
        e.errors += u64::from(c.error.is_some());
        e.security = c.security.as_str().to_string();
    }
    for r in reqs.windowed() {
        let src = wl.get(Some(&r.source_pod)).unwrap_or_else(|| r.source_pod.clone());
        let dst = wl.get(r.destination_pod.as_deref()).unwrap_or_else(|| r.service.clone());
        peers.entry((src, dst)).or_default().requests.push(r);
    }
    peers
        .into_iter()
        .map(|((source, destination), p)| PeerStats {
            source,
            destination,
            connections: p.connections,
            bytes: p.bytes,
            errors: p.errors,
            security: p.security,
            window: WindowStats::of(&p.requests, reqs.span_ms),
        })
        .collect()
}

impl Admin {
    fn pods<'a>(&self, idx: &'a PodIndex, snap: &crate::proxy::conns::Snapshot, reqs: &Requests) -> Vec<PodStats<'a>> {
        // Per source pod of this node: connections and bytes (live and remembered).
        let mut pod_conns: HashMap<&str, (u64, u64)> = HashMap::new();
        for c in snap.recent.iter().chain(&snap.active) {
            if let Some(p) = c.source_pod.as_deref() {
                let e = pod_conns.entry(p).or_default();
                e.0 += 1;
                e.1 += c.bytes_sent + c.bytes_received;
            }
        }
        let certs: HashMap<String, i64> = self
            .certs
            .as_ref()
            .map(|c| c.status().into_iter().map(|s| (s.identity, s.expires_in_secs)).collect())
            .unwrap_or_default();
        idx.pods
            .iter()
            .filter(|p| p.cgroup_id.is_some())
            .map(|p| {
                let w = &p.workload;
                let id = w.spiffe_id(&self.trust_domain);
                let (connections_out, bytes_out) = pod_conns.get(p.key.as_str()).copied().unwrap_or_default();
                let out: Vec<&RequestRecord> = reqs.windowed().filter(|r| r.source_pod == p.key).collect();
                PodStats {
                    pod: &p.key,
                    workload: format!("{}/{}", w.namespace, w.workload_name()),
                    ip: w.ip,
                    cert_expires_in_secs: certs.get(&id).copied(),
                    identity: if w.meshed { id } else { "-".into() },
                    meshed: w.meshed,
                    redirected: p.redirected,
                    reason: w.reason,
                    mtls_mode: w.mtls_mode,
                    fail_mode: if w.fail_closed { "closed" } else { "open" },
                    connections_out,
                    bytes_out,
                    requests_out: reqs.recent.iter().filter(|r| r.source_pod == p.key).count(),
                    window: WindowStats::of(&out, reqs.span_ms),
                }
            })
            .collect()
    }

    /// `/debug/summary`. Works on a clone of the pod index (an Arc): the data plane's readers
    /// never wait on this low-priority thread's aggregation.
    fn summary(&self) -> serde_json::Result<Vec<u8>> {
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let (cpu_seconds, rss_bytes, open_fds) = crate::metrics::process_stats();
        let st = &self.http.stats;
        let reqs = Requests::new(self.http.recent(), now_ms);
        let idx = self.pods.borrow().clone();
        let snap = self.conns.snapshot();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for c in &snap.recent {
            if let Some(e) = &c.error {
                *errors.entry(e.chars().take(80).collect()).or_default() += 1;
            }
        }
        let r = &self.reasons;
        let dp = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
        let summary = Summary {
            node: &self.node_name,
            ready: *self.ready.borrow(),
            now_unix_ms: now_ms,
            agent: AgentStats { cpu_seconds, rss_bytes, open_fds },
            totals: Totals {
                http_requests: st.requests.get(),
                http_retries: st.retries.get(),
                retry_budget_exhausted: st.budget_exhausted.get(),
                timeouts: st.timeouts.get(),
                limit_hits: st.limit_hits.get(),
                upstream_failures: st.upstream_failures.get(),
                ejections: self.balancer.ejections_total.get(),
                connections_closed: snap.closed_total,
                connections_active: snap.active.len(),
            },
            window_ms: reqs.span_ms,
            reasons: [
                ("authorization_denials", r.denied.counts()),
                ("tls_handshake_failures", r.tls_failures.counts()),
                ("inbound_rejected", r.rejected.counts()),
            ]
            .into(),
            services: reqs.services(),
            peers: peers(&snap, &reqs, &Workloads::of(&idx)),
            pods: self.pods(&idx, &snap, &reqs),
            errors,
            denials_by_policy: r
                .by_policy
                .counts(|name| idx.authz.iter().any(|p| p.name == name))
                .into_iter()
                .collect(),
            ebpf: DatapathView::of(dp.as_ref()),
        };
        serde_json::to_vec_pretty(&summary)
    }
}
