//! Outbound: the listener the eBPF programs send meshed pods' connections to.
//!
//! Per connection, top to bottom:
//! 1. take the original destination the kernel recorded for this client address (never guess:
//!    no record, no forwarding);
//! 2. take one snapshot of the pod index and route ([`route::route`]: source pod from the
//!    cgroup, then a workload target, same node / HBONE / passthrough, or a Service), or refuse;
//! 3. for a Service, detect the protocol (`detect`): HTTP is served request by request
//!    (`http`); TCP takes one of the Service's connection slots ([`ServiceLimits`]);
//! 4. connect ([`upstream`]: one connect for every kind of target; for a Service, the endpoint
//!    picker and up to [`MAX_CONNECT_ATTEMPTS`] attempts with jittered backoff);
//! 5. copy both ways until both sides finish, each half-close on its own (`idle::copy`);
//! 6. the connection's telemetry is written once, by its [`Recorder`] (`observe`).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use crate::{
    datapath::{OrigDstLookup, Original},
    metrics::{ProxyMetrics, RouteKind, RouteLabels},
    proxy::{
        balance::{self, Balancer},
        conns::ConnRecord,
        detect::{self, DetectConfig, Hint, Protocol},
        http,
        observe::{Observe, Recorder},
        route::{self, Destination, Refusal, Route, RouteConfig, Target},
        upstream::{ConnectError, Connector, LimitHit, Picker, ServiceLimits, UpstreamIo},
    },
    state::PodIndex,
};

pub struct Outbound {
    pub lookup: Arc<dyn OrigDstLookup>,
    pub pods: watch::Receiver<Arc<PodIndex>>,
    pub metrics: ProxyMetrics,
    /// Connection records, counters, Istio's TCP metrics and the access log.
    pub observe: Arc<Observe>,
    /// Close a proxied connection after this long without a byte either way (`None`: never).
    pub idle_timeout: Option<Duration>,
    pub copy_buffer: usize,
    pub route: RouteConfig,
    pub connector: Connector,
    /// Service endpoint choice (shared by all connections).
    pub balancer: Arc<Balancer>,
    /// `switchyard.io/max-connections` per Service, for TCP and HTTP alike.
    pub limits: Arc<ServiceLimits>,
    /// HTTP to Services: budgets, counters, recent requests.
    pub http: Arc<http::Http>,
    pub detect: DetectConfig,
    /// Same-node connections, re-checked when the authorization rules change.
    pub authorizations: Arc<crate::proxy::recheck::OpenAuthorizations>,
    /// Connections per pod and for the node.
    pub caps: Arc<crate::proxy::caps::ConnectionCaps>,
}

/// Connect attempts for a connection to a Service, first one included.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no original destination recorded for client {0}: the connection did not come through the mesh's redirect")]
    NoOriginalDst(SocketAddr),
    #[error("original-destination lookup failed: {0}")]
    Lookup(std::io::Error),
    #[error("service {0} has no ready endpoint")]
    NoEndpoints(std::net::SocketAddrV4),
    #[error(
        "service {service} ({vip}) is at its limit of {} open connections (switchyard.io/max-connections); reset at once", hit.limit
    )]
    ConnectionLimit { service: String, vip: std::net::SocketAddrV4, hit: LimitHit },
    #[error(transparent)]
    Upstream(#[from] ConnectError),
}

impl OutboundError {
    fn reason(&self) -> &'static str {
        match self {
            OutboundError::NoOriginalDst(_) => "no_original_dst",
            OutboundError::Lookup(_) => "lookup_failed",
            OutboundError::NoEndpoints(_) => "no_endpoints",
            OutboundError::ConnectionLimit { .. } => "connection_limit",
            OutboundError::Upstream(e) => e.reason(),
        }
    }
}

/// The first endpoint a connection went to and how (`None`: refused): the labels and route of a
/// connection that never got through.
struct FirstPick {
    ep: std::net::SocketAddrV4,
    path: Option<crate::proxy::route::Path>,
}

/// The upstream side of a connection, once open.
struct Connected {
    io: UpstreamIo,
    /// The endpoint finally connected to (after any connect retries), and how.
    target: Target,
    _in_flight: Option<balance::InFlight>,
}

