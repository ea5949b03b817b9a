//! Outbound: the listener the eBPF programs send meshed pods' connections to.
//!
//! On accept: take the original destination recorded by the kernel for this client address
//! (never guess: no record, no forwarding), identify the source pod by the cgroup in the
//! record, then route:
//! * destination is a meshed pod on this node: authorize here, connect directly (`local`);
//! * destination is a meshed pod on another node: HBONE (mTLS, HTTP/2 CONNECT) to that node's
//!   proxy, which authorizes (`mutual_tls`);
//! * anything else: plain TCP from the proxy (`plaintext`).
//!
//! A destination that is a Service's virtual address (ClusterIP:port) is first replaced by one
//! of its ready endpoints (`balance`: power of two choices over peak-EWMA connect latency and
//! connections in flight), then routed as above: meshed pods reach Services without
//! kube-proxy. A failed direct connect to an endpoint (refused, unreachable, timed out) is
//! retried on another endpoint, up to [`MAX_CONNECT_ATTEMPTS`] in all, with jittered
//! exponential backoff.
//!
//! Bytes are copied both ways until both sides finish, each half-close propagated on its own.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    authz::{self, Decision},
    datapath::{OrigDstLookup, Original},
    identity::Identity,
    metrics::{DirectionLabels, ProxyMetrics, RouteLabels},
    proxy::{
        balance::{self, Balancer},
        conns::{ConnRecord, Connections, Security},
        detect::{self, Hint, Protocol},
        http,
        pool::Pool,
    },
    reconcile::PodIndex,
};

pub struct Outbound {
    pub lookup: Arc<dyn OrigDstLookup>,
    pub pods: watch::Receiver<Arc<PodIndex>>,
    pub metrics: ProxyMetrics,
    pub conns: Arc<Connections>,
    pub connect_timeout: Duration,
    /// Close a proxied connection after this long without a byte either way (`None`: never).
    pub idle_timeout: Option<Duration>,
    pub copy_buffer: usize,
    pub trust_domain: String,
    /// HBONE client; `None` when no CA is configured (then other nodes' meshed pods are
    /// unreachable rather than silently reached in plaintext).
    pub pool: Option<Arc<Pool>>,
    pub hbone_port: u16,
    /// Service endpoint choice (shared by all connections).
    pub balancer: Arc<Balancer>,
    /// Connections open per Service virtual address, for `switchyard.io/max-connections`.
    pub open_per_service: Arc<std::sync::Mutex<std::collections::HashMap<std::net::SocketAddrV4, u32>>>,
    /// HTTP to Services: limits, budgets, counters.
    pub http: Arc<http::Http>,
    /// Istio's standard metrics (reporter `source`).
    pub istio: crate::metrics::IstioMetrics,
    pub detect: DetectConfig,
}

/// Protocol detection settings (see `detect`).
#[derive(Debug, Clone)]
pub struct DetectConfig {
    pub sniff_timeout: Duration,
    pub http_ports: Vec<u16>,
    pub opaque_ports: Vec<u16>,
    pub retry_body_limit: usize,
    /// Propagate W3C trace context on HTTP requests (create it when absent).
    pub trace_context: bool,
    /// Share (0..1) of the traces the proxy starts that are marked sampled.
    pub trace_sample_rate: f64,
    /// OTLP export of the proxy's request spans (`None`: off).
    pub spans: Option<crate::otlp::Spans>,
    pub access_log: crate::config::AccessLog,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            sniff_timeout: crate::config::DEFAULT_SNIFF_TIMEOUT,
            http_ports: vec![],
            opaque_ports: crate::config::DEFAULT_OPAQUE_PORTS.to_vec(),
            retry_body_limit: crate::config::DEFAULT_RETRY_BODY_LIMIT,
            trace_context: true,
            trace_sample_rate: 1.0,
            spans: None,
            access_log: Default::default(),
        }
    }
}

/// Holds one of a Service's connection slots until dropped.
struct ServiceSlot {
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::SocketAddrV4, u32>>>,
    vip: std::net::SocketAddrV4,
}

impl Drop for ServiceSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.vip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.vip);
            }
        }
    }
}

/// Connect attempts for a connection to a Service, first one included.
pub const MAX_CONNECT_ATTEMPTS: u32 = 3;

