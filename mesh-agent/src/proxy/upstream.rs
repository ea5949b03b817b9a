//! The upstream side of every proxied connection and HTTP request: one connect for every kind
//! of [`Target`] ([`Connector::connect`]: direct TCP, or an HBONE tunnel), one endpoint picker
//! for Services ([`Picker`]: tried endpoints, endpoints behind a peer node that just failed,
//! refused routes), used by TCP connections and HTTP requests alike, and one [`ServiceLimits`]
//! (`switchyard.io/max-connections`, `max-pending-requests`) per Service.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::warn;

use crate::{
    metrics::ProxyMetrics,
    proxy::{
        balance::Balancer,
        pool::{HboneError, Pool, Tunnel, TunnelRequest},
        route::{Path, Refusal, Route, RouteConfig, Target},
    },
    state::ServicePolicy,
};

/// Why an upstream connection could not be had. Typed to the end: what to do about it is
/// asked of it ([`Self::is_final`], [`Self::peer_dead`], [`Self::is_denial`]); [`Self::reason`]
/// is only for metric labels.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("connecting to {dst} timed out after {timeout:?}; maybe a NetworkPolicy or firewall drops it")]
    Timeout { dst: SocketAddrV4, timeout: Duration },
    #[error("connecting to {dst} failed: {source}")]
    Io { dst: SocketAddrV4, source: std::io::Error },
    #[error(transparent)]
    Hbone(#[from] HboneError),
}

impl ConnectError {
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Refused(r) => r.reason(),
            ConnectError::Timeout { .. } => "connect_timeout",
            ConnectError::Io { .. } => "connect_failed",
            ConnectError::Hbone(e) => e.reason(),
        }
    }

    /// Refused by authorization policy, here or by the peer node: a `403` for HTTP clients.
    pub fn is_denial(&self) -> bool {
        match self {
            ConnectError::Refused(r) => r.is_denial(),
            ConnectError::Hbone(e) => e.is_denial(),
            _ => false,
        }
    }

    /// Not the endpoint's fault, and any other endpoint would fail the same: never retried,
    /// never counted against the endpoint (a denial, or no certificate for the source yet).
    pub fn is_final(&self) -> bool {
        self.is_denial() || matches!(self, ConnectError::Hbone(HboneError::NoSourceCert(_)))
    }

    /// The way to the endpoint failed before reaching it (no TCP, no TLS with the peer node):
    /// when the path is HBONE, the peer node's other endpoints would fail too.
    pub fn peer_dead(&self) -> bool {
        match self {
            ConnectError::Timeout { .. } => true,
            ConnectError::Hbone(e) => e.peer_dead(),
            _ => false,
        }
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

/// Opens upstream transports.
pub struct Connector {
    /// HBONE client; `None` when no CA is configured (routing then never picks HBONE).
    pub pool: Option<Arc<Pool>>,
    pub connect_timeout: Duration,
    pub metrics: ProxyMetrics,
}

impl Connector {
    /// One attempt to reach `t`, within the connect timeout. Failures are counted by reason.
    pub async fn connect(&self, t: &Target, source: &crate::proxy::route::Source) -> Result<UpstreamIo, ConnectError> {
        let attempt = async {
            match (&t.path, &self.pool) {
                (Path::Hbone { peer, node }, Some(pool)) => {
                    let dst = t.dst.as_ref().expect("an HBONE target is a meshed pod");
                    let tunnel = pool
                        .connect(TunnelRequest {
                            src: &source.identity,
                            src_ip: source.ip,
                            src_port: source.port,
                            baggage: &source.baggage,
                            dst,
                            peer: *peer,
                            legacy: Some(*node),
                            target: t.ep,
                        })
                        .await
                        .inspect_err(|e| {
                            warn!(src = %source.identity, %dst, %peer, error = %e, "HBONE tunnel failed");
                        })?;
                    Ok(UpstreamIo::Tunnel(Box::new(tunnel)))
                }
                (Path::Hbone { .. }, None) => {
                    Err(ConnectError::Refused(Refusal::MtlsUnavailable(t.dst_pod.clone().unwrap_or_default())))
                }
                (Path::Local | Path::Passthrough, _) => match TcpStream::connect(t.ep).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        Ok(UpstreamIo::Tcp(s))
                    }
                    Err(source) => Err(ConnectError::Io { dst: t.ep, source }),
                },
            }
        };
        let r = match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout { dst: t.ep, timeout: self.connect_timeout }),
        };
        if let Err(e) = &r {
            self.metrics.error(e.reason());
        }
        r
    }

    /// Counts a refused route (and a denial as a denial).
    pub fn refused(&self, r: &Refusal) {
        self.metrics.error(r.reason());
        if r.is_denial() {
            self.metrics.denials.inc(r.reason());
        }
        if let Refusal::Denied(d) = r
            && let crate::authz::Decision::Denied(policy) = &d.decision
        {
            self.metrics.by_policy.inc(policy);
        }
    }
}

