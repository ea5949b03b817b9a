//! The in-process test tier: the real proxy (outbound listener, HBONE pool, HBONE server) on
//! 127.0.0.0/8, without root, eBPF or network namespaces. The kernel's original-destination
//! record comes from a [`FakeTable`]; certificates from an in-memory CA ([`Pki`]); pods and
//! nodes are written as a [`NodeState`] and indexed as the reconciler would.
//!
//! Loopback addresses stand for pods and nodes: `127.0.0.1` is the client pod (cgroup
//! [`CLIENT_CGROUP`]); any other `127.x.y.z` can be a pod or a node, since Linux answers on the
//! whole of 127.0.0.0/8.
use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    datapath::{OrigDstLookup, Original},
    identity::{Identity, ca::LocalCa, manager::CertManager},
    metrics::ProxyMetrics,
    proxy::{
        inbound::{Inbound, InboundMetrics},
        observe::Observe,
        outbound::Outbound,
        pool::Pool,
        route::RouteConfig,
        upstream::Connector,
    },
    state::{MeshReason, NodeInfo, NodeState, ServiceEntry, Workload},
    state::{PodIndex, PodStatus},
    tls::TrustBundle,
};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// The cgroup id of the client pod (`shop/client`, 127.0.0.1) in [`Cluster::new`].
pub const CLIENT_CGROUP: u64 = 1;

/// Original-destination records as the kernel would leave them, keyed by client address.
#[derive(Default)]
pub struct FakeTable(pub Mutex<HashMap<SocketAddr, Original>>);

impl OrigDstLookup for FakeTable {
    fn take(&self, client: SocketAddr) -> std::io::Result<Option<Original>> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&client))
    }
}

