//! The agent's view of the node's workloads, whatever feeds it (the local workload file or the
//! Kubernetes watches), and the annotations' meaning. The reconciler turns it into datapath
//! state and publishes the [`PodIndex`] the proxy looks up per connection.
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
};

use crate::{authz::Rule, identity::Identity};

/// The annotation that opts a namespace in (`enabled`) or a pod out (`disabled`).
pub const MESH_ANNOTATION: &str = "switchyard.io/mesh";
/// Namespace annotation: `permissive` (default) or `strict`.
pub const MTLS_MODE_ANNOTATION: &str = "switchyard.io/mtls-mode";
/// Namespace annotation: what the namespace's pods get while no agent serves the node:
/// `open` (default: they connect directly) or `closed` (their connects are refused). Needs
/// the programs pinned (`bpfPinDir`), else they go with the agent and every pod is open.
pub const FAIL_MODE_ANNOTATION: &str = "switchyard.io/fail-mode";
/// Namespace annotation: which of its pods' TCP connections the kernel sends to the proxy:
/// `mesh` (default: destinations the mesh serves, meshed pods and the Services it serves) or
/// `all` (every destination; traffic to the outside world then leaves from the node, as the
/// node, and shows in the mesh's metrics).
pub const CAPTURE_ANNOTATION: &str = "switchyard.io/capture";

/// Whether a meshed pod also accepts plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsMode {
    /// Accept connections from non-mesh clients too (the default, for migration).
    #[default]
    Permissive,
    /// Accept TCP only through the mesh; other SYNs are dropped in the kernel.
    Strict,
}

/// What a namespace's annotations ask of the mesh. One parser for the workload file and for
/// Kubernetes, equally strict: a value the key does not take is an error, never read as "off".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NamespacePolicy {
    /// [`MESH_ANNOTATION`] is `enabled` (`disabled` or absent: not meshed).
    pub meshed: bool,
    pub mtls_mode: MtlsMode,
    /// [`FAIL_MODE_ANNOTATION`] is `closed`.
    pub fail_closed: bool,
    /// [`CAPTURE_ANNOTATION`] is `all`.
    pub capture_all: bool,
}