/// Chooses the endpoints of one Service for successive attempts of one connection or request:
/// the balancer's pick among those not tried yet, skipping endpoints this source may not
/// reach and those behind a peer node that just failed.
pub struct Picker<'a> {
    route: &'a Route,
    cfg: &'a RouteConfig,
    tried: Vec<SocketAddrV4>,
    /// Nodes whose pods could not be reached over HBONE (TCP or TLS failed) in this attempt.
    dead_nodes: Vec<&'a str>,
    /// When every endpoint has been tried, pick among all again (HTTP retries); otherwise
    /// give up (TCP connect retries).
    repeat: bool,
}

impl<'a> Picker<'a> {
    pub fn new(route: &'a Route, cfg: &'a RouteConfig, repeat: bool) -> Self {
        Picker { route, cfg, tried: Vec::new(), dead_nodes: Vec::new(), repeat }
    }

    /// The node an HBONE target runs on.
    fn hbone_node(&self, t: &Target) -> Option<&'a str> {
        matches!(t.path, Path::Hbone { .. })
            .then(|| self.route.snapshot.by_ip(*t.ep.ip()).map(|p| p.workload.node.as_str()))
            .flatten()
    }

    fn endpoints(&self) -> &'a [SocketAddrV4] {
        match self.route.service() {
            Some(s) => &s.entry.endpoints,
            None => &[],
        }
    }

    /// The next target. The first pick's refusal (with its endpoint) is the answer (the client
    /// asked for that Service and policy says no); later picks skip refused endpoints. `None`:
    /// nothing left.
    pub fn next(&mut self, balancer: &Balancer) -> Option<Result<Target, (SocketAddrV4, Refusal)>> {
        let first = self.tried.is_empty();
        let endpoints = self.endpoints();
        let mut excluded = self.tried.clone();
        loop {
            let mut ep = balancer.pick(endpoints, &excluded);
            if ep.is_none() && self.repeat && !self.tried.is_empty() {
                // Every endpoint tried: any, minus those excluded for cause below.
                excluded.retain(|e| !self.tried.contains(e));
                ep = balancer.pick(endpoints, &excluded);
                if ep.is_some() {
                    self.tried.clear();
                }
            }
            let ep = ep?;
            match self.route.to_endpoint(self.cfg, ep) {
                Ok(t) if self.hbone_node(&t).is_some_and(|n| self.dead_nodes.contains(&n)) => excluded.push(ep),
                Ok(t) => {
                    self.tried.push(ep);
                    return Some(Ok(t));
                }
                Err(r) if first => {
                    self.tried.push(ep);
                    return Some(Err((ep, r)));
                }
                Err(_) => excluded.push(ep),
            }
        }
    }

    /// `t`'s attempt failed with `e`: the other pods of its node are skipped from now on if
    /// the way there is what failed (the node, or its proxy, is likely down).
    pub fn failed(&mut self, t: &Target, e: &ConnectError) {
        if e.peer_dead()
            && let Some(node) = self.hbone_node(t)
            && !self.dead_nodes.contains(&node)
        {
            self.dead_nodes.push(node);
        }
    }

    /// Endpoints tried so far (the current one included).
    pub fn attempts(&self) -> usize {
        self.tried.len()
    }
}

