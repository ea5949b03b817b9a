//! Wires the agent together: datapath, workload source, reconciler, proxy and admin server,
//! and takes it apart again in the right order on shutdown.
use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use mesh_common::PodPolicy;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    admin::Admin,
    cgroup,
    config::Config,
    datapath::{Datapath, DatapathConfig},
    identity::{ca, manager::CertManager},
    metrics::{self, DatapathCollector, ProxyMetrics},
    proxy::{
        balance::Balancer,
        conns::Connections,
        inbound::{Inbound, InboundMetrics},
        observe::Observe,
        outbound::Outbound,
        pool::Pool,
        recheck::OpenAuthorizations,
    },
    reconcile::Reconciler,
    state::{NodeState, PodIndex},
    tls, workloads,
};

/// mTLS pieces, present when a CA is configured.
struct Mtls {
    certs: Arc<CertManager>,
    bundle: tls::TrustBundle,
    /// Re-read while running (a CA rotation changes it).
    bundle_path: std::path::PathBuf,
}

/// How often the trust bundle file is re-read.
const BUNDLE_POLL: Duration = Duration::from_secs(5);

fn load_mtls(config: &Config) -> anyhow::Result<Option<Mtls>> {
    let (issuer, bundle_path): (Arc<dyn crate::identity::issuer::CertIssuer>, _) = match (&config.ca, &config.ca_client)
    {
        (Some(files), _) => {
            let issuer = ca::LocalCa::load(&files.cert, &files.key)?;
            info!(trust_domain = %config.trust_domain, lifetime = ?config.cert_lifetime, "mesh CA loaded: signing in-process");
            (Arc::new(issuer), files.bundle.clone().unwrap_or(files.cert.clone()))
        }
        (None, Some(client)) => {
            let issuer = crate::identity::caclient::CaClient::new(
                client.clone(),
                config.connect_timeout.max(Duration::from_secs(5)),
            )?;
            info!(ca = %client.address, trust_domain = %config.trust_domain, lifetime = ?config.cert_lifetime, "asking the CA for certificates (no CA key on this node)");
            (Arc::new(issuer), client.root_cert.clone())
        }
        (None, None) => {
            warn!("no CA configured: no mTLS; connections to other nodes' meshed pods will be refused");
            return Ok(None);
        }
    };
    let roots = ca::load_bundle(&bundle_path)?;
    let bundle = tls::TrustBundle::new(&roots)?;
    info!(roots = roots.len(), bundle = %bundle_path.display(), "trust bundle loaded");
    Ok(Some(Mtls { certs: Arc::new(CertManager::new(issuer, config.cert_lifetime)), bundle, bundle_path }))
}

/// How long a starting agent waits for its pods' certificates before it takes the datapath
/// (over) anyway.
const FIRST_CERTIFICATES_WAIT: Duration = Duration::from_secs(10);

/// The certificates of the node's meshed pods, before the datapath is touched: an upgraded
/// agent takes the eBPF links over from its predecessor (which serves meanwhile) only once it
/// can serve mTLS itself. Bounded: with the CA unreachable it goes on without them after
/// [`FIRST_CERTIFICATES_WAIT`] (a node whose agent is gone is worse off), `/readyz` says which
/// are missing (so a rolling update stops there), and renewal keeps retrying.
async fn first_certificates(config: &Config, m: &Mtls, mut state: watch::Receiver<NodeState>) {
    let deadline = tokio::time::Instant::now() + FIRST_CERTIFICATES_WAIT;
    if config.kubernetes.is_some() {
        // The node's pods are known once the watches have synced (the first update).
        let _ = tokio::time::timeout_at(deadline, state.changed()).await;
    }
    let wanted: std::collections::BTreeSet<_> =
        state.borrow().meshed().map(|w| w.identity(&config.trust_domain)).collect();
    if wanted.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout_at(deadline, m.certs.sync(&wanted)).await;
    let missing = m.certs.missing(&wanted);
    if missing.is_empty() {
        info!(certificates = wanted.len(), took = ?started.elapsed(), "certificates of the node's pods obtained");
    } else {
        let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
        warn!(
            ?missing,
            "starting without some certificates (the CA did not answer in time); connections needing them fail until they are issued"
        );
    }
}

/// The datapath, shared with the heartbeat thread, the reconciler and the admin views; taken
/// (and so detached) first at shutdown.
type SharedDatapath = Arc<Mutex<Option<Datapath>>>;

