//! The admin server (default port 15020), apart from the data plane: `/metrics`,
//! `/healthz`, `/readyz`, and JSON debug views of pods, connections and the datapath.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{datapath::Datapath, proxy::conns::Connections, reconcile::PodIndex};

pub struct Admin {
    pub registry: Registry,
    pub pods: watch::Receiver<Arc<PodIndex>>,
    pub conns: Arc<Connections>,
    pub datapath: Arc<std::sync::Mutex<Option<Datapath>>>,
    pub ready: watch::Receiver<bool>,
    pub node_name: String,
    pub certs: Option<Arc<crate::identity::manager::CertManager>>,
    pub pool: Option<Arc<crate::proxy::pool::Pool>>,
    /// Endpoint state (latency, in flight, ejection) for `/debug/services`.
    pub balancer: Arc<crate::proxy::balance::Balancer>,
}

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
            let this = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.route(req)) }
                });
                if let Err(e) =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
                {
                    debug!(error = %e, "admin connection error");
                }
            });
        }
    }

    fn route(&self, req: Request<hyper::body::Incoming>) -> Resp {
        if req.method() != Method::GET {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
                    }
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
                        "events": dp.stats().iter().map(|(s, v)| (s.name(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                    }),
                    None => serde_json::json!({ "attached": false }),
                };
                json(&v)
            }
            "/" => respond(
                StatusCode::OK,
                "text/plain",
                format!(
                    "switchyard mesh-agent on node {}\n\n/metrics\n/healthz\n/readyz\n/debug/pods\n/debug/services\n/debug/connections\n/debug/datapath\n/debug/certs\n/debug/pool\n",
                    self.node_name
                ),
            ),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// Address the admin server really bound (port 0 in tests).
pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}
