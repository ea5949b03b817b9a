//! Local mode: the node's pods come from a YAML workload file, re-read whenever it changes.
//!
//! ```yaml
//! nodes:                            # other nodes' agents (HBONE on port 15008)
//!   - {name: node-b, address: 192.168.77.2}
//! namespaces:
//!   - name: shop
//!     annotations: { switchyard.io/mesh: enabled }
//! pods:
//!   - name: web-0
//!     namespace: shop
//!     serviceAccount: web          # default: "default"
//!     ip: 10.244.1.10
//!     cgroup: switchyard/node-a/web-0   # relative to the cgroup2 mount, or absolute
//!     annotations: { switchyard.io/mesh: disabled }   # optional per-pod opt-out
//!     workload: web                 # optional: its Deployment, for metric labels
//!     labels: { app: web, version: v2 }   # optional: Istio's app/version/canonical labels
//!     probePorts: [8081]            # optional: the kubelet's probe ports (a strict pod admits them from the node)
//!   - name: db-0
//!     namespace: shop
//!     node: node-b                  # default: this node; cgroup only for this node's pods
//!     ip: 10.244.2.10
//! authorization:
//!   - name: only-web
//!     namespace: shop               # destination namespace
//!     workload: db-0                # optional: one pod
//!     ports: [5432]                 # optional
//!     action: allow                 # or deny
//!     from: [spiffe://cluster.local/ns/shop/sa/web]   # exact, .../ns/<ns>/*, or spiffe://<td>/*
//! services:                         # what EndpointSlices say in Kubernetes mode
//!   - name: web
//!     namespace: shop
//!     clusterIP: 10.96.0.10
//!     annotations: { switchyard.io/timeout: 2s, switchyard.io/retries: "2" }
//!     ports: [{name: http, port: 80, targetPort: 8080}]   # appProtocol: http|tcp optional
//!     endpoints: [10.244.1.10, 10.244.2.10]               # ready endpoint IPs
//! ```
//! One file can describe the whole (simulated) cluster: each agent picks its own pods by its
//! node name.
//! The annotations are Kubernetes' own, so a workload file reads like the cluster it stands in
//! for. A file that does not parse or validate is rejected with a clear error and the previous
//! state is kept.
use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use notify::Watcher as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    authz, cgroup,
    state::{
        MeshReason, NamespacePolicy, NodeInfo, NodeState, ProtocolHint, ServiceEntry, ServicePolicy, Workload,
        pod_opts_out,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum WorkloadFileError {
    #[error("cannot read workload file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("workload file {path} is not valid YAML for a workload file: {source}")]
    Parse { path: PathBuf, source: serde_yaml_ng::Error },
    #[error("workload file {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// A workload file, as the agent reads it (and as the test harness writes it).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadFile {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization: Vec<authz::RuleSpec>,
    /// Istio `AuthorizationPolicy` objects, as `kubectl apply` would take them: enforced as
    /// in Kubernetes mode (root namespace `istio-system`).
    #[serde(default, rename = "authorizationPolicies", skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<serde_json::Value>,
    /// Istio `PeerAuthentication` objects.
    #[serde(default, rename = "peerAuthentications", skip_serializing_if = "Vec::is_empty")]
    pub peer_authentications: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
}

impl WorkloadFile {
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a workload file always serializes")
    }
}

/// A Service, with what its EndpointSlices would say in Kubernetes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub ports: Vec<ServicePortSpec>,
    /// Ready endpoint IPs.
    #[serde(default)]
    pub endpoints: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortSpec {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// Another node's agent (HBONE on port 15008 at `address`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub address: Ipv4Addr,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub ip: Ipv4Addr,
    /// Default: this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Relative to the cgroup2 mount, or absolute; needed for this node's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The workload it belongs to (a Deployment's name, say), for metric labels; default:
    /// the pod's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Pod labels; those Istio names workloads by in metrics (`app`, `version`,
    /// `service.istio.io/canonical-name`, ...) are used.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The ports the kubelet probes the pod on (in Kubernetes, read from its containers'
    /// probes): a strict pod admits connections to them from the node's address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_ports: Vec<u16>,
}

