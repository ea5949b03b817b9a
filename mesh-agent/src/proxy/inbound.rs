//! Inbound HBONE (port 15008), as Istio's ztunnel serves it: connections addressed to any of
//! this node's meshed pods on 15008 (the kernel steers them to this listener, see
//! `datapath::steer`) get that pod's certificate whatever the SNI; the client's must chain to
//! the bundle and name a SPIFFE ID of this trust domain. HTTP/2, one `CONNECT <pod ip:port>`
//! stream per tunnelled connection: its authority must be the address the connection arrived
//! on (else 400), anything but CONNECT is 400, an authorization denial 401, a pod that cannot
//! be reached 503, and 200 (with the destination's `baggage`) only once the pod accepted.
//!
//! Connections to the node's own address with an SNI naming a workload (Switchyard's HBONE
//! before it spoke ztunnel's, during a rolling upgrade) are still served: the certificate
//! follows the SNI and the CONNECT may name any local pod of that identity.
use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::{net::TcpListener, net::TcpStream, sync::watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use crate::{
    authz::{self, Decision},
    identity::Identity,
    metrics::ByReason,
    proxy::{
        conns::{ConnRecord, Direction, Security},
        h2io::{self, H2Stream},
        idle,
        observe::{Observe, Recorder},
        pool::REASON_HEADER,
        route::Authorized,
    },
    state::PodIndex,
    tls,
};

/// Limits on what a peer may do before it is authenticated, and per connection. An
/// unauthenticated peer must not be able to exhaust the agent, which carries the whole node's
/// mesh traffic.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The TLS ClientHello must arrive within this (a silent connection gives its slot back soon).
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// TLS handshakes in progress at once; more wait up to [`HANDSHAKE_QUEUE_WAIT`], then are
/// refused.
pub const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress at once from one source address: one peer (or one tenant's pods
/// behind one node) cannot take every slot, so other nodes still reach this one.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// How long a connection waits for a handshake slot before it is refused.
pub const HANDSHAKE_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// HBONE connections open at once; more are refused at once.
pub const MAX_CONNECTIONS: usize = 4096;
pub use crate::config::HBONE_MAX_CONCURRENT_STREAMS as MAX_CONCURRENT_STREAMS;
/// A CONNECT needs a few hundred bytes of headers; anything near this is hostile.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

#[derive(Clone, Default)]
pub struct InboundMetrics {
    pub tls_failures: ByReason,
    pub rejected: ByReason,
    pub denied: ByReason,
    pub accepted: Counter,
    /// HTTP/2 receive windows granted to open HBONE connections (`ReceiveBudget`).
    pub receive_windows: prometheus_client::metrics::gauge::Gauge,
    /// Connections that got a smaller window because the budget was short.
    pub receive_window_reduced: Counter,
    /// Denials by DENY policy (shared with the outbound side's same-node denials).
    pub by_policy: Arc<crate::metrics::PolicyDenials>,
}

impl InboundMetrics {
    pub fn register(&self, reg: &mut Registry) {
        // The common reasons start at 0, so the families are exported (and rate() works) before
        // the first event.
        self.denied.preset(&["deny_rule", "no_allow_rule"]);
        self.tls_failures.preset(&[
            "not_tls",
            "unknown_issuer",
            "expired_certificate",
            "bad_client_identity",
            "timeout",
            "client_hello_timeout",
        ]);
        reg.register(
            "inbound_connections",
            "HBONE streams accepted and connected to a local pod",
            self.accepted.clone(),
        );
        self.tls_failures.register(
            reg,
            "tls_handshake_failures",
            "Inbound mTLS handshakes rejected, by reason (not_tls, unknown_issuer, expired_certificate, ...)",
        );
        self.rejected.register(reg, "inbound_rejected", "HBONE CONNECT streams rejected, by reason");
        reg.register(
            "hbone_receive_window_bytes",
            "HTTP/2 receive windows granted to open HBONE connections: what peers may send before the agent passed it on (at most hboneReceiveBudgetBytes, plus 64 KiB per connection past it)",
            self.receive_windows.clone(),
        );
        reg.register(
            "hbone_receive_window_reduced",
            "HBONE connections given a smaller receive window than 16 MiB because the node's budget (hboneReceiveBudgetBytes) was spent",
            self.receive_window_reduced.clone(),
        );
        self.denied.register(reg, "authorization_denials", "Connections denied by authorization policy, by reason");
    }
}

pub struct Inbound {
    /// Connections to the node's address: the certificate the SNI names.
    pub acceptor: TlsAcceptor,
    /// Certificates of this node's pods, for connections addressed to a pod.
    pub certs: Arc<crate::identity::manager::CertManager>,
    /// A connection with no stream for this long is closed (also bounds a peer that never sends
    /// the HTTP/2 preface). Longer than the clients' pool idle time, so clients close first.
    pub idle_timeout: Duration,
    pub handshakes: Arc<tokio::sync::Semaphore>,
    pub connections: Arc<tokio::sync::Semaphore>,
    pub trust_domain: String,
    pub pods: watch::Receiver<Arc<PodIndex>>,
    pub metrics: InboundMetrics,
    pub connect_timeout: Duration,
    pub copy_buffer: usize,
    /// Close a tunnelled connection after this long without a byte either way (`None`: never),
    /// as outbound connections are.
    pub tcp_idle_timeout: Option<Duration>,
    /// Connection records, Istio's standard metrics (reporter `destination`) and the access log.
    pub observe: Arc<Observe>,
    /// HBONE streams, re-checked when the authorization rules change.
    pub authorizations: Arc<crate::proxy::recheck::OpenAuthorizations>,
    /// Whether a CONNECT may name a loopback address: only in the in-process test tier, whose
    /// pods are loopback addresses. Never in the agent: the node's loopback is its own (the
    /// admin port is there).
    pub loopback_pods: bool,
    /// Handshakes in progress per source address.
    pub source_slots: SourceSlots,
    /// HTTP/2 receive windows, node-wide: what the agent may hold toward slow readers.
    pub receive_budget: Arc<crate::proxy::caps::ReceiveBudget>,
    /// Connect to the pod from the (verified) source pod's address, as ztunnel does with
    /// `IP_TRANSPARENT`, so the application sees its real peer. Only while the kernel steers
    /// the pod's replies back to the agent (`mesh_steer`); otherwise from the node's address.
    pub transparent: bool,
}

/// Things in progress per source address, at most a limit each ([`MAX_HANDSHAKES_PER_SOURCE`]
/// handshakes by default).
pub struct SourceSlots {
    counts: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    limit: usize,
}

impl Default for SourceSlots {
    fn default() -> Self {
        SourceSlots::with_limit(MAX_HANDSHAKES_PER_SOURCE)
    }
}

/// One source's handshake slot, given back on drop.
pub struct SourceSlot(Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>, std::net::IpAddr);

impl SourceSlots {
    pub fn with_limit(limit: usize) -> Self {
        SourceSlots { counts: Default::default(), limit }
    }

    /// A slot for `ip`, if it has fewer than the limit.
    pub fn take(&self, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.counts.clone(), ip))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl Inbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken, tasks: TaskTracker) {
        let stops = idle::Stops::new(&stop);
        loop {
            let Some((tcp, peer)) = crate::accept::next(&stop, "hbone", || listener.accept(), || ()).await else {
                return;
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                warn!(%peer, limit = MAX_CONNECTIONS, "HBONE connection refused: too many connections");
                self.metrics.tls_failures.inc("connection_limit");
                continue;
            };
            let this = self.clone();
            let stop = stops.handle();
            tasks.spawn(async move {
                this.connection(tcp, peer, stop).await;
                drop(permit);
            });
        }
    }

    /// One HBONE connection: the TLS handshake within its slots, the peer's identity, then
    /// its streams until it ends, idles out, its certificate expires or the agent stops.
    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, stop: idle::StopHandle) {
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok().map(|a| a.ip());
        // Addressed to a meshed pod of this node (ztunnel's HBONE): that pod's identity.
        let pod = match local {
            Some(std::net::IpAddr::V4(ip)) => {
                let idx = self.pods.borrow();
                idx.by_ip(ip)
                    .filter(|p| idx.is_local(p) && p.workload.meshed)
                    .map(|p| (ip, p.workload.identity(&self.trust_domain)))
            }
            _ => None,
        };
        let link = Link { peer, local, pod: pod.as_ref().map(|(ip, _)| *ip) };
        let config = match &pod {
            None => self.acceptor.config().clone(),
            Some((ip, id)) => match self.certs.get(id) {
                Some(cert) => tls::server_config_for_pod(self.acceptor.config(), cert.key.clone()),
                None => {
                    warn!(%peer, pod = %ip, identity = %id, "HBONE connection refused: no certificate for the pod yet");
                    self.metrics.tls_failures.inc("no_server_certificate");
                    return;
                }
            },
        };
        let Some(tls) = self.accept_tls(tcp, peer, config).await else { return };
        let Some((client_id, server_id, cert_expiry)) = self.verify_peer(&tls, peer, pod.map(|(_, id)| id)) else {
            return;
        };
        self.serve_streams(tls, link, client_id, server_id, cert_expiry, stop).await;
    }

    /// The TLS handshake, once a per-source and a global handshake slot are free; `None` when
    /// it was refused or failed (logged and counted by reason).
    async fn accept_tls(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let Some(source_slot) = self.source_slots.take(peer.ip()) else {
            warn!(%peer, limit = MAX_HANDSHAKES_PER_SOURCE, "HBONE connection refused: too many handshakes in progress from this address");
            self.metrics.tls_failures.inc("source_handshake_limit");
            return None;
        };
        let handshake_permit =
            match tokio::time::timeout(HANDSHAKE_QUEUE_WAIT, self.handshakes.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => {
                    warn!(%peer, limit = MAX_HANDSHAKES, "HBONE connection refused: too many handshakes in progress");
                    self.metrics.tls_failures.inc("handshake_limit");
                    return None;
                }
            };
        let accepted = self.handshake(tcp, config).await;
        drop((handshake_permit, source_slot));
        match accepted {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                let reason = tls::failure_reason(&e);
                warn!(%peer, reason, error = %tls::describe(&e), "HBONE mTLS handshake rejected");
                self.metrics.tls_failures.inc(reason);
                None
            }
            Err(reason) => {
                warn!(%peer, reason, "HBONE mTLS handshake timed out");
                self.metrics.tls_failures.inc(reason);
                None
            }
        }
    }

    /// The client's identity (in this trust domain), the identity this node serves on the
    /// connection (the pod's it was addressed to, else the one the SNI names), and when the
    /// client's certificate expires; `None` (counted) when either is missing or foreign.
    fn verify_peer(
        &self,
        tls: &tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        pod: Option<Identity>,
    ) -> Option<(Identity, Identity, Option<SystemTime>)> {
        let (_, session) = tls.get_ref();
        // Identity is checked once, at the handshake: the connection must not outlive it.
        let leaf = session.peer_certificates().and_then(|c| c.first());
        let cert_expiry = leaf.and_then(|c| tls::not_after(c));
        let client_id = match leaf.map(tls::peer_identity) {
            Some(Ok(id)) if id.trust_domain == self.trust_domain => id,
            other => {
                let why = match other {
                    Some(Ok(id)) => format!("identity {id} is from another trust domain"),
                    Some(Err(e)) => e.to_string(),
                    None => "no client certificate".into(),
                };
                warn!(%peer, reason = %why, "HBONE client identity rejected");
                self.metrics.tls_failures.inc("bad_client_identity");
                return None;
            }
        };
        let server_id = pod.or_else(|| session.server_name().and_then(|n| Identity::from_sni(n, &self.trust_domain)));
        let Some(server_id) = server_id else {
            self.metrics.tls_failures.inc("no_server_name");
            return None;
        };
        Some((client_id, server_id, cert_expiry))
    }

    /// Serves a verified connection's streams until it ends, idles out, the client's
    /// certificate expires or the agent stops; then GOAWAY within a bounded grace.
    async fn serve_streams(
        self: Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        link: Link,
        client_id: Identity,
        server_id: Identity,
        cert_expiry: Option<SystemTime>,
        stop: idle::StopHandle,
    ) {
        let peer = link.peer;
        debug!(%peer, client = %client_id, server = %server_id, "HBONE connection accepted");
        let activity = Arc::new(Activity { streams: AtomicUsize::new(0), last: Mutex::new(Instant::now()) });
        let window = self.receive_budget.grant();
        if window.reduced() {
            self.metrics.receive_window_reduced.inc();
            debug!(%peer, window = window.connection_window(), "HBONE receive budget short: smaller window");
        }
        // The client's preface within the idle time: a silent peer gives its slot back.
        let mut conn =
            match tokio::time::timeout(self.idle_timeout, h2_server(&window).handshake::<_, Bytes>(tls)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "HBONE connection failed before its first stream");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "HBONE connection closed: no HTTP/2 preface");
                    return;
                }
            };
        // Shared by the connection's streams.
        let ids = Arc::new((client_id, server_id));
        let spawn = |req: Request<RecvStream>, respond: SendResponse<Bytes>| {
            let active = StreamActive::start(&activity);
            tokio::spawn(self.clone().stream(req, respond, link, ids.clone(), active));
        };
        // A PING every 30 s; no answer within 20 s (ztunnel's bound) drops the connection.
        let alive = h2io::keepalive(conn.ping_pong(), Duration::from_secs(30), Duration::from_secs(20));
        let mut alive = std::pin::pin!(alive);
        let expires_in = cert_expiry.and_then(|t| t.duration_since(SystemTime::now()).ok()).unwrap_or(Duration::ZERO);
        let expiry = tokio::time::sleep(expires_in);
        let mut expiry = std::pin::pin!(expiry);
        let mut tick = tokio::time::interval((self.idle_timeout / 4).max(Duration::from_millis(100)));
        let mut stopping = std::pin::pin!(stop.cancel.cancelled());
        // The accept loop also drives the connection: its streams move only while it runs.
        let why = loop {
            tokio::select! {
                // The connection first: nearly every wake-up is for it.
                biased;
                r = conn.accept() => match r {
                    Some(Ok((req, respond))) => spawn(req, respond),
                    Some(Err(e)) => {
                        debug!(%peer, error = %e, "HBONE connection error");
                        return;
                    }
                    None => return,
                },
                Err(why) = alive.as_mut() => {
                    debug!(%peer, why, "HBONE connection dropped: keep-alive failed");
                    return;
                }
                _ = stopping.as_mut() => break Close::Stopping,
                _ = expiry.as_mut() => break Close::CertificateExpired,
                _ = tick.tick() => {
                    let idle = activity.streams.load(Ordering::Acquire) == 0
                        && activity.last.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= self.idle_timeout;
                    if idle {
                        break Close::Idle;
                    }
                }
            }
        };
        // GOAWAY; open streams may finish, within a bound: an expired identity gets no more
        // time than needed.
        debug!(%peer, ?why, "closing HBONE connection");
        conn.graceful_shutdown();
        let grace = match why {
            Close::Idle => Duration::from_secs(1),
            Close::CertificateExpired => Duration::from_secs(30),
            // The agent's drain grace bounds this one.
            Close::Stopping => Duration::from_secs(3600),
        };
        let drain = async {
            // Streams the client opened before it saw the GOAWAY are still served.
            while let Some(Ok((req, respond))) = conn.accept().await {
                spawn(req, respond);
            }
        };
        // A peer that died silently during the drain does not hold it for the whole grace.
        tokio::select! {
            _ = tokio::time::timeout(grace, drain) => {}
            Err(why) = alive.as_mut() => debug!(%peer, why, "HBONE connection dropped while draining: keep-alive failed"),
        }
        drop(window);
    }

    /// The TLS handshake: the ClientHello within [`CLIENT_HELLO_TIMEOUT`], all of it within
    /// [`HANDSHAKE_TIMEOUT`]. `Err` is the timeout's reason.
    async fn handshake(
        &self,
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>, &'static str> {
        let started = tokio::time::Instant::now();
        let lazy = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        let start = match tokio::time::timeout(CLIENT_HELLO_TIMEOUT, lazy).await {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => return Ok(Err(e)),
            Err(_) => return Err("client_hello_timeout"),
        };
        tokio::time::timeout_at(started + HANDSHAKE_TIMEOUT, start.into_stream(config)).await.map_err(|_| "timeout")
    }

    fn reject(&self, status: StatusCode, reason: &'static str, detail: String) -> Response<()> {
        self.metrics.rejected.inc(reason);
        warn!(status = status.as_u16(), reason, "{detail}");
        Response::builder()
            .status(status)
            .header(REASON_HEADER, reason)
            .body(())
            .expect("static response parts are valid")
    }

    /// One HBONE stream: check it, connect to the pod, answer 200, then copy until both sides
    /// are done (a refusal is answered and ends the stream). The setup runs in a
    /// boxed future of its own, freed once the copy starts: a task's allocation is as big as
    /// its largest state, and an open stream spends its life in the copy (so an idle stream
    /// costs the copy's state, not the handshake's).
    fn stream(
        self: Arc<Self>,
        req: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        link: Link,
        ids: Arc<(Identity, Identity)>,
        active: StreamActive,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (buffer, idle_timeout) = (self.copy_buffer, self.tcp_idle_timeout);
        let open = Box::pin(self.open_stream(req, respond, link, ids));
        async move {
            let Some(mut s) = open.await else { return };
            let c = idle::copy(&mut s.tunnel, &mut s.upstream, buffer, idle_timeout, Some(&s.cancel)).await;
            let OpenStream { tunnel, upstream, rec, cancel: _, _open } = s;
            rec.finish(c.a_to_b, c.b_to_a, c.error.map(|e| e.to_string()));
            // The stream is done (its sockets closed) before the connection counts it gone.
            drop((tunnel, upstream, _open));
            drop(active);
        }
    }

    /// A stream's setup: checks, the pod's connect, the record and the 200. `None`: refused
    /// (answered), or reset by the client.
    async fn open_stream(
        self: Arc<Self>,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        link: Link,
        ids: Arc<(Identity, Identity)>,
    ) -> Option<OpenStream> {
        let (client_id, server_id) = (&ids.0, &ids.1);
        let peer = link.peer;
        let refuse = |respond: &mut SendResponse<Bytes>, resp: Response<()>| {
            if let Err(e) = respond.send_response(resp, true) {
                debug!(%peer, error = %e, "could not answer a refused HBONE stream");
            }
        };
        // The checks and the pod's connect, abandoned if the client resets the stream first:
        // h2 stops counting a reset stream against the connection's stream limit, so work on
        // it must stop too (else HEADERS then RST_STREAM, repeated, would open pod connections
        // without bound).
        let prepare = async {
            let checked = self.check(&req, link, client_id, server_id)?;
            let upstream = self.connect_pod(checked.target, checked.source_ip).await?;
            Ok::<_, Response<()>>((checked, upstream))
        };
        let prepared = tokio::select! {
            biased;
            r = prepare => r,
            reason = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                debug!(%peer, ?reason, "HBONE stream reset by the client before it was answered");
                return None;
            }
        };
        let (checked, upstream) = match prepared {
            Ok(p) => p,
            Err(resp) => {
                refuse(&mut respond, resp);
                return None;
            }
        };
        self.metrics.accepted.inc();
        let rec_dst_pod = checked.dst_pod;
        let mut rec = Recorder::open(
            &self.observe,
            ConnRecord {
                direction: Direction::Inbound,
                security: Security::MutualTls,
                client: peer,
                source_identity: Some(client_id.to_string()),
                source_pod: checked.source_pod,
                destination_identity: Some(server_id.to_string()),
                destination_pod: Some(rec_dst_pod.clone()),
                original_dst: checked.target,
                ..Default::default()
            },
            "tcp",
        );
        rec.istio_opened(checked.istio);
        let cancel = idle::Cancel::default();
        let authorized = Authorized {
            src: client_id.clone(),
            src_ip: checked.source_ip,
            dst_pod: rec_dst_pod,
            port: checked.target.port(),
        };
        let open = self.authorizations.register(authorized, *checked.target.ip(), cancel.clone());
        let mut ok = Response::new(());
        if let Ok(v) = hyper::header::HeaderValue::from_str(&checked.baggage) {
            ok.headers_mut().insert(crate::proxy::pool::BAGGAGE_HEADER, v);
        }
        let send = match respond.send_response(ok, false) {
            Ok(send) => send,
            Err(e) => {
                rec.finish(0, 0, Some(format!("answering the CONNECT failed: {e}")));
                return None;
            }
        };
        let tunnel = H2Stream::new(send, req.into_body());
        Some(OpenStream { tunnel, upstream, rec, cancel, _open: open })
    }

    /// The stream's checks ([`check_connect`]), with their side effects: a refusal is counted,
    /// logged and answered. `Err` is the answer.
    fn check(
        &self,
        req: &Request<RecvStream>,
        link: Link,
        client_id: &Identity,
        server_id: &Identity,
    ) -> Result<Checked, Response<()>> {
        let idx = self.pods.borrow().clone();
        let cx = ConnectContext {
            idx: &idx,
            trust_domain: &self.trust_domain,
            loopback_pods: self.loopback_pods,
            link,
            client_id,
            server_id,
        };
        match check_connect(req, &cx) {
            Ok(c) => Ok(c),
            Err(Refused::Rejected { status, reason, detail }) => Err(self.reject(status, reason, detail)),
            Err(Refused::Denied { reason, rule, target }) => {
                self.metrics.denied.inc(reason);
                if reason == "deny_rule" {
                    self.metrics.by_policy.inc(&rule);
                }
                warn!(src = %client_id, dst = %server_id, %target, reason, rule, "connection denied by authorization policy");
                // 401, as ztunnel answers a denial.
                Err(Response::builder()
                    .status(StatusCode::UNAUTHORIZED)
                    .header(REASON_HEADER, reason)
                    .body(())
                    .expect("static response parts are valid"))
            }
        }
    }

    /// Connects to the pod. `Err` is the answer: 503, as ztunnel answers any upstream failure
    /// (the reason header says which).
    async fn connect_pod(
        &self,
        target: SocketAddrV4,
        source: Option<std::net::Ipv4Addr>,
    ) -> Result<TcpStream, Response<()>> {
        let connect = async {
            match source.filter(|_| self.transparent) {
                Some(src) => match transparent_socket(src) {
                    Ok(s) => s.connect(target.into()).await,
                    Err(e) => {
                        debug!(%src, error = %e, "cannot connect from the source pod's address; connecting from the node's");
                        TcpStream::connect(target).await
                    }
                },
                None => TcpStream::connect(target).await,
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => {
                let (reason, what) = match (e.kind(), e.raw_os_error()) {
                    (std::io::ErrorKind::ConnectionRefused, _) => ("pod_refused", "the pod refused"),
                    (_, Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                        ("agent_out_of_resources", "the agent is out of resources")
                    }
                    _ => ("pod_unreachable", "the pod is unreachable"),
                };
                Err(self.reject(
                    StatusCode::SERVICE_UNAVAILABLE,
                    reason,
                    format!("HBONE CONNECT to {target}: {what} ({e})"),
                ))
            }
            Err(_) => Err(self.reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "pod_timeout",
                format!("HBONE CONNECT to {target}: connecting to the pod timed out"),
            )),
        }
    }
}