/// The other endpoints a failed connect may be retried on.
struct ServiceTarget {
    vip: std::net::SocketAddrV4,
    endpoints: Vec<std::net::SocketAddrV4>,
    /// `namespace/name`.
    name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no original destination recorded for client {0}: the connection did not come through the mesh's redirect")]
    NoOriginalDst(SocketAddr),
    #[error("original-destination lookup failed: {0}")]
    Lookup(std::io::Error),
    #[error("connecting to {dst} timed out after {timeout:?}; maybe a NetworkPolicy or firewall drops it")]
    ConnectTimeout { dst: SocketAddr, timeout: Duration },
    #[error("connecting to {dst} failed: {source}")]
    Connect { dst: SocketAddr, source: std::io::Error },
    #[error("service {0} has no ready endpoint")]
    NoEndpoints(std::net::SocketAddrV4),
    #[error(
        "service {service} ({vip}) is at its limit of {limit} open connections (switchyard.io/max-connections); reset at once"
    )]
    ConnectionLimit { service: String, vip: std::net::SocketAddrV4, limit: u32 },
    #[error("{detail}")]
    Tunnel { dst: SocketAddr, reason: &'static str, detail: String },
}

impl OutboundError {
    fn reason(&self) -> &'static str {
        match self {
            OutboundError::NoOriginalDst(_) => "no_original_dst",
            OutboundError::Lookup(_) => "lookup_failed",
            OutboundError::ConnectTimeout { .. } => "connect_timeout",
            OutboundError::NoEndpoints(_) => "no_endpoints",
            OutboundError::ConnectionLimit { .. } => "connection_limit",
            OutboundError::Connect { .. } => "connect_failed",
            OutboundError::Tunnel { reason, .. } => reason,
        }
    }
}

/// The upstream side of a connection, once open.
struct Connected {
    io: http::UpstreamIo,
    /// The endpoint finally connected to (after any connect retries).
    ep: std::net::SocketAddrV4,
    route: Route,
    in_flight: Option<balance::InFlight>,
}

/// Where one connection goes.
#[derive(Debug, Clone)]
enum Route {
    Local {
        dst: Identity,
    },
    Hbone {
        src: Identity,
        /// The source pod's address, sent along (`Forwarded: for=`) so the destination node
        /// can name its workload; it trusts it only if that pod has the verified identity.
        src_ip: std::net::Ipv4Addr,
        dst: Identity,
        peer: SocketAddr,
    },
    Passthrough,
    /// `denial`: refused by authorization policy (counted as a denial too).
    Refuse {
        reason: &'static str,
        detail: String,
        denial: bool,
    },
}

impl Route {
    fn label(&self) -> &'static str {
        match self {
            Route::Local { .. } => "local",
            Route::Hbone { .. } => "hbone",
            Route::Passthrough => "passthrough",
            Route::Refuse { .. } => "refused",
        }
    }
}

impl Outbound {
    /// Serves until `stop` is cancelled. Connections in flight are tracked by `tasks` so the
    /// caller can let them drain.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken, tasks: TaskTracker) {
        loop {
            let (client, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "outbound accept failed");
                        self.metrics.error("accept_failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let this = self.clone();
            let stop = stop.clone();
            tasks.spawn(async move { this.handle(client, peer, stop).await });
        }
    }

