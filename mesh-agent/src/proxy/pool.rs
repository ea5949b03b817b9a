//! HBONE client: pooled mTLS HTTP/2 connections to other nodes' pods, one `CONNECT` stream
//! per proxied TCP connection, on the wire exactly as Istio's ztunnel speaks it: TCP to the
//! destination pod's own address on port 15008 (whichever proxy serves it answers there), TLS
//! 1.3 without SNI, ALPN `h2`, the server's certificate required to name the destination
//! workload's SPIFFE ID exactly; `CONNECT <pod ip>:<port>` with `forwarded`, `baggage` and
//! `traceparent`; exactly `200` opens the tunnel.
//!
//! Connections are pooled per (source identity, destination identity, destination pod address):
//! the client certificate is the source workload's, the server presents the destination
//! workload's, and it answers only for the address it was reached on, so a connection can only
//! carry streams between that pair to that pod. A connection takes at
//! most `max_streams` streams at once; beyond that another is opened. A connection made with a
//! certificate that has since been renewed takes no new streams (its open streams finish), and
//! one idle for `idle` is closed.
use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{Method, Request, StatusCode};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::{
    identity::{Identity, manager::CertManager},
    proxy::h2io::{self, H2Stream},
    tls::{self, TrustBundle},
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no certificate for source identity {0} on this node")]
    NoSourceCert(String),
    #[error("connecting to HBONE peer {peer} failed: {source}; maybe a NetworkPolicy or firewall blocks port 15008")]
    Connect { peer: SocketAddr, source: std::io::Error },
    #[error("connecting to HBONE peer {0} timed out; maybe a NetworkPolicy or firewall blocks port 15008")]
    ConnectTimeout(SocketAddr),
    #[error("mTLS handshake with {peer} failed ({reason}): {detail}")]
    Tls { peer: SocketAddr, reason: &'static str, detail: String },
    #[error("HTTP/2 with {peer} failed: {source}")]
    H2 { peer: SocketAddr, source: h2::Error },
    #[error("peer {peer} answered CONNECT {target} with {status}{}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Status { peer: SocketAddr, target: SocketAddrV4, status: StatusCode, reason: Option<String> },
    #[error("HBONE peer {peer} failed {failures} time(s) in a row ({cause}); not retried for {retry_in:?}")]
    PeerBackoff { peer: SocketAddr, failures: u32, cause: String, retry_in: Duration },
    #[error("peer {peer} did not answer CONNECT {target} within {timeout:?}")]
    ConnectStreamTimeout { peer: SocketAddr, target: SocketAddrV4, timeout: Duration },
}

impl HboneError {
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::NoSourceCert(_) => "no_source_certificate",
            HboneError::Connect { .. } => "hbone_connect_failed",
            HboneError::ConnectTimeout(_) => "hbone_connect_timeout",
            HboneError::Tls { .. } => "hbone_tls_failed",
            HboneError::H2 { .. } => "hbone_h2_failed",
            HboneError::ConnectStreamTimeout { .. } => "hbone_stream_timeout",
            HboneError::Status { status, .. } if is_denial_status(*status) => "hbone_denied",
            HboneError::Status { .. } => "hbone_rejected",
            HboneError::PeerBackoff { .. } => "hbone_peer_backoff",
        }
    }

    /// The peer node's authorization refused the stream.
    pub fn is_denial(&self) -> bool {
        matches!(self, HboneError::Status { status, .. } if is_denial_status(*status))
    }

    /// The peer node itself could not be reached (TCP or TLS): its other pods cannot either.
    pub fn peer_dead(&self) -> bool {
        matches!(
            self,
            HboneError::Connect { .. }
                | HboneError::ConnectTimeout(_)
                | HboneError::Tls { .. }
                | HboneError::PeerBackoff { .. }
        )
    }
}

/// An authorization denial by the server: 401, as ztunnel answers it (Switchyard before its
/// ztunnel-compatible HBONE answered 403).
fn is_denial_status(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

/// The header a server sets on a non-200 CONNECT answer to say why.
pub const REASON_HEADER: &str = "x-switchyard-reason";
/// W3C baggage: the source workload on a CONNECT, the destination workload on its 200.
pub const BAGGAGE_HEADER: &str = "baggage";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: Identity,
    dst: Identity,
    peer: SocketAddr,
}

/// The pooled connections of one key; the async lock serialises opening new ones.
type Slot = Arc<tokio::sync::Mutex<Vec<Arc<Conn>>>>;