impl Outbound {
    /// Serves until `stop` is cancelled. Connections in flight are tracked by `tasks` so the
    /// caller can let them drain.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken, tasks: TaskTracker) {
        let stops = crate::proxy::idle::Stops::new(&stop);
        loop {
            let accepted =
                crate::accept::next(&stop, "outbound", || listener.accept(), || self.metrics.error("accept_failed"));
            let Some((client, peer)) = accepted.await else { return };
            let this = self.clone();
            let stops = stops.clone();
            tasks.spawn(this.handle(client, peer, stops));
        }
    }

    /// One connection. Its setup (lookup, routing, detection, the upstream's connect) runs in
    /// a boxed future of its own, freed once the connection is established: a task's
    /// allocation is as big as its largest state, and a connection spends its life copying (or
    /// serving HTTP), so an open connection costs the copy's state, not the handshake's.
    fn handle(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        stops: Arc<crate::proxy::idle::Stops>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let setup = Box::pin(self.clone().setup(client, peer, stops));
        async move {
            match setup.await {
                Established::Done => {}
                Established::Http(serve) => serve.await,
                Established::Tcp(mut c) => {
                    let (sent, received, error) = self.copy(&mut c.client, &mut c.io, &c.cancel).await;
                    let TcpConn { client, io, rec, .. } = c;
                    rec.finish(sent, received, error);
                    drop((client, io));
                }
            }
        }
    }

    async fn setup(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        stops: Arc<crate::proxy::idle::Stops>,
    ) -> Established {
        self.metrics.opened.inc();
        let orig = match self.lookup.take(peer) {
            Ok(Some(o)) => o,
            Ok(None) => {
                self.reject(client, OutboundError::NoOriginalDst(peer));
                return Established::Done;
            }
            Err(e) => {
                self.reject(client, OutboundError::Lookup(e));
                return Established::Done;
            }
        };
        // One snapshot of the pod index for the whole connection.
        let snapshot = self.pods.borrow().clone();
        let mut route = match route::route(&snapshot, &self.route, orig.dst, orig.pod_cgroup) {
            Ok(r) => r,
            Err(refusal) => {
                self.refuse(client, peer, orig, &snapshot, refusal);
                return Established::Done;
            }
        };
        route.source.port = peer.port();
        self.metrics.pod_redirects.inc(&route.source.pod);
        // Held until the connection ends (HTTP and TCP alike are served below).
        let cap = match self.caps.open(orig.pod_cgroup, &route.source.pod) {
            Ok(slot) => slot,
            Err(hit) => {
                // Logged by the caps (rate-limited): a flood must not flood the log too.
                self.metrics.error(hit.reason());
                self.metrics.closed.inc();
                reset(client);
                return Established::Done;
            }
        };
        // A Service: HTTP is served request by request.
        let hint = route.service().map(|s| self.hint(&s.entry, orig.dst.port()));
        if let Some(hint) = hint {
            let hinted_wait = self.idle_timeout.unwrap_or(Duration::from_secs(3600));
            let protocol = detect::detect(&client, hint, self.detect.sniff_timeout, hinted_wait).await;
            if protocol != Protocol::Tcp {
                let source_pod = route.source.pod.clone();
                let stop = stops.handle();
                return Established::Http(Box::pin(async move {
                    self.handle_http(client, peer, orig, protocol, &source_pod, stop).await;
                    drop(cap);
                }));
            }
        }
        match self.connect_tcp(client, peer, route, hint.is_some(), cap).await {
            Some(c) => Established::Tcp(c),
            None => Established::Done,
        }
    }

    /// A connection refused by routing: counted, recorded (with the pods the snapshot knows at
    /// either end), reset.
    fn refuse(&self, client: TcpStream, peer: SocketAddr, orig: Original, idx: &PodIndex, refusal: Refusal) {
        warn!(dst = %orig.dst, reason = refusal.reason(), "{refusal}");
        self.connector.refused(&refusal);
        self.metrics.routes.get_or_create(&RouteLabels { route: RouteKind::Refused }).inc();
        let (src, dst) = (idx.by_cgroup(orig.pod_cgroup), idx.by_ip(*orig.dst.ip()));
        let record = ConnRecord {
            client: peer,
            source_pod: src.map(|p| p.key.clone()),
            original_dst: orig.dst,
            destination_pod: dst.map(|p| p.key.clone()),
            ..Default::default()
        };
        let mut rec = Recorder::open(&self.observe, record, "tcp");
        let mut labels = crate::metrics::IstioLabels::unknown("source", "tcp");
        if let Some(s) = src {
            labels = labels.source(&s.workload, &self.route.trust_domain);
        }
        if let Some(d) = dst {
            labels = labels.destination(&d.workload, &self.route.trust_domain);
        }
        rec.istio_opened(labels);
        reset(client);
        rec.finish(0, 0, Some(refusal.to_string()));
    }

    /// The TCP path's upstream, connected and recorded; `None`: failed (the client was reset).
    async fn connect_tcp(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        route: Route,
        detected: bool,
        cap: crate::proxy::caps::CapSlot,
    ) -> Option<TcpConn> {
        // The slot (for `switchyard.io/max-connections`) is held until the connection ends.
        let slot = match route.service() {
            Some(s) => match self.limits.try_acquire(s.vip, &s.entry.policy) {
                Ok(slot) => Some(slot),
                Err(hit) => {
                    let e = OutboundError::ConnectionLimit { service: s.entry.service.clone(), vip: s.vip, hit };
                    self.reject(client, e);
                    return None;
                }
            },
            None => None,
        };
        let workload = match &route.destination {
            Destination::Workload(t) => Some(t),
            Destination::Service(_) => None,
        };
        let mut rec = Recorder::open(
            &self.observe,
            ConnRecord {
                client: peer,
                source_pod: Some(route.source.pod.clone()),
                original_dst: route.original(),
                destination_pod: workload.and_then(|t| t.dst_pod.clone()),
                protocol: detected.then_some("tcp"),
                ..Default::default()
            },
            "tcp",
        );
        match self.connect(&route, &rec).await {
            Ok(up) => {
                self.metrics.routes.get_or_create(&RouteLabels { route: up.target.path.label() }).inc();
                rec.connected(&route.source, &up.target);
                rec.istio_opened(route.istio_labels(&self.route, Some(up.target.ep), Some(&up.target.path), "tcp"));
                let t = &up.target;
                let open = t.authorized.clone().map(|a| self.authorizations.register(a, *t.ep.ip(), t.cancel.clone()));
                Some(TcpConn {
                    client,
                    io: up.io,
                    rec,
                    cancel: up.target.cancel,
                    _open: open,
                    _slot: slot,
                    _in_flight: up._in_flight,
                    _cap: cap,
                })
            }
            // Labels and route of the first pick (a retry may have gone another way).
            Err((e, first)) => {
                let path = first.as_ref().and_then(|f| f.path.as_ref());
                self.metrics
                    .routes
                    .get_or_create(&RouteLabels { route: path.map_or(RouteKind::Refused, |p| p.label()) })
                    .inc();
                rec.istio_opened(route.istio_labels(&self.route, first.as_ref().map(|f| f.ep), path, "tcp"));
                reset(client);
                rec.finish(0, 0, Some(e.to_string()));
                None
            }
        }
    }

    /// Whether and how to detect the protocol of a connection to this Service port.
    fn hint(&self, entry: &crate::state::ServiceEntry, port: u16) -> Hint {
        match entry.protocol {
            Some(crate::state::ProtocolHint::Http) => Hint::Http,
            Some(crate::state::ProtocolHint::Opaque) => Hint::Opaque,
            None if self.detect.http_ports.contains(&port) => Hint::Http,
            None if self.detect.opaque_ports.contains(&port) => Hint::Opaque,
            None => Hint::None,
        }
    }

    async fn handle_http(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        orig: Original,
        protocol: Protocol,
        source_pod: &str,
        stop: crate::proxy::idle::StopHandle,
    ) {
        let _ = client.set_nodelay(true);
        self.metrics.routes.get_or_create(&RouteLabels { route: RouteKind::Http }).inc();
        let mut rec = Recorder::open(
            &self.observe,
            ConnRecord {
                client: peer,
                source_pod: Some(source_pod.to_string()),
                original_dst: orig.dst,
                protocol: Some(protocol.label()),
                ..Default::default()
            },
            "http_connection",
        );
        let ds = Arc::new(http::Downstream::new(self.clone(), orig, orig.dst, rec.id(), protocol));
        let counted = Counting::new(client);
        let (from_client, to_client) = (counted.read.clone(), counted.written.clone());
        let result = ds.clone().serve(counted, stop).await;
        rec.set_requests(ds.requests.load(Ordering::Relaxed));
        let (sent, received) = (from_client.load(Ordering::Relaxed), to_client.load(Ordering::Relaxed));
        rec.finish(sent, received, result.err().map(|e| e.to_string()));
    }

    /// Opens the upstream side. For a Service, a failed connect (refused, unreachable, timed
    /// out, or an HBONE tunnel the peer node could not open) is retried on another endpoint,
    /// whichever way it is reached (jittered backoff, at most [`MAX_CONNECT_ATTEMPTS`] in all);
    /// a final error (a denial, no certificate yet) is not.
    async fn connect(&self, route: &Route, rec: &Recorder) -> Result<Connected, (OutboundError, Option<FirstPick>)> {
        let svc = match &route.destination {
            Destination::Workload(t) => {
                let first = || Some(FirstPick { ep: t.ep, path: Some(t.path.clone()) });
                rec.connecting(&route.source, t);
                let io = self.connector.connect(t, &route.source).await.map_err(|e| (e.into(), first()))?;
                return Ok(Connected { io, target: t.clone(), _in_flight: None });
            }
            Destination::Service(svc) => svc,
        };
        let mut picker = Picker::new(route, &self.route, false);
        let mut last: Option<ConnectError> = None;
        let mut first: Option<FirstPick> = None;
        loop {
            let t = match picker.next(&self.balancer) {
                Some(Ok(t)) => t,
                Some(Err((ep, refusal))) => {
                    warn!(service = %svc.vip, reason = refusal.reason(), "{refusal}");
                    self.connector.refused(&refusal);
                    return Err((ConnectError::Refused(refusal).into(), Some(FirstPick { ep, path: None })));
                }
                None => {
                    let e = last.map_or(OutboundError::NoEndpoints(svc.vip), OutboundError::from);
                    if matches!(e, OutboundError::NoEndpoints(_)) {
                        self.metrics.error(e.reason());
                    }
                    return Err((e, first));
                }
            };
            if first.is_none() {
                first = Some(FirstPick { ep: t.ep, path: Some(t.path.clone()) });
                rec.connecting(&route.source, &t);
            }
            let attempt = picker.attempts() - 1;
            if let Some(e) = &last {
                warn!(service = %svc.vip, retry = %t.ep, attempt, error = %e, "endpoint connect failed; retrying on another endpoint");
                self.metrics.error("endpoint_retry");
                tokio::time::sleep(balance::backoff(attempt as u32)).await;
            }
            self.observe.conns.set_endpoint(rec.id(), t.ep, t.dst_pod.clone(), attempt as u32);
            let guard = self.balancer.start(t.ep);
            let started = std::time::Instant::now();
            match self.connector.connect(&t, &route.source).await {
                Ok(io) => {
                    self.balancer.connected(t.ep, started.elapsed());
                    return Ok(Connected { io, target: t, _in_flight: Some(guard) });
                }
                Err(e) if e.is_final() => return Err((e.into(), first)),
                Err(e) => {
                    drop(guard);
                    self.balancer.failed(t.ep, &svc.entry.endpoints, started.elapsed());
                    picker.failed(&t, &e);
                    if picker.attempts() >= MAX_CONNECT_ATTEMPTS {
                        return Err((e.into(), first));
                    }
                    last = Some(e);
                }
            }
        }
    }

    /// Copies until both sides finish; (sent by the client, received by it, error).
    /// A failure resets the client when `client` is dropped.
    async fn copy<U: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut TcpStream,
        upstream: &mut U,
        cancel: &crate::proxy::idle::Cancel,
    ) -> (u64, u64, Option<String>) {
        let _ = client.set_nodelay(true);
        let c = super::idle::copy(client, upstream, self.copy_buffer, self.idle_timeout, Some(cancel)).await;
        let error = match c.error {
            None => {
                let _ = client.shutdown().await;
                None
            }
            Some(e) => {
                let reason = match e.kind() {
                    std::io::ErrorKind::TimedOut => "idle_timeout",
                    std::io::ErrorKind::Interrupted => "cancelled",
                    _ => "io",
                };
                self.metrics.error(reason);
                debug!(error = %e, reason, "outbound copy ended");
                // The client learns the connection failed (a reset, as the upstream's failure
                // would have told it without a proxy), never a clean but empty end.
                if reason != "idle_timeout" {
                    reset_on_close(client);
                }
                Some(match reason {
                    "idle_timeout" => format!("idle timeout: {e}"),
                    _ => e.to_string(),
                })
            }
        };
        (c.a_to_b, c.b_to_a, error)
    }

    fn reject(&self, client: TcpStream, e: OutboundError) {
        warn!(error = %e, "outbound connection closed");
        self.metrics.error(e.reason());
        self.metrics.closed.inc();
        reset(client);
    }
}