    fn route(&self, orig: &Original) -> (Route, Option<String>, Option<String>) {
        let idx = self.pods.borrow();
        let src = idx.by_cgroup(orig.pod_cgroup);
        let src_key = src.map(|p| p.key.clone());
        let dst = idx.by_ip(*orig.dst.ip());
        let dst_key = dst.map(|p| p.key.clone());
        let Some(src) = src else {
            let detail = format!("cgroup {} is not a known pod of this node", orig.pod_cgroup);
            return (Route::Refuse { reason: "unknown_source", detail, denial: false }, src_key, dst_key);
        };
        let src_id = src.workload.identity(&self.trust_domain);
        let route = match dst {
            Some(d) if d.workload.meshed && idx.is_local(d) => {
                let dst_id = d.workload.identity(&self.trust_domain);
                match authz::evaluate(&idx.authz, &src_id, &d.workload, orig.dst.port()) {
                    Decision::Allow => Route::Local { dst: dst_id },
                    decision => {
                        let detail = format!(
                            "connection from {src_id} to {dst_id} ({}) denied by authorization policy ({})",
                            orig.dst,
                            match &decision {
                                Decision::Denied(rule) => format!("deny rule {rule}"),
                                _ => "no allow rule matches".into(),
                            }
                        );
                        Route::Refuse { reason: decision.reason(), detail, denial: true }
                    }
                }
            }
            Some(d) if d.workload.meshed => {
                let dst_id = d.workload.identity(&self.trust_domain);
                match (idx.nodes.get(&d.workload.node), &self.pool) {
                    (Some(node), Some(_)) => Route::Hbone {
                        src: src_id,
                        src_ip: src.workload.ip,
                        dst: dst_id,
                        peer: SocketAddr::from((node.address, self.hbone_port)),
                    },
                    (None, _) => Route::Refuse {
                        reason: "unknown_node",
                        detail: format!("pod {} is on node {}, whose address is unknown", d.key, d.workload.node),
                        denial: false,
                    },
                    (_, None) => Route::Refuse {
                        reason: "mtls_unavailable",
                        detail: format!("pod {} is meshed on another node but this agent has no CA configured", d.key),
                        denial: false,
                    },
                }
            }
            _ => Route::Passthrough,
        };
        (route, src_key, dst_key)
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr, stop: CancellationToken) {
        self.metrics.opened.inc();
        let orig = match self.lookup.take(peer) {
            Ok(Some(o)) => o,
            Ok(None) => return self.reject(client, OutboundError::NoOriginalDst(peer)),
            Err(e) => return self.reject(client, OutboundError::Lookup(e)),
        };
        if let Some(p) = self.pods.borrow().by_cgroup(orig.pod_cgroup) {
            self.metrics.pod_redirects.inc(&p.key);
        }
        // A Service from a known pod: HTTP is served request by request.
        let hint = self.hint(&orig);
        let protocol = match hint {
            Some(hint) => {
                let hinted_wait = self.idle_timeout.unwrap_or(Duration::from_secs(3600));
                detect::detect(&client, hint, self.detect.sniff_timeout, hinted_wait).await
            }
            None => Protocol::Tcp,
        };
        if protocol != Protocol::Tcp {
            return self.handle_http(client, peer, orig, protocol, stop).await;
        }
        let mut orig = orig;
        // The slot (for `switchyard.io/max-connections`) is held until the connection ends.
        let (service, _slot) = match self.resolve_service(&mut orig) {
            Ok(Some((target, slot))) => (Some(target), slot),
            Ok(None) => (None, None),
            Err(e) => return self.reject(client, e),
        };
        let (route, source_pod, destination_pod) = self.route(&orig);
        self.metrics.routes.get_or_create(&RouteLabels { route: route.label() }).inc();
        let source_identity = match &route {
            Route::Hbone { src, .. } => Some(src.to_string()),
            _ => None,
        };
        let id = self.conns.open(ConnRecord {
            client: peer,
            source_pod,
            source_identity,
            original_dst: service.as_ref().map_or(orig.dst, |s| s.vip),
            endpoint: service.as_ref().map(|_| orig.dst),
            destination_pod,
            protocol: hint.map(|_| "tcp"),
            ..Default::default()
        });
        self.metrics.active.inc();
        let started = Instant::now();
        let service_name = service.as_ref().map(|s| s.name.as_str());
        // Istio's labels are those of the endpoint finally reached (a connect retry may have
        // gone another way than the first pick); a connection that never got through carries
        // those of its first pick.
        let first_labels = self.istio_labels(&orig, orig.dst, service_name, &route, "tcp");
        let (istio, (sent, received, error)) = match self.connect(id, orig, route, service.as_ref()).await {
            Ok(up) => {
                // The route follows from the endpoint: the first pick's labels stand unless a
                // retry reached another endpoint.
                let istio = match up.ep == orig.dst {
                    true => first_labels,
                    false => self.istio_labels(&orig, up.ep, service_name, &up.route, "tcp"),
                };
                self.istio.tcp_opened.get_or_create(&istio).inc();
                let _in_flight = up.in_flight;
                let r = match self.copy(client, up.io).await {
                    Ok((s, r)) => (s, r, None),
                    Err((s, r, e)) => (s, r, Some(e)),
                };
                (istio, r)
            }
            Err(e) => {
                reset(client);
                self.istio.tcp_opened.get_or_create(&first_labels).inc();
                (first_labels, (0, 0, Some(e)))
            }
        };
        self.metrics.active.dec();
        self.metrics.closed.inc();
        self.metrics.bytes.get_or_create(&DirectionLabels { direction: "sent" }).inc_by(sent);
        self.metrics.bytes.get_or_create(&DirectionLabels { direction: "received" }).inc_by(received);
        self.istio.tcp_closed.get_or_create(&istio).inc();
        self.istio.tcp_received.get_or_create(&istio).inc_by(sent);
        self.istio.tcp_sent.get_or_create(&istio).inc_by(received);
        if let Some(rec) = self.conns.close(id, started.elapsed(), sent, received, error)
            && self.detect.access_log.wants(rec.error.is_some())
        {
            info!(
                target: "access",
                direction = "outbound",
                kind = "tcp",
                client = %rec.client,
                src = rec.source_pod.as_deref().unwrap_or("-"),
                dst = %rec.original_dst,
                endpoint = rec.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
                retries = rec.retries,
                dst_pod = rec.destination_pod.as_deref().unwrap_or("-"),
                dst_identity = rec.destination_identity.as_deref().unwrap_or("-"),
                security = ?rec.security,
                sent, received,
                duration_ms = rec.duration_ms,
                error = rec.error.as_deref().unwrap_or("-"),
                "outbound connection"
            );
        }
    }

