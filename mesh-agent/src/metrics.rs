//! The registries and the metric types shared by several components (Istio's standard labels,
//! `ByReason`, label enums); each component registers its own metrics into the registry it is
//! given. The kernel-side counters and map usage are read at scrape time by a collector, so a
//! slow scrape never touches the data plane.
use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
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

/// A label value that is one of a fixed set, written as `as_str` gives it.
macro_rules! label_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl prometheus_client::encoding::EncodeLabelValue for $name {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_enum!(
    /// Bytes `sent` by the client (to the upstream) or `received` by it.
    ByteDirection { Sent => "sent", Received => "received" }
);

label_enum!(
    /// How the outbound proxy sent a connection on (`switchyard_outbound_routes_total`).
    RouteKind { Local => "local", Hbone => "hbone", Passthrough => "passthrough", Http => "http", Refused => "refused" }
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: ByteDirection,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: RouteKind,
}

/// A counter by `reason` that also remembers the reasons it has seen, so the admin views read
/// the counts back from the counters themselves (a `Family` cannot be iterated).
#[derive(Clone, Debug, Default)]
pub struct ByReason {
    family: Family<ErrorLabels, Counter>,
    reasons: Arc<Mutex<std::collections::BTreeSet<&'static str>>>,
}

impl ByReason {
    pub fn inc(&self, reason: &'static str) {
        let labels = ErrorLabels { reason };
        if let Some(c) = self.family.get(&labels) {
            c.inc();
            return;
        }
        self.reasons.lock().unwrap_or_else(|p| p.into_inner()).insert(reason);
        self.family.get_or_create(&labels).inc();
    }

    /// Exported from 0 before the first event (so rate() works from the start).
    pub fn preset(&self, reasons: &[&'static str]) {
        for &reason in reasons {
            self.reasons.lock().unwrap_or_else(|p| p.into_inner()).insert(reason);
            let _ = self.family.get_or_create(&ErrorLabels { reason });
        }
    }

    pub fn get(&self, reason: &'static str) -> u64 {
        self.family.get(&ErrorLabels { reason }).map_or(0, |c| c.get())
    }

    /// Every reason seen, with its count.
    pub fn counts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner()).clone();
        reasons.into_iter().map(|r| (r, self.get(r))).collect()
    }

    pub fn register(&self, reg: &mut Registry, name: &str, help: &str) {
        reg.register(name, help, self.family.clone());
    }
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
    pub denials: ByReason,
    /// Redirected connections per pod (exported by [`PodRedirectCollector`]).
    pub pod_redirects: Arc<PodRedirects>,
    /// Denials by the DENY policy that decided them (shared with the inbound side).
    pub by_policy: Arc<PolicyDenials>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

/// Counts by a name that comes and goes (a pod, a policy): exported only for the names that
/// exist now, so the series stay bounded; a name's count goes with it.
#[derive(Debug, Default)]
pub struct KeyedCounts(Mutex<std::collections::HashMap<String, u64>>);

impl KeyedCounts {
    pub fn inc(&self, key: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                m.insert(key.to_string(), 1);
            }
        }
    }

    /// The counts of the names `exists` keeps (the others are forgotten).
    pub fn counts(&self, exists: impl Fn(&str) -> bool) -> std::collections::HashMap<String, u64> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|name, _| exists(name));
        m.clone()
    }
}

/// Connections redirected to the proxy per pod of this node, counted as the proxy accepts them
/// (the kernel's node-wide count is `switchyard_ebpf_events_total{event="redirected"}`).
pub type PodRedirects = KeyedCounts;

/// Connections denied, by the name of the DENY policy that denied them (exported by
/// [`AuthzPolicyCollector`] for the policies that exist now).
pub type PolicyDenials = KeyedCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
}

