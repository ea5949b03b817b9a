//! The in-process tier: outbound → pool → inbound on 127.0.0.0/8, no root needed (see
//! `crate::testing`). Pool behaviour as ztunnel tests its pool (reuse, stream limits, GOAWAY,
//! idle and stale release, dead peers); the retry loop against scripted endpoints.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::Ordering,
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    identity::Identity,
    proxy::{
        conns::Security,
        pool::{HboneError, TunnelRequest},
    },
    state::{ProtocolHint, ServiceEntry, ServicePolicy},
    testing::{
        Cluster, InboundProxy, OutboundProxy, Pki, ProxyOptions, Script, TRUST_DOMAIN, echo, http_endpoint,
        http_request, pool, pool_with,
    },
};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);

fn id(sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, "shop", sa)
}

/// A tunnel from a pod on 127.0.0.1 to `target` through the node proxy at `peer`.
fn req<'a>(src: &'a Identity, dst: &'a Identity, peer: SocketAddr, target: SocketAddrV4) -> TunnelRequest<'a> {
    TunnelRequest { src, src_ip: Ipv4Addr::LOCALHOST, src_port: 40000, baggage: "", dst, peer, legacy: None, target }
}

fn ip(a: u8, b: u8, c: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, a, b, c)
}

/// Waits (bounded) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn roundtrip(c: &mut tokio::net::TcpStream, msg: &[u8]) -> Vec<u8> {
    c.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got)).await.expect("echoed in time").unwrap();
    got
}

/// Node a (client, 127.0.0.1) and node b (at `node_b`) with the pod `shop/server` at
/// `server_ip`, running an echo server; node b's HBONE server is up.
struct TwoNodes {
    out: OutboundProxy,
    inb: InboundProxy,
    server: SocketAddrV4,
    pool: std::sync::Arc<crate::proxy::pool::Pool>,
    certs: std::sync::Arc<crate::identity::manager::CertManager>,
}

async fn two_nodes(octet: u8, max_streams: usize, inbound_idle: Duration, edit: impl FnOnce(&mut Cluster)) -> TwoNodes {
    two_nodes_with(octet, max_streams, inbound_idle, Duration::from_secs(3600), edit).await
}

async fn two_nodes_with(
    octet: u8,
    max_streams: usize,
    inbound_idle: Duration,
    cert_lifetime: Duration,
    edit: impl FnOnce(&mut Cluster),
) -> TwoNodes {
    let pki = Pki::new();
    let node_b = ip(octet, 0, 1);
    let server = echo(SocketAddr::from((ip(octet, 1, 1), 0))).await;
    let mut cluster = Cluster::new();
    // Node a's HBONE connections come from 127.0.0.1.
    cluster.add_node("a", Ipv4Addr::LOCALHOST);
    cluster.add_node("b", node_b);
    cluster.add_pod("shop", "server", *server.ip(), "b");
    edit(&mut cluster);
    let inb = InboundProxy::start(&cluster, "b", node_b, &pki, inbound_idle).await;
    let certs = pki.certs_for(&[id("client")], cert_lifetime).await;
    let (pool, certs) = pool_with(certs, &pki, max_streams, Duration::from_secs(60));
    let opts = ProxyOptions { pool: Some(pool.clone()), hbone_port: inb.addr.port(), ..Default::default() };
    let out = OutboundProxy::start(&cluster, opts).await;
    TwoNodes { out, inb, server, pool, certs }
}