    /// Istio labels (reporter `source`) for a connection or request from `orig`'s pod to `ep`.
    fn istio_labels(
        &self,
        orig: &Original,
        ep: std::net::SocketAddrV4,
        service: Option<&str>,
        route: &Route,
        protocol: &'static str,
    ) -> crate::metrics::IstioLabels {
        let idx = self.pods.borrow();
        let mut l = crate::metrics::IstioLabels::unknown("source", protocol);
        if let Some(src) = idx.by_cgroup(orig.pod_cgroup) {
            l = l.source(&src.workload, &self.trust_domain);
        }
        if let Some(dst) = idx.by_ip(*ep.ip()) {
            l = l.destination(&dst.workload, &self.trust_domain);
        }
        if let Some(s) = service {
            l = l.service(s);
        }
        l.connection_security_policy = if matches!(route, Route::Hbone { .. }) { "mutual_tls" } else { "none" };
        l
    }

    /// Whether and how to detect the protocol: only for a Service, from a pod of this node.
    fn hint(&self, orig: &Original) -> Option<Hint> {
        let idx = self.pods.borrow();
        let entry = idx.services.get(&orig.dst)?;
        idx.by_cgroup(orig.pod_cgroup)?;
        let port = orig.dst.port();
        Some(match entry.protocol {
            Some(crate::state::ProtocolHint::Http) => Hint::Http,
            Some(crate::state::ProtocolHint::Opaque) => Hint::Opaque,
            None if self.detect.http_ports.contains(&port) => Hint::Http,
            None if self.detect.opaque_ports.contains(&port) => Hint::Opaque,
            None => Hint::None,
        })
    }

    async fn handle_http(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        orig: Original,
        protocol: Protocol,
        stop: CancellationToken,
    ) {
        let _ = client.set_nodelay(true);
        let source_pod = self.pods.borrow().by_cgroup(orig.pod_cgroup).map(|p| p.key.clone());
        self.metrics.routes.get_or_create(&RouteLabels { route: "http" }).inc();
        let id = self.conns.open(ConnRecord {
            client: peer,
            source_pod,
            original_dst: orig.dst,
            protocol: Some(protocol.label()),
            ..Default::default()
        });
        self.metrics.active.inc();
        let started = Instant::now();
        let ds = Arc::new(http::Downstream::new(self.clone(), orig, orig.dst, id, protocol));
        let counted = Counting::new(client);
        let (from_client, to_client) = (counted.read.clone(), counted.written.clone());
        let result = ds.clone().serve(counted, stop).await;
        let (sent, received) = (from_client.load(Ordering::Relaxed), to_client.load(Ordering::Relaxed));
        self.metrics.active.dec();
        self.metrics.closed.inc();
        let requests = ds.requests.load(std::sync::atomic::Ordering::Relaxed);
        self.conns.set_requests(id, requests);
        let error = result.err().map(|e| e.to_string());
        self.metrics.bytes.get_or_create(&DirectionLabels { direction: "sent" }).inc_by(sent);
        self.metrics.bytes.get_or_create(&DirectionLabels { direction: "received" }).inc_by(received);
        if let Some(rec) = self.conns.close(id, started.elapsed(), sent, received, error)
            && self.detect.access_log.wants(rec.error.is_some())
        {
            info!(
                target: "access",
                direction = "outbound",
                kind = "http_connection",
                client = %rec.client,
                src = rec.source_pod.as_deref().unwrap_or("-"),
                dst = %rec.original_dst,
                protocol = protocol.label(),
                requests,
                sent, received,
                duration_ms = rec.duration_ms,
                error = rec.error.as_deref().unwrap_or("-"),
                "outbound connection"
            );
        }
    }