/// A socket bound to `src`, an address of another node's pod (`IP_TRANSPARENT`), its port
/// chosen at connect time.
fn transparent_socket(src: std::net::Ipv4Addr) -> std::io::Result<tokio::net::TcpSocket> {
    let s = tokio::net::TcpSocket::new_v4()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    crate::steer::set_transparent(fd)?;
    crate::steer::set_bind_address_no_port(fd)?;
    s.set_nodelay(true)?;
    s.bind(SocketAddr::from((src, 0)))?;
    Ok(s)
}

/// An HBONE connection's two ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    pub peer: SocketAddr,
    /// The address it arrived on.
    pub local: Option<std::net::IpAddr>,
    /// That address, when it is one of this node's meshed pods (ztunnel's HBONE): every
    /// CONNECT on the connection must name it.
    pub pod: Option<std::net::Ipv4Addr>,
}

/// The HTTP/2 server settings of HBONE: windows and frames as ztunnel's (4 MiB per stream,
/// 16 MiB per connection) while the node's receive budget lasts, bounded headers and streams,
/// keep-alive pings.
fn h2_server(window: &crate::proxy::caps::ReceiveGrant) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_window_size(window.stream_window())
        .initial_connection_window_size(window.connection_window())
        .max_frame_size(1 << 20);
    b
}