/// A node whose agent predates ztunnel's addressing answers on its own address only, by SNI:
/// the pod's address refuses, and the pool reaches the node in the older dialect (a rolling
/// upgrade of the agents keeps HBONE working both ways).
#[tokio::test]
async fn a_node_still_on_the_older_dialect_is_reached_by_its_address_and_sni() {
    let pki = Pki::new();
    let node_b = ip(16, 0, 1);
    let server = echo(SocketAddr::from((ip(16, 1, 1), 0))).await;
    let mut cluster = Cluster::new();
    cluster.add_node("a", Ipv4Addr::LOCALHOST);
    cluster.add_node("b", node_b);
    cluster.add_pod("shop", "server", *server.ip(), "b");
    let inb = InboundProxy::start_older_dialect(&cluster, "b", node_b, &pki, Duration::from_secs(60)).await;
    let (pool, _) = pool(&pki, &[id("client")], 100, Duration::from_secs(60)).await;
    let opts = ProxyOptions { pool: Some(pool.clone()), hbone_port: inb.addr.port(), ..Default::default() };
    let out = OutboundProxy::start(&cluster, opts).await;
    for _ in 0..3 {
        let mut c = out.connect(server).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"older dialect").await, b"older dialect");
    }
    assert_eq!(pool.metrics.legacy.get(), 1, "one connection in the older dialect, then pooled");
    assert_eq!(pool.metrics.handshakes.get(), 1);
    let snap = pool.snapshot();
    assert_eq!(snap[0]["peer"], format!("{}:{}", server.ip(), inb.addr.port()), "pooled under the pod's address");
}

#[tokio::test]
async fn a_pod_on_another_node_is_reached_over_hbone_with_both_identities() {
    let t = two_nodes(10, 100, Duration::from_secs(60), |_| {}).await;
    let mut c = t.out.connect(t.server).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"over hbone").await, b"over hbone");
    drop(c);
    let out = &t.out.outbound.observe.conns;
    until("the outbound record closed", || out.snapshot().closed_total == 1).await;
    let rec = &out.snapshot().recent[0];
    assert_eq!(rec.security, Security::MutualTls);
    assert_eq!(rec.destination_identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/server"));
    assert_eq!(
        rec.source_identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/client"),
        "presented over HBONE"
    );
    let inb = &t.inb.inbound.observe.conns;
    until("the inbound record closed", || inb.snapshot().closed_total == 1).await;
    let rec = &inb.snapshot().recent[0];
    assert_eq!(rec.source_identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/client"));
    assert_eq!(rec.source_pod.as_deref(), Some("shop/client"), "Forwarded names the source pod, believed");
    assert_eq!((rec.bytes_sent, rec.bytes_received), (10, 10));
}

#[tokio::test]
async fn the_pool_reuses_one_connection_for_successive_streams() {
    let t = two_nodes(11, 100, Duration::from_secs(60), |_| {}).await;
    for _ in 0..3 {
        let mut c = t.out.connect(t.server).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"x").await, b"x");
    }
    assert_eq!(t.pool.metrics.handshakes.get(), 1, "one handshake for three tunnels");
}

#[tokio::test]
async fn past_its_stream_limit_the_pool_opens_another_connection() {
    let t = two_nodes(12, 1, Duration::from_secs(60), |_| {}).await;
    let mut a = t.out.connect(t.server).await.unwrap();
    assert_eq!(roundtrip(&mut a, b"a").await, b"a");
    let mut b = t.out.connect(t.server).await.unwrap();
    assert_eq!(roundtrip(&mut b, b"b").await, b"b");
    assert_eq!(t.pool.metrics.handshakes.get(), 2, "one stream per connection");
    let streams = t.pool.snapshot()[0]["streams_per_connection"].clone();
    assert_eq!(streams, serde_json::json!([1, 1]));
}

#[tokio::test]
async fn after_the_servers_goaway_new_streams_go_to_a_new_connection() {
    // The server closes connections idle for 200 ms with GOAWAY.
    let t = two_nodes(13, 100, Duration::from_millis(200), |_| {}).await;
    let mut c = t.out.connect(t.server).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"1").await, b"1");
    drop(c);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut c = t.out.connect(t.server).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"2").await, b"2", "the tunnel after GOAWAY works");
    assert_eq!(t.pool.metrics.handshakes.get(), 2, "on a new connection");
}