    /// Opens the upstream side for `orig` along `route`. For a Service, a failed connect
    /// (refused, unreachable, timed out, or an HBONE tunnel the peer node could not open) is
    /// retried on another endpoint, whichever way it is reached (jittered backoff, at most
    /// [`MAX_CONNECT_ATTEMPTS`] in all); an authorization denial is final. Returns the
    /// endpoint connected to, its route, and the guard that counts it as in flight.
    async fn connect(
        &self,
        id: u64,
        orig: Original,
        route: Route,
        service: Option<&ServiceTarget>,
    ) -> Result<Connected, String> {
        if let Route::Refuse { reason, detail, denial } = route {
            warn!(dst = %orig.dst, reason, "{detail}");
            self.metrics.error(reason);
            if denial {
                self.metrics.denials.get_or_create(&crate::metrics::ErrorLabels { reason }).inc();
            }
            return Err(detail);
        }
        let Some(svc) = service else {
            let io = self.open_route(orig.dst, &route).await.map_err(|e| e.to_string())?;
            self.note_security(id, &route);
            return Ok(Connected { io, ep: orig.dst, route, in_flight: None });
        };
        let (mut ep, mut route) = (orig.dst, route);
        let mut tried = Vec::new();
        loop {
            let guard = self.balancer.start(ep);
            let started = Instant::now();
            let err = match self.open_route(ep, &route).await {
                Ok(io) => {
                    self.balancer.connected(ep, started.elapsed());
                    self.note_security(id, &route);
                    return Ok(Connected { io, ep, route, in_flight: Some(guard) });
                }
                Err(e) => e,
            };
            drop(guard);
            // Not the endpoint's fault, and every other endpoint would fail the same: the peer
            // node refused it by policy, or this agent has no certificate for the source yet.
            if matches!(err.reason(), "hbone_denied" | "no_source_certificate") {
                return Err(err.to_string());
            }
            self.balancer.failed(ep, &svc.endpoints, started.elapsed());
            tried.push(ep);
            // The peer node itself failed (unreachable, TLS): its other endpoints would too.
            let dead_peer = match (&route, err.reason()) {
                (
                    Route::Hbone { peer, .. },
                    "hbone_connect_failed" | "hbone_connect_timeout" | "hbone_tls_failed" | "connect_timeout",
                ) => Some(*peer),
                _ => None,
            };
            let attempt = tried.len() as u32;
            // Another endpoint, reached whichever way, that policy lets this pod reach.
            let next = (attempt < MAX_CONNECT_ATTEMPTS)
                .then(|| {
                    let mut excluded = tried.clone();
                    loop {
                        let c = self.balancer.pick(&svc.endpoints, &excluded)?;
                        let (r, _, dst_pod) = self.route(&Original { dst: c, ..orig });
                        let behind_dead_peer =
                            matches!((&r, dead_peer), (Route::Hbone { peer, .. }, Some(dead)) if *peer == dead);
                        if !matches!(r, Route::Refuse { .. }) && !behind_dead_peer {
                            return Some((c, r, dst_pod));
                        }
                        excluded.push(c);
                    }
                })
                .flatten();
            let Some((c, r, dst_pod)) = next else { return Err(err.to_string()) };
            warn!(service = %svc.vip, failed = %ep, retry = %c, attempt, error = %err, "endpoint connect failed; retrying on another endpoint");
            self.metrics.error("endpoint_retry");
            tokio::time::sleep(balance::backoff(attempt)).await;
            self.conns.set_endpoint(id, c, dst_pod, attempt);
            (ep, route) = (c, r);
        }
    }