/// A running agent: where it listens, and what [`Agent::shutdown`] takes apart.
pub struct Agent {
    /// The outbound proxy's listener (redirected connections arrive here).
    pub outbound: SocketAddr,
    /// The admin endpoint (probes, metrics, debug views, dashboard), on loopback.
    pub admin: SocketAddr,
    /// The stats endpoint (metrics and health only).
    pub stats: SocketAddr,
    /// The HBONE server, when a CA is configured.
    pub hbone: Option<SocketAddr>,
    drain_grace: Duration,
    ready: watch::Sender<bool>,
    datapath: SharedDatapath,
    heartbeat: std::thread::JoinHandle<()>,
    stop: CancellationToken,
    /// Proxied connections, drained for `drain_grace` at shutdown.
    tasks: TaskTracker,
    /// Listeners, the reconciler and background loops: they end when `stop` is cancelled.
    serving: Vec<JoinHandle<()>>,
    conns: Arc<Connections>,
    spans: SpanExport,
    admin_stop: CancellationToken,
    admin_thread: std::thread::JoinHandle<()>,
}

/// Runs the agent until `shutdown` completes, then stops it cleanly (see [`Agent::shutdown`]).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let agent = build(config).await?;
    shutdown.await;
    agent.shutdown().await;
    Ok(())
}

/// Starts the agent: checks its inputs, binds its listeners, loads the datapath, and serves.
/// Everything that can fail on bad input fails before the kernel is touched.
pub async fn build(config: Config) -> anyhow::Result<Agent> {
    info!(?config, "effective configuration");
    let mount = cgroup::cgroup2_mount()?;
    let initial = initial_state(&config, &mount)?;
    let kube_client = match &config.kubernetes {
        Some(kubeconfig) => Some(kube_client(kubeconfig.as_deref()).await?),
        None => None,
    };
    let mtls = load_mtls(&config)?;
    let listeners = Listeners::bind(&config, mtls.is_some())?;
    let outbound_addr = listeners.outbound.local_addr()?;
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let state_rx = watch_state(&config, initial, mount, kube_client, stop.clone());
    if let Some(m) = &mtls {
        first_certificates(&config, m, state_rx.clone()).await;
    }

    let (orig_table, datapath) = start_datapath(&config, mtls.is_some())?;
    let heartbeat = spawn_heartbeat(datapath.clone());
    let (index_rx, reconcile) = start_reconciler(&config, datapath.clone(), outbound_addr, state_rx, stop.clone());
    let mut serving = vec![reconcile];
    let pool = mtls.as_ref().map(|m| start_identity(&config, m, &index_rx, &stop, &mut serving));
    let mut telemetry = Telemetry::register(&config, &datapath, &index_rx, mtls.as_ref(), pool.as_deref())?;

    let conns = Arc::new(Connections::default());
    let (ready, ready_rx) = watch::channel(false);
    let admin = Arc::new(Admin {
        registry: std::mem::take(&mut telemetry.root),
        pods: index_rx.clone(),
        conns: conns.clone(),
        datapath: datapath.clone(),
        ready: ready_rx,
        node_name: config.node_name.clone(),
        trust_domain: config.trust_domain.clone(),
        certs: mtls.as_ref().map(|m| m.certs.clone()),
        pool: pool.clone(),
        balancer: telemetry.balancer.clone(),
        http: telemetry.http.clone(),
        reasons: telemetry.inbound.clone(),
    });
    let admin_addr = listeners.admin.local_addr()?;
    let stats_addr = listeners.stats.local_addr()?;
    // The admin endpoint (probes, metrics) stays up through the drain, until the agent exits.
    let admin_stop = CancellationToken::new();
    if !config.admin_listen.ip().is_loopback() {
        warn!(admin = %config.admin_listen, "the admin port is not on loopback: its debug views list every pod of the cluster to whoever reaches it");
    }
    let admin_thread =
        spawn_admin(admin, listeners.admin, listeners.stats, config.admin_socket.clone(), admin_stop.clone())?;

    let observe = |proxy| {
        Arc::new(Observe { conns: conns.clone(), proxy, istio: telemetry.istio.clone(), access_log: config.access_log })
    };
    let outbound =
        outbound_proxy(&config, orig_table, index_rx.clone(), &telemetry, observe(Some(telemetry.proxy.clone())), pool);
    let mut hbone = None;
    if let (Some(m), Some(listener)) = (&mtls, listeners.hbone) {
        // Delivery from the source pod's address needs the kernel to steer the pod's replies.
        let transparent = datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|d| d.steering().is_on() && config.transparent_delivery);
        let inbound = inbound_proxy(&config, m, index_rx.clone(), &telemetry, observe(None), transparent)?;
        hbone = Some(listener.local_addr()?);
        info!(hbone = %listener.local_addr()?, "HBONE listener up");
        serving.push(tokio::spawn(inbound.serve(listener, stop.clone(), tasks.clone())));
    }
    serving.push(tokio::spawn(telemetry.authorizations.clone().run(index_rx, stop.clone())));
    serving.push(tokio::spawn(outbound.serve(listeners.outbound, stop.clone(), tasks.clone())));

    ready.send_replace(true);
    info!(node = %config.node_name, outbound = %outbound_addr, admin = %admin_addr, "agent ready");
    Ok(Agent {
        outbound: outbound_addr,
        admin: admin_addr,
        stats: stats_addr,
        hbone,
        drain_grace: config.drain_grace,
        ready,
        datapath,
        heartbeat,
        stop,
        tasks,
        serving,
        conns,
        spans: telemetry.spans,
        admin_stop,
        admin_thread,
    })
}