#[tokio::test]
async fn idle_connections_are_released_and_busy_ones_kept() {
    let pki = Pki::new();
    let node_b = ip(14, 0, 1);
    let server = echo(SocketAddr::from((ip(14, 1, 1), 0))).await;
    let mut cluster = Cluster::new();
    cluster.add_node("b", node_b);
    cluster.add_pod("shop", "server", *server.ip(), "b");
    let inb = InboundProxy::start(&cluster, "b", node_b, &pki, Duration::from_secs(60)).await;
    let (pool, _) = pool(&pki, &[id("client")], 100, Duration::from_millis(100)).await;
    let peer = SocketAddr::from((*server.ip(), inb.addr.port()));
    let tunnel = pool.connect(req(&id("client"), &id("server"), peer, server)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pool.reap().await, 0, "a connection with an open stream stays");
    drop(tunnel);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pool.reap().await, 1, "idle past the idle time: released");
    assert!(pool.snapshot().is_empty());
}

#[tokio::test]
async fn a_connection_made_with_a_renewed_certificate_takes_no_new_streams() {
    // Certificates of 4 s, renewed at half-life.
    let t = two_nodes_with(15, 100, Duration::from_secs(60), Duration::from_secs(4), |_| {}).await;
    let mut c = t.out.connect(t.server).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"old").await, b"old");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    t.certs.sync(&[id("client")].into_iter().collect()).await;
    assert_eq!(t.certs.get(&id("client")).unwrap().generation, 2, "renewed");
    let mut d = t.out.connect(t.server).await.unwrap();
    assert_eq!(roundtrip(&mut d, b"new").await, b"new");
    assert_eq!(t.pool.metrics.handshakes.get(), 2, "the new certificate makes a new connection");
    assert_eq!(t.pool.reap().await, 0, "the stale connection still carries a stream");
    drop(c);
    until("the old stream ended", || t.out.outbound.observe.conns.snapshot().closed_total == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(t.pool.reap().await, 1, "the stale connection goes once unused");
    drop(d);
}

#[tokio::test]
async fn callers_back_off_together_from_a_peer_that_failed() {
    let pki = Pki::new();
    let (pool, _) = pool(&pki, &[id("client")], 100, Duration::from_secs(60)).await;
    // Nothing listens there: connection refused.
    let dead: SocketAddr = SocketAddr::from((ip(16, 0, 1), 1));
    let target = SocketAddrV4::new(ip(16, 1, 1), 80);
    let first = pool.connect(req(&id("client"), &id("server"), dead, target)).await.err().unwrap();
    assert!(matches!(first, HboneError::Connect { .. }), "{first}");
    // Another identity pair to the same peer: no attempt of its own, the shared failure.
    let second = pool.connect(req(&id("other"), &id("server"), dead, target)).await;
    match second {
        Err(HboneError::NoSourceCert(_)) => {}
        other => panic!("{:?}", other.err()),
    }
    let again = pool.connect(req(&id("client"), &id("server"), dead, target)).await.err().unwrap();
    assert!(matches!(again, HboneError::PeerBackoff { failures: 1, .. }), "{again}");
    assert!(again.peer_dead(), "a backed-off peer is skipped like a dead one");
    tokio::time::sleep(crate::proxy::pool::peer_backoff(1) + Duration::from_millis(20)).await;
    let later = pool.connect(req(&id("client"), &id("server"), dead, target)).await.err().unwrap();
    assert!(matches!(later, HboneError::Connect { .. }), "tried again after the backoff: {later}");
    assert_eq!(pool.metrics.handshakes.get(), 0);
}

