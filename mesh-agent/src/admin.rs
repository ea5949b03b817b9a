//! The admin server (default port 15020), apart from the data plane: `/metrics`,
//! `/healthz`, `/readyz`, and JSON debug views of pods, connections and the datapath.
use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{datapath::Datapath, proxy::conns::Connections, state::PodIndex};

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
}

/// The node dashboard: one self-contained page (no CDN, nothing fetched but this agent's
/// own `/debug/summary`), embedded in the binary.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The dashboard's rates and latencies per pod and per peer are over this much of the latest
/// requests.
const WINDOW_MS: u64 = 10_000;

type Resp = Response<Full<Bytes>>;

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
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            };
            tokio::spawn(self.clone().serve_connection(stream));
        }
    }

    /// The same endpoint on a Unix socket of this process's own (`adminSocket`): what the
    /// kubelet's exec probes ask (`mesh-agent probe`), so that while two agents share the admin
    /// port during a rolling update (SO_REUSEPORT), each pod's probes reach its own agent.
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener, stop: CancellationToken) {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            };
            tokio::spawn(self.clone().serve_connection(stream));
        }
    }

    async fn serve_connection<S>(self: Arc<Self>, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.route(req)) }
        });
        if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
            debug!(error = %e, "admin connection error");
        }
    }

    fn route(&self, req: Request<hyper::body::Incoming>) -> Resp {
        if req.method() != Method::GET {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
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
                if *self.ready.borrow() {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
                }
            }
            "/debug/pods" => json(&self.pods.borrow().pods),
            // Service virtual addresses and the ready endpoints the proxy balances over.
            // With each endpoint's latency estimate, requests in flight and ejection.
            "/debug/services" => {
                let idx = self.pods.borrow();
                let view: std::collections::BTreeMap<String, serde_json::Value> = idx
                    .services
                    .iter()
                    .map(|(vip, e)| {
                        (
                            vip.to_string(),
                            serde_json::json!({
                                "service": e.service,
                                "protocol": e.protocol,
                                "policy": e.policy,
                                "endpoints": e.endpoints,
                                "endpoint_state": self.balancer.view(&e.endpoints),
                            }),
                        )
                    })
                    .collect();
                json(&view)
            }
            "/" => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
            "/debug/summary" => json(&self.summary()),
            "/debug/connections" => json(&self.conns.snapshot()),
            "/debug/certs" => json(&self.certs.as_ref().map(|c| c.status()).unwrap_or_default()),
            "/debug/pool" => json(&self.pool.as_ref().map(|p| p.snapshot()).unwrap_or_default()),
            "/debug/datapath" => {
                let guard = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
                let v = match guard.as_ref() {
                    Some(dp) => serde_json::json!({
                        "attached": true,
                        "cgroup_root": dp.cgroup_root(),
                        "sockmap_acceleration": dp.accel_state(),
                        "pinned": dp.pinned(),
                        "superseded": dp.superseded(),
                        "maps": dp.map_usage(),
                    "map_capacity": dp.map_capacity().iter().map(|(m, n)| (*m, *n)).collect::<std::collections::BTreeMap<_, _>>(),
                    "programs": dp.programs().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                        "events": dp.stats().iter().map(|(s, v)| (s.name(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                    }),
                    None => serde_json::json!({ "attached": false }),
                };
                json(&v)
            }
            "/debug" => respond(
                StatusCode::OK,
                "text/plain",
                format!(
                    "switchyard mesh-agent on node {}\n\n/ (dashboard)\n/metrics\n/healthz\n/readyz\n/debug/summary\n/debug/pods\n/debug/services\n/debug/connections\n/debug/datapath\n/debug/certs\n/debug/pool\n",
                    self.node_name
                ),
            ),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// Denials, handshake failures and rejected streams by reason, read from the registry's own
/// counters (what `/metrics` exports): `{"authorization_denials": {"deny_rule": 2}, ...}`.
fn reason_counters(registry: &Registry) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
    let mut out: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> = Default::default();
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return out;
    }
    for family in ["authorization_denials", "tls_handshake_failures", "inbound_rejected"] {
        let prefix = format!("switchyard_{family}_total{{reason=\"");
        let m = out.entry(family.to_string()).or_default();
        for l in text.lines() {
            let Some(rest) = l.strip_prefix(&prefix) else { continue };
            let Some((reason, value)) = rest.split_once("\"}") else { continue };
            if let Ok(v) = value.trim().parse::<f64>() {
                m.insert(reason.to_string(), v as u64);
            }
        }
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

impl Admin {
    /// Everything the dashboard shows, in one JSON document (it polls this).
    fn summary(&self) -> serde_json::Value {
        use std::collections::BTreeMap;
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let (cpu, rss, fds) = crate::metrics::process_stats();
        let st = &self.http.stats;
        // Per Service, over the remembered requests.
        let mut by_service: BTreeMap<String, Vec<&crate::proxy::http::RequestRecord>> = BTreeMap::new();
        let recent = self.http.recent();
        for r in &recent {
            by_service.entry(r.service.clone()).or_default().push(r);
        }
        let services: Vec<serde_json::Value> = by_service
            .iter()
            .map(|(svc, rs)| {
                let mut d: Vec<f64> = rs.iter().map(|r| r.duration_ms).collect();
                d.sort_by(|a, b| a.total_cmp(b));
                serde_json::json!({
                    "service": svc,
                    "requests": rs.len(),
                    "errors": rs.iter().filter(|r| r.status >= 500).count(),
                    "retries": rs.iter().map(|r| u64::from(r.retries)).sum::<u64>(),
                    "p50_ms": percentile(&d, 0.5),
                    "p99_ms": percentile(&d, 0.99),
                    "last_unix_ms": rs.last().map_or(0, |r| r.at_unix_ms),
                })
            })
            .collect();
        // Pods by key: their workload (`namespace/workload`, Istio's grouping) for the peers.
        // A clone of the index (an Arc): the data plane's readers never wait on this
        // low-priority thread's aggregation.
        let idx = self.pods.borrow().clone();
        let workload_of: std::collections::HashMap<&str, String> = idx
            .pods
            .iter()
            .map(|p| (p.key.as_str(), format!("{}/{}", p.workload.namespace, p.workload.workload_name())))
            .collect();
        let wl = |pod: Option<&str>| pod.and_then(|p| workload_of.get(p).cloned());
        // Rates and latencies over the last WINDOW of requests (fewer if the request
        // buffer does not reach that far back: then over what it holds).
        let window_start = now_ms.saturating_sub(WINDOW_MS);
        let span_ms = match recent.first() {
            Some(oldest) if recent.len() == crate::proxy::http::RECENT_REQUESTS && oldest.at_unix_ms > window_start => {
                (now_ms - oldest.at_unix_ms).max(1)
            }
            _ => WINDOW_MS,
        };
        let windowed: Vec<&crate::proxy::http::RequestRecord> =
            recent.iter().filter(|r| r.at_unix_ms >= window_start).collect();
        let window_stats = |rs: &[&crate::proxy::http::RequestRecord]| {
            let mut d: Vec<f64> = rs.iter().map(|r| r.duration_ms).collect();
            d.sort_by(|a, b| a.total_cmp(b));
            serde_json::json!({
                "requests_per_s": rs.len() as f64 * 1000.0 / span_ms as f64,
                "errors_per_s": rs.iter().filter(|r| r.status >= 500).count() as f64 * 1000.0 / span_ms as f64,
                "p50_ms": (!d.is_empty()).then(|| percentile(&d, 0.5)),
                "p99_ms": (!d.is_empty()).then(|| percentile(&d, 0.99)),
            })
        };
        // Per peer workload pair: connections (live and remembered) and requests (window).
        #[derive(Default)]
        struct Peer<'a> {
            connections: u64,
            bytes: u64,
            errors: u64,
            security: String,
            requests: Vec<&'a crate::proxy::http::RequestRecord>,
        }
        let snap = self.conns.snapshot();
        let mut peers: BTreeMap<(String, String), Peer> = BTreeMap::new();
        // Per source pod of this node too: connections and bytes (live and remembered).
        let mut pod_conns: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for c in snap.recent.iter().chain(&snap.active) {
            if let Some(p) = c.source_pod.as_deref() {
                let e = pod_conns.entry(p).or_default();
                e.0 += 1;
                e.1 += c.bytes_sent + c.bytes_received;
            }
            let src = wl(c.source_pod.as_deref())
                .or_else(|| c.source_identity.clone())
                .unwrap_or_else(|| c.client.ip().to_string());
            let dst = wl(c.destination_pod.as_deref()).unwrap_or_else(|| c.original_dst.to_string());
            let e = peers.entry((src, dst)).or_default();
            e.connections += 1;
            e.bytes += c.bytes_sent + c.bytes_received;
            e.errors += u64::from(c.error.is_some());
            e.security =
                serde_json::to_value(c.security).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        }
        for r in &windowed {
            let src = wl(Some(&r.source_pod)).unwrap_or_else(|| r.source_pod.clone());
            let dst = wl(r.destination_pod.as_deref()).unwrap_or_else(|| r.service.clone());
            peers.entry((src, dst)).or_default().requests.push(r);
        }
        let peers: Vec<serde_json::Value> = peers
            .into_iter()
            .map(|((src, dst), p)| {
                let mut v = window_stats(&p.requests);
                let extra = serde_json::json!({"source": src, "destination": dst, "connections": p.connections,
                    "bytes": p.bytes, "errors": p.errors, "security": p.security});
                if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
                    o.extend(e);
                }
                v
            })
            .collect();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for c in &snap.recent {
            if let Some(e) = &c.error {
                *errors.entry(e.chars().take(80).collect()).or_default() += 1;
            }
        }
        let certs: BTreeMap<String, i64> = self
            .certs
            .as_ref()
            .map(|c| c.status().into_iter().map(|s| (s.identity, s.expires_in_secs)).collect())
            .unwrap_or_default();
        let pods: Vec<serde_json::Value> = idx
            .pods
            .iter()
            .filter(|p| p.cgroup_id.is_some())
            .map(|p| {
                let w = &p.workload;
                let id = w.spiffe_id(&self.trust_domain);
                let key = &p.key;
                let (conns_out, bytes_out) = pod_conns.get(key.as_str()).copied().unwrap_or_default();
                let out: Vec<&crate::proxy::http::RequestRecord> =
                    windowed.iter().copied().filter(|r| &r.source_pod == key).collect();
                let mut v = window_stats(&out);
                let extra = serde_json::json!({
                    "pod": key,
                    "workload": format!("{}/{}", w.namespace, w.workload_name()),
                    "ip": w.ip,
                    "identity": if w.meshed { id.clone() } else { "-".into() },
                    "meshed": w.meshed,
                    "redirected": p.redirected,
                    "reason": w.reason,
                    "mtls_mode": w.mtls_mode,
                    "fail_mode": if w.fail_closed { "closed" } else { "open" },
                    "cert_expires_in_secs": certs.get(&id).copied(),
                    "connections_out": conns_out,
                    "bytes_out": bytes_out,
                    "requests_out": recent.iter().filter(|r| &r.source_pod == key).count(),
                });
                if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
                    o.extend(e);
                }
                v
            })
            .collect();
        drop(idx);
        let ebpf = {
            let guard = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(dp) => serde_json::json!({
                    "attached": true,
                    "pinned": dp.pinned(),
                    "acceleration": dp.accel_state(),
                    "maps": dp.map_usage(),
                    "map_capacity": dp.map_capacity().iter().map(|(m, n)| (*m, *n)).collect::<BTreeMap<_, _>>(),
                    "programs": dp.programs().into_iter().collect::<BTreeMap<_, _>>(),
                    "events": dp.stats().iter().map(|(s, v)| (s.name(), *v)).collect::<BTreeMap<_, _>>(),
                }),
                None => serde_json::json!({"attached": false}),
            }
        };
        serde_json::json!({
            "node": self.node_name,
            "ready": *self.ready.borrow(),
            "now_unix_ms": now_ms,
            "agent": {"cpu_seconds": cpu, "rss_bytes": rss, "open_fds": fds},
            "totals": {
                "http_requests": st.requests.get(),
                "http_retries": st.retries.get(),
                "retry_budget_exhausted": st.budget_exhausted.get(),
                "timeouts": st.timeouts.get(),
                "limit_hits": st.limit_hits.get(),
                "upstream_failures": st.upstream_failures.get(),
                "ejections": self.balancer.ejections_total.get(),
                "connections_closed": snap.closed_total,
                "connections_active": snap.active.len(),
            },
            "window_ms": span_ms,
            "reasons": reason_counters(&self.registry),
            "services": services,
            "peers": peers,
            "pods": pods,
            "errors": errors,
            "ebpf": ebpf,
        })
    }
}
