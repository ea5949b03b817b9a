//! One connection's telemetry, written once. A [`Recorder`] is opened when a connection is
//! accepted and finished when it ends (or when it is dropped: a connection task that panics or
//! is cancelled still leaves its record, counters and access-log line). It owns, for outbound
//! TCP, outbound HTTP connections and inbound HBONE streams alike: the live/recent connection
//! record (`/debug/connections`), the proxy's connection counters, Istio's `istio_tcp_*`, and the
//! access-log line (one schema for every kind of connection).
use std::{sync::Arc, time::Instant};

use prometheus_client::metrics::counter::Counter;
use tracing::info;

use crate::{
    config::AccessLog,
    metrics::{ByteDirection, DirectionLabels, IstioLabels, IstioMetrics, ProxyMetrics},
    proxy::{
        conns::{ConnRecord, Connections, Direction},
        route::{Path, Source, Target},
    },
};

/// Where connection telemetry goes (shared by all connections of a listener).
#[derive(Clone)]
pub struct Observe {
    pub conns: Arc<Connections>,
    /// The outbound listener's own counters (`switchyard_outbound_connections_*`, bytes).
    pub proxy: Option<ProxyMetrics>,
    pub istio: IstioMetrics,
    pub access_log: AccessLog,
}

/// The `istio_tcp_*` counters one connection's close adds to, looked up once when it opened: a
/// connection holds three counter handles, not its ~20 label strings (on both nodes, for as
/// long as it is open).
struct IstioSeries {
    closed: Counter,
    received: Counter,
    sent: Counter,
}

/// One connection's telemetry until it is written.
pub struct Recorder {
    observe: Arc<Observe>,
    id: u64,
    direction: Direction,
    kind: &'static str,
    started: Instant,
    /// Istio's series of its close, once the connection counts as opened
    /// (`istio_tcp_connections_opened`).
    istio: Option<IstioSeries>,
    requests: u64,
    finished: bool,
}

impl Recorder {
    /// `kind`: `tcp` or `http_connection`.
    pub fn open(observe: &Arc<Observe>, rec: ConnRecord, kind: &'static str) -> Recorder {
        let direction = rec.direction;
        let id = observe.conns.open(rec);
        if let Some(m) = &observe.proxy {
            m.active.inc();
        }
        Recorder {
            observe: observe.clone(),
            id,
            direction,
            kind,
            started: Instant::now(),
            istio: None,
            requests: 0,
            finished: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Counts the connection as opened, with these Istio labels (also those of its close).
    pub fn istio_opened(&mut self, labels: IstioLabels) {
        let m = &self.observe.istio;
        m.tcp_opened.get_or_create(&labels).inc();
        self.istio = Some(IstioSeries {
            closed: m.tcp_closed.get_or_create(&labels).clone(),
            received: m.tcp_received.get_or_create(&labels).clone(),
            sent: m.tcp_sent.get_or_create(&labels).clone(),
        });
    }

    /// The first target an outbound connection goes to: over HBONE, the source identity it
    /// presents is on the record from then on (also if the tunnel then fails).
    pub fn connecting(&self, source: &Source, t: &Target) {
        if matches!(t.path, Path::Hbone { .. }) {
            self.observe.conns.set_source_identity(self.id, source.identity.to_string());
        }
    }

    /// How an outbound connection reached its destination, once connected.
    pub fn connected(&self, source: &Source, t: &Target) {
        self.connecting(source, t);
        self.observe.conns.set_security(self.id, t.path.security(), t.dst.as_ref().map(|i| i.to_string()));
    }

    pub fn set_requests(&mut self, n: u64) {
        self.requests = n;
        self.observe.conns.set_requests(self.id, n);
    }

    /// Writes everything: `sent` is what the client (the source) sent, `received` what it got.
    pub fn finish(mut self, sent: u64, received: u64, error: Option<String>) {
        self.write(sent, received, error);
    }

    fn write(&mut self, sent: u64, received: u64, error: Option<String>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let o = &self.observe;
        if let Some(m) = &o.proxy {
            m.active.dec();
            m.closed.inc();
            m.bytes.get_or_create(&DirectionLabels { direction: ByteDirection::Sent }).inc_by(sent);
            m.bytes.get_or_create(&DirectionLabels { direction: ByteDirection::Received }).inc_by(received);
        }
        if let Some(s) = &self.istio {
            // Istio's "received" is what the source sent.
            s.closed.inc();
            s.received.inc_by(sent);
            s.sent.inc_by(received);
        }
        let Some(rec) = o.conns.close(self.id, self.started.elapsed(), sent, received, error) else { return };
        if !o.access_log.wants(rec.error.is_some()) {
            return;
        }
        let direction = match self.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        };
        info!(
            target: "access",
            direction,
            kind = self.kind,
            client = %rec.client,
            src = rec.source_pod.as_deref().unwrap_or("-"),
            src_identity = rec.source_identity.as_deref().unwrap_or("-"),
            dst = %rec.original_dst,
            endpoint = rec.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            dst_pod = rec.destination_pod.as_deref().unwrap_or("-"),
            dst_identity = rec.destination_identity.as_deref().unwrap_or("-"),
            security = ?rec.security,
            protocol = rec.protocol.unwrap_or("tcp"),
            requests = self.requests,
            retries = rec.retries,
            sent, received,
            duration_ms = rec.duration_ms,
            error = rec.error.as_deref().unwrap_or("-"),
            "{direction} connection"
        );
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.write(0, 0, Some("connection task ended before the connection did".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observe() -> Arc<Observe> {
        Arc::new(Observe {
            conns: Arc::default(),
            proxy: Some(ProxyMetrics::default()),
            istio: IstioMetrics::default(),
            access_log: AccessLog::default(),
        })
    }

    #[test]
    fn a_connection_is_written_once_and_a_dropped_one_still_is() {
        let o = observe();
        let mut r = Recorder::open(&o, ConnRecord::default(), "tcp");
        let labels = IstioLabels::unknown("source", "tcp");
        r.istio_opened(labels.clone());
        assert_eq!(o.proxy.as_ref().unwrap().active.get(), 1);
        r.finish(7, 20, None);
        let m = o.proxy.as_ref().unwrap();
        assert_eq!((m.active.get(), m.closed.get()), (0, 1));
        assert_eq!(o.istio.tcp_received.get_or_create(&labels).get(), 7);
        assert_eq!(o.istio.tcp_sent.get_or_create(&labels).get(), 20);
        assert_eq!(o.istio.tcp_closed.get_or_create(&labels).get(), 1);
        let snap = o.conns.snapshot();
        assert_eq!((snap.recent[0].bytes_sent, snap.recent[0].bytes_received), (7, 20));

        // A task that ends without finishing (panic, cancellation): still closed, once.
        drop(Recorder::open(&o, ConnRecord::default(), "tcp"));
        assert_eq!((m.active.get(), m.closed.get()), (0, 2));
        let snap = o.conns.snapshot();
        assert_eq!(snap.closed_total, 2);
        assert!(snap.recent.iter().any(|c| c.error.as_deref().is_some_and(|e| e.contains("ended before"))));
    }
}