struct Conn {
    send: h2::client::SendRequest<Bytes>,
    /// Set by the connection's task when it has ended.
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// Set when a stream on it failed at the HTTP/2 level (e.g. the peer sent GOAWAY):
    /// no new streams go to it.
    broken: std::sync::atomic::AtomicBool,
    active: Arc<AtomicUsize>,
    cert_generation: u64,
    last_used: Mutex<Instant>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[derive(Clone, Default)]
pub struct PoolMetrics {
    /// mTLS handshakes made by the client side (one per pooled connection).
    pub handshakes: Counter,
    pub open_connections: Gauge,
    /// Connections opened in Switchyard's older dialect (node address, SNI) because the pod's
    /// address refused: peers whose agent is not upgraded yet.
    pub legacy: Counter,
}

impl PoolMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "hbone_client_handshakes",
            "mTLS handshakes made to other nodes (one per pooled connection)",
            self.handshakes.clone(),
        );
        reg.register("hbone_pool_connections", "Pooled HBONE client connections open", self.open_connections.clone());
        reg.register(
            "hbone_legacy_connections",
            "HBONE connections opened to a node in Switchyard's older dialect (node address, SNI) because the pod's address refused: a node whose agent is not upgraded yet",
            self.legacy.clone(),
        );
    }
}

/// A tunnel to open: from the source pod (`src`, at `src_ip`, its socket's port `src_port`,
/// its workload described by `baggage`) to `target`, a pod of identity `dst`, through whichever
/// proxy answers at `peer` (the pod's address, port 15008); if nothing does (refused), through
/// `legacy`, the node's agent in Switchyard's older dialect (node address, SNI).
#[derive(Debug, Clone, Copy)]
pub struct TunnelRequest<'a> {
    pub src: &'a Identity,
    pub src_ip: std::net::Ipv4Addr,
    pub src_port: u16,
    pub baggage: &'a str,
    pub dst: &'a Identity,
    pub peer: SocketAddr,
    pub legacy: Option<SocketAddr>,
    pub target: SocketAddrV4,
}

pub struct Pool {
    certs: Arc<CertManager>,
    bundle: TrustBundle,
    connect_timeout: Duration,
    max_streams: usize,
    idle: Duration,
    slots: Mutex<HashMap<Key, Slot>>,
    /// Peers whose last connection attempt failed: callers back off together (see
    /// [`PeerFailure`]) instead of each waiting out its own connect timeout in turn.
    failures: Mutex<HashMap<SocketAddr, PeerFailure>>,
    pub metrics: PoolMetrics,
}

/// A peer node's consecutive failed connection attempts. Until `at + backoff(failures)`, a
/// caller that would open a connection to it fails at once with [`HboneError::PeerBackoff`]:
/// callers queued behind the failed attempt get its result, not a connect timeout each.
#[derive(Debug, Clone)]
struct PeerFailure {
    at: Instant,
    failures: u32,
    cause: String,
}

/// How long a peer that failed `failures` times in a row is not tried again: 100 ms, doubling,
/// at most 2 s.
pub fn peer_backoff(failures: u32) -> Duration {
    Duration::from_millis(100).saturating_mul(1 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(2))
}

/// An open tunnel. Holding it counts as a stream on its pooled connection.
pub struct Tunnel {
    pub io: H2Stream,
    _stream: StreamGuard,
}

struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        *self.0.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

impl Pool {
    pub fn new(
        certs: Arc<CertManager>,
        bundle: TrustBundle,
        connect_timeout: Duration,
        max_streams: usize,
        idle: Duration,
    ) -> Self {
        Pool {
            certs,
            bundle,
            connect_timeout,
            max_streams,
            idle,
            slots: Mutex::default(),
            failures: Mutex::default(),
            metrics: PoolMetrics::default(),
        }
    }

    /// Opens a tunnel from `src` to `target` (a pod of identity `dst`) through the node proxy at
    /// `peer`. A stream that fails at the HTTP/2 level (the peer went away, is draining, or
    /// refused it, as it does on a connection whose certificate is about to expire) is retried
    /// once on a new connection: no byte of the client's has gone into the tunnel yet.
    pub async fn connect(&self, t: TunnelRequest<'_>) -> Result<Tunnel, HboneError> {
        match self.try_connect(t).await {
            Err((HboneError::H2 { .. }, reused)) => {
                debug!(peer = %t.peer, reused, "HBONE stream failed at the HTTP/2 level; retrying on a new connection");
                self.try_connect(t).await.map_err(|(e, _)| e)
            }
            r => r.map_err(|(e, _)| e),
        }
    }