    /// One connect attempt to `ep` along `route` (never `Refuse`), within the connect timeout.
    async fn open_route(&self, ep: std::net::SocketAddrV4, route: &Route) -> Result<http::UpstreamIo, OutboundError> {
        let dst = SocketAddr::V4(ep);
        let attempt = async {
            match route {
                Route::Hbone { src, src_ip, dst: dst_id, peer } => {
                    let pool = self.pool.as_ref().expect("route() only picks HBONE with a pool");
                    pool.connect(src, *src_ip, dst_id, *peer, ep)
                        .await
                        .map(|t| http::UpstreamIo::Tunnel(Box::new(t)))
                        .map_err(|e| {
                            warn!(%src, dst = %dst_id, %peer, error = %e, "HBONE tunnel failed");
                            OutboundError::Tunnel { dst, reason: e.reason(), detail: e.to_string() }
                        })
                }
                Route::Local { .. } | Route::Passthrough => match TcpStream::connect(dst).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        Ok(http::UpstreamIo::Tcp(s))
                    }
                    Err(source) => Err(OutboundError::Connect { dst, source }),
                },
                Route::Refuse { reason, detail, .. } => {
                    Err(OutboundError::Tunnel { dst, reason, detail: detail.clone() })
                }
            }
        };
        let r = match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(OutboundError::ConnectTimeout { dst, timeout: self.connect_timeout }),
        };
        if let Err(e) = &r {
            self.metrics.error(e.reason());
        }
        r
    }

    fn note_security(&self, id: u64, route: &Route) {
        let (security, dst_id) = match route {
            Route::Local { dst } => (Security::Local, Some(dst.to_string())),
            Route::Hbone { dst, .. } => (Security::MutualTls, Some(dst.to_string())),
            _ => (Security::Plaintext, None),
        };
        self.conns.set_security(id, security, dst_id);
    }

    /// For a Service's virtual address: takes one of its connection slots if it has a limit,
    /// and replaces `orig.dst` by the endpoint the balancer picks. `None`: not a Service.
    fn resolve_service(
        &self,
        orig: &mut Original,
    ) -> Result<Option<(ServiceTarget, Option<ServiceSlot>)>, OutboundError> {
        let idx = self.pods.borrow();
        let Some(entry) = idx.services.get(&orig.dst) else { return Ok(None) };
        let vip = orig.dst;
        let slot = match entry.policy.max_connections {
            Some(limit) => {
                let mut open = self.open_per_service.lock().unwrap_or_else(|p| p.into_inner());
                let n = open.entry(vip).or_insert(0);
                if *n >= limit {
                    return Err(OutboundError::ConnectionLimit { service: entry.service.clone(), vip, limit });
                }
                *n += 1;
                Some(ServiceSlot { open: self.open_per_service.clone(), vip })
            }
            None => None,
        };
        let ep = self.balancer.pick(&entry.endpoints, &[]).ok_or(OutboundError::NoEndpoints(vip))?;
        orig.dst = ep;
        Ok(Some((ServiceTarget { vip, endpoints: entry.endpoints.clone(), name: entry.service.clone() }, slot)))
    }

    async fn copy<U: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: TcpStream,
        mut upstream: U,
    ) -> Result<(u64, u64), (u64, u64, String)> {
        let _ = client.set_nodelay(true);
        match super::idle::copy_bidirectional(&mut client, &mut upstream, self.copy_buffer, self.idle_timeout).await {
            Ok((s, r)) => {
                let _ = client.shutdown().await;
                Ok((s, r))
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                self.metrics.error("idle_timeout");
                debug!(error = %e, "outbound connection closed for idleness");
                Err((0, 0, format!("idle timeout: {e}")))
            }
            Err(e) => {
                self.metrics.error("io");
                debug!(error = %e, "outbound copy ended with an error");
                // The client learns the connection failed (a reset, as the upstream's failure
                // would have told it without a proxy), never a clean but empty end.
                reset(client);
                // copy_bidirectional loses its counts on error; report what we know.
                Err((0, 0, e.to_string()))
            }
        }
    }

    fn reject(&self, client: TcpStream, e: OutboundError) {
        warn!(error = %e, "outbound connection closed");
        self.metrics.error(e.reason());
        self.metrics.closed.inc();
        reset(client);
    }
}

impl http::Upstreams for Outbound {
    fn service(&self, vip: std::net::SocketAddrV4) -> Option<crate::state::ServiceEntry> {
        self.pods.borrow().services.get(&vip).cloned()
    }