impl Agent {
    /// Stops the agent in order: programs detached first (new connections go direct at once),
    /// listeners closed, in-flight connections given the drain grace to finish, the last spans
    /// sent, the admin endpoint closed last.
    pub async fn shutdown(self) {
        self.ready.send_replace(false);
        // The datapath goes first: from here on, new connections do not come to this agent.
        let dp = self.datapath.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(dp) = dp {
            release_datapath(dp).await;
        }
        let _ = self.heartbeat.join();
        // Connections redirected just before the detach are in the accept queue or still in
        // their handshake: keep accepting a moment so they are served, not reset when the
        // listener closes (seen as one failed new connection in 2 500 under restart before this).
        tokio::time::sleep(ACCEPT_SETTLE).await;
        self.stop.cancel();
        for t in self.serving {
            let _ = t.await;
        }
        self.tasks.close();
        let in_flight = self.conns.active_count();
        if in_flight > 0 {
            info!(in_flight, grace = ?self.drain_grace, "letting in-flight connections finish");
        }
        if tokio::time::timeout(self.drain_grace, self.tasks.wait()).await.is_err() {
            warn!(cut = self.conns.active_count(), "drain grace period over; closing the remaining connections");
        }
        // Stopped after the drain, so the spans of the last requests still go out.
        self.spans.stop.cancel();
        if let Some(t) = self.spans.task {
            let _ = tokio::time::timeout(Duration::from_secs(6), t).await;
        }
        self.admin_stop.cancel();
        let _ = self.admin_thread.join();
        info!("agent stopped");
    }
}

/// Unpinned: detaches the programs (connect programs first, the rest once the connections they
/// redirected an instant ago are established and recorded: seen as one failed new connection
/// in ~6 restarts under load when all went at once). Pinned: leaves them to a successor, or
/// marks the agent stopped so pods fail open or closed.
async fn release_datapath(mut dp: Datapath) {
    if !dp.pinned() {
        info!("stopping: detaching eBPF programs (pods connect directly)");
        dp.stop_redirecting();
        tokio::time::sleep(REDIRECT_SETTLE).await;
    } else if dp.superseded() {
        info!("stopping: a newer agent has taken the eBPF programs and listeners over");
    } else {
        info!("stopping without a successor: programs stay pinned; pods fail open or closed by namespace");
        if let Err(e) = dp.heartbeat(0) {
            warn!(error = %e, "cannot mark the agent stopped; pods see it gone within 2 s");
        }
    }
}

/// The state to start from: the workload file's (checked now, so a bad file fails the start),
/// or empty until the Kubernetes watches sync.
fn initial_state(config: &Config, mount: &std::path::Path) -> anyhow::Result<NodeState> {
    Ok(match (&config.workload_file, &config.kubernetes) {
        (Some(path), _) => workloads::load(path, &config.node_name, mount)?,
        (None, Some(_)) => NodeState { node: config.node_name.clone(), ..Default::default() },
        (None, None) => {
            warn!("no workload file configured and not in Kubernetes mode: no pod will be meshed");
            NodeState::default()
        }
    })
}