/// One of `choices` (value, meaning), the first when absent.
fn choice<T: Copy>(
    key: &str,
    value: Option<&str>,
    choices: &[(&'static str, T)],
    expected: &'static str,
) -> Result<T, AnnotationError> {
    match value {
        None => Ok(choices[0].1),
        Some(v) => choices.iter().find(|(c, _)| *c == v.trim()).map(|(_, t)| *t).ok_or_else(|| AnnotationError {
            key: key.into(),
            value: v.into(),
            expected,
        }),
    }
}

impl NamespacePolicy {
    /// From a namespace's annotations, looked up by key.
    pub fn from_annotations<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, AnnotationError> {
        Ok(NamespacePolicy {
            meshed: choice(
                MESH_ANNOTATION,
                get(MESH_ANNOTATION),
                &[("disabled", false), ("enabled", true)],
                "\"enabled\" or \"disabled\"",
            )?,
            mtls_mode: choice(
                MTLS_MODE_ANNOTATION,
                get(MTLS_MODE_ANNOTATION),
                &[("permissive", MtlsMode::Permissive), ("strict", MtlsMode::Strict)],
                "\"permissive\" or \"strict\"",
            )?,
            fail_closed: choice(
                FAIL_MODE_ANNOTATION,
                get(FAIL_MODE_ANNOTATION),
                &[("open", false), ("closed", true)],
                "\"open\" or \"closed\"",
            )?,
            capture_all: choice(
                CAPTURE_ANNOTATION,
                get(CAPTURE_ANNOTATION),
                &[("mesh", false), ("all", true)],
                "\"mesh\" or \"all\"",
            )?,
        })
    }
}

/// Whether a pod's annotations opt it out of its namespace's mesh ([`MESH_ANNOTATION`]
/// `disabled`; `enabled` or absent: it follows its namespace).
pub fn pod_opts_out<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<bool, AnnotationError> {
    choice(
        MESH_ANNOTATION,
        get(MESH_ANNOTATION),
        &[("enabled", false), ("disabled", true)],
        "\"enabled\" or \"disabled\"",
    )
}

/// Why a pod is or is not meshed: shown in logs and on the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MeshReason {
    /// Its namespace is annotated `switchyard.io/mesh: enabled`.
    Namespace,
    /// The pod itself is annotated `switchyard.io/mesh: disabled`.
    PodOptOut,
    /// Its namespace is not annotated.
    NamespaceNotMeshed,
    /// It runs in the node's network namespace (`hostNetwork: true`): never meshed.
    HostNetwork,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub name: String,
    /// The workload the pod belongs to (Deployment, StatefulSet, ... as Istio names it), when
    /// it is not the pod itself; see [`Workload::workload_name`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub namespace: String,
    pub service_account: String,
    pub ip: Ipv4Addr,
    /// The node the pod runs on.
    pub node: String,
    /// Absolute path of the pod's cgroup (v2); known for this node's pods only.
    pub cgroup: Option<PathBuf>,
    pub meshed: bool,
    pub reason: MeshReason,
    pub mtls_mode: MtlsMode,
    /// [`FAIL_MODE_ANNOTATION`] is `closed` on its namespace.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fail_closed: bool,
    /// [`CAPTURE_ANNOTATION`] is `all` on its namespace.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub capture_all: bool,
    /// The pod labels Istio's metrics name it by (canonical service and revision, app,
    /// version).
    #[serde(skip_serializing_if = "AppLabels::is_empty")]
    pub labels: AppLabels,
    /// The ports the kubelet probes the pod on: a strict pod admits them from the node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probe_ports: Vec<u16>,
    /// All its labels, for authorization policies' selectors (this node's pods only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
}

/// The pod labels Istio derives its `*_canonical_service`, `*_canonical_revision`, `*_app`
/// and `*_version` metric labels from.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct AppLabels {
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canonical_name: Option<String>,
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else `version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canonical_revision: Option<String>,
    /// `app`, else `app.kubernetes.io/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// `version`, else `app.kubernetes.io/version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl AppLabels {
    /// From a pod's labels, by Istio's precedence.
    pub fn from_labels<'a>(get: impl Fn(&str) -> Option<&'a str>) -> AppLabels {
        let first = |keys: &[&str]| keys.iter().find_map(|k| get(k).filter(|v| !v.is_empty())).map(str::to_string);
        AppLabels {
            canonical_name: first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]),
            canonical_revision: first(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]),
            app: first(&["app", "app.kubernetes.io/name"]),
            version: first(&["version", "app.kubernetes.io/version"]),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == AppLabels::default()
    }
}

impl Workload {
    /// This pod as the destination of a connection to `port`, for authorization.
    pub fn authz_destination(&self, port: u16) -> crate::authz::Destination<'_> {
        crate::authz::Destination {
            namespace: &self.namespace,
            name: &self.name,
            labels: &self.pod_labels,
            ip: self.ip,
            port,
        }
    }

    /// W3C `baggage` naming this pod's workload, as ztunnel sends it on HBONE (a request's
    /// source, a 200's destination): cluster, namespace, workload (a Deployment's when the pod
    /// has an owner, else the pod), canonical service and revision.
    pub fn baggage(&self) -> String {
        let kind = if self.workload.is_some() { "deployment" } else { "pod" };
        format!(
            "k8s.cluster.name={},k8s.namespace.name={},k8s.{kind}.name={},service.name={},service.version={}",
            crate::metrics::CLUSTER,
            self.namespace,
            self.workload_name(),
            self.canonical_service(),
            self.canonical_revision()
        )
    }

    /// The `source_workload`/`destination_workload` of metrics: the owning workload's name,
    /// else the pod's.
    pub fn workload_name(&self) -> &str {
        self.workload.as_deref().unwrap_or(&self.name)
    }

    /// Istio's canonical service: from the labels, else the workload's name.
    pub fn canonical_service(&self) -> &str {
        self.labels.canonical_name.as_deref().unwrap_or_else(|| self.workload_name())
    }

    /// Istio's canonical revision: from the labels, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.labels.canonical_revision.as_deref().unwrap_or("latest")
    }

    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        self.identity(trust_domain).to_string()
    }

    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// Another node's agent, reachable for HBONE.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// Address the node's HBONE listener (port 15008) is reached on.
    pub address: Ipv4Addr,
}