fn default_sa() -> String {
    "default".into()
}

/// Reads and validates a workload file, as seen from node `node`.
pub fn load(path: &Path, node: &str, cgroup2_mount: &Path) -> Result<NodeState, WorkloadFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadFileError::Read { path: path.into(), source })?;
    parse(&text, path, node, cgroup2_mount)
}

pub fn parse(text: &str, path: &Path, node: &str, cgroup2_mount: &Path) -> Result<NodeState, WorkloadFileError> {
    let invalid = |msg: String| WorkloadFileError::Invalid { path: path.into(), msg };
    let file: WorkloadFile =
        serde_yaml_ng::from_str(text).map_err(|source| WorkloadFileError::Parse { path: path.into(), source })?;
    let mut namespaces = BTreeMap::new();
    for ns in &file.namespaces {
        let policy = NamespacePolicy::from_annotations(|k| ns.annotations.get(k).map(String::as_str))
            .map_err(|e| invalid(format!("namespace {}: {e}", ns.name)))?;
        if namespaces.insert(ns.name.clone(), policy).is_some() {
            return Err(invalid(format!("namespace {} is listed twice", ns.name)));
        }
    }
    let mut state = NodeState { node: node.to_string(), ..Default::default() };
    for n in file.nodes {
        if n.name == node {
            continue;
        }
        if state.nodes.insert(n.name.clone(), NodeInfo { name: n.name.clone(), address: n.address }).is_some() {
            return Err(invalid(format!("node {} is listed twice", n.name)));
        }
    }
    for spec in file.authorization {
        state.authz.push(spec.try_into().map_err(|e: authz::RuleError| invalid(e.to_string()))?);
    }
    for svc in file.services {
        let key = format!("{}/{}", svc.namespace, svc.name);
        let policy = ServicePolicy::from_annotations(svc.annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| invalid(format!("service {key}: {e}")))?;
        for port in &svc.ports {
            if port.port == 0 || port.target_port == Some(0) {
                return Err(invalid(format!("service {key}: port 0 is not a port")));
            }
            let mut endpoints: Vec<SocketAddrV4> =
                svc.endpoints.iter().map(|ip| SocketAddrV4::new(*ip, port.target_port.unwrap_or(port.port))).collect();
            endpoints.sort();
            endpoints.dedup();
            let entry = ServiceEntry {
                service: key.clone(),
                endpoints,
                protocol: ProtocolHint::from_port(port.app_protocol.as_deref(), &port.name),
                policy: policy.clone(),
            };
            let vip = SocketAddrV4::new(svc.cluster_ip, port.port);
            if state.services.insert(vip, entry).is_some() {
                return Err(invalid(format!("service {key}: {vip} is used by another service port")));
            }
        }
    }
    let mut ips = HashSet::new();
    for p in file.pods {
        let key = format!("{}/{}", p.namespace, p.name);
        check_names(&p).map_err(|msg| invalid(format!("pod {key}: {msg}")))?;
        if !ips.insert(p.ip) {
            return Err(invalid(format!("pod {key}: IP {} is used by another pod", p.ip)));
        }
        let opt_out = pod_opts_out(|k| p.annotations.get(k).map(String::as_str))
            .map_err(|e| invalid(format!("pod {key}: {e}")))?;
        let pod_node = p.node.unwrap_or_else(|| node.to_string());
        let local = pod_node == node;
        let cgroup = match (&p.cgroup, pod_node == node) {
            (Some(c), _) => Some(cgroup::resolve(cgroup2_mount, c).map_err(|e| invalid(format!("pod {key}: {e}")))?),
            (None, true) => return Err(invalid(format!("pod {key} runs on this node and needs a cgroup"))),
            (None, false) => None,
        };
        let ns = namespaces.get(&p.namespace).copied().unwrap_or_default();
        let (meshed, reason) = match (ns.meshed, opt_out) {
            (true, false) => (true, MeshReason::Namespace),
            (true, true) => (false, MeshReason::PodOptOut),
            (false, _) => (false, MeshReason::NamespaceNotMeshed),
        };
        let w = Workload {
            workload: p.workload.filter(|w| !w.is_empty() && *w != p.name),
            name: p.name,
            namespace: p.namespace,
            service_account: p.service_account,
            ip: p.ip,
            node: pod_node,
            cgroup,
            meshed,
            reason,
            mtls_mode: ns.mtls_mode,
            fail_closed: ns.fail_closed,
            capture_all: ns.capture_all,
            labels: crate::state::AppLabels::from_labels(|k| p.labels.get(k).map(String::as_str)),
            probe_ports: p.probe_ports,
            pod_labels: if local { p.labels } else { BTreeMap::new() },
        };
        if state.pods.insert(key.clone(), w).is_some() {
            return Err(invalid(format!("pod {key} is listed twice")));
        }
    }
    istio_policies(&file.authorization_policies, &file.peer_authentications, &mut state).map_err(invalid)?;
    Ok(state)
}