/// A stream the client resets while the server is still connecting to the pod is abandoned
/// there: h2 stops counting a reset stream against the connection's stream limit, so a peer
/// repeating HEADERS then RST_STREAM must not open pod connections without bound.
#[tokio::test]
async fn a_stream_reset_before_its_answer_stops_the_servers_connect_to_the_pod() {
    let pki = Pki::new();
    let node_b = ip(29, 0, 1);
    // A pod whose accept queue is full and never drained: connecting to it hangs (the kernel
    // drops the SYNs), so the server's connect runs into its 2 s timeout unless abandoned.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((ip(29, 1, 1), 0))).unwrap();
    let listener = sock.listen(0).unwrap();
    let SocketAddr::V4(pod) = listener.local_addr().unwrap() else { unreachable!("bound on IPv4") };
    let fillers: Vec<_> = (0..4).map(|_| tokio::spawn(tokio::net::TcpStream::connect(pod))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cluster = Cluster::new();
    cluster.add_node("a", Ipv4Addr::LOCALHOST);
    cluster.add_node("b", node_b);
    cluster.add_pod("shop", "server", *pod.ip(), "b");
    let inb = InboundProxy::start(&cluster, "b", node_b, &pki, Duration::from_secs(60)).await;
    let certs = pki.certs_for(&[id("client")], Duration::from_secs(3600)).await;
    // The client would wait longer than the server's connect.
    let pool =
        crate::proxy::pool::Pool::new(certs, pki.bundle.clone(), Duration::from_secs(10), 100, Duration::from_secs(60));
    let (src, dst) = (id("client"), id("server"));
    let peer = SocketAddr::from((*pod.ip(), inb.addr.port()));
    let rejected = |reason| inb.inbound.metrics.rejected.get(reason);

    // Control: a stream the client waits for gets the server's 503 once its connect times out.
    let waited = pool.connect(req(&src, &dst, peer, pod)).await.err().expect("the pod never accepts");
    assert!(matches!(waited, HboneError::Status { status, .. } if status == 503), "{waited}");
    assert_eq!(rejected("pod_timeout"), 1, "the setup makes the server's connect hang");

    // The client gives up (its future dropped: RST_STREAM) while the server is connecting.
    let gave_up = tokio::time::timeout(Duration::from_millis(300), pool.connect(req(&src, &dst, peer, pod))).await;
    assert!(gave_up.is_err(), "still connecting when the client gave up");
    // Past the server's connect timeout: the abandoned connect never timed out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rejected("pod_timeout"), 1, "the reset stream's connect was abandoned, not run out");
    drop((fillers, listener));
}

#[tokio::test]
async fn a_denial_by_the_peer_node_is_final_and_counted() {
    let t = two_nodes(17, 100, Duration::from_secs(60), |c| {
        c.state.authz.push(
            crate::authz::RuleSpec {
                name: "no-client".into(),
                namespace: "shop".into(),
                workload: None,
                ports: vec![],
                action: crate::authz::Action::Deny,
                from: vec!["spiffe://cluster.local/ns/shop/sa/client".into()],
            }
            .try_into()
            .unwrap(),
        );
    })
    .await;
    let mut c = t.out.connect(t.server).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "the client's connection is closed: {r:?}");
    until("the denial counted", || t.out.errors("hbone_denied") == 1).await;
    assert_eq!(t.inb.inbound.metrics.denied.get("deny_rule"), 1);
}

#[tokio::test]
async fn a_connection_denied_here_is_recorded_with_both_pods() {
    let server = echo(SocketAddr::from((ip(26, 0, 1), 0))).await;
    let mut cluster = Cluster::new();
    cluster.add_pod("shop", "vault", *server.ip(), "a");
    cluster.state.authz.push(
        crate::authz::RuleSpec {
            name: "no-client".into(),
            namespace: "shop".into(),
            workload: Some("vault".into()),
            ports: vec![],
            action: crate::authz::Action::Deny,
            from: vec!["spiffe://cluster.local/ns/shop/sa/client".into()],
        }
        .try_into()
        .unwrap(),
    );
    let p = OutboundProxy::start(&cluster, ProxyOptions::default()).await;
    let mut c = p.connect(server).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let conns = &p.outbound.observe.conns;
    until("the record closed", || conns.snapshot().closed_total == 1).await;
    let rec = &conns.snapshot().recent[0];
    assert_eq!((rec.source_pod.as_deref(), rec.destination_pod.as_deref()), (Some("shop/client"), Some("shop/vault")));
    assert!(rec.error.as_deref().unwrap().contains("deny rule no-client"), "{:?}", rec.error);
    assert_eq!(p.errors("deny_rule"), 1);
    let denials = p.metrics().denials.get("deny_rule");
    assert_eq!(denials, 1);
}