impl FakeTable {
    pub fn record(&self, client: SocketAddr, dst: SocketAddrV4, pod_cgroup: u64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(client, Original { dst, pod_cgroup });
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// A meshed pod of namespace `ns` with service account `name`.
pub fn pod(ns: &str, name: &str, ip: Ipv4Addr, node: &str) -> Workload {
    Workload {
        name: name.into(),
        workload: None,
        namespace: ns.into(),
        service_account: name.into(),
        ip,
        node: node.into(),
        cgroup: None,
        meshed: true,
        reason: MeshReason::Namespace,
        mtls_mode: Default::default(),
        fail_closed: false,
        capture_all: false,
        labels: Default::default(),
        probe_ports: Vec::new(),
        pod_labels: Default::default(),
    }
}

/// An in-memory mesh CA and trust bundle.
pub struct Pki {
    pub ca: Arc<LocalCa>,
    pub bundle: TrustBundle,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = Arc::new(LocalCa::generate(TRUST_DOMAIN, Duration::from_secs(3600)).expect("a CA is generated"));
        let bundle = TrustBundle::new(std::slice::from_ref(ca.ca_cert())).expect("the CA is a valid anchor");
        Pki { ca, bundle }
    }

    /// A certificate manager holding certificates for `ids`.
    pub async fn certs(&self, ids: &[Identity]) -> Arc<CertManager> {
        self.certs_for(ids, Duration::from_secs(3600)).await
    }

    /// The same, with certificates of this lifetime (renewed at half of it by `sync`).
    pub async fn certs_for(&self, ids: &[Identity], lifetime: Duration) -> Arc<CertManager> {
        let m = Arc::new(CertManager::new(self.ca.clone(), lifetime));
        m.sync(&ids.iter().cloned().collect::<BTreeSet<_>>()).await;
        m
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// The cluster as every node sees it: pods (with the node each runs on), nodes, Services.
#[derive(Clone)]
pub struct Cluster {
    pub state: NodeState,
    /// Pod key → cgroup id, for pods of any node.
    pub cgroups: HashMap<String, u64>,
}

impl Cluster {
    /// Node `a` (at 127.0.0.1) with the client pod `shop/client` at 127.0.0.2 (cgroup
    /// [`CLIENT_CGROUP`]): a pod never shares its node's address (that is a host-network pod).
    pub fn new() -> Cluster {
        let mut c = Cluster { state: NodeState { node: "a".into(), ..Default::default() }, cgroups: HashMap::new() };
        c.add_pod("shop", "client", Ipv4Addr::new(127, 0, 0, 2), "a");
        c.cgroups.insert("shop/client".into(), CLIENT_CGROUP);
        c
    }

    pub fn add_pod(&mut self, ns: &str, name: &str, ip: Ipv4Addr, node: &str) -> &mut Workload {
        let key = format!("{ns}/{name}");
        let next = self.cgroups.len() as u64 + 100;
        self.cgroups.entry(key.clone()).or_insert(next);
        self.state.pods.entry(key).or_insert_with(|| pod(ns, name, ip, node))
    }

    pub fn add_node(&mut self, name: &str, address: Ipv4Addr) {
        self.state.nodes.insert(name.into(), NodeInfo { name: name.into(), address });
    }

    pub fn add_service(&mut self, vip: SocketAddrV4, entry: ServiceEntry) {
        self.state.services.insert(vip, entry);
    }

    /// The pod index as node `node`'s reconciler publishes it.
    pub fn index(&self, node: &str) -> Arc<PodIndex> {
        let state = NodeState { node: node.into(), ..self.state.clone() };
        let pods = state
            .pods
            .iter()
            .map(|(k, w)| {
                let local = w.node == node;
                PodStatus {
                    key: k.clone(),
                    workload: w.clone(),
                    cgroup_id: local.then(|| self.cgroups[k]),
                    redirected: local && w.meshed,
                }
            })
            .collect();
        Arc::new(PodIndex::new(&state, pods))
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}

/// A running outbound proxy of node `a`.
pub struct OutboundProxy {
    pub addr: SocketAddr,
    pub table: Arc<FakeTable>,
    pub outbound: Arc<Outbound>,
    pub index: watch::Sender<Arc<PodIndex>>,
    pub stop: CancellationToken,
}

/// Options of a test proxy.
pub struct ProxyOptions {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub pool: Option<Arc<Pool>>,
    pub hbone_port: u16,
    /// Connections the client pod may have open through the proxy at once.
    pub max_connections_per_pod: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: None,
            pool: None,
            hbone_port: 15008,
            max_connections_per_pod: crate::proxy::caps::DEFAULT_PER_POD,
        }
    }
}

impl OutboundProxy {
    /// Node `a`'s outbound proxy on 127.0.0.1, serving `cluster`.
    pub async fn start(cluster: &Cluster, opts: ProxyOptions) -> OutboundProxy {
        let table = Arc::new(FakeTable::default());
        let (tx, pods) = watch::channel(cluster.index("a"));
        let metrics = ProxyMetrics::default();
        let outbound = Arc::new(Outbound {
            lookup: table.clone(),
            pods,
            metrics: metrics.clone(),
            observe: Arc::new(Observe {
                conns: Default::default(),
                proxy: Some(metrics.clone()),
                istio: Default::default(),
                access_log: Default::default(),
            }),
            idle_timeout: opts.idle_timeout,
            copy_buffer: 16 * 1024,
            route: RouteConfig {
                trust_domain: TRUST_DOMAIN.into(),
                hbone_port: opts.hbone_port,
                mtls: opts.pool.is_some(),
            },
            connector: Connector { pool: opts.pool, connect_timeout: opts.connect_timeout, metrics },
            balancer: Default::default(),
            limits: Default::default(),
            caps: crate::proxy::caps::ConnectionCaps::new(
                opts.max_connections_per_pod,
                crate::proxy::caps::DEFAULT_NODE,
            ),
            authorizations: Default::default(),
            http: Default::default(),
            detect: Default::default(),
        });
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind the outbound listener");
        let addr = l.local_addr().expect("bound");
        let stop = CancellationToken::new();
        tokio::spawn(outbound.clone().serve(l, stop.clone(), TaskTracker::new()));
        tokio::spawn(outbound.authorizations.clone().run(tx.subscribe(), stop.clone()));
        OutboundProxy { addr, table, outbound, index: tx, stop }
    }

    /// A client socket of the client pod (127.0.0.1), connected to the proxy as if the kernel
    /// had redirected its connect to `dst`.
    pub async fn connect(&self, dst: SocketAddrV4) -> std::io::Result<tokio::net::TcpStream> {
        self.connect_from(dst, CLIENT_CGROUP).await
    }

    pub async fn connect_from(&self, dst: SocketAddrV4, cgroup: u64) -> std::io::Result<tokio::net::TcpStream> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind("127.0.0.1:0".parse().expect("an address"))?;
        self.table.record(s.local_addr()?, dst, cgroup);
        s.connect(self.addr).await
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.outbound.metrics
    }

    /// The count of outbound errors with this reason.
    pub fn errors(&self, reason: &'static str) -> u64 {
        self.outbound.metrics.errors.get_or_create(&crate::metrics::ErrorLabels { reason }).get()
    }
}

impl Drop for OutboundProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A running HBONE server of node `node`, listening on every address at `addr`'s port
/// (`addr` is `<node address>:port`).
pub struct InboundProxy {
    pub addr: SocketAddr,
    pub inbound: Arc<Inbound>,
    pub stop: CancellationToken,
}

impl InboundProxy {
    /// Serves HBONE for `node`'s pods of `cluster` on `address` (port chosen by the kernel),
    /// with certificates for each of them.
    pub async fn start(cluster: &Cluster, node: &str, address: Ipv4Addr, pki: &Pki, idle: Duration) -> InboundProxy {
        let budget = crate::proxy::caps::DEFAULT_RECEIVE_BUDGET;
        InboundProxy::start_with_budget(cluster, node, address, pki, idle, budget).await
    }

    /// An agent from before ztunnel's addressing: it listens on its node's address only, and
    /// answers by SNI (nothing steers the pods' addresses to it).
    pub async fn start_older_dialect(
        cluster: &Cluster,
        node: &str,
        address: Ipv4Addr,
        pki: &Pki,
        idle: Duration,
    ) -> InboundProxy {
        let budget = crate::proxy::caps::DEFAULT_RECEIVE_BUDGET;
        InboundProxy::start_bound(cluster, node, address, pki, idle, budget, address).await
    }