/// The agent's listeners, bound before anything else starts.
struct Listeners {
    outbound: TcpListener,
    admin: TcpListener,
    stats: TcpListener,
    hbone: Option<TcpListener>,
}

impl Listeners {
    fn bind(config: &Config, hbone: bool) -> anyhow::Result<Listeners> {
        let bind =
            |addr: SocketAddr, what: &str| listen(addr).with_context(|| format!("cannot listen on {addr} ({what})"));
        Ok(Listeners {
            outbound: bind(config.outbound_listen, "outbound")?,
            admin: bind(config.admin_listen, "admin")?,
            stats: bind(config.stats_listen, "stats")?,
            hbone: if hbone { Some(bind_hbone(config.hbone_listen)?) } else { None },
        })
    }
}

fn start_datapath(
    config: &Config,
    hbone: bool,
) -> anyhow::Result<(Arc<crate::datapath::OrigDstTable>, SharedDatapath)> {
    let datapath = Datapath::start(&DatapathConfig {
        cgroup_root: config.cgroup_root.clone(),
        bypass_ports: config.bypass_ports.clone(),
        bypass_cidrs: config.bypass_cidrs.clone(),
        agent: crate::datapath::agent_id().context("cannot read this process's PID namespace")?,
        // Its drain, and a margin.
        previous_agent_grace: config.drain_grace + std::time::Duration::from_secs(10),
        max_redirected_sockets: config.max_redirected_sockets,
        proxy_ip4: config.redirect_address,
        accel: config.sockmap_acceleration,
        pin_dir: config.bpf_pin_dir.clone(),
        steer: hbone,
    })?;
    if config.bpf_pin_dir.is_some() {
        allow_accept_queue_migration();
    }
    let orig_table = datapath.orig_dst_table();
    Ok((orig_table, Arc::new(Mutex::new(Some(datapath)))))
}

/// The node state, kept current from the workload file or the Kubernetes API.
fn watch_state(
    config: &Config,
    initial: NodeState,
    mount: std::path::PathBuf,
    kube_client: Option<kube::Client>,
    stop: CancellationToken,
) -> watch::Receiver<NodeState> {
    let (state_tx, state_rx) = watch::channel(initial);
    if let Some(path) = config.workload_file.clone() {
        tokio::spawn(workloads::watch(path, config.node_name.clone(), mount, state_tx));
    } else if let Some(client) = kube_client {
        info!(node = %config.node_name, pod_cgroups = %config.pod_cgroup_root.display(), "Kubernetes mode: watching the API server");
        let root = config.istio_root_namespace.clone();
        tokio::spawn(crate::k8s::run(
            client,
            config.node_name.clone(),
            config.pod_cgroup_root.clone(),
            root,
            state_tx,
            stop,
        ));
    }
    state_rx
}

/// Applies the state to the datapath now and on every change; the pod index follows.
fn start_reconciler(
    config: &Config,
    datapath: SharedDatapath,
    outbound: SocketAddr,
    state_rx: watch::Receiver<NodeState>,
    stop: CancellationToken,
) -> (watch::Receiver<Arc<PodIndex>>, JoinHandle<()>) {
    let policy = PodPolicy {
        proxy_ip4: u32::from_ne_bytes(config.redirect_address.octets()),
        proxy_port: outbound.port().to_be(),
        flags: 0,
        probe_ports: [0; mesh_common::MAX_PROBE_PORTS],
    };
    // Local mode has no kube-proxy: the proxy serves every Service of the workload file.
    let mut reconciler = Reconciler::new(datapath, policy, config.workload_file.is_some());
    let index = reconciler.apply(&state_rx.borrow()).unwrap_or_default();
    let (index_tx, index_rx) = watch::channel(Arc::new(index));
    (index_rx, tokio::spawn(reconciler.run(state_rx, index_tx, stop)))
}