fn deny_client(name: &str, workload: &str) -> crate::authz::Rule {
    crate::authz::RuleSpec {
        name: name.into(),
        namespace: "shop".into(),
        workload: Some(workload.into()),
        ports: vec![],
        action: crate::authz::Action::Deny,
        from: vec!["spiffe://cluster.local/ns/shop/sa/client".into()],
    }
    .try_into()
    .unwrap()
}

#[tokio::test]
async fn a_policy_change_closes_the_open_connections_it_no_longer_allows_and_only_those() {
    let vault = echo(SocketAddr::from((ip(26, 0, 2), 0))).await;
    let web = echo(SocketAddr::from((ip(26, 0, 3), 0))).await;
    let mut cluster = Cluster::new();
    cluster.add_pod("shop", "vault", *vault.ip(), "a");
    cluster.add_pod("shop", "web", *web.ip(), "a");
    let p = OutboundProxy::start(&cluster, ProxyOptions::default()).await;
    let (mut to_vault, mut to_web) = (p.connect(vault).await.unwrap(), p.connect(web).await.unwrap());
    let mut buf = [0u8; 4];
    for c in [&mut to_vault, &mut to_web] {
        c.write_all(b"ping").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
    }
    let open = &p.outbound.authorizations;
    until("both connections registered", || open.len() == 2).await;

    // A rule unrelated to these connections changes nothing.
    cluster.state.authz.push(deny_client("no-client-to-other", "other"));
    p.index.send_replace(cluster.index("a"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(open.closed.get(), 0);

    // Denying the client the vault closes that connection; the one to web stays open.
    cluster.state.authz.push(deny_client("no-client-to-vault", "vault"));
    p.index.send_replace(cluster.index("a"));
    let r = tokio::time::timeout(Duration::from_secs(5), to_vault.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert_eq!(open.closed.get(), 1);
    to_web.write_all(b"pong").await.unwrap();
    to_web.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    let conns = &p.outbound.observe.conns;
    until("the vault connection's record closed", || conns.snapshot().closed_total == 1).await;
    assert_eq!(conns.snapshot().recent[0].destination_pod.as_deref(), Some("shop/vault"));
    drop(to_web);
    until("the registry emptied", || open.is_empty()).await;
}

fn service(cluster: &mut Cluster, endpoints: Vec<SocketAddrV4>, protocol: ProtocolHint, policy: ServicePolicy) {
    cluster.add_service(VIP, ServiceEntry { service: "shop/web".into(), endpoints, protocol: Some(protocol), policy });
}

#[tokio::test]
async fn a_tcp_connect_to_a_dead_endpoint_is_retried_on_a_live_one() {
    let dead = tokio::net::TcpListener::bind((ip(18, 0, 1), 0)).await.unwrap().local_addr().unwrap();
    let dead = match dead {
        SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let live = echo(SocketAddr::from((ip(18, 0, 2), 0))).await;
    let mut cluster = Cluster::new();
    service(&mut cluster, vec![dead, live], ProtocolHint::Opaque, ServicePolicy::default());
    let p = OutboundProxy::start(&cluster, ProxyOptions::default()).await;
    for _ in 0..6 {
        let mut c = p.connect(VIP).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"svc").await, b"svc");
    }
    assert!(p.errors("endpoint_retry") >= 1, "the dead endpoint was tried and the connect retried");
}

#[tokio::test]
async fn tcp_connections_past_the_services_limit_are_reset_at_once() {
    let live = echo(SocketAddr::from((ip(19, 0, 1), 0))).await;
    let mut cluster = Cluster::new();
    let policy = ServicePolicy { max_connections: Some(1), ..Default::default() };
    service(&mut cluster, vec![live], ProtocolHint::Opaque, policy);
    let p = OutboundProxy::start(&cluster, ProxyOptions::default()).await;
    let mut held = p.connect(VIP).await.unwrap();
    assert_eq!(roundtrip(&mut held, b"1").await, b"1");
    let mut over = p.connect(VIP).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    until("the limit hit counted", || p.errors("connection_limit") == 1).await;
    drop(held);
    until("the slot returned", || p.metrics().closed.get() >= 2).await;
    let mut next = p.connect(VIP).await.unwrap();
    assert_eq!(roundtrip(&mut next, b"2").await, b"2", "a slot again once the first closed");
}

#[tokio::test]
async fn a_service_with_no_endpoint_resets() {
    let mut cluster = Cluster::new();
    service(&mut cluster, vec![], ProtocolHint::Opaque, ServicePolicy::default());
    let p = OutboundProxy::start(&cluster, ProxyOptions::default()).await;
    let mut c = p.connect(VIP).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    until("counted", || p.errors("no_endpoints") == 1).await;
}

async fn http_service(
    octet: u8,
    scripts: &[Script],
    policy: ServicePolicy,
) -> (OutboundProxy, Vec<std::sync::Arc<std::sync::atomic::AtomicU64>>) {
    let mut cluster = Cluster::new();
    let mut eps = Vec::new();
    let mut seen = Vec::new();
    for (i, s) in scripts.iter().enumerate() {
        let (a, n) = http_endpoint(SocketAddr::from((ip(octet, 0, i as u8 + 1), 0)), *s).await;
        eps.push(a);
        seen.push(n);
    }
    service(&mut cluster, eps, ProtocolHint::Http, policy);
    (OutboundProxy::start(&cluster, ProxyOptions::default()).await, seen)
}

fn ms(n: u64) -> Option<Duration> {
    Some(Duration::from_millis(n))
}

#[tokio::test]
async fn a_try_past_the_per_try_timeout_is_retried_on_another_endpoint() {
    // The balancer prefers the endpoint it knows to be fast; only first picks, while both are
    // unknown, may land on the hung one. Several clients start at once, on fresh proxies until
    // one of them did (bounded).
    for round in 0..8u8 {
        let policy = ServicePolicy { timeout: ms(2000), per_try_timeout: ms(200), ..Default::default() };
        let (p, seen) = http_service(20 + round * 10, &[Script::Hang, Script::Ok], policy).await;
        let p = std::sync::Arc::new(p);
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move {
                    let mut c = p.connect(VIP).await.unwrap();
                    let mut statuses = Vec::new();
                    for _ in 0..3 {
                        statuses.push(http_request(&mut c, "GET", "/").await.unwrap().0);
                    }
                    statuses
                })
            })
            .collect();
        for c in clients {
            assert_eq!(c.await.unwrap(), vec![200, 200, 200], "every GET answered 200");
        }
        let stats = &p.outbound.http.stats;
        let hung = seen[0].load(Ordering::SeqCst);
        assert_eq!(stats.per_try_timeouts.get(), hung, "each try on the hung endpoint was cut");
        assert_eq!(stats.retries.get(), hung, "and retried");
        assert_eq!(stats.timeouts.get(), 0);
        if hung >= 1 {
            return;
        }
    }
    panic!("the hung endpoint was never picked");
}