/// Exports [`PodRedirects`] for the pods this node meshes now, from zero; a pod's series (and
/// its count) goes with the pod, so the label set stays bounded by the node's pods.
#[derive(Debug)]
pub struct PodRedirectCollector {
    pub counts: Arc<PodRedirects>,
    pub pods: tokio::sync::watch::Receiver<Arc<crate::state::PodIndex>>,
}

impl Collector for PodRedirectCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let idx = self.pods.borrow().clone();
        let local: Vec<&crate::state::PodStatus> = idx.pods.iter().filter(|p| p.redirected).collect();
        let counts = self.counts.counts(|k| local.iter().any(|p| p.key == k));
        let mut family = enc.encode_descriptor(
            "pod_redirected_connections",
            "Connections from each meshed pod of this node redirected to the node proxy",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for p in local {
            let labels = PodLabels { namespace: p.workload.namespace.clone(), pod: p.workload.name.clone() };
            ConstCounter::new(counts.get(&p.key).copied().unwrap_or(0)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyStatusLabels {
    status: &'static str,
}

/// Authorization policies by what became of them: `enforced`, `enforced_l4_only` (parts
/// that need L7 attributes left out, see `mesh-agent authz`), `ignored` (for waypoints),
/// `not_enforced` (CUSTOM).
#[derive(Debug)]
pub struct AuthzPolicyCollector {
    pub pods: tokio::sync::watch::Receiver<Arc<crate::state::PodIndex>>,
    pub denials: Arc<PolicyDenials>,
}

impl Collector for AuthzPolicyCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use crate::authz::istio::Status;
        let idx = self.pods.borrow().clone();
        let mut counts: std::collections::BTreeMap<&'static str, i64> =
            ["enforced", "enforced_l4_only", "ignored", "not_enforced", "malformed"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        // Workload-file rules have no report: enforced as written.
        let reported = |name: &str| idx.authz_reports.iter().any(|r| r.policy == name);
        *counts.entry("enforced").or_default() += idx.authz.iter().filter(|r| !reported(&r.name)).count() as i64;
        for r in &idx.authz_reports {
            let status = match r.status {
                Status::Enforced if r.warnings.is_empty() => "enforced",
                Status::Enforced => "enforced_l4_only",
                Status::Ignored => "ignored",
                Status::NotEnforced => "not_enforced",
                Status::Malformed => "malformed",
            };
            *counts.entry(status).or_default() += 1;
        }
        let mut family = enc.encode_descriptor(
            "authorization_policies",
            "Authorization policies this node read, by what became of them (enforced, enforced_l4_only, ignored: for waypoints, not_enforced: CUSTOM, malformed: denies its workloads)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (status, n) in counts {
            ConstGauge::new(n).encode(family.encode_family(&PolicyStatusLabels { status })?)?;
        }
        let denials = self.denials.counts(|name| idx.authz.iter().any(|r| r.name == name));
        let mut family = enc.encode_descriptor(
            "authorization_policy_denials",
            "Connections denied, by the DENY policy that denied them (policies that exist now)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for r in idx.authz.iter().filter(|r| r.action == crate::authz::Action::Deny) {
            let n = denials.get(&r.name).copied().unwrap_or(0);
            ConstCounter::new(n).encode(family.encode_family(&PolicyLabels { policy: r.name.clone() })?)?;
        }
        Ok(())
    }
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

/// The agent's root registry: Istio's standard metrics at the top (see [`IstioMetrics`]),
/// Switchyard's own in [`switchyard`] (prefix `switchyard_`).
pub fn registry() -> Registry {
    let mut reg = Registry::default();
    switchyard(&mut reg).register(
        "build",
        "Agent build information",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    reg
}

/// Switchyard's own metrics: the `switchyard_` sub-registry of the root.
pub fn switchyard(root: &mut Registry) -> &mut Registry {
    root.sub_registry_with_prefix(PREFIX)
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: &'static str,
}

/// One gauge family with a value per label set, encoded at scrape time.
fn gauges<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, i64)>,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
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
        let capacity = dp.map_capacity();
        let programs = dp.programs();
        drop(guard);
        gauges(
            &mut enc,
            "ebpf_program_attached",
            "1 for each eBPF program of this agent that is attached (0: not attached, or taken over by a newer agent)",
            programs.into_iter().map(|(program, on)| (ProgramLabels { program }, i64::from(on))),
        )?;
        gauges(
            &mut enc,
            "ebpf_map_capacity",
            "Capacity of the eBPF maps that grow with pods and connections (usage: switchyard_ebpf_map_entries)",
            capacity.into_iter().map(|(map, n)| (MapLabels { map }, i64::from(n))),
        )?;
        let mut family = enc.encode_descriptor(
            "ebpf_events",
            "Kernel-side decisions and events, summed over CPUs",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (stat, v) in stats {
            ConstCounter::new(v).encode(family.encode_family(&EventLabels { event: stat.name() })?)?;
        }
        gauges(
            &mut enc,
            "ebpf_map_entries",
            "Entries in the eBPF maps that grow with pods and connections",
            usage.entries().into_iter().map(|(map, n)| (MapLabels { map }, n as i64)),
        )?;
        Ok(())
    }
}

/// Istio's standard metric labels, so Istio's Grafana and Kiali dashboards read Switchyard
/// unchanged. A bounded subset: pods, namespaces, identities and Services, never ports or
/// connection ids. Unknown values are `unknown`, as in Istio.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioLabels {
    /// `source` (the outbound proxy) or `destination` (the HBONE server).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// `<name>.<namespace>.svc.cluster.local` for a Service, else `unknown`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `tcp`, `http` or `grpc`.
    pub request_protocol: &'static str,
    /// `mutual_tls` only when the bytes crossed in HBONE; `none` otherwise (same-node delivery,
    /// plaintext out of the mesh). Never assumed.
    pub connection_security_policy: &'static str,
    /// Istio's canonical service and revision (from the pod's labels; else the workload's
    /// name and `latest`), which Kiali's app graph groups by.
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    /// The pods' `app` and `version` labels (`unknown` without them).
    pub source_app: String,
    pub source_version: String,
    pub destination_app: String,
    pub destination_version: String,
    /// Istio's default cluster id, as one cluster's metrics carry it.
    pub source_cluster: &'static str,
    pub destination_cluster: &'static str,
    /// Envoy-style response flags for HTTP (`UO` limit hit, `UT` request timeout, `UF`
    /// upstream connect failure, `UC` upstream reset, `UH` no healthy endpoint, `URX` retries
    /// exhausted); `-` for none and for TCP.
    pub response_flags: &'static str,
}

/// Istio's cluster id when none is configured (single-cluster meshes).
pub const CLUSTER: &str = "Kubernetes";

pub const UNKNOWN: &str = "unknown";

impl IstioLabels {
    pub fn unknown(reporter: &'static str, request_protocol: &'static str) -> Self {
        let u = || UNKNOWN.to_string();
        IstioLabels {
            reporter,
            source_workload: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            destination_workload: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_service: u(),
            destination_service_name: u(),
            destination_service_namespace: u(),
            request_protocol,
            connection_security_policy: "none",
            source_canonical_service: u(),
            source_canonical_revision: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            source_app: u(),
            source_version: u(),
            destination_app: u(),
            destination_version: u(),
            source_cluster: CLUSTER,
            destination_cluster: CLUSTER,
            response_flags: "-",
        }
    }

    /// Fills the source side from a pod.
    pub fn source(mut self, w: &crate::state::Workload, trust_domain: &str) -> Self {
        self.source_workload = w.workload_name().to_string();
        self.source_workload_namespace = w.namespace.clone();
        self.source_principal = w.spiffe_id(trust_domain);
        self.source_canonical_service = w.canonical_service().to_string();
        self.source_canonical_revision = w.canonical_revision().to_string();
        self.source_app = w.labels.app.clone().unwrap_or_else(|| UNKNOWN.into());
        self.source_version = w.labels.version.clone().unwrap_or_else(|| UNKNOWN.into());
        self
    }

    /// Fills the destination side from a pod (its principal only if it is meshed: a pod
    /// outside the mesh proves no identity).
    pub fn destination(mut self, w: &crate::state::Workload, trust_domain: &str) -> Self {
        self.destination_workload = w.workload_name().to_string();
        self.destination_workload_namespace = w.namespace.clone();
        self.destination_canonical_service = w.canonical_service().to_string();
        self.destination_canonical_revision = w.canonical_revision().to_string();
        self.destination_app = w.labels.app.clone().unwrap_or_else(|| UNKNOWN.into());
        self.destination_version = w.labels.version.clone().unwrap_or_else(|| UNKNOWN.into());
        if w.meshed {
            self.destination_principal = w.spiffe_id(trust_domain);
        }
        self
    }

    /// Fills the Service from its `namespace/name` key.
    pub fn service(mut self, key: &str) -> Self {
        if let Some((ns, name)) = key.split_once('/') {
            self.destination_service = format!("{name}.{ns}.svc.cluster.local");
            self.destination_service_name = name.to_string();
            self.destination_service_namespace = ns.to_string();
        }
        self
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioHttpLabels {
    #[prometheus(flatten)]
    pub base: IstioLabels,
    pub response_code: u16,
    /// The gRPC status (`grpc-status` in the trailers, or the headers of a trailers-only
    /// answer) of a gRPC request; empty for other HTTP.
    pub grpc_response_status: String,
}

/// Istio's standard metrics (no `switchyard_` prefix: the names are Istio's).
#[derive(Clone)]
pub struct IstioMetrics {
    pub tcp_opened: Family<IstioLabels, Counter>,
    pub tcp_closed: Family<IstioLabels, Counter>,
    /// Bytes from the destination back to the source (Istio: "sent during response").
    pub tcp_sent: Family<IstioLabels, Counter>,
    /// Bytes from the source to the destination (Istio: "received during request").
    pub tcp_received: Family<IstioLabels, Counter>,
    pub requests: Family<IstioHttpLabels, Counter>,
    pub request_duration: Family<IstioHttpLabels, Histogram, fn() -> Histogram>,
    pub request_bytes: Family<IstioHttpLabels, Histogram, fn() -> Histogram>,
    pub response_bytes: Family<IstioHttpLabels, Histogram, fn() -> Histogram>,
}

fn duration_buckets() -> Histogram {
    // Istio's default buckets (milliseconds).
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
        300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn size_buckets() -> Histogram {
    // Istio's: 1 B to 100 MB, ×10.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 10.0, 9))
}

impl Default for IstioMetrics {
    fn default() -> Self {
        IstioMetrics {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_buckets),
            request_bytes: Family::new_with_constructor(size_buckets),
            response_bytes: Family::new_with_constructor(size_buckets),
        }
    }
}

impl IstioMetrics {
    /// Registers under Istio's names, in a registry without prefix.
    pub fn register(&self, reg: &mut Registry) {
        reg.register("istio_tcp_connections_opened", "TCP connections opened", self.tcp_opened.clone());
        reg.register("istio_tcp_connections_closed", "TCP connections closed", self.tcp_closed.clone());
        reg.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during response (destination to source)",
            self.tcp_sent.clone(),
        );
        reg.register(
            "istio_tcp_received_bytes",
            "Bytes received during request (source to destination)",
            self.tcp_received.clone(),
        );
        reg.register("istio_requests", "HTTP requests", self.requests.clone());
        reg.register_with_unit(
            "istio_request_duration",
            "HTTP request duration until the response headers, retries included",
            prometheus_client::registry::Unit::Other("milliseconds".into()),
            self.request_duration.clone(),
        );
        reg.register("istio_request_bytes", "HTTP request body sizes", self.request_bytes.clone());
        reg.register("istio_response_bytes", "HTTP response body sizes", self.response_bytes.clone());
    }
}

/// The agent process (CPU, memory, open files), read at scrape time.
#[derive(Debug)]
pub struct ProcessCollector;

/// (CPU seconds, resident bytes, open descriptors) of this process, from /proc.
pub fn process_stats() -> (f64, u64, u64) {
    // SAFETY: sysconf has no preconditions.
    let (tick, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command (which may hold spaces) end with ')'.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let (u, k) = (f.get(11)?.parse::<f64>().ok()?, f.get(12)?.parse::<f64>().ok()?);
            Some((u + k) / tick.max(1) as f64)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page.max(1) as u64);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    (cpu, rss, fds)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let (cpu, rss, fds) = process_stats();
        let c = ConstCounter::new(cpu);
        c.encode(enc.encode_descriptor(
            "process_cpu_seconds",
            "Agent CPU time, user and system",
            None,
            c.metric_type(),
        )?)?;
        let g = ConstGauge::new(rss as i64);
        g.encode(enc.encode_descriptor(
            "process_resident_memory_bytes",
            "Agent resident memory",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(fds as i64);
        g.encode(enc.encode_descriptor("process_open_fds", "Agent open file descriptors", None, g.metric_type())?)?;
        Ok(())
    }
}

/// The same metrics in Prometheus' text format 0.0.4, from prometheus-client's OpenMetrics
/// text, for scrapers that do not ask for OpenMetrics: counter families are named with their
/// `_total` suffix, info families become gauges named `<name>_info`, `unknown` is `untyped`,
/// and the `# UNIT` and `# EOF` lines go.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE; hold it until the type says what the family is called.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                "gaugehistogram" => (name.to_string(), "histogram"),
                "stateset" => (name.to_string(), "gauge"),
                _ => (name.to_string(), "untyped"),
            };
            if let Some((h, text)) = help.take() {
                let h = if rest.starts_with(h) && rest[h.len()..].starts_with(' ') { name.as_str() } else { h };
                out.push_str(&format!("# HELP {h} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            if let Some((name, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Whether a scraper's `Accept` header asks for OpenMetrics (Prometheus does, first); anything
/// else (curl, older scrapers) gets the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            let is_om = params.next().is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"));
            let refused =
                params.any(|p| p.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)));
            is_om && !refused
        })
    })
}