/// Everything this node knows at one moment: its own pods, the other nodes and their pods,
/// and the authorization rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeState {
    /// This node's name.
    pub node: String,
    /// Keyed by `namespace/name`; pods of every node.
    pub pods: BTreeMap<String, Workload>,
    pub nodes: BTreeMap<String, NodeInfo>,
    pub authz: Vec<Rule>,
    /// What became of each Istio policy read (`mesh-agent authz`).
    pub authz_reports: Vec<crate::authz::istio::Report>,
    /// Service virtual addresses (ClusterIP:port) → ready endpoints (pod IP:target port),
    /// balanced over by the proxy (no kube-proxy needed for meshed pods).
    pub services: BTreeMap<SocketAddrV4, ServiceEntry>,
}

impl NodeState {
    /// What authorization asks of this node's pods: strict mTLS where PeerAuthentication says
    /// STRICT, or where a policy can only hold if the pod is reached through the mesh (an
    /// ALLOW policy, a DENY on identities: see [`crate::authz::needs_mesh_only`]); the stricter
    /// of that and the namespace's annotation wins. A policy for pods outside the mesh is
    /// reported as not enforced for them.
    pub fn apply_policies(&mut self, peer_auths: &[crate::authz::istio::PeerAuthentication], root: &str) {
        let mut unmeshed: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (key, w) in self.pods.iter_mut().filter(|(_, w)| w.node == self.node) {
            let dst = w.authz_destination(0);
            if !w.meshed {
                for r in self.authz.iter().filter(|r| r.selects(dst)) {
                    unmeshed.entry(r.name.as_str()).or_default().push(key.clone());
                }
                continue;
            }
            let strict = crate::authz::istio::strict(peer_auths, root, &w.namespace, &w.pod_labels)
                || crate::authz::needs_mesh_only(&self.authz, dst);
            if strict {
                w.mtls_mode = MtlsMode::Strict;
            }
        }
        for r in self.authz_reports.iter_mut() {
            if let Some(pods) = unmeshed.get(r.policy.as_str()) {
                r.warnings.push(format!("selects pods outside the mesh, NOT ENFORCED for them: {}", pods.join(", ")));
            }
        }
    }
}

/// Annotation on a Service: connections open at once through the mesh to it, node-wide per
/// agent; past it new connections are reset at once (fail fast) instead of queueing. For HTTP
/// it bounds the requests in flight to the Service (each holds one upstream connection).
pub const MAX_CONNECTIONS_ANNOTATION: &str = "switchyard.io/max-connections";
/// HTTP requests that may wait for one of the `max-connections` slots (default 0: none wait;
/// past it the request gets a 503 at once).
pub const MAX_PENDING_ANNOTATION: &str = "switchyard.io/max-pending-requests";
/// Per-request timeout for HTTP (`250ms`, `2s`, `1m`); default none.
pub const TIMEOUT_ANNOTATION: &str = "switchyard.io/timeout";
/// Envoy's per-try timeout (Linkerd's retry timeout): one attempt of an HTTP request past it
/// is cancelled, counted against its endpoint and retried within `timeout` and the budget.
pub const PER_TRY_TIMEOUT_ANNOTATION: &str = "switchyard.io/per-try-timeout";
/// Retries per HTTP request (default 2; `0` turns retries off).
pub const RETRIES_ANNOTATION: &str = "switchyard.io/retries";
/// Status codes an idempotent request is retried on (comma separated; default `503`).
pub const RETRY_ON_ANNOTATION: &str = "switchyard.io/retry-on";
/// `true`: also retry non-idempotent methods (POST, PATCH, ...). Default `false`.
pub const RETRY_NON_IDEMPOTENT_ANNOTATION: &str = "switchyard.io/retry-non-idempotent";
/// Retry budget: retries at most this share of requests (plus a small floor), e.g. `20%`.
pub const RETRY_BUDGET_ANNOTATION: &str = "switchyard.io/retry-budget";