#[tokio::test]
async fn without_a_per_try_timeout_a_hung_try_uses_up_the_whole_timeout() {
    let policy = ServicePolicy { timeout: ms(300), ..Default::default() };
    let (p, _) = http_service(101, &[Script::Hang], policy).await;
    let mut c = p.connect(VIP).await.unwrap();
    let (status, body) = http_request(&mut c, "GET", "/").await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("switchyard.io/timeout"), "{body}");
    assert_eq!(p.outbound.http.stats.timeouts.get(), 1);
}

#[tokio::test]
async fn the_last_try_past_its_per_try_timeout_answers_504() {
    let policy = ServicePolicy { timeout: ms(5000), per_try_timeout: ms(100), retries: 1, ..Default::default() };
    let (p, seen) = http_service(102, &[Script::Hang], policy).await;
    let mut c = p.connect(VIP).await.unwrap();
    let (status, body) = http_request(&mut c, "GET", "/").await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("per-try-timeout"), "{body}");
    assert_eq!(seen[0].load(Ordering::SeqCst), 2, "one try and one retry");
    assert_eq!(p.outbound.http.stats.per_try_timeouts.get(), 2);
}

#[tokio::test]
async fn a_non_idempotent_request_is_never_sent_twice() {
    let (p, seen) = http_service(103, &[Script::Status(503)], ServicePolicy::default()).await;
    let mut c = p.connect(VIP).await.unwrap();
    let (status, _) = http_request(&mut c, "POST", "/order").await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(seen[0].load(Ordering::SeqCst), 1, "a POST that reached the endpoint is not resent");
    let (status, _) = http_request(&mut c, "GET", "/order").await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(seen[0].load(Ordering::SeqCst), 1 + 3, "a GET is retried on 503 (default 2 retries)");
}