/// Certificates follow the node's meshed pods (issued before serving, so the first
/// connections find theirs); the HBONE client pool uses them.
fn start_identity(
    config: &Config,
    m: &Mtls,
    index_rx: &watch::Receiver<Arc<PodIndex>>,
    stop: &CancellationToken,
    background: &mut Vec<JoinHandle<()>>,
) -> Arc<Pool> {
    let (wanted_tx, wanted_rx) = watch::channel(index_rx.borrow().wanted_identities(&config.trust_domain));
    background.push(tokio::spawn(m.bundle.clone().watch(m.bundle_path.clone(), BUNDLE_POLL, stop.clone())));
    background.push(tokio::spawn(m.certs.clone().run(wanted_rx, stop.clone())));
    let mut idx_rx = index_rx.clone();
    let td = config.trust_domain.clone();
    let stop_w = stop.clone();
    background.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop_w.cancelled() => return,
                r = idx_rx.changed() => if r.is_err() { return },
            }
            let w = idx_rx.borrow_and_update().wanted_identities(&td);
            wanted_tx.send_if_modified(|old| {
                let changed = *old != w;
                *old = w;
                changed
            });
        }
    }));
    let pool = Arc::new(Pool::new(
        m.certs.clone(),
        m.bundle.clone(),
        config.connect_timeout,
        config.pool_max_streams,
        config.pool_idle,
    ));
    background.push(tokio::spawn(pool.clone().run_reaper(stop.clone())));
    pool
}

/// The OTLP span exporter, stopped after the drain.
struct SpanExport {
    spans: Option<crate::otlp::Spans>,
    task: Option<JoinHandle<()>>,
    stop: CancellationToken,
}

/// Every metric family, registered once, and the shared state the proxies report into.
struct Telemetry {
    root: prometheus_client::registry::Registry,
    istio: metrics::IstioMetrics,
    proxy: ProxyMetrics,
    inbound: InboundMetrics,
    http: Arc<crate::proxy::http::Http>,
    balancer: Arc<Balancer>,
    authorizations: Arc<OpenAuthorizations>,
    spans: SpanExport,
}

impl Telemetry {
    fn register(
        config: &Config,
        datapath: &SharedDatapath,
        index_rx: &watch::Receiver<Arc<PodIndex>>,
        mtls: Option<&Mtls>,
        pool: Option<&Pool>,
    ) -> anyhow::Result<Telemetry> {
        let mut root = metrics::registry();
        let istio = metrics::IstioMetrics::default();
        istio.register(&mut root);
        let registry = metrics::switchyard(&mut root);
        let inbound = InboundMetrics::default();
        let proxy = ProxyMetrics {
            denials: inbound.denied.clone(),
            by_policy: inbound.by_policy.clone(),
            ..Default::default()
        };
        proxy.register(registry);
        inbound.register(registry);
        if let Some(p) = pool {
            p.metrics.register(registry);
        }
        if let Some(m) = mtls {
            m.certs.metrics.register(registry);
        }
        registry.register_collector(Box::new(DatapathCollector(datapath.clone())));
        registry.register_collector(Box::new(metrics::PodRedirectCollector {
            counts: proxy.pod_redirects.clone(),
            pods: index_rx.clone(),
        }));
        registry.register_collector(Box::new(metrics::AuthzPolicyCollector {
            pods: index_rx.clone(),
            denials: proxy.by_policy.clone(),
        }));
        registry.register_collector(Box::new(metrics::ProcessCollector));
        if let Some(m) = mtls {
            registry.register_collector(Box::new(crate::identity::manager::ExpiryCollector(m.certs.clone())));
        }
        let http = Arc::new(crate::proxy::http::Http::default());
        http.stats.register(registry);
        let stop = CancellationToken::new();
        let (spans, task) = match &config.otlp_traces_url {
            Some(url) => {
                let (spans, task) = crate::otlp::Spans::start(url, &config.node_name, stop.clone())
                    .map_err(|e| anyhow::anyhow!("OTLP endpoint {url:?}: {e}"))?;
                crate::otlp::register(&spans, registry);
                (Some(spans), Some(task))
            }
            None => (None, None),
        };
        let balancer = Arc::new(Balancer::new(config.outlier));
        registry.register(
            "endpoint_ejections",
            "Service endpoints ejected by outlier detection (consecutive failures)",
            balancer.ejections_total.clone(),
        );
        let authorizations = Arc::new(OpenAuthorizations::default());
        authorizations.register_metrics(registry);
        Ok(Telemetry {
            root,
            istio,
            proxy,
            inbound,
            http,
            balancer,
            authorizations,
            spans: SpanExport { spans, task, stop },
        })
    }
}