/// What a stream's checks established.
pub(crate) struct Checked {
    pub target: SocketAddrV4,
    pub dst_pod: String,
    pub source_pod: Option<String>,
    /// The source pod's address, verified (it has the client's identity and runs on the node
    /// the connection came from).
    pub source_ip: Option<std::net::Ipv4Addr>,
    pub istio: crate::metrics::IstioLabels,
    /// The destination workload, for the 200's `baggage`.
    pub baggage: String,
}

/// What an HBONE stream is checked against: this node's view of the pods, and the verified
/// identities of the connection it came on.
pub(crate) struct ConnectContext<'a> {
    pub idx: &'a PodIndex,
    pub trust_domain: &'a str,
    pub loopback_pods: bool,
    pub link: Link,
    /// The client's identity, from its verified certificate.
    pub client_id: &'a Identity,
    /// The identity this node presented on the connection.
    pub server_id: &'a Identity,
}

/// Why a stream is refused.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Malformed, misdirected or for no pod here: answered with `status` (400, as ztunnel).
    Rejected { status: StatusCode, reason: &'static str, detail: String },
    /// Authorization policy said no (401, as ztunnel).
    Denied { reason: &'static str, rule: String, target: SocketAddrV4 },
}

fn rejected(status: StatusCode, reason: &'static str, detail: String) -> Refused {
    Refused::Rejected { status, reason, detail }
}

/// The stream's checks, without side effects: a CONNECT to a meshed pod of this node, on a
/// connection for that pod's identity, allowed by policy.
pub(crate) fn check_connect<B>(req: &Request<B>, cx: &ConnectContext<'_>) -> Result<Checked, Refused> {
    let (idx, client_id, server_id, link) = (cx.idx, cx.client_id, cx.server_id, cx.link);
    if req.method() != Method::CONNECT {
        return Err(rejected(
            StatusCode::BAD_REQUEST,
            "not_connect",
            format!("HBONE request from {client_id} is {}, not CONNECT", req.method()),
        ));
    }
    let Some(target) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok()) else {
        return Err(rejected(
            StatusCode::BAD_REQUEST,
            "bad_authority",
            format!("HBONE CONNECT from {client_id} has no ip:port authority ({:?})", req.uri()),
        ));
    };
    let ip = *target.ip();
    if let Some(arrived) = link.pod
        && arrived != ip
    {
        return Err(rejected(
            StatusCode::BAD_REQUEST,
            "authority_mismatch",
            format!("HBONE CONNECT from {client_id} to {target} on a connection addressed to {arrived}"),
        ));
    }
    let this_node = link.pod.is_none() && link.local == Some(std::net::IpAddr::V4(ip));
    if crate::state::special_address(ip)
        || idx.is_node_address(ip)
        || this_node
        || (ip.is_loopback() && !cx.loopback_pods)
    {
        return Err(rejected(
            StatusCode::BAD_REQUEST,
            "forbidden_target",
            format!(
                "HBONE CONNECT from {client_id} to {target}: not a pod address (unspecified, loopback, link-local or a node)"
            ),
        ));
    }
    let Some(pod) = idx.by_ip(ip).filter(|p| idx.is_local(p) && p.workload.meshed) else {
        return Err(rejected(
            StatusCode::BAD_REQUEST,
            "not_on_this_node",
            format!("HBONE CONNECT from {client_id} to {target}: no meshed pod with that address on this node"),
        ));
    };
    let dst_id = pod.workload.identity(cx.trust_domain);
    if dst_id != *server_id {
        return Err(rejected(
            StatusCode::BAD_REQUEST,
            "identity_mismatch",
            format!("HBONE CONNECT from {client_id} to {target} ({dst_id}) on a connection for {server_id}"),
        ));
    }
    // The source is known by its verified identity. Which of its pods: the one the peer
    // names (`Forwarded: for=`), believed only if that pod has that identity (a peer can
    // only ever name pods of its own identity) and the connection comes from its node (a node
    // proxy) or from the pod itself (a ztunnel in the pod's network namespace, as in Istio's
    // in-pod and dedicated modes). Its address is then verified, for policies on source
    // addresses.
    let source = forwarded_for(req.headers())
        .and_then(|ip| idx.by_ip(ip))
        .filter(|p| p.workload.identity(cx.trust_domain) == *client_id && p.workload.meshed)
        .filter(|p| {
            link.peer.ip() == std::net::IpAddr::V4(p.workload.ip)
                || idx.nodes.get(&p.workload.node).is_some_and(|n| std::net::IpAddr::V4(n.address) == link.peer.ip())
        });
    let peer = authz::Peer { identity: client_id, ip: source.map(|p| p.workload.ip) };
    match authz::decide(&idx.authz, peer, pod.workload.authz_destination(target.port())) {
        Decision::Allow => {}
        Decision::Denied(rule) => return Err(Refused::Denied { reason: "deny_rule", rule, target }),
        other => return Err(Refused::Denied { reason: other.reason(), rule: "-".into(), target }),
    }
    let mut istio =
        crate::metrics::IstioLabels::unknown("destination", "tcp").destination(&pod.workload, cx.trust_domain);
    match source {
        Some(src) => istio = istio.source(&src.workload, cx.trust_domain),
        None => {
            istio.source_workload_namespace = client_id.namespace.clone();
            istio.source_principal = client_id.to_string();
        }
    }
    istio.connection_security_policy = "mutual_tls";
    Ok(Checked {
        target,
        baggage: pod.workload.baggage(),
        dst_pod: pod.key.clone(),
        source_pod: source.map(|p| p.key.clone()),
        source_ip: source.map(|p| p.workload.ip),
        istio,
    })
}

