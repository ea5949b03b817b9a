//! Metrics by construction: each component registers its own metrics here; the kernel-side
//! counters and map usage are read at scrape time by a collector, so a slow scrape never
//! touches the data plane.
use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        info::Info,
    },
    registry::Registry,
};

use crate::datapath::Datapath;

pub const PREFIX: &str = "switchyard";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// The outbound proxy's metrics.
#[derive(Clone, Default)]
pub struct ProxyMetrics {
    pub opened: Counter,
    pub closed: Counter,
    pub active: Gauge,
    pub bytes: Family<DirectionLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub routes: Family<RouteLabels, Counter>,
    /// Shared with the inbound side (registered there): same-node denials count here too.
    pub denials: Family<ErrorLabels, Counter>,
}

impl ProxyMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register("outbound_connections_opened", "Connections accepted by the outbound proxy", self.opened.clone());
        reg.register("outbound_connections_closed", "Outbound proxy connections finished", self.closed.clone());
        reg.register("outbound_connections_active", "Outbound proxy connections open now", self.active.clone());
        reg.register(
            "outbound_bytes",
            "Bytes copied by the outbound proxy (sent: client to destination; received: destination to client)",
            self.bytes.clone(),
        );
        reg.register("outbound_errors", "Outbound proxy connections that failed, by reason", self.errors.clone());
        reg.register(
            "outbound_routes",
            "Outbound connections by route: local (same node), hbone (mTLS to another node), passthrough (plaintext, not meshed), refused",
            self.routes.clone(),
        );
    }

    pub fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ErrorLabels { reason }).inc();
    }
}

/// Agent-wide registry under the `switchyard_` prefix.
pub fn registry() -> Registry {
    let mut reg = Registry::with_prefix(PREFIX);
    reg.register("build", "Agent build information", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
    reg
}

/// Exports the kernel-side counters and map usage at scrape time.
#[derive(Debug)]
pub struct DatapathCollector(pub Arc<Mutex<Option<Datapath>>>);

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").field("cgroup_root", &self.cgroup_root()).finish()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let dropped = ConstCounter::new(crate::logging::dropped());
        dropped.encode(enc.encode_descriptor(
            "log_lines_dropped",
            "Log and access-log lines dropped because the log queue was full (logging never blocks the data plane)",
            None,
            dropped.metric_type(),
        )?)?;
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let up = ConstGauge::new(i64::from(guard.is_some()));
        up.encode(enc.encode_descriptor(
            "ebpf_attached",
            "1 while the eBPF programs are attached",
            None,
            up.metric_type(),
        )?)?;
        let Some(dp) = guard.as_ref() else { return Ok(()) };
        let accel = ConstGauge::new(i64::from(*dp.accel_state() == crate::datapath::AccelState::On));
        accel.encode(enc.encode_descriptor(
            "sockmap_acceleration",
            "1 while same-node acceleration (sockmap + sk_msg) is on",
            None,
            accel.metric_type(),
        )?)?;
        let stats = dp.stats();
        let usage = dp.map_usage();
        drop(guard);
        let mut family = enc.encode_descriptor(
            "ebpf_events",
            "Kernel-side decisions and events, summed over CPUs",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (stat, v) in stats {
            ConstCounter::new(v).encode(family.encode_family(&EventLabels { event: stat.name() })?)?;
        }
        let mut family = enc.encode_descriptor(
            "ebpf_map_entries",
            "Entries in the eBPF maps that grow with pods and connections",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (map, n) in [
            ("meshed_cgroups", usage.meshed_cgroups),
            ("sock_orig", usage.sock_orig),
            ("orig_by_client", usage.orig_by_client),
            ("accel_sockets", usage.accel_sockets),
            ("accel_paths", usage.accel_paths),
        ] {
            ConstGauge::new(n as i64).encode(family.encode_family(&MapLabels { map })?)?;
        }
        Ok(())
    }
}

impl crate::proxy::inbound::InboundMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "inbound_connections",
            "HBONE streams accepted and connected to a local pod",
            self.accepted.clone(),
        );
        reg.register(
            "tls_handshake_failures",
            "Inbound mTLS handshakes rejected, by reason (not_tls, unknown_issuer, expired_certificate, ...)",
            self.tls_failures.clone(),
        );
        reg.register("inbound_rejected", "HBONE CONNECT streams rejected, by reason", self.rejected.clone());
        reg.register(
            "authorization_denials",
            "Connections denied by authorization policy, by reason",
            self.denied.clone(),
        );
    }
}

impl crate::proxy::pool::PoolMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "hbone_client_handshakes",
            "mTLS handshakes made to other nodes (one per pooled connection)",
            self.handshakes.clone(),
        );
        reg.register("hbone_pool_connections", "Pooled HBONE client connections open", self.open_connections.clone());
    }
}