#[tokio::test]
async fn retries_stop_when_the_budget_is_spent() {
    let policy = ServicePolicy { retries: 2, retry_budget_percent: 0, ..Default::default() };
    let (p, seen) = http_service(104, &[Script::Status(503)], policy).await;
    let mut c = p.connect(VIP).await.unwrap();
    // The floor alone: 10 retries a second over 10 s.
    for _ in 0..60 {
        let (status, _) = http_request(&mut c, "GET", "/").await.unwrap();
        assert_eq!(status, 503);
    }
    let stats = &p.outbound.http.stats;
    assert_eq!(stats.retries.get(), 100, "the floor's 100 retries, no more");
    assert_eq!(stats.budget_exhausted.get(), 10, "the last 10 requests found it spent");
    assert_eq!(seen[0].load(Ordering::SeqCst), 60 + 100);
}

#[tokio::test]
async fn requests_past_the_limit_get_the_proxys_own_503() {
    let policy = ServicePolicy { max_connections: Some(1), timeout: ms(3000), ..Default::default() };
    let (p, _) = http_service(105, &[Script::Hang], policy).await;
    let mut first = p.connect(VIP).await.unwrap();
    let hold = tokio::spawn(async move { http_request(&mut first, "GET", "/").await.map(|r| r.0) });
    until("the first request holds the slot", || p.outbound.http.stats.requests.get() == 1).await;
    let mut second = p.connect(VIP).await.unwrap();
    let (status, body) = http_request(&mut second, "GET", "/").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("max-connections"), "{body}");
    assert_eq!(p.outbound.http.stats.limit_hits.get(), 1);
    assert_eq!(hold.await.unwrap().unwrap(), 504, "the held request ends at its timeout");
}

#[tokio::test]
async fn a_pod_past_its_connection_cap_is_reset_and_gets_slots_back_as_connections_close() {
    let live = echo(SocketAddr::from((ip(40, 0, 1), 0))).await;
    let mut cluster = Cluster::new();
    cluster.add_pod("shop", "server", *live.ip(), "a");
    let p = OutboundProxy::start(&cluster, ProxyOptions { max_connections_per_pod: 2, ..Default::default() }).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = p.connect(live).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"in").await, b"in");
        held.push(c);
    }
    let mut over = p.connect(live).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "past the cap: reset, {r:?}");
    until("the cap hit counted", || p.errors("pod_connection_limit") == 1).await;
    // One closes: a slot is free again.
    drop(held.pop());
    until("the slot given back", || p.outbound.caps.open_of(crate::testing::CLIENT_CGROUP) == 1).await;
    let mut again = p.connect(live).await.unwrap();
    assert_eq!(roundtrip(&mut again, b"again").await, b"again");
}