/// The source pod's address as an HBONE client names it: the `Forwarded` header's first
/// element's `for=` (RFC 7239), as ztunnel writes it (`for="10.0.0.5:41234"`) or as a bare
/// address (`for=10.0.0.5`). IPv4 only: IPv6 sources are not meshed.
fn forwarded_for(headers: &hyper::HeaderMap) -> Option<std::net::Ipv4Addr> {
    forwarded_source(headers.get(hyper::header::FORWARDED)?.to_str().ok()?)
}

pub(crate) fn forwarded_source(value: &str) -> Option<std::net::Ipv4Addr> {
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let node = node.strip_prefix('"').and_then(|n| n.strip_suffix('"')).unwrap_or(node);
    node.parse().ok().or_else(|| node.parse::<SocketAddrV4>().ok().map(|s| *s.ip()))
}

/// Why the server closes an HBONE connection.
#[derive(Debug, Clone, Copy)]
enum Close {
    Idle,
    CertificateExpired,
    Stopping,
}

/// Streams open on one HBONE connection, and when the last one ended.
struct Activity {
    streams: AtomicUsize,
    last: Mutex<Instant>,
}

/// An answered stream, connected to its pod: what its copy needs.
struct OpenStream {
    tunnel: H2Stream,
    upstream: TcpStream,
    rec: Recorder,
    cancel: idle::Cancel,
    /// Registered for re-checks while the stream is open.
    _open: crate::proxy::recheck::Registration,
}

