//! Outbound: the listener the eBPF programs send meshed pods' connections to.
//!
//! On accept: take the original destination recorded by the kernel for this client address
//! (never guess: no record, no forwarding), connect there, and copy bytes both ways until both
//! sides have finished, propagating each half-close on its own.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    datapath::{OrigDstLookup, Original},
    metrics::{DirectionLabels, ProxyMetrics},
    proxy::conns::{ConnRecord, Connections},
    reconcile::PodIndex,
};

pub struct Outbound {
    pub lookup: Arc<dyn OrigDstLookup>,
    pub pods: watch::Receiver<Arc<PodIndex>>,
    pub metrics: ProxyMetrics,
    pub conns: Arc<Connections>,
    pub connect_timeout: Duration,
    pub copy_buffer: usize,
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
}

impl OutboundError {
    fn reason(&self) -> &'static str {
        match self {
            OutboundError::NoOriginalDst(_) => "no_original_dst",
            OutboundError::Lookup(_) => "lookup_failed",
            OutboundError::ConnectTimeout { .. } => "connect_timeout",
            OutboundError::Connect { .. } => "connect_failed",
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
            tasks.spawn(async move { this.handle(client, peer).await });
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        self.metrics.opened.inc();
        let orig = match self.lookup.take(peer) {
            Ok(Some(o)) => o,
            Ok(None) => return self.reject(client, OutboundError::NoOriginalDst(peer)),
            Err(e) => return self.reject(client, OutboundError::Lookup(e)),
        };
        let (source_pod, destination_pod) = {
            let pods = self.pods.borrow();
            (pods.by_cgroup(orig.pod_cgroup).map(str::to_owned), pods.by_ip(*orig.dst.ip()).map(str::to_owned))
        };
        let id = self.conns.open(ConnRecord {
            id: 0,
            client: peer,
            source_pod,
            original_dst: orig.dst,
            destination_pod,
            started_unix_ms: 0,
            duration_ms: None,
            bytes_sent: 0,
            bytes_received: 0,
            error: None,
        });
        self.metrics.active.inc();
        let started = Instant::now();
        let (sent, received, error) = match self.forward(client, orig).await {
            Ok((s, r)) => (s, r, None),
            Err((s, r, e)) => (s, r, Some(e)),
        };
        self.metrics.active.dec();
        self.metrics.closed.inc();
        self.metrics.bytes.get_or_create(&DirectionLabels { direction: "sent" }).inc_by(sent);
        self.metrics.bytes.get_or_create(&DirectionLabels { direction: "received" }).inc_by(received);
        if let Some(rec) = self.conns.close(id, started.elapsed(), sent, received, error) {
            info!(
                target: "access",
                client = %rec.client,
                src = rec.source_pod.as_deref().unwrap_or("-"),
                dst = %rec.original_dst,
                dst_pod = rec.destination_pod.as_deref().unwrap_or("-"),
                sent, received,
                duration_ms = rec.duration_ms,
                error = rec.error.as_deref().unwrap_or("-"),
                "outbound connection"
            );
        }
    }

    /// Returns bytes (client→destination, destination→client).
    async fn forward(&self, mut client: TcpStream, orig: Original) -> Result<(u64, u64), (u64, u64, String)> {
        let dst = SocketAddr::V4(orig.dst);
        let upstream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                let e = OutboundError::Connect { dst, source };
                self.metrics.error(e.reason());
                reset(client);
                return Err((0, 0, e.to_string()));
            }
            Err(_) => {
                let e = OutboundError::ConnectTimeout { dst, timeout: self.connect_timeout };
                self.metrics.error(e.reason());
                reset(client);
                return Err((0, 0, e.to_string()));
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let mut upstream = upstream;
        match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, self.copy_buffer, self.copy_buffer).await {
            Ok((s, r)) => {
                let _ = client.shutdown().await;
                Ok((s, r))
            }
            Err(e) => {
                self.metrics.error("io");
                debug!(error = %e, %dst, "outbound copy ended with an error");
                // Counts are lost on error by copy_bidirectional; report what we know.
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

/// Closes with RST so the application sees a failed connection, not a clean empty reply.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
