//! Wires the agent together: datapath, workload source, reconciler, proxy and admin server,
//! and takes it apart again in the right order on shutdown.
use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use mesh_common::PodPolicy;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    admin::Admin,
    cgroup,
    config::Config,
    datapath::{Datapath, DatapathConfig},
    metrics::{self, DatapathCollector, ProxyMetrics},
    proxy::{conns::Connections, outbound::Outbound},
    reconcile::Reconciler,
    state::NodeState,
    workloads,
};

/// Runs the agent until `shutdown` completes, then stops it cleanly: programs detached first
/// (new connections go direct at once), listeners closed, in-flight connections given
/// `config.drain_grace` to finish.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    info!(?config, "effective configuration");
    let mount = cgroup::cgroup2_mount()?;

    // Everything that can fail on bad input fails before the kernel is touched.
    let initial = match &config.workload_file {
        Some(path) => workloads::load(path, &mount)?,
        None => {
            warn!("no workload file configured: no pod will be meshed");
            NodeState::default()
        }
    };
    let outbound_listener = TcpListener::bind(config.outbound_listen)
        .await
        .with_context(|| format!("cannot listen on {} (outbound)", config.outbound_listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    let outbound_addr: SocketAddr = outbound_listener.local_addr()?;

    let datapath = Datapath::start(&DatapathConfig {
        cgroup_root: config.cgroup_root.clone(),
        bypass_ports: config.bypass_ports.clone(),
        bypass_cidrs: config.bypass_cidrs.clone(),
        agent_tgid: std::process::id(),
        max_redirected_sockets: config.max_redirected_sockets,
    })?;
    let orig_table = datapath.orig_dst_table();
    let datapath = Arc::new(Mutex::new(Some(datapath)));

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();

    let (state_tx, state_rx) = watch::channel(initial);
    if let Some(path) = config.workload_file.clone() {
        tokio::spawn(workloads::watch(path, mount.clone(), state_tx));
    }
    let policy = PodPolicy {
        proxy_ip4: u32::from_ne_bytes(config.redirect_address.octets()),
        proxy_port: outbound_addr.port().to_be(),
        flags: 0,
    };
    let mut reconciler = Reconciler::new(datapath.clone(), policy);
    let index = reconciler.apply(&state_rx.borrow());
    let (index_tx, index_rx) = watch::channel(Arc::new(index));
    let reconcile_task = tokio::spawn(reconciler.run(state_rx, index_tx, stop.clone()));

    let mut registry = metrics::registry();
    let proxy_metrics = ProxyMetrics::default();
    proxy_metrics.register(&mut registry);
    registry.register_collector(Box::new(DatapathCollector(datapath.clone())));

    let conns = Arc::new(Connections::default());
    let (ready_tx, ready_rx) = watch::channel(false);
    let admin = Arc::new(Admin {
        registry,
        pods: index_rx.clone(),
        conns: conns.clone(),
        datapath: datapath.clone(),
        ready: ready_rx,
        node_name: config.node_name.clone(),
    });
    let admin_addr = admin_listener.local_addr()?;
    let admin_task = tokio::spawn(admin.serve(admin_listener, stop.clone()));

    let outbound = Arc::new(Outbound {
        lookup: orig_table,
        pods: index_rx,
        metrics: proxy_metrics,
        conns: conns.clone(),
        connect_timeout: config.connect_timeout,
        copy_buffer: config.copy_buffer,
    });
    let outbound_task = tokio::spawn(outbound.serve(outbound_listener, stop.clone(), tasks.clone()));

    ready_tx.send_replace(true);
    info!(node = %config.node_name, outbound = %outbound_addr, admin = %admin_addr, "agent ready");

    shutdown.await;

    info!("stopping: detaching eBPF programs");
    ready_tx.send_replace(false);
    // Detach first: from here on, pods connect directly again.
    let dp = datapath.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(dp);
    stop.cancel();
    let _ = tokio::join!(reconcile_task, outbound_task);
    tasks.close();
    let in_flight = conns.active_count();
    if in_flight > 0 {
        info!(in_flight, grace = ?config.drain_grace, "letting in-flight connections finish");
    }
    if tokio::time::timeout(config.drain_grace, tasks.wait()).await.is_err() {
        warn!(cut = conns.active_count(), "drain grace period over; closing the remaining connections");
    }
    admin_task.abort();
    info!("agent stopped");
    Ok(())
}