impl http::Upstreams for Outbound {
    fn route(&self, orig: Original) -> Result<Route, Refusal> {
        let snapshot = self.pods.borrow().clone();
        route::route(&snapshot, &self.route, orig.dst, orig.pod_cgroup)
    }

    async fn open(&self, route: &Route, target: &Target) -> Result<UpstreamIo, ConnectError> {
        self.connector.connect(target, &route.source).await
    }

    fn refused(&self, r: &Refusal) {
        self.connector.refused(r)
    }

    fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    fn http(&self) -> &http::Http {
        &self.http
    }

    fn limits(&self) -> &ServiceLimits {
        &self.limits
    }

    fn route_config(&self) -> &RouteConfig {
        &self.route
    }

    fn settings(&self) -> &DetectConfig {
        &self.detect
    }

    fn observe(&self) -> &Observe {
        &self.observe
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
    reset_on_close(&stream);
    drop(stream);
}

/// Closing `stream` will reset it (linger 0).
fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// What a connection's setup leaves to serve. Not boxed: the TCP connection is the common case
/// and is moved into the task's own state, where it lives anyway.
#[allow(clippy::large_enum_variant)]
enum Established {
    /// Refused, failed or already answered.
    Done,
    /// An HTTP connection, served request by request.
    Http(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
    Tcp(TcpConn),
}

/// An outbound TCP connection with its upstream: what its copy needs, and what it holds until
/// it ends (the per-pod cap, the Service's connection slot, the balancer's in-flight count, the
/// registration for authorization re-checks).
struct TcpConn {
    client: TcpStream,
    io: UpstreamIo,
    rec: Recorder,
    cancel: crate::proxy::idle::Cancel,
    _open: Option<crate::proxy::recheck::Registration>,
    _slot: Option<crate::proxy::upstream::Slot>,
    _in_flight: Option<balance::InFlight>,
    _cap: crate::proxy::caps::CapSlot,
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, SocketAddrV4};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::testing::{Cluster, OutboundProxy, ProxyOptions};