/// Defaults of a Service's policy.
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;

/// What a Service port speaks, from its `appProtocol` or name (`http-*`, `grpc-*`, `tcp-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolHint {
    /// HTTP/1 or HTTP/2: no sniff timeout, wait for the client's first bytes.
    Http,
    /// Opaque TCP: never sniffed.
    Opaque,
}

impl ProtocolHint {
    /// From a port's `appProtocol` (preferred) or its name, as Istio and Linkerd read them.
    pub fn from_port(app_protocol: Option<&str>, name: &str) -> Option<ProtocolHint> {
        let word = |s: &str| {
            let s = s.to_ascii_lowercase();
            let head = s.split(['-', '/']).next().unwrap_or("").to_string();
            match head.as_str() {
                "http" | "http2" | "h2c" | "grpc" | "grpc-web" => Some(ProtocolHint::Http),
                "kubernetes.io" if s.ends_with("/h2c") => Some(ProtocolHint::Http),
                "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "opaque" => Some(ProtocolHint::Opaque),
                _ => None,
            }
        };
        app_protocol.and_then(word).or_else(|| word(name))
    }
}

/// A Service's traffic policy, from its annotations. Every field has a default; an invalid
/// value rejects the whole Service update (the previous version stays).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServicePolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    pub max_pending_requests: u32,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub timeout: Option<std::time::Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub per_try_timeout: Option<std::time::Duration>,
    pub retries: u32,
    pub retry_on: Vec<u16>,
    pub retry_non_idempotent: bool,
    pub retry_budget_percent: u32,
}

mod opt_ms {
    pub fn serialize<S: serde::Serializer>(d: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }
}

impl Default for ServicePolicy {
    fn default() -> Self {
        ServicePolicy {
            max_connections: None,
            max_pending_requests: 0,
            timeout: None,
            per_try_timeout: None,
            retries: DEFAULT_RETRIES,
            retry_on: vec![503],
            retry_non_idempotent: false,
            retry_budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
        }
    }
}

/// `250ms`, `2s`, `1.5s`, `1m`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map(|i| s.split_at(i))?;
    let n: f64 = num.parse().ok().filter(|n: &f64| n.is_finite() && *n > 0.0)?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    std::time::Duration::try_from_secs_f64(secs).ok().filter(|d| *d >= std::time::Duration::from_millis(1))
}

/// An annotation whose value is not what its key takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {value:?} is not {expected}")]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub expected: &'static str,
}