/// Per-Service connection limits (`switchyard.io/max-connections` open at once: TCP
/// connections, or HTTP requests in flight, each holding one upstream connection; and
/// `max-pending-requests` HTTP requests waiting for a slot). Shared by TCP and HTTP.
#[derive(Default)]
pub struct ServiceLimits {
    services: Mutex<HashMap<SocketAddrV4, Arc<Limit>>>,
}

struct Limit {
    policy: ServicePolicy,
    slots: Arc<Semaphore>,
    pending: AtomicU32,
}

/// Past the Service's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitHit {
    pub limit: u32,
    pub pending: u32,
}

/// One of a Service's slots, held until dropped (`None` inside: the Service has no limit).
pub struct Slot(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl ServiceLimits {
    fn limit(&self, vip: SocketAddrV4, policy: &ServicePolicy) -> Option<Arc<Limit>> {
        let max = policy.max_connections?;
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = services.get(&vip)
            && l.policy == *policy
        {
            return Some(l.clone());
        }
        // New Service or a changed policy: fresh limits (holders of old slots finish).
        let l = Arc::new(Limit {
            policy: policy.clone(),
            slots: Arc::new(Semaphore::new(max as usize)),
            pending: AtomicU32::new(0),
        });
        services.insert(vip, l.clone());
        Some(l)
    }

    /// A slot now, or [`LimitHit`] (a TCP connection is reset at once).
    pub fn try_acquire(&self, vip: SocketAddrV4, policy: &ServicePolicy) -> Result<Slot, LimitHit> {
        let Some(l) = self.limit(vip, policy) else { return Ok(Slot(None)) };
        l.slots.clone().try_acquire_owned().map(|p| Slot(Some(p))).map_err(|_| l.hit())
    }

    /// A slot, waiting (until `deadline`, if any) only if one of the pending places is free.
    pub async fn acquire(
        &self,
        vip: SocketAddrV4,
        policy: &ServicePolicy,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Slot, LimitHit> {
        let Some(l) = self.limit(vip, policy) else { return Ok(Slot(None)) };
        if let Ok(p) = l.slots.clone().try_acquire_owned() {
            return Ok(Slot(Some(p)));
        }
        let waiting = l.pending.fetch_add(1, Ordering::AcqRel);
        let r = if waiting < l.policy.max_pending_requests {
            let wait = l.slots.clone().acquire_owned();
            match deadline {
                Some(d) => tokio::time::timeout_at(d, wait).await.ok().and_then(Result::ok),
                None => wait.await.ok(),
            }
        } else {
            None
        };
        l.pending.fetch_sub(1, Ordering::AcqRel);
        r.map(|p| Slot(Some(p))).ok_or_else(|| l.hit())
    }

    /// Forgets Services that are gone (their slots held are released as they end).
    pub fn retain(&self, keep: impl Fn(&SocketAddrV4) -> bool) {
        self.services.lock().unwrap_or_else(|p| p.into_inner()).retain(|vip, _| keep(vip));
    }
}

impl Limit {
    fn hit(&self) -> LimitHit {
        LimitHit { limit: self.policy.max_connections.unwrap_or(0), pending: self.policy.max_pending_requests }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        proxy::route::{self, RouteConfig},
        state::{NodeInfo, NodeState, ServiceEntry, Workload},
        state::{PodIndex, PodStatus},
    };
    use std::net::Ipv4Addr;

    fn pod(name: &str, ip: [u8; 4], node: &str) -> Workload {
        crate::testing::pod("shop", name, ip.into(), node)
    }

    const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80);

    fn ep(ip: [u8; 4]) -> SocketAddrV4 {
        SocketAddrV4::new(ip.into(), 8080)
    }

    /// A Service with endpoints on this node (a, 10.0.0.x), node b (10.0.1.x), node c (10.0.2.x).
    fn service_route(endpoints: &[[u8; 4]]) -> (Route, RouteConfig) {
        let mut state = NodeState { node: "a".into(), ..Default::default() };
        let mut statuses = vec![PodStatus {
            key: "shop/client".into(),
            workload: pod("client", [10, 0, 0, 1], "a"),
            cgroup_id: Some(1),
            redirected: true,
        }];
        for (i, ip) in endpoints.iter().enumerate() {
            let node = match ip[2] {
                0 => "a",
                1 => "b",
                _ => "c",
            };
            statuses.push(PodStatus {
                key: format!("shop/web-{i}"),
                workload: pod(&format!("web-{i}"), *ip, node),
                cgroup_id: None,
                redirected: false,
            });
        }
        // Node c's address is unknown.
        state.nodes.insert("b".into(), NodeInfo { name: "b".into(), address: [192, 168, 0, 2].into() });
        state.services.insert(
            VIP,
            ServiceEntry {
                service: "shop/web".into(),
                endpoints: endpoints.iter().map(|ip| ep(*ip)).collect(),
                ..Default::default()
            },
        );
        let idx = Arc::new(PodIndex::new(&state, statuses));
        let cfg = RouteConfig { trust_domain: "cluster.local".into(), hbone_port: 15008, mtls: true };
        (route::route(&idx, &cfg, VIP, 1).unwrap(), cfg)
    }

    fn dead_peer() -> ConnectError {
        ConnectError::Hbone(HboneError::ConnectTimeout("192.168.0.2:15008".parse().unwrap()))
    }

    #[test]
    fn tcp_picks_each_endpoint_once_then_gives_up() {
        let (r, cfg) = service_route(&[[10, 0, 0, 5], [10, 0, 0, 6], [10, 0, 0, 7]]);
        let b = Balancer::default();
        let mut p = Picker::new(&r, &cfg, false);
        let mut seen: Vec<_> = (0..3).map(|_| p.next(&b).unwrap().unwrap().ep).collect();
        seen.sort();
        assert_eq!(seen, vec![ep([10, 0, 0, 5]), ep([10, 0, 0, 6]), ep([10, 0, 0, 7])]);
        assert!(p.next(&b).is_none());
        assert_eq!(p.attempts(), 3);
    }

    #[test]
    fn http_picks_again_once_all_were_tried() {
        let (r, cfg) = service_route(&[[10, 0, 0, 5]]);
        let b = Balancer::default();
        let mut p = Picker::new(&r, &cfg, true);
        for _ in 0..3 {
            assert_eq!(p.next(&b).unwrap().unwrap().ep, ep([10, 0, 0, 5]));
        }
    }

    #[test]
    fn endpoints_behind_a_dead_peer_node_are_skipped_by_tcp_and_http_alike() {
        for repeat in [false, true] {
            let (r, cfg) = service_route(&[[10, 0, 1, 5], [10, 0, 1, 6], [10, 0, 0, 7]]);
            let b = Balancer::default();
            let mut p = Picker::new(&r, &cfg, repeat);
            // Force the first pick onto node b by trying until one lands there.
            let first = loop {
                let t = p.next(&b).unwrap().unwrap();
                if matches!(t.path, Path::Hbone { .. }) {
                    break t;
                }
            };
            p.failed(&first, &dead_peer());
            for _ in 0..4 {
                match p.next(&b) {
                    Some(Ok(t)) => assert_eq!(t.path, Path::Local, "repeat={repeat}: nothing behind node b"),
                    Some(Err((ep, e))) => panic!("{ep}: {e}"),
                    None => break,
                }
            }
        }
    }

    #[test]
    fn an_endpoint_failure_alone_does_not_condemn_its_peer() {
        let (r, cfg) = service_route(&[[10, 0, 1, 5], [10, 0, 1, 6]]);
        let b = Balancer::default();
        let mut p = Picker::new(&r, &cfg, false);
        let first = p.next(&b).unwrap().unwrap();
        // The peer answered; the pod refused (503 on CONNECT): its sibling is still tried.
        let refused = ConnectError::Hbone(HboneError::Status {
            peer: "192.168.0.2:15008".parse().unwrap(),
            target: first.ep,
            status: hyper::StatusCode::SERVICE_UNAVAILABLE,
            reason: Some("pod_refused".into()),
        });
        assert!(!refused.peer_dead() && !refused.is_final());
        p.failed(&first, &refused);
        assert!(p.next(&b).unwrap().is_ok());
    }

    #[test]
    fn the_first_refusal_is_the_answer_later_ones_are_skipped() {
        // Node c's address is unknown: its endpoint is refused.
        let (r, cfg) = service_route(&[[10, 0, 2, 5]]);
        let b = Balancer::default();
        let mut p = Picker::new(&r, &cfg, false);
        let (refused, why) = p.next(&b).unwrap().unwrap_err();
        assert_eq!((refused, why.reason()), (ep([10, 0, 2, 5]), "unknown_node"));
        let (r, cfg) = service_route(&[[10, 0, 2, 5], [10, 0, 0, 6]]);
        for _ in 0..20 {
            let mut p = Picker::new(&r, &cfg, false);
            match p.next(&b).unwrap() {
                // Refused first: that is the answer.
                Err(_) => continue,
                Ok(t) => {
                    assert_eq!(t.ep, ep([10, 0, 0, 6]));
                    assert!(p.next(&b).is_none(), "the refused endpoint is not a retry");
                }
            }
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        let denied = ConnectError::Hbone(HboneError::Status {
            peer: "192.168.0.2:15008".parse().unwrap(),
            target: ep([10, 0, 1, 5]),
            status: hyper::StatusCode::FORBIDDEN,
            reason: None,
        });
        assert!(denied.is_denial() && denied.is_final() && !denied.peer_dead());
        assert_eq!(denied.reason(), "hbone_denied");
        let no_cert = ConnectError::Hbone(HboneError::NoSourceCert("x".into()));
        assert!(no_cert.is_final() && !no_cert.is_denial());
        let refused = ConnectError::Io {
            dst: ep([10, 0, 0, 5]),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(!refused.is_final() && !refused.peer_dead());
        assert_eq!(refused.reason(), "connect_failed");
        let timeout = ConnectError::Timeout { dst: ep([10, 0, 0, 5]), timeout: Duration::from_millis(1) };
        assert!(timeout.peer_dead() && !timeout.is_final());
        assert!(dead_peer().peer_dead());
    }

    #[tokio::test]
    async fn limits_are_shared_and_pending_requests_wait() {
        let limits = ServiceLimits::default();
        let policy = ServicePolicy { max_connections: Some(1), max_pending_requests: 1, ..Default::default() };
        let held = limits.try_acquire(VIP, &policy).unwrap();
        assert_eq!(limits.try_acquire(VIP, &policy).err(), Some(LimitHit { limit: 1, pending: 1 }));
        // One may wait; a second waiter is refused at once.
        let limits = Arc::new(limits);
        let l2 = limits.clone();
        let p2 = policy.clone();
        let waiter = tokio::spawn(async move { l2.acquire(VIP, &p2, None).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(limits.acquire(VIP, &policy, None).await.is_err());
        drop(held);
        assert!(waiter.await.unwrap());
        // A deadline bounds the wait.
        let _held = limits.try_acquire(VIP, &policy).unwrap();
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(limits.acquire(VIP, &policy, Some(soon)).await.is_err());
        // No limit: always a slot.
        assert!(limits.try_acquire(VIP, &ServicePolicy::default()).is_ok());
    }
}