    async fn open(
        &self,
        orig: Original,
        ep: std::net::SocketAddrV4,
    ) -> Result<(http::UpstreamIo, Option<String>), http::UpstreamError> {
        let (route, _, dst_pod) = self.route(&Original { dst: ep, ..orig });
        match route {
            Route::Local { .. } | Route::Passthrough => match TcpStream::connect(ep).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    Ok((http::UpstreamIo::Tcp(s), dst_pod))
                }
                Err(e) => {
                    self.metrics.error("connect_failed");
                    Err(http::UpstreamError { denied: false, reason: "connect_failed", detail: e.to_string() })
                }
            },
            Route::Hbone { src, src_ip, dst, peer } => {
                let pool = self.pool.as_ref().expect("route() only picks HBONE with a pool");
                match pool.connect(&src, src_ip, &dst, peer, ep).await {
                    Ok(t) => Ok((http::UpstreamIo::Tunnel(Box::new(t)), dst_pod)),
                    Err(e) => {
                        self.metrics.error(e.reason());
                        // The peer node's authorization said no: a 403 for the client, as a
                        // same-node denial is, never retried elsewhere.
                        let denied = e.reason() == "hbone_denied";
                        Err(http::UpstreamError { denied, reason: e.reason(), detail: e.to_string() })
                    }
                }
            }
            Route::Refuse { reason, detail, denial } => {
                self.metrics.error(reason);
                if denial {
                    self.metrics.denials.get_or_create(&crate::metrics::ErrorLabels { reason }).inc();
                }
                Err(http::UpstreamError { denied: denial, reason, detail })
            }
        }
    }

    fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    fn http(&self) -> &http::Http {
        &self.http
    }

    fn retry_body_limit(&self) -> usize {
        self.detect.retry_body_limit
    }

    fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    fn trace_context(&self) -> bool {
        self.detect.trace_context
    }

    fn pod_keys(&self, orig: Original, ep: Option<std::net::SocketAddrV4>) -> (Option<String>, Option<String>) {
        let idx = self.pods.borrow();
        (
            idx.by_cgroup(orig.pod_cgroup).map(|p| p.key.clone()),
            ep.and_then(|ep| idx.by_ip(*ep.ip())).map(|p| p.key.clone()),
        )
    }

    fn trace_sample_rate(&self) -> f64 {
        self.detect.trace_sample_rate
    }

    fn spans(&self) -> Option<&crate::otlp::Spans> {
        self.detect.spans.as_ref()
    }

    fn access_log(&self, failed: bool) -> bool {
        self.detect.access_log.wants(failed)
    }

    fn istio(&self) -> &crate::metrics::IstioMetrics {
        &self.istio
    }

    fn istio_labels(
        &self,
        orig: Original,
        ep: Option<std::net::SocketAddrV4>,
        service: &str,
        protocol: &'static str,
    ) -> crate::metrics::IstioLabels {
        match ep {
            Some(ep) => {
                let (route, _, _) = self.route(&Original { dst: ep, ..orig });
                Outbound::istio_labels(self, &orig, ep, Some(service), &route, protocol)
            }
            None => Outbound::istio_labels(self, &orig, orig.dst, Some(service), &Route::Passthrough, protocol),
        }
    }

    fn note_endpoint(&self, conn: u64, ep: std::net::SocketAddrV4, retries: u32) {
        let dst_pod = self.pods.borrow().by_ip(*ep.ip()).map(|p| p.key.clone());
        self.conns.set_endpoint(conn, ep, dst_pod, retries);
    }

    fn note_route(&self, conn: u64, orig: Original, ep: std::net::SocketAddrV4) {
        let (security, dst_id) = match self.route(&Original { dst: ep, ..orig }).0 {
            Route::Local { dst } => (Security::Local, Some(dst.to_string())),
            Route::Hbone { dst, .. } => (Security::MutualTls, Some(dst.to_string())),
            Route::Passthrough => (Security::Plaintext, None),
            Route::Refuse { .. } => (Security::Unknown, None),
        };
        self.conns.set_security(conn, security, dst_id);
    }
}

/// A client stream that counts the bytes read from and written to it (an HTTP connection's
/// size, for its record and the proxy's byte counters).
struct Counting<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S> Counting<S> {
    fn new(inner: S) -> Self {
        Counting { inner, read: Arc::default(), written: Arc::default() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Closes with RST so the application sees a failed connection, not a clean empty reply.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{SocketAddr, SocketAddrV4},
        sync::Mutex,
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpSocket},
    };

    use super::*;

    /// Records as the kernel would leave them, keyed by client address.
    #[derive(Default)]
    struct FakeTable(Mutex<HashMap<SocketAddr, Original>>);

    impl OrigDstLookup for FakeTable {
        fn take(&self, client: SocketAddr) -> std::io::Result<Option<Original>> {
            Ok(self.0.lock().unwrap().remove(&client))
        }
    }