impl ServicePolicy {
    /// From a Service's annotations (other keys ignored).
    pub fn from_annotations<'a>(
        annotations: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<ServicePolicy, AnnotationError> {
        let mut p = ServicePolicy::default();
        for (k, v) in annotations {
            let bad = |expected: &'static str| AnnotationError { key: k.into(), value: v.into(), expected };
            let v = v.trim();
            match k {
                MAX_CONNECTIONS_ANNOTATION => {
                    p.max_connections =
                        Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| bad("a positive number of connections"))?)
                }
                MAX_PENDING_ANNOTATION => {
                    p.max_pending_requests = v.parse().map_err(|_| bad("a number of requests (0 or more)"))?
                }
                TIMEOUT_ANNOTATION => {
                    p.timeout = Some(parse_duration(v).ok_or_else(|| bad("a duration like 500ms, 2s or 1m"))?)
                }
                PER_TRY_TIMEOUT_ANNOTATION => {
                    p.per_try_timeout = Some(parse_duration(v).ok_or_else(|| bad("a duration like 200ms or 1s"))?)
                }
                RETRIES_ANNOTATION => {
                    p.retries =
                        v.parse().ok().filter(|n| *n <= 10).ok_or_else(|| bad("a number of retries from 0 to 10"))?
                }
                RETRY_ON_ANNOTATION => {
                    p.retry_on = v
                        .split(',')
                        .map(|c| c.trim().parse::<u16>().ok().filter(|c| (500..=599).contains(c)))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| bad("a comma-separated list of 5xx status codes"))?
                }
                RETRY_NON_IDEMPOTENT_ANNOTATION => {
                    p.retry_non_idempotent = match v {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad("true or false")),
                    }
                }
                RETRY_BUDGET_ANNOTATION => {
                    p.retry_budget_percent = v
                        .strip_suffix('%')
                        .and_then(|n| n.trim().parse().ok())
                        .filter(|n| *n <= 100)
                        .ok_or_else(|| bad("a percentage from 0% to 100%"))?
                }
                _ => {}
            }
        }
        Ok(p)
    }
}

/// One Service port as the proxy serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceEntry {
    /// `namespace/name`.
    pub service: String,
    /// Ready endpoints (pod IP:target port).
    pub endpoints: Vec<SocketAddrV4>,
    /// From the port's `appProtocol` or name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolHint>,
    pub policy: ServicePolicy,
}

impl NodeState {
    /// This node's meshed pods.
    pub fn meshed(&self) -> impl Iterator<Item = &Workload> {
        self.pods.values().filter(|w| w.meshed && w.node == self.node)
    }
}

/// A pod as the proxy and the admin API see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PodStatus {
    pub key: String,
    #[serde(flatten)]
    pub workload: Workload,
    pub cgroup_id: Option<u64>,
    /// True once the pod's cgroup is in the datapath's meshed map.
    pub redirected: bool,
}

/// What the proxy looks up per connection: pods (this node's and others'), nodes, rules.
#[derive(Debug, Default)]
pub struct PodIndex {
    pub node: String,
    pub pods: Vec<PodStatus>,
    pub nodes: BTreeMap<String, NodeInfo>,
    pub authz: Vec<Rule>,
    pub authz_reports: Vec<crate::authz::istio::Report>,
    /// Shared, so a connection's route holds its Service without copying it.
    pub services: BTreeMap<std::net::SocketAddrV4, Arc<ServiceEntry>>,
    by_cgroup: HashMap<u64, usize>,
    by_ip: HashMap<Ipv4Addr, usize>,
}

/// An address that is never a pod's: unspecified, link-local (the cloud metadata service),
/// broadcast or multicast. (Loopback is refused where traffic arrives from the network: see
/// `Inbound::loopback_pods`.)
pub fn special_address(ip: Ipv4Addr) -> bool {
    ip.is_unspecified() || ip.is_link_local() || ip.is_broadcast() || ip.is_multicast()
}

impl PodIndex {
    /// Whether `ip` is one of the nodes' addresses.
    pub fn is_node_address(&self, ip: Ipv4Addr) -> bool {
        self.nodes.values().any(|n| n.address == ip)
    }