    fn v4(a: SocketAddr) -> SocketAddrV4 {
        match a {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        }
    }

    async fn proxy() -> OutboundProxy {
        OutboundProxy::start(&Cluster::new(), ProxyOptions::default()).await
    }

    #[tokio::test]
    async fn forwards_to_the_recorded_destination_with_half_close_both_ways() {
        let upstream = TcpListener::bind("127.0.0.2:0").await.unwrap();
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
        let p = proxy().await;
        let mut c = p.connect(v4(up_addr)).await.unwrap();
        c.write_all(b"request").await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after your FIN");
        assert_eq!(server.await.unwrap(), b"request");
        let conns = &p.outbound.observe.conns;
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
        // 127.0.0.2 is the client pod itself: a same-node meshed destination.
        assert_eq!(snap.recent[0].security, crate::proxy::conns::Security::Local);
        assert_eq!(p.metrics().opened.get(), 1);
        assert!(p.table.is_empty(), "the record is consumed");
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
        let p = proxy().await;
        let c = p.connect_from(v4(upstream.local_addr().unwrap()), 99).await.unwrap();
        expect_closed(c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(p.errors("unknown_source"), 1);
    }

    #[tokio::test]
    async fn no_record_means_no_forwarding() {
        let p = proxy().await;
        let c = TcpStream::connect(p.addr).await.unwrap();
        expect_closed(c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(p.errors("no_original_dst"), 1);
    }

    #[tokio::test]
    async fn refused_destination_resets_the_client() {
        // A port with nothing listening.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let p = proxy().await;
        let c = p.connect(v4(dead)).await.unwrap();
        expect_closed(c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(p.errors("connect_failed"), 1);
        assert!(p.outbound.observe.conns.snapshot().recent[0].error.as_deref().unwrap().contains("refused"));
    }
}
