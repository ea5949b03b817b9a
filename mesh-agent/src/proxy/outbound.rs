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
        match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, self.copy_buffer, self.copy_buffer)
            .await
        {
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
        let (_tx, pods) = watch::channel(Arc::new(PodIndex::default()));
        let out = Arc::new(Outbound {
            lookup: table.clone(),
            pods,
            metrics: metrics.clone(),
            conns: conns.clone(),
            connect_timeout: Duration::from_secs(2),
            copy_buffer: 16 * 1024,
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