    pub fn new(state: &NodeState, pods: Vec<PodStatus>) -> Self {
        let by_cgroup = pods
            .iter()
            .enumerate()
            .filter(|(_, p)| p.workload.node == state.node)
            .filter_map(|(i, p)| Some((p.cgroup_id?, i)))
            .collect();
        // Only addresses that name one pod: never 0.0.0.0 or another special address (a pending
        // pod), never a node's (host-network pods), never one several pods share.
        let mut count: HashMap<Ipv4Addr, usize> = HashMap::new();
        for p in &pods {
            *count.entry(p.workload.ip).or_default() += 1;
        }
        let is_node = |ip: Ipv4Addr| state.nodes.values().any(|n| n.address == ip);
        let by_ip = pods
            .iter()
            .enumerate()
            .filter(|(_, p)| !special_address(p.workload.ip) && !is_node(p.workload.ip) && count[&p.workload.ip] == 1)
            .map(|(i, p)| (p.workload.ip, i))
            .collect();
        PodIndex {
            node: state.node.clone(),
            pods,
            nodes: state.nodes.clone(),
            authz: state.authz.clone(),
            authz_reports: state.authz_reports.clone(),
            services: state.services.iter().map(|(k, v)| (*k, Arc::new(v.clone()))).collect(),
            by_cgroup,
            by_ip,
        }
    }
    /// This node's pod with this cgroup id.
    pub fn by_cgroup(&self, id: u64) -> Option<&PodStatus> {
        self.by_cgroup.get(&id).map(|&i| &self.pods[i])
    }
    /// Any node's pod with this IP.
    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&PodStatus> {
        self.by_ip.get(&ip).map(|&i| &self.pods[i])
    }
    pub fn is_local(&self, p: &PodStatus) -> bool {
        p.workload.node == self.node
    }

    /// The destinations the kernel sends to the proxy (port 0: every port of the address):
    /// meshed pods (on any node, at addresses that name one pod), and the Services the mesh
    /// serves: those with a meshed endpoint or a policy of their own (timeouts, retries,
    /// limits), or every Service when `all_services` (local mode, where no kube-proxy serves
    /// Service addresses). Everything else stays on the pods' own path.
    pub fn mesh_destinations(&self, all_services: bool) -> std::collections::BTreeSet<(Ipv4Addr, u16)> {
        let meshed_pod = |ip: Ipv4Addr| self.by_ip(ip).is_some_and(|p| p.workload.meshed);
        let pods = self.by_ip.iter().filter(|(ip, _)| meshed_pod(**ip)).map(|(ip, _)| (*ip, 0));
        let services = self
            .services
            .iter()
            .filter(|(_, s)| {
                all_services
                    || s.policy != ServicePolicy::default()
                    || s.endpoints.iter().any(|ep| meshed_pod(*ep.ip()))
            })
            .map(|(vip, _)| (*vip.ip(), vip.port()));
        pods.chain(services).collect()
    }