/// The file's Istio policies into `state`, then what they ask of its pods (strict mTLS).
fn istio_policies(aps: &[serde_json::Value], pas: &[serde_json::Value], state: &mut NodeState) -> Result<(), String> {
    let root = authz::istio::DEFAULT_ROOT_NAMESPACE;
    for (i, v) in aps.iter().enumerate() {
        let t = authz::istio::authorization_policy(v, root).map_err(|e| format!("authorizationPolicies[{i}]: {e}"))?;
        for w in &t.report.warnings {
            warn!(policy = %t.report.policy, "{w}");
        }
        state.authz.extend(t.rule);
        state.authz_reports.push(t.report);
    }
    let peer_auths = pas
        .iter()
        .enumerate()
        .map(|(i, v)| authz::istio::peer_authentication(v).map_err(|e| format!("peerAuthentications[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    state.apply_policies(&peer_auths, root);
    Ok(())
}

/// A pod's name, namespace and service account as Kubernetes allows them (they become SPIFFE
/// IDs and metric labels).
fn check_names(p: &PodSpec) -> Result<(), String> {
    if !crate::identity::is_dns_subdomain(&p.name) || !crate::identity::is_dns_label(&p.namespace) {
        return Err(
            "the name must be a DNS subdomain and the namespace a DNS label (lowercase letters, digits, '-')".into()
        );
    }
    if !crate::identity::is_dns_subdomain(&p.service_account) {
        return Err(format!(
            "service account {:?} is not a DNS subdomain (lowercase letters, digits, '-', '.')",
            p.service_account
        ));
    }
    Ok(())
}

/// Loads the file, then keeps `tx` up to date with every valid edit until the sender's
/// receivers are all gone. Watches the file's directory (editors and ConfigMaps replace files
/// by rename) and also re-reads every few seconds in case an event was missed.
pub async fn watch(path: PathBuf, node: String, cgroup2_mount: PathBuf, tx: watch::Sender<NodeState>) {
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel::<()>(1);
    let file_name = path.file_name().map(|n| n.to_os_string());
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && ev.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
        {
            let _ = ev_tx.try_send(());
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                warn!(error = %e, "cannot watch the workload file's directory; falling back to polling");
            }
            Some(w)
        }
        Err(e) => {
            warn!(error = %e, "cannot watch the workload file; falling back to polling");
            None
        }
    };
    let mut last_text = None;
    loop {
        match std::fs::read_to_string(&path) {
            Ok(text) if Some(&text) != last_text.as_ref() => {
                match parse(&text, &path, &node, &cgroup2_mount) {
                    Ok(state) => {
                        info!(file = %path.display(), pods = state.pods.len(), meshed = state.meshed().count(), "workload file applied");
                        tx.send_replace(state);
                    }
                    Err(e) => warn!(error = %e, "workload file rejected; keeping the previous workloads"),
                }
                last_text = Some(text);
            }
            Ok(_) => {}
            Err(e) => {
                if last_text.is_some() {
                    warn!(file = %path.display(), error = %e, "cannot read the workload file; keeping the previous workloads");
                }
                last_text = None;
            }
        }
        tokio::select! {
            _ = ev_rx.recv() => {
                // Let a burst of writes settle before reading.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while ev_rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "/sys/fs/cgroup";

    fn p(text: &str) -> Result<NodeState, WorkloadFileError> {
        parse(text, Path::new("w.yaml"), "n1", Path::new(M))
    }

    #[test]
    fn istio_policies_in_the_file_are_enforced_as_in_kubernetes() {
        let text = r#"
namespaces: [{name: shop, annotations: {switchyard.io/mesh: enabled}}]
pods:
  - {name: db, namespace: shop, ip: 10.0.0.5, cgroup: shop/db, labels: {app: db}}
  - {name: web, namespace: shop, ip: 10.0.0.6, cgroup: shop/web, labels: {app: web}}
authorizationPolicies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: db-from-web, namespace: shop}
    spec:
      selector: {matchLabels: {app: db}}
      rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}], to: [{operation: {methods: [GET]}}]}]
peerAuthentications:
  - {metadata: {name: web, namespace: shop}, spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}}