    /// The error comes with whether the connection was a reused one.
    async fn try_connect(&self, t: TunnelRequest<'_>) -> Result<Tunnel, (HboneError, bool)> {
        let TunnelRequest { src, src_ip, src_port, baggage, dst, peer, legacy, target } = t;
        let key = Key { src: src.clone(), dst: dst.clone(), peer };
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone();
        let (guard, reused) = {
            let mut conns = slot.lock().await;
            // The certificate as it is once the slot is ours: waiting for the lock may have
            // outlasted a renewal, and a new connection with the old certificate would be
            // refused by the peer when it expires moments later.
            let cert = self.certs.get(src).ok_or_else(|| (HboneError::NoSourceCert(src.to_string()), false))?;
            conns.retain(|c| !c.is_closed() && !c.broken.load(Ordering::Acquire));
            let reusable = conns.iter().find(|c| {
                c.cert_generation == cert.generation
                    && c.active.load(Ordering::Acquire) < self.max_streams.min(c.send.current_max_send_streams())
            });
            let (conn, reused) = match reusable {
                Some(c) => (c.clone(), true),
                None => {
                    self.check_backoff(peer).map_err(|e| (e, false))?;
                    let c = match self.open_or_legacy(&cert, dst, peer, legacy).await {
                        Ok(c) => Arc::new(c),
                        Err(e) => {
                            self.note_failure(peer, &e);
                            return Err((e, false));
                        }
                    };
                    self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer);
                    conns.push(c.clone());
                    (c, false)
                }
            };
            // Counted under the lock, so concurrent callers see it.
            conn.active.fetch_add(1, Ordering::AcqRel);
            (StreamGuard(conn), reused)
        };
        let send = guard.0.send.clone();
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            // RFC 7239, as ztunnel sends it: the source pod's address and port.
            .header(hyper::header::FORWARDED, format!("for=\"{src_ip}:{src_port}\""))
            .body(())
            .expect("CONNECT request parts are valid");
        if let Ok(v) = hyper::header::HeaderValue::from_str(baggage) {
            req.headers_mut().insert(BAGGAGE_HEADER, v);
        }
        // A span of its own for the tunnel, as ztunnel starts one per connection.
        crate::proxy::trace::continue_or_start(req.headers_mut(), 0.0);
        let timeout = self.connect_timeout;
        let exchange = async {
            let h2 = |source| HboneError::H2 { peer, source };
            // A stream beyond the peer's limit on concurrent streams waits in h2 for a free
            // one (within the timeout).
            let mut send = send.ready().await.map_err(h2)?;
            let (resp, stream) = send.send_request(req, false).map_err(h2)?;
            let resp = resp.await.map_err(h2)?;
            if resp.status() != StatusCode::OK {
                let reason = resp.headers().get(REASON_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
                return Err(HboneError::Status { peer, target, status: resp.status(), reason });
            }
            Ok(H2Stream::new(stream, resp.into_body()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(io)) => Ok(Tunnel { io, _stream: guard }),
            Ok(Err(e)) => {
                if matches!(e, HboneError::H2 { .. }) {
                    guard.0.broken.store(true, Ordering::Release);
                }
                Err((e, reused))
            }
            Err(_) => Err((HboneError::ConnectStreamTimeout { peer, target, timeout }, reused)),
        }
    }

    /// Fails at once while `peer` is backed off after failed attempts.
    fn check_backoff(&self, peer: SocketAddr) -> Result<(), HboneError> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(&peer) {
            Some(f) if f.at.elapsed() < peer_backoff(f.failures) => Err(HboneError::PeerBackoff {
                peer,
                failures: f.failures,
                cause: f.cause.clone(),
                retry_in: peer_backoff(f.failures).saturating_sub(f.at.elapsed()),
            }),
            _ => Ok(()),
        }
    }

    fn note_failure(&self, peer: SocketAddr, e: &HboneError) {
        if !e.peer_dead() {
            return;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let f = failures.entry(peer).or_insert(PeerFailure { at: Instant::now(), failures: 0, cause: String::new() });
        f.at = Instant::now();
        f.failures = f.failures.saturating_add(1);
        f.cause = e.to_string();
    }

    /// [`Pool::open`] to the pod's address; if that is refused and the node's agent is known,
    /// to the node in Switchyard's older dialect (an agent from before ztunnel's addressing:
    /// nothing steers the pod's address to it, so the pod itself refuses). Both are the same
    /// mutual TLS with the destination's identity verified: a refusal cannot downgrade anything.
    async fn open_or_legacy(
        &self,
        cert: &crate::identity::manager::WorkloadCert,
        dst: &Identity,
        peer: SocketAddr,
        legacy: Option<SocketAddr>,
    ) -> Result<Conn, HboneError> {
        match (self.open(cert, dst, peer, None).await, legacy) {
            (Err(HboneError::Connect { source, .. }), Some(node))
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                debug!(%peer, %node, "the pod's address refused HBONE; trying its node's agent in the older dialect");
                self.metrics.legacy.inc();
                self.open(cert, dst, node, Some(dst.sni())).await
            }
            (r, _) => r,
        }
    }