struct StreamActive(Arc<Activity>);

impl StreamActive {
    /// Counts a stream on the connection until dropped.
    fn start(activity: &Arc<Activity>) -> Self {
        activity.streams.fetch_add(1, Ordering::AcqRel);
        StreamActive(activity.clone())
    }
}

impl Drop for StreamActive {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(v: &str) -> Option<std::net::Ipv4Addr> {
        let mut h = hyper::HeaderMap::new();
        h.insert(hyper::header::FORWARDED, v.parse().unwrap());
        forwarded_for(&h)
    }

    #[test]
    fn the_source_address_is_read_from_forwarded() {
        assert_eq!(forwarded("for=10.244.1.10"), Some([10, 244, 1, 10].into()));
        assert_eq!(forwarded("proto=http; For=\"10.0.0.7\", for=10.0.0.8"), Some([10, 0, 0, 7].into()));
        assert_eq!(forwarded("for=\"10.0.0.9:41234\""), Some([10, 0, 0, 9].into()), "ztunnel's form");
        assert_eq!(forwarded("for=unknown"), None);
        assert_eq!(forwarded("for=\"10.0.0.9"), None, "unbalanced quotes");
        assert_eq!(forwarded("for=\"[2001:db8::1]\""), None, "IPv6 sources are not meshed");
        assert_eq!(forwarded_for(&hyper::HeaderMap::new()), None);
    }
}