fn outbound_proxy(
    config: &Config,
    lookup: Arc<crate::datapath::OrigDstTable>,
    pods: watch::Receiver<Arc<PodIndex>>,
    telemetry: &Telemetry,
    observe: Arc<Observe>,
    pool: Option<Arc<Pool>>,
) -> Arc<Outbound> {
    Arc::new(Outbound {
        lookup,
        pods,
        metrics: telemetry.proxy.clone(),
        observe,
        idle_timeout: config.tcp_idle_timeout,
        copy_buffer: config.copy_buffer,
        route: crate::proxy::route::RouteConfig {
            trust_domain: config.trust_domain.clone(),
            hbone_port: config.hbone_listen.port(),
            mtls: pool.is_some(),
        },
        connector: crate::proxy::upstream::Connector {
            pool,
            connect_timeout: config.connect_timeout,
            metrics: telemetry.proxy.clone(),
        },
        balancer: telemetry.balancer.clone(),
        limits: Default::default(),
        caps: crate::proxy::caps::ConnectionCaps::new(config.max_connections_per_pod, config.max_proxied_connections),
        authorizations: telemetry.authorizations.clone(),
        http: telemetry.http.clone(),
        detect: crate::proxy::detect::DetectConfig {
            sniff_timeout: config.sniff_timeout,
            http_ports: config.http_ports.clone(),
            opaque_ports: config.opaque_ports.clone(),
            retry_body_limit: config.retry_body_limit,
            retry_body_budget: config.retry_body_budget,
            trace_context: config.trace_context,
            trace_sample_rate: config.trace_sample_rate,
            spans: telemetry.spans.spans.clone(),
            access_log: config.access_log,
        },
    })
}

fn inbound_proxy(
    config: &Config,
    m: &Mtls,
    pods: watch::Receiver<Arc<PodIndex>>,
    telemetry: &Telemetry,
    observe: Arc<Observe>,
    transparent: bool,
) -> anyhow::Result<Arc<Inbound>> {
    let server = tls::server_config(m.certs.clone(), &config.trust_domain, &m.bundle)?;
    Ok(Arc::new(Inbound {
        acceptor: tokio_rustls::TlsAcceptor::from(server),
        certs: m.certs.clone(),
        idle_timeout: (config.pool_idle * 2).max(Duration::from_secs(1)),
        handshakes: Arc::new(tokio::sync::Semaphore::new(crate::proxy::inbound::MAX_HANDSHAKES)),
        connections: Arc::new(tokio::sync::Semaphore::new(crate::proxy::inbound::MAX_CONNECTIONS)),
        trust_domain: config.trust_domain.clone(),
        pods,
        metrics: telemetry.inbound.clone(),
        authorizations: telemetry.authorizations.clone(),
        connect_timeout: config.connect_timeout,
        copy_buffer: config.copy_buffer,
        tcp_idle_timeout: config.tcp_idle_timeout,
        observe,
        loopback_pods: false,
        source_slots: Default::default(),
        receive_budget: crate::proxy::caps::ReceiveBudget::new(
            config.hbone_receive_budget,
            telemetry.inbound.receive_windows.clone(),
        ),
        transparent,
    }))
}

/// Serves the admin endpoint (metrics, debug views, dashboard) on a thread and runtime of its
/// own, at a lower CPU priority (nice +10): encoding a scrape never runs on a proxy worker,
/// and when the CPUs are busy the kernel runs the data plane first.
fn spawn_admin(
    admin: Arc<Admin>,
    listener: TcpListener,
    stats: TcpListener,
    socket: Option<std::path::PathBuf>,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let listener = listener.into_std()?;
    let stats = stats.into_std()?;
    // Bound here, before the agent says it is ready: a probe that cannot connect fails.
    let unix = match &socket {
        Some(path) => Some(bind_admin_socket(path)?),
        None => None,
    };
    let bound_inode = socket.as_deref().and_then(|p| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::symlink_metadata(p).ok().map(|m| m.ino())
    });
    Ok(std::thread::Builder::new().name("admin".into()).spawn(move || {
        // SAFETY: setpriority on this thread's own id; no memory is involved.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) } != 0 {
            warn!(error = %std::io::Error::last_os_error(), "cannot lower the admin thread's priority");
        }
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return warn!(error = %e, "admin runtime failed to start; no admin endpoint"),
        };
        rt.block_on(async move {
            if let Some(u) = unix {
                match tokio::net::UnixListener::from_std(u) {
                    Ok(l) => {
                        tokio::spawn(admin.clone().serve_unix(l, stop.clone()));
                    }
                    Err(e) => warn!(error = %e, "admin socket unusable; probes through it will fail"),
                }
            }
            match TcpListener::from_std(stats) {
                Ok(l) => {
                    tokio::spawn(admin.clone().serve(l, crate::admin::Surface::Stats, stop.clone()));
                }
                Err(e) => warn!(error = %e, "stats listener unusable; no metrics endpoint"),
            }
            match TcpListener::from_std(listener) {
                Ok(l) => admin.serve(l, crate::admin::Surface::Admin, stop).await,
                Err(e) => warn!(error = %e, "admin listener unusable; no admin endpoint"),
            }
        });
        // Only the socket this agent bound: a newer agent may have bound the path since.
        if let (Some(path), Some(ino)) = (socket, bound_inode) {
            use std::os::unix::fs::MetadataExt as _;
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
                let _ = std::fs::remove_file(path);
            }
        }
    })?)
}