    /// [`InboundProxy::start`] with a receive budget of `budget` bytes.
    pub async fn start_with_budget(
        cluster: &Cluster,
        node: &str,
        address: Ipv4Addr,
        pki: &Pki,
        idle: Duration,
        budget: u64,
    ) -> InboundProxy {
        InboundProxy::start_bound(cluster, node, address, pki, idle, budget, Ipv4Addr::UNSPECIFIED).await
    }

    async fn start_bound(
        cluster: &Cluster,
        node: &str,
        address: Ipv4Addr,
        pki: &Pki,
        idle: Duration,
        budget: u64,
        bind: Ipv4Addr,
    ) -> InboundProxy {
        let ids: Vec<Identity> = cluster
            .state
            .pods
            .values()
            .filter(|w| w.node == node && w.meshed)
            .map(|w| w.identity(TRUST_DOMAIN))
            .collect();
        let certs = pki.certs(&ids).await;
        let server = crate::tls::server_config(certs.clone(), TRUST_DOMAIN, &pki.bundle).expect("a server config");
        // The receiver keeps the last index after the sender is gone.
        let (_, pods) = watch::channel(cluster.index(node));
        let inbound = Arc::new(Inbound {
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            certs,
            idle_timeout: idle,
            handshakes: Arc::new(tokio::sync::Semaphore::new(crate::proxy::inbound::MAX_HANDSHAKES)),
            connections: Arc::new(tokio::sync::Semaphore::new(crate::proxy::inbound::MAX_CONNECTIONS)),
            trust_domain: TRUST_DOMAIN.into(),
            pods,
            metrics: InboundMetrics::default(),
            connect_timeout: Duration::from_secs(2),
            copy_buffer: 16 * 1024,
            tcp_idle_timeout: None,
            authorizations: Default::default(),
            loopback_pods: true,
            source_slots: Default::default(),
            receive_budget: crate::proxy::caps::ReceiveBudget::new(budget, Default::default()),
            transparent: false,
            observe: Arc::new(Observe {
                conns: Default::default(),
                proxy: None,
                istio: Default::default(),
                access_log: Default::default(),
            }),
        });
        // On every address, as the kernel's steering makes the agent's listener answer on each
        // of its pods' addresses: clients dial `<pod ip>:port` (ztunnel's HBONE), and `addr`
        // is the node's address for tests that dial the node.
        let l = TcpListener::bind(SocketAddr::from((bind, 0))).await.expect("bind the HBONE listener");
        let addr = SocketAddr::from((address, l.local_addr().expect("bound").port()));
        let stop = CancellationToken::new();
        tokio::spawn(inbound.clone().serve(l, stop.clone(), TaskTracker::new()));
        InboundProxy { addr, inbound, stop }
    }
}

impl Drop for InboundProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An HBONE client pool with certificates for `ids`, and its certificate manager.
pub async fn pool(pki: &Pki, ids: &[Identity], max_streams: usize, idle: Duration) -> (Arc<Pool>, Arc<CertManager>) {
    pool_with(pki.certs(ids).await, pki, max_streams, idle)
}

/// An HBONE client pool over `certs`.
pub fn pool_with(
    certs: Arc<CertManager>,
    pki: &Pki,
    max_streams: usize,
    idle: Duration,
) -> (Arc<Pool>, Arc<CertManager>) {
    (Arc::new(Pool::new(certs.clone(), pki.bundle.clone(), Duration::from_secs(2), max_streams, idle)), certs)
}

/// A TCP echo server on `addr`: every connection gets its bytes back, then EOF after the
/// client's. Returns the bound address.
pub async fn echo(addr: SocketAddr) -> SocketAddrV4 {
    let l = TcpListener::bind(addr).await.expect("bind echo");
    let a = match l.local_addr().expect("bound") {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("bound on IPv4"),
    };
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            });
        }
    });
    a
}

/// What a scripted HTTP endpoint does with each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// `200` with body `ok <port>`.
    Ok,
    /// This status, empty body.
    Status(u16),
    /// Accepts, reads the request, never answers.
    Hang,
}

/// A scripted HTTP/1.1 endpoint on `addr`; the counter counts requests it received.
pub async fn http_endpoint(addr: SocketAddr, script: Script) -> (SocketAddrV4, Arc<std::sync::atomic::AtomicU64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = TcpListener::bind(addr).await.expect("bind endpoint");
    let a = match l.local_addr().expect("bound") {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("bound on IPv4"),
    };
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request at a time: headers end with an empty line; bodies are empty.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
                    buf.drain(..end);
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let resp = match script {
                        Script::Ok => {
                            let body = format!("ok {}", a.port());
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                        }
                        Script::Status(code) => format!("HTTP/1.1 {code} Scripted\r\ncontent-length: 0\r\n\r\n"),
                        Script::Hang => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                    };
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (a, counter)
}

/// One HTTP/1.1 request on `s` (kept alive): the status and the body.
pub async fn http_request(s: &mut tokio::net::TcpStream, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = if method == "POST" { "x" } else { "" };
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nhost: web\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..(end + 4 + len).min(buf.len())]).to_string();
            return Ok((status, body));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a response"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