    /// A pooled connection to `peer`: without SNI (ztunnel's HBONE, addressed to the pod), or
    /// with `sni` (the older dialect, addressed to the node).
    async fn open(
        &self,
        cert: &crate::identity::manager::WorkloadCert,
        dst: &Identity,
        peer: SocketAddr,
        sni: Option<String>,
    ) -> Result<Conn, HboneError> {
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(peer)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(HboneError::Connect { peer, source }),
            Err(_) => return Err(HboneError::ConnectTimeout(peer)),
        };
        let _ = tcp.set_nodelay(true);
        let config = tls::client_config(cert.key.clone(), dst.clone(), &self.bundle, sni.is_some());
        // No SNI (rustls sends none for an address): the server picks its certificate by the
        // address it was reached on, and the verifier checks the SPIFFE ID, not a name.
        let server_name = match sni.map(ServerName::try_from) {
            Some(Ok(name)) => name,
            Some(Err(e)) => {
                return Err(HboneError::Tls { peer, reason: "bad_server_name", detail: e.to_string() });
            }
            None => ServerName::IpAddress(peer.ip().into()),
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        let handshake = tokio::time::timeout(self.connect_timeout, connector.connect(server_name, tcp));
        let tls = match handshake.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(HboneError::Tls { peer, reason: tls::failure_reason(&e), detail: tls::describe(&e) });
            }
            Err(_) => return Err(HboneError::Tls { peer, reason: "timeout", detail: "handshake timed out".into() }),
        };
        self.metrics.handshakes.inc();
        // h2 itself, not hyper: its streams are written directly (see `h2io`).
        let (send, conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            // As ztunnel: the peer may send DATA frames of up to 1 MiB (fewer frame headers
            // and wake-ups per MiB of bulk than at the protocol's default 16 KiB).
            .max_frame_size(1 << 20)
            .max_header_list_size(16 << 10)
            // hyper's client values: 1 MiB buffered per stream; 100 streams until the peer's
            // SETTINGS say otherwise.
            .max_send_buffer_size(1 << 20)
            .initial_max_send_streams(100)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { peer, source })?;
        info!(%peer, dst = %dst, generation = cert.generation, "HBONE connection opened");
        let gauge = self.metrics.open_connections.clone();
        gauge.inc();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            // As ztunnel: a PING every 10 s; no answer in 20 s ends the connection.
            let why = h2io::drive_client(conn, Duration::from_secs(10), Duration::from_secs(20)).await;
            ended.store(true, Ordering::Release);
            debug!(%peer, why, "HBONE connection ended");
            gauge.dec();
        });
        Ok(Conn {
            send,
            closed,
            broken: std::sync::atomic::AtomicBool::new(false),
            active: Arc::new(AtomicUsize::new(0)),
            cert_generation: cert.generation,
            last_used: Mutex::new(Instant::now()),
        })
    }

    /// Closes connections with no stream that have been idle for longer than the idle time or
    /// were made with a certificate since renewed. Returns how many.
    pub async fn reap(&self) -> usize {
        let slots: Vec<_> =
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut closed = 0;
        for (key, slot) in slots {
            let current = self.certs.get(&key.src).map(|c| c.generation);
            let mut conns = slot.lock().await;
            let before = conns.len();
            conns.retain(|c| {
                let unused = c.active.load(Ordering::Acquire) == 0;
                let idle = c.last_used.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= self.idle;
                let stale = current != Some(c.cert_generation);
                !(unused && (idle || stale || c.broken.load(Ordering::Acquire))) && !c.is_closed()
            });
            closed += before - conns.len();
        }
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| s.try_lock().map_or(true, |c| !c.is_empty()));
        // Failures long past their backoff are forgotten (the map stays as small as the peers).
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, f| f.at.elapsed() < Duration::from_secs(60));
        closed
    }

    /// Runs [`Pool::reap`] periodically until `stop`.
    pub async fn run_reaper(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let period = (self.idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let n = self.reap().await;
            if n > 0 {
                debug!(closed = n, "idle HBONE connections released");
            }
        }
    }

    /// Pooled connections per destination pod, for the admin API.
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .map(|(k, s)| {
                let conns =
                    s.try_lock().map(|c| c.iter().map(|c| c.active.load(Ordering::Relaxed)).collect::<Vec<_>>());
                serde_json::json!({
                    "src": k.src.to_string(),
                    "dst": k.dst.to_string(),
                    "peer": k.peer.to_string(),
                    "streams_per_connection": conns.unwrap_or_default(),
                })
            })
            .collect()
    }
}