/// The admin Unix socket at `path`: a stale socket file (an agent that died in this pod
/// before) is replaced; anything else at that path is an error, never deleted.
fn bind_admin_socket(path: &std::path::Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            m.file_type().is_socket(),
            "admin socket {}: something other than a socket is there; not replacing it",
            path.display()
        );
        // A live socket is another running agent's: never take it from under it.
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "admin socket {}: another agent is serving on it; give this one its own --admin-socket",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing the stale admin socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding the admin socket {}", path.display()))?;
    l.set_nonblocking(true)?;
    info!(path = %path.display(), "admin endpoint also on a Unix socket (for probes)");
    Ok(l)
}

/// A listener that another agent may share (SO_REUSEPORT) while it takes over.
/// The HBONE listener: transparent, so that connections the kernel steers to it, addressed to
/// this node's pods (ztunnel's HBONE), are answered from the pod's address. Without
/// `CAP_NET_ADMIN` it still serves connections to the node's own address.
fn bind_hbone(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let s = tokio::net::TcpSocket::new_v4().context("HBONE listener socket")?;
    if let Err(e) = crate::steer::set_transparent(std::os::fd::AsRawFd::as_raw_fd(&s)) {
        warn!(error = %e, "HBONE listener is not transparent (no CAP_NET_ADMIN?): HBONE addressed to this node's pods cannot be served");
    }
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr).with_context(|| format!("cannot listen on {addr} (HBONE)"))?;
    Ok(s.listen(1024)?)
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

/// Lets a listener's accept queue move to another listener of its SO_REUSEPORT group when it
/// closes (`net.ipv4.tcp_migrate_req`, Linux 5.14+): connections queued on the old agent at
/// hand-over are served by the new one instead of being reset.
fn allow_accept_queue_migration() {
    let path = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(path, "1") {
            Ok(()) => {
                info!("net.ipv4.tcp_migrate_req set to 1 (queued connections move to the new agent on hand-over)")
            }
            Err(e) => {
                warn!(error = %e, "cannot set net.ipv4.tcp_migrate_req; connections queued at hand-over may be reset")
            }
        },
        Err(e) => {
            warn!(error = %e, "no net.ipv4.tcp_migrate_req (kernel older than 5.14?); connections queued at hand-over may be reset")
        }
    }
}

/// Writes the heartbeat every 250 ms from a thread of its own (a busy runtime cannot delay it),
/// until the datapath is taken at shutdown or a newer agent has taken over.
fn spawn_heartbeat(datapath: Arc<Mutex<Option<Datapath>>>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            loop {
                {
                    let mut guard = datapath.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(dp) = guard.as_mut() else { return };
                    if dp.superseded() {
                        info!("a newer agent has taken the eBPF programs over; heartbeat stopped");
                        return;
                    }
                    if let Err(e) = dp.heartbeat(crate::datapath::monotonic_ns()) {
                        warn!(error = %e, "heartbeat write failed");
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
        .expect("spawning a thread")
}

/// How long the listeners keep accepting after the programs are detached at shutdown.
const ACCEPT_SETTLE: Duration = Duration::from_millis(200);

/// How long `sockops` stays attached after the connect programs at shutdown (unpinned mode):
/// a redirected connection is established and recorded within microseconds on a node.
const REDIRECT_SETTLE: Duration = Duration::from_millis(100);

/// A client from an explicit kubeconfig, else in-cluster or `$KUBECONFIG` (kube's inference).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let cfg = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {} is not usable", path.display()))?
        }
        None => kube::Config::infer().await.context("no Kubernetes configuration (in-cluster or $KUBECONFIG)")?,
    };
    kube::Client::try_from(cfg).context("cannot build the Kubernetes client")
}