"#;
        let s = p(text).unwrap();
        assert_eq!((s.authz.len(), s.authz[0].name.as_str()), (1, "shop/db-from-web"));
        assert!(s.authz_reports[0].warnings[0].contains("methods"), "an L7 field reported");
        assert_eq!(s.pods["shop/db"].mtls_mode, crate::state::MtlsMode::Strict, "an ALLOW policy is for it");
        assert_eq!(s.pods["shop/web"].mtls_mode, crate::state::MtlsMode::Strict, "PeerAuthentication STRICT");
        let bad = text.replace("mode: STRICT", "mode: ON");
        assert!(p(&bad).unwrap_err().to_string().contains("peerAuthentications[0]"));
    }

    #[test]
    fn a_written_file_reads_back_as_the_same_state() {
        let text = r#"
nodes: [{name: n2, address: 192.168.77.2}]
namespaces:
  - {name: shop, annotations: {switchyard.io/mesh: enabled, switchyard.io/mtls-mode: strict}}
pods:
  - {name: a, namespace: shop, serviceAccount: web, ip: 10.0.0.1, cgroup: n/a, labels: {app: web}}
  - {name: b, namespace: shop, ip: 10.0.0.2, node: n2, workload: b-deploy}
authorization:
  - {name: r, namespace: shop, ports: [80], action: deny, from: ["spiffe://cluster.local/ns/x/*"]}
services:
  - {name: s, namespace: shop, clusterIP: 10.96.0.1, annotations: {switchyard.io/retries: "1"},
     ports: [{name: http, port: 80, targetPort: 8080}], endpoints: [10.0.0.1]}
"#;
        let file: WorkloadFile = serde_yaml_ng::from_str(text).unwrap();
        let written = file.to_yaml();
        assert_eq!(p(&written).unwrap(), p(text).unwrap(), "{written}");
    }

    #[test]
    fn namespace_opt_in_and_pod_opt_out() {
        let s = p(r#"
namespaces:
  - {name: shop, annotations: {switchyard.io/mesh: enabled}}
  - {name: legacy}
pods:
  - {name: a, namespace: shop, serviceAccount: web, ip: 10.0.0.1, cgroup: n/a}
  - {name: b, namespace: shop, ip: 10.0.0.2, cgroup: n/b, annotations: {switchyard.io/mesh: disabled}}
  - {name: c, namespace: legacy, ip: 10.0.0.3, cgroup: /sys/fs/cgroup/n/c}
"#)
        .unwrap();
        let a = &s.pods["shop/a"];
        assert!(a.meshed);
        assert_eq!(a.reason, MeshReason::Namespace);
        assert_eq!(a.cgroup.as_deref(), Some(Path::new("/sys/fs/cgroup/n/a")));
        assert_eq!(a.spiffe_id("cluster.local"), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(s.pods["shop/b"].reason, MeshReason::PodOptOut);
        assert_eq!(s.pods["shop/b"].service_account, "default");
        assert_eq!(s.pods["legacy/c"].reason, MeshReason::NamespaceNotMeshed);
        assert_eq!(s.meshed().count(), 1);
    }

    #[test]
    fn malformed_files_are_rejected_with_the_reason() {
        let cases = [
            ("pods: [{name: a, namespace: x, ip: 10.0.0.300, cgroup: a}]", "ip"),
            ("pods: [{name: a, namespace: x, ip: 10.0.0.1, cgroup: a, colour: red}]", "colour"),
            (
                "pods:\n - {name: a, namespace: x, ip: 10.0.0.1, cgroup: a}\n - {name: b, namespace: x, ip: 10.0.0.1, cgroup: b}",
                "used by another pod",
            ),
            (
                "pods:\n - {name: a, namespace: x, ip: 10.0.0.1, cgroup: a}\n - {name: a, namespace: x, ip: 10.0.0.2, cgroup: b}",
                "twice",
            ),
            ("namespaces: [{name: x, annotations: {switchyard.io/mesh: yes}}]", "switchyard.io/mesh: \"yes\" is not"),
            (
                "pods: [{name: a, namespace: x, ip: 10.0.0.1, cgroup: a, annotations: {switchyard.io/mesh: off}}]",
                "pod x/a: switchyard.io/mesh",
            ),
            ("pods: [{name: a, namespace: x, ip: 10.0.0.1, cgroup: ../../etc}]", "not inside"),
            ("pods: {", "YAML"),
            ("pods: [{name: a, namespace: x, ip: 10.0.0.1}]", "needs a cgroup"),
            ("namespaces: [{name: x, annotations: {switchyard.io/mtls-mode: tight}}]", "\"permissive\" or \"strict\""),
            ("namespaces: [{name: x, annotations: {switchyard.io/fail-mode: shut}}]", "\"open\" or \"closed\""),
            ("authorization: [{name: r, namespace: x, action: allow, from: [bogus]}]", "bogus"),
            ("authorization: [{name: r, namespace: x, action: maybe, from: []}]", "maybe"),
            ("nodes: [{name: b, address: 1.2.3.4}, {name: b, address: 1.2.3.5}]", "twice"),
            ("pods: [{name: a, namespace: a.b, ip: 10.0.0.1, cgroup: a}]", "DNS label"),
            ("pods: [{name: a, namespace: x, serviceAccount: Web, ip: 10.0.0.1, cgroup: a}]", "not a DNS subdomain"),
            (
                "services: [{name: s, namespace: x, clusterIP: 10.96.0.1, ports: [{port: 80}], annotations: {switchyard.io/timeout: soon}}]",
                "switchyard.io/timeout: \"soon\" is not a duration",
            ),
            (
                "services: [{name: s, namespace: x, clusterIP: 10.96.0.1, ports: [{port: 80}], annotations: {switchyard.io/retries: \"-1\"}}]",
                "switchyard.io/retries",
            ),
            (
                "services:\n - {name: s, namespace: x, clusterIP: 10.96.0.1, ports: [{port: 80}]}\n - {name: t, namespace: x, clusterIP: 10.96.0.1, ports: [{port: 80}]}",
                "used by another service port",
            ),
        ];
        for (text, needle) in cases {
            let e = p(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?} gave {e:?}, wanted {needle:?}");
        }
    }
}

#[cfg(test)]
mod examples {
    use std::path::Path;

    /// The examples shipped in deploy/local must stay valid.
    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local");
        let s = super::load(&dir.join("workloads.yaml"), "node-a", Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(s.meshed().count(), 2);
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(s.authz.len(), 1);
        let text = std::fs::read_to_string(dir.join("agent.yaml")).unwrap();
        let c: crate::config::FileConfig = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(c.workload_file.as_deref(), Some(Path::new("workloads.yaml")));
        assert!(c.ca.is_some());
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;
    use crate::state::MtlsMode;

    #[test]
    fn services_carry_endpoints_protocol_hints_and_policy() {
        let text = r#"
services:
  - name: web
    namespace: shop
    clusterIP: 10.96.0.10
    annotations: {switchyard.io/timeout: 250ms, switchyard.io/retries: "3", switchyard.io/retry-on: "502,503", switchyard.io/max-connections: "8"}
    ports: [{name: http, port: 80, targetPort: 8080}, {name: db, port: 5432, appProtocol: tcp}, {port: 9000}]
    endpoints: [10.0.1.11, 10.0.1.10]
"#;
        let s = parse(text, Path::new("s.yaml"), "a", Path::new("/sys/fs/cgroup")).unwrap();
        let web = &s.services[&"10.96.0.10:80".parse().unwrap()];
        assert_eq!(web.service, "shop/web");
        assert_eq!(web.endpoints, vec!["10.0.1.10:8080".parse().unwrap(), "10.0.1.11:8080".parse().unwrap()]);
        assert_eq!(web.protocol, Some(ProtocolHint::Http));
        assert_eq!(web.policy.timeout, Some(Duration::from_millis(250)));
        assert_eq!(web.policy.retries, 3);
        assert_eq!(web.policy.retry_on, vec![502, 503]);
        assert_eq!(web.policy.max_connections, Some(8));
        assert_eq!(s.services[&"10.96.0.10:5432".parse().unwrap()].protocol, Some(ProtocolHint::Opaque));
        let other = &s.services[&"10.96.0.10:9000".parse().unwrap()];
        assert_eq!((other.protocol, &other.policy), (None, &web.policy), "the policy is the Service's");
        assert_eq!(other.endpoints[0].port(), 9000, "targetPort defaults to the port");
    }

    #[test]
    fn one_file_describes_the_cluster_each_node_sees_its_own_pods() {
        let text = r#"
nodes: [{name: a, address: 192.168.1.1}, {name: b, address: 192.168.1.2}]
namespaces: [{name: shop, annotations: {switchyard.io/mesh: enabled, switchyard.io/mtls-mode: strict}}]
pods:
  - {name: web, namespace: shop, node: a, ip: 10.0.1.10, cgroup: a/web}
  - {name: db, namespace: shop, node: b, ip: 10.0.2.10, cgroup: b/db}
  - {name: cache, namespace: shop, node: b, ip: 10.0.2.11}
authorization:
  - {name: web-only, namespace: shop, workload: db, action: allow, from: [spiffe://cluster.local/ns/shop/sa/web]}
"#;
        let a = parse(text, Path::new("c.yaml"), "a", Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(a.meshed().map(|w| w.name.as_str()).collect::<Vec<_>>(), vec!["web"]);
        assert_eq!(a.nodes.keys().collect::<Vec<_>>(), vec!["b"], "a node does not list itself");
        assert_eq!(a.pods["shop/db"].node, "b");
        assert_eq!(a.pods["shop/db"].mtls_mode, MtlsMode::Strict);
        assert_eq!(a.authz.len(), 1);
        let b = parse(text, Path::new("c.yaml"), "b", Path::new("/sys/fs/cgroup")).unwrap_err();
        assert!(b.to_string().contains("shop/cache runs on this node and needs a cgroup"), "{b}");
    }
}