#[cfg(test)]
mod text_format_tests {
    use super::*;
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};

    #[test]
    fn openmetrics_becomes_prometheus_text_and_accept_chooses() {
        let mut reg = registry();
        let sy = switchyard(&mut reg);
        let c = Counter::<u64>::default();
        c.inc_by(3);
        sy.register("http_requests", "HTTP requests", c);
        let g = Gauge::<i64>::default();
        g.set(7);
        sy.register("open", "Open things", g);
        let h = Histogram::new([1.0, 10.0]);
        h.observe(5.0);
        sy.register("latency", "Latency", h);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &reg).unwrap();
        assert!(om.contains("# TYPE switchyard_http_requests counter") && om.ends_with("# EOF\n"), "{om}");
        let text = prometheus_text(&om);
        for want in [
            "# HELP switchyard_http_requests_total HTTP requests.\n# TYPE switchyard_http_requests_total counter\nswitchyard_http_requests_total 3\n",
            "# HELP switchyard_open Open things.\n# TYPE switchyard_open gauge\nswitchyard_open 7\n",
            "# TYPE switchyard_latency histogram\n",
            "switchyard_latency_bucket{le=\"10.0\"} 1\n",
            "# TYPE switchyard_build_info gauge\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        // Every sample line of the original is in the converted text, unchanged.
        for l in om.lines().filter(|l| !l.starts_with('#')) {
            assert!(text.lines().any(|t| t == l), "{l}");
        }

        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
    }
}