    async fn proxy() -> (SocketAddr, Arc<FakeTable>, ProxyMetrics, Arc<Connections>) {
        let table = Arc::new(FakeTable::default());
        let metrics = ProxyMetrics::default();
        let conns = Arc::new(Connections::default());
        // One meshed pod on this node, cgroup 1: the source of every test connection.
        let client = crate::state::Workload {
            name: "client".into(),
            workload: None,
            namespace: "shop".into(),
            service_account: "client".into(),
            ip: [127, 0, 0, 1].into(),
            node: "n".into(),
            cgroup: Some("/sys/fs/cgroup/n/client".into()),
            meshed: true,
            reason: crate::state::MeshReason::Namespace,
            mtls_mode: Default::default(),
            fail_closed: false,
            labels: Default::default(),
        };
        let mut state = crate::state::NodeState { node: "n".into(), ..Default::default() };
        state.pods.insert("shop/client".into(), client.clone());
        let status = crate::reconcile::PodStatus {
            key: "shop/client".into(),
            workload: client,
            cgroup_id: Some(1),
            redirected: true,
        };
        let (_tx, pods) = watch::channel(Arc::new(PodIndex::new(&state, vec![status])));
        let out = Arc::new(Outbound {
            lookup: table.clone(),
            pods,
            metrics: metrics.clone(),
            conns: conns.clone(),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: None,
            copy_buffer: 16 * 1024,
            trust_domain: "cluster.local".into(),
            pool: None,
            hbone_port: 15008,
            balancer: Default::default(),
            open_per_service: Default::default(),
            http: Default::default(),
            istio: Default::default(),
            detect: Default::default(),
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(out.serve(l, CancellationToken::new(), TaskTracker::new()));
        (addr, table, metrics, conns)
    }

    /// A client socket bound first, so the test knows the address the proxy will see.
    fn bound_client() -> (TcpSocket, SocketAddr) {
        let s = TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    fn v4(a: SocketAddr) -> SocketAddrV4 {
        match a {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn forwards_to_the_recorded_destination_with_half_close_both_ways() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut got = Vec::new();
            // Reads to EOF: the client's half-close must arrive here.
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(b"reply after your FIN").await.unwrap();
            s.shutdown().await.unwrap();
            got
        });
        let (proxy_addr, table, metrics, conns) = proxy().await;
        let (sock, me) = bound_client();
        table.0.lock().unwrap().insert(me, Original { dst: v4(up_addr), pod_cgroup: 1 });
        let mut c = sock.connect(proxy_addr).await.unwrap();
        c.write_all(b"request").await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after your FIN");
        assert_eq!(server.await.unwrap(), b"request");
        for _ in 0..100 {
            if conns.snapshot().closed_total == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let snap = conns.snapshot();
        assert_eq!(snap.recent[0].original_dst, v4(up_addr));
        assert_eq!(snap.recent[0].bytes_sent, 7);
        assert_eq!(snap.recent[0].bytes_received, 20);
        assert_eq!(snap.recent[0].source_pod.as_deref(), Some("shop/client"));
        // 127.0.0.1 is the client pod itself here, so the destination is "local"... unless it
        // is not in the index; the upstream port is not the pod's, the IP is. Either way the
        // route is honest about it.
        assert_ne!(snap.recent[0].security, crate::proxy::conns::Security::Unknown);
        assert_eq!(metrics.opened.get(), 1);
        assert!(table.0.lock().unwrap().is_empty(), "the record is consumed");
    }

    async fn expect_closed(mut c: TcpStream) {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("closed promptly") {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("unexpected {n} bytes"),
        }
    }

    #[tokio::test]
    async fn an_unknown_source_cgroup_is_refused() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (proxy_addr, table, metrics, _) = proxy().await;
        let (sock, me) = bound_client();
        table.0.lock().unwrap().insert(me, Original { dst: v4(upstream.local_addr().unwrap()), pod_cgroup: 99 });
        let c = sock.connect(proxy_addr).await.unwrap();
        expect_closed(c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(metrics.errors.get_or_create(&crate::metrics::ErrorLabels { reason: "unknown_source" }).get(), 1);
    }

    #[tokio::test]
    async fn no_record_means_no_forwarding() {
        let (proxy_addr, _table, metrics, _) = proxy().await;
        let c = TcpStream::connect(proxy_addr).await.unwrap();
        expect_closed(c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(metrics.errors.get_or_create(&crate::metrics::ErrorLabels { reason: "no_original_dst" }).get(), 1);
    }

    #[tokio::test]
    async fn refused_destination_resets_the_client() {
        // A port with nothing listening.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let (proxy_addr, table, metrics, conns) = proxy().await;
        let (sock, me) = bound_client();
        table.0.lock().unwrap().insert(me, Original { dst: v4(dead), pod_cgroup: 1 });
        let c = sock.connect(proxy_addr).await.unwrap();
        expect_closed(c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(metrics.errors.get_or_create(&crate::metrics::ErrorLabels { reason: "connect_failed" }).get(), 1);
        assert!(conns.snapshot().recent[0].error.as_deref().unwrap().contains("refused"));
    }
}