    /// Identities the node needs certificates for: those of its meshed pods, and only those.
    pub fn wanted_identities(&self, trust_domain: &str) -> std::collections::BTreeSet<crate::identity::Identity> {
        self.pods
            .iter()
            .filter(|p| self.is_local(p) && p.workload.meshed)
            .map(|p| p.workload.identity(trust_domain))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A pod an ALLOW policy (or a DENY on identities, or STRICT PeerAuthentication) is for
    /// becomes strict; a DENY on addresses only does not; a policy for an unmeshed pod is
    /// reported as not enforced for it.
    #[test]
    fn policies_that_only_the_mesh_can_hold_make_their_pods_strict() {
        use crate::authz::istio::{self, DEFAULT_ROOT_NAMESPACE as ROOT};
        let mut state = NodeState { node: "a".into(), ..Default::default() };
        for (name, app, meshed) in
            [("db", "db", true), ("web", "web", true), ("cache", "cache", true), ("old", "db", false)]
        {
            let mut w = crate::testing::pod("shop", name, Ipv4Addr::new(10, 0, 0, name.len() as u8), "a");
            w.meshed = meshed;
            w.pod_labels = [("app".to_string(), app.to_string())].into();
            state.pods.insert(format!("shop/{name}"), w);
        }
        let policy = |name: &str, spec: serde_json::Value| {
            let v = serde_json::json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec});
            istio::authorization_policy(&v, ROOT).unwrap()
        };
        let translated = [
            policy("allow-db", serde_json::json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]})),
            policy(
                "deny-ips",
                serde_json::json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                                   "rules": [{"from": [{"source": {"ipBlocks": ["10.9.0.0/16"]}}]}]}),
            ),
        ];
        state.authz = translated.iter().filter_map(|t| t.rule.clone()).collect();
        state.authz_reports = translated.iter().map(|t| t.report.clone()).collect();
        let pa = istio::peer_authentication(&serde_json::json!({
            "metadata": {"name": "cache", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "cache"}}, "mtls": {"mode": "STRICT"}}}))
        .unwrap();
        state.apply_policies(&[pa], ROOT);
        let mode = |k: &str| state.pods[k].mtls_mode;
        assert_eq!(mode("shop/db"), MtlsMode::Strict, "ALLOW");
        assert_eq!(mode("shop/web"), MtlsMode::Permissive, "a DENY on addresses only");
        assert_eq!(mode("shop/cache"), MtlsMode::Strict, "PeerAuthentication");
        assert_eq!(mode("shop/old"), MtlsMode::Permissive, "not meshed");
        assert!(state.authz_reports[0].warnings.iter().any(|w| w.contains("NOT ENFORCED") && w.contains("shop/old")));
    }

    #[test]
    fn only_addresses_that_name_one_pod_are_indexed() {
        let mut state = NodeState { node: "a".into(), ..Default::default() };
        state.nodes.insert("a".into(), NodeInfo { name: "a".into(), address: Ipv4Addr::new(192, 168, 1, 1) });
        let status = |name: &str, ip: [u8; 4]| PodStatus {
            key: format!("shop/{name}"),
            workload: crate::testing::pod("shop", name, Ipv4Addr::from(ip), "a"),
            cgroup_id: None,
            redirected: false,
        };
        let pods = vec![
            status("web", [10, 0, 0, 5]),
            status("pending", [0, 0, 0, 0]),
            status("metadata", [169, 254, 169, 254]),
            status("host-1", [192, 168, 1, 1]),
            status("twin-1", [10, 0, 0, 9]),
            status("twin-2", [10, 0, 0, 9]),
        ];
        let idx = PodIndex::new(&state, pods);
        assert_eq!(idx.by_ip(Ipv4Addr::new(10, 0, 0, 5)).map(|p| p.key.as_str()), Some("shop/web"));
        for ip in [[0, 0, 0, 0], [169, 254, 169, 254], [192, 168, 1, 1], [10, 0, 0, 9]] {
            assert!(idx.by_ip(Ipv4Addr::from(ip)).is_none(), "{ip:?} must name no pod");
        }
        assert!(idx.is_node_address(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(idx.pods.len(), 6, "all still listed (the admin views show them)");
    }

    #[test]
    fn the_mesh_serves_meshed_pods_and_services_with_a_meshed_endpoint_or_a_policy() {
        let mut state = NodeState { node: "a".into(), ..Default::default() };
        let status = |name: &str, ip: [u8; 4], meshed: bool| PodStatus {
            key: format!("shop/{name}"),
            workload: Workload { meshed, ..crate::testing::pod("shop", name, Ipv4Addr::from(ip), "a") },
            cgroup_id: None,
            redirected: false,
        };
        let svc = |ep: [u8; 4], policy: ServicePolicy| ServiceEntry {
            service: "shop/x".into(),
            endpoints: vec![SocketAddrV4::new(ep.into(), 8080)],
            protocol: None,
            policy,
        };
        let vip = |last: u8| SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, last), 80);
        state.services.insert(vip(1), svc([10, 0, 0, 5], ServicePolicy::default()));
        state.services.insert(vip(2), svc([10, 0, 0, 6], ServicePolicy::default()));
        state.services.insert(vip(3), svc([10, 0, 0, 6], ServicePolicy { retries: 5, ..Default::default() }));
        let pods = vec![
            status("web", [10, 0, 0, 5], true),
            status("legacy", [10, 0, 0, 6], false),
            status("pending", [0, 0, 0, 0], true),
        ];
        let idx = PodIndex::new(&state, pods);
        let dests = |all| idx.mesh_destinations(all).into_iter().map(|(ip, p)| format!("{ip}:{p}")).collect::<Vec<_>>();
        assert_eq!(
            dests(false),
            ["10.0.0.5:0", "10.96.0.1:80", "10.96.0.3:80"],
            "the meshed pod (every port), the Service with a meshed endpoint and the one with a policy; \
             not the unmeshed pod, the pending one, or a plain Service of unmeshed endpoints"
        );
        assert_eq!(
            dests(true),
            ["10.0.0.5:0", "10.96.0.1:80", "10.96.0.2:80", "10.96.0.3:80"],
            "local mode: every Service"
        );
    }

    #[test]
    fn capture_is_mesh_by_default_or_all_and_nothing_else() {
        let ns = |v: Option<&'static str>| {
            NamespacePolicy::from_annotations(|k| (k == CAPTURE_ANNOTATION).then_some(v).flatten())
        };
        assert!(!ns(None).unwrap().capture_all);
        assert!(!ns(Some("mesh")).unwrap().capture_all);
        assert!(ns(Some("all")).unwrap().capture_all);
        let e = ns(Some("everything")).unwrap_err().to_string();
        assert!(e.contains(CAPTURE_ANNOTATION) && e.contains("\"mesh\" or \"all\""), "{e}");
    }

    fn policy(pairs: &[(&str, &str)]) -> Result<ServicePolicy, AnnotationError> {
        ServicePolicy::from_annotations(pairs.iter().copied())
    }

    #[test]
    fn policy_annotations_parse_and_bad_values_say_why() {
        let p = policy(&[
            (TIMEOUT_ANNOTATION, "1.5s"),
            (PER_TRY_TIMEOUT_ANNOTATION, "200ms"),
            (RETRIES_ANNOTATION, "0"),
            (RETRY_NON_IDEMPOTENT_ANNOTATION, "true"),
            (RETRY_BUDGET_ANNOTATION, "10%"),
            (MAX_PENDING_ANNOTATION, "4"),
            ("unrelated/annotation", "whatever"),
        ])
        .unwrap();
        assert_eq!(p.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(200)));
        assert_eq!(
            (p.retries, p.retry_non_idempotent, p.retry_budget_percent, p.max_pending_requests),
            (0, true, 10, 4)
        );
        for (k, v) in [
            (TIMEOUT_ANNOTATION, "0s"),
            (PER_TRY_TIMEOUT_ANNOTATION, "quick"),
            (TIMEOUT_ANNOTATION, "5"),
            (TIMEOUT_ANNOTATION, "-1s"),
            (RETRIES_ANNOTATION, "many"),
            (RETRIES_ANNOTATION, "11"),
            (RETRY_ON_ANNOTATION, "404"),
            (RETRY_ON_ANNOTATION, "503,"),
            (RETRY_NON_IDEMPOTENT_ANNOTATION, "yes"),
            (RETRY_BUDGET_ANNOTATION, "20"),
            (RETRY_BUDGET_ANNOTATION, "120%"),
            (MAX_CONNECTIONS_ANNOTATION, "0"),
            (MAX_PENDING_ANNOTATION, "-3"),
        ] {
            let e = policy(&[(k, v)]).unwrap_err().to_string();
            assert!(e.starts_with(k) && e.contains(v), "{k}={v}: {e}");
        }
    }

    #[test]
    fn protocol_hints_from_app_protocol_then_port_name() {
        use ProtocolHint::*;
        assert_eq!(ProtocolHint::from_port(None, "http-web"), Some(Http));
        assert_eq!(ProtocolHint::from_port(None, "grpc"), Some(Http));
        assert_eq!(ProtocolHint::from_port(Some("kubernetes.io/h2c"), "x"), Some(Http));
        assert_eq!(ProtocolHint::from_port(Some("tcp"), "http"), Some(Opaque), "appProtocol wins");
        assert_eq!(ProtocolHint::from_port(None, "tls-db"), Some(Opaque));
        assert_eq!(ProtocolHint::from_port(None, "web"), None);
        assert_eq!(ProtocolHint::from_port(None, ""), None);
    }
}