#[tokio::test]
async fn a_silent_client_on_an_http_hinted_port_is_opaque_tcp_within_the_bound() {
    // Hinted waits are capped: a silent client holds detection for 10 s at most.
    assert_eq!(crate::proxy::detect::hinted_wait(Duration::from_secs(3600)), crate::proxy::detect::HINTED_WAIT_MAX);
    assert_eq!(crate::proxy::detect::hinted_wait(Duration::from_millis(200)), Duration::from_millis(200));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let client = tokio::spawn(async move { tokio::net::TcpStream::connect(addr).await.unwrap() });
    let (server, _) = l.accept().await.unwrap();
    let mut client = client.await.unwrap();
    let hint = crate::proxy::detect::Hint::Http;
    let p = crate::proxy::detect::detect(&server, hint, Duration::from_millis(50), Duration::from_millis(200)).await;
    assert_eq!(p, crate::proxy::detect::Protocol::Tcp, "silent past the wait: opaque");
    // A request line longer than the first look is still read whole.
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(1000));
    client.write_all(long.as_bytes()).await.unwrap();
    let p = crate::proxy::detect::detect(&server, hint, Duration::from_millis(50), Duration::from_secs(5)).await;
    assert_eq!(p, crate::proxy::detect::Protocol::Http1);
}

#[tokio::test]
async fn an_http1_request_head_past_the_limit_is_refused_and_the_endpoint_never_sees_it() {
    let (ep, seen) = http_endpoint(SocketAddr::from((ip(41, 0, 1), 0)), Script::Ok).await;
    let mut cluster = Cluster::new();
    service(&mut cluster, vec![ep], ProtocolHint::Http, ServicePolicy::default());
    let p = OutboundProxy::start(&cluster, ProxyOptions::default()).await;
    let mut c = p.connect(VIP).await.unwrap();
    let huge = "x".repeat(crate::proxy::http::H1_MAX_HEADER + 1024);
    let head = format!("GET / HTTP/1.1\r\nhost: web\r\nx-huge: {huge}\r\n\r\n");
    // The proxy may close before it has read everything: a failed write is a refusal too.
    let _ = c.write_all(head.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await.expect("answered in time");
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(seen.load(Ordering::Relaxed), 0, "never forwarded");
    // A normal request on a new connection is served.
    let mut c = p.connect(VIP).await.unwrap();
    assert_eq!(http_request(&mut c, "GET", "/").await.unwrap().0, 200);
}

/// The node's HTTP/2 receive windows come out of one budget (`hboneReceiveBudgetBytes`): the
/// first HBONE connection gets ztunnel's 16 MiB, the next what is left, then the protocol's
/// 64 KiB; every byte comes back when the connections close.
#[tokio::test]
async fn hbone_receive_windows_come_out_of_the_node_budget_and_go_back() {
    use crate::proxy::caps::RECEIVE_WINDOW_FLOOR;
    let pki = Pki::new();
    let node_b = ip(42, 0, 1);
    let server = echo(SocketAddr::from((ip(42, 1, 1), 0))).await;
    let mut cluster = Cluster::new();
    cluster.add_node("a", Ipv4Addr::LOCALHOST);
    cluster.add_node("b", node_b);
    cluster.add_pod("shop", "server", *server.ip(), "b");
    let idle = Duration::from_millis(600);
    let inb = InboundProxy::start_with_budget(&cluster, "b", node_b, &pki, idle, 20 << 20).await;
    // One stream per pooled connection: three tunnels open three HBONE connections.
    let (pool, _certs) = crate::testing::pool(&pki, &[id("client")], 1, Duration::from_millis(300)).await;
    let opts = ProxyOptions { pool: Some(pool.clone()), hbone_port: inb.addr.port(), ..Default::default() };
    let out = OutboundProxy::start(&cluster, opts).await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let mut c = out.connect(server).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"w").await, b"w");
        tunnels.push(c);
    }
    assert_eq!(pool.metrics.handshakes.get(), 3);
    let budget = &inb.inbound.receive_budget;
    assert_eq!(budget.granted(), (16 << 20) + (4 << 20) + u64::from(RECEIVE_WINDOW_FLOOR));
    assert_eq!(inb.inbound.metrics.receive_window_reduced.get(), 2);
    drop(tunnels);
    until("the idle HBONE connections closed and gave their windows back", || budget.granted() == 0).await;
}
