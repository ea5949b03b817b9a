//! The few fields the agent keeps of each Kubernetes object, and how they become a
//! [`NodeState`]. Objects arrive as free-form JSON (kube's `DynamicObject`) and are trimmed here at
//! once: managed fields, specs and statuses the agent does not use are never stored. An object
//! missing what the agent needs is rejected with the reason (logged and skipped by the caller).
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use serde_json::Value;

use crate::state::{AnnotationError, MeshReason, NamespacePolicy, NodeInfo, NodeState, Workload, pod_opts_out};

/// Why an object was rejected (the caller logs it and keeps the object's last good version).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("{field} {value} is not {expected}")]
    Invalid { field: &'static str, value: String, expected: &'static str },
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    #[error("not a Kubernetes object: {0}")]
    Json(String),
    #[error(transparent)]
    Policy(#[from] crate::authz::istio::PolicyError),
}

fn invalid(field: &'static str, value: impl std::fmt::Display, expected: &'static str) -> ObjectError {
    ObjectError::Invalid { field, value: value.to_string(), expected }
}

/// A namespace, trimmed: what its annotations ask of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub policy: NamespacePolicy,
}

/// A pod, trimmed to what routing, identity and meshing use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: Option<String>,
    pub service_account: String,
    pub host_network: bool,
    /// `Pending`, `Running`, ...; finished pods (`Succeeded`, `Failed`) are dropped.
    pub ip: Option<Ipv4Addr>,
    pub opt_out: bool,
    /// The workload the pod belongs to, as Istio names it (see [`workload_of`]); `None` when
    /// it is the pod itself.
    pub workload: Option<String>,
    /// The labels Istio's metrics use (all other labels are dropped).
    pub labels: crate::state::AppLabels,
    /// The ports its containers' probes reach (see [`probe_ports`]).
    pub probe_ports: Vec<u16>,
    /// All its labels, for authorization policies' selectors: kept for this node's pods only
    /// (the watch of other nodes' pods drops them).
    pub all_labels: std::collections::BTreeMap<String, String>,
}

/// A node, trimmed to the address its agent is reached on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub address: Option<Ipv4Addr>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn name_of(v: &Value) -> Result<String, ObjectError> {
    match str_at(v, &["metadata", "name"]) {
        Some(n) if !n.is_empty() => Ok(n.to_string()),
        _ => Err(ObjectError::Missing("metadata.name")),
    }
}

fn namespace_of(v: &Value) -> Result<&str, ObjectError> {
    str_at(v, &["metadata", "namespace"]).ok_or(ObjectError::Missing("metadata.namespace"))
}

fn annotation<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    str_at(v, &["metadata", "annotations", key])
}

/// A pod's workload name, the way Istio derives `source_workload`/`destination_workload`
/// (so its dashboards group pods the same way): the controlling owner's name, except that a
/// Deployment's ReplicaSet (`<deployment>-<pod-template-hash>`) counts as its Deployment and a
/// CronJob's Job (`<cronjob>-<schedule time in minutes>`) as its CronJob. `None` for a pod
/// without a controller (the pod is its own workload).
pub fn workload_of(v: &Value) -> Option<String> {
    let owners = v.get("metadata")?.get("ownerReferences")?.as_array()?;
    let owner = owners.iter().find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))?;
    let (kind, name) = (owner.get("kind")?.as_str()?, owner.get("name")?.as_str()?);
    if name.is_empty() {
        return None;
    }
    let trimmed = match kind {
        "ReplicaSet" => str_at(v, &["metadata", "labels", "pod-template-hash"])
            .and_then(|hash| name.strip_suffix(hash)?.strip_suffix('-')),
        "Job" => name
            .rsplit_once('-')
            .filter(|(_, t)| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .map(|(cron, _)| cron),
        _ => None,
    };
    Some(trimmed.filter(|t| !t.is_empty()).unwrap_or(name).to_string())
}

impl Namespace {
    pub fn from_json(v: &Value) -> Result<Namespace, ObjectError> {
        let name = name_of(v)?;
        let policy = NamespacePolicy::from_annotations(|k| annotation(v, k))?;
        Ok(Namespace { name, policy })
    }
}

impl Pod {
    /// `Ok(None)` for a pod that has finished (it holds no connections and no IP any more).
    pub fn from_json(v: &Value) -> Result<Option<Pod>, ObjectError> {
        let name = name_of(v)?;
        let namespace = namespace_of(v)?.to_string();
        let uid = str_at(v, &["metadata", "uid"]).ok_or(ObjectError::Missing("metadata.uid"))?.to_string();
        let spec = v.get("spec").filter(|s| s.is_object()).ok_or(ObjectError::Missing("spec (an object)"))?;
        let status = v.get("status").cloned().unwrap_or(Value::Null);
        if matches!(status.get("phase").and_then(Value::as_str), Some("Succeeded" | "Failed")) {
            return Ok(None);
        }
        let ip = match status.get("podIP").and_then(Value::as_str) {
            None | Some("") => None,
            Some(s) => match s.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(a)) => Some(a),
                // IPv6-only pods are not meshed yet; dual-stack pods list their IPv4 in podIPs.
                Ok(std::net::IpAddr::V6(_)) => status
                    .get("podIPs")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.get("ip")?.as_str()?.parse::<Ipv4Addr>().ok())
                    .next(),
                Err(_) => return Err(invalid("status.podIP", format_args!("{s:?}"), "an IP address")),
            },
        };
        let host_network = match spec.get("hostNetwork") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(invalid("spec.hostNetwork", other, "a boolean")),
        };
        let service_account =
            spec.get("serviceAccountName").and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or("default");
        // They become a SPIFFE ID (a certificate's SAN) and metric labels: as the API server
        // validates them, never trusted to have been (found by fuzzing: `fuzz/`).
        use crate::identity::{is_dns_label, is_dns_subdomain};
        if !is_dns_subdomain(&name) {
            return Err(invalid("metadata.name", format_args!("{name:?}"), "a DNS subdomain"));
        }
        if !is_dns_label(&namespace) {
            return Err(invalid("metadata.namespace", format_args!("{namespace:?}"), "a DNS label"));
        }
        if !is_dns_subdomain(service_account) {
            return Err(invalid("spec.serviceAccountName", format_args!("{service_account:?}"), "a DNS subdomain"));
        }
        Ok(Some(Pod {
            uid,
            namespace,
            node: spec.get("nodeName").and_then(Value::as_str).filter(|n| !n.is_empty()).map(str::to_string),
            service_account: service_account.to_string(),
            host_network,
            ip,
            opt_out: pod_opts_out(|k| annotation(v, k))?,
            workload: workload_of(v).filter(|w| *w != name),
            labels: crate::state::AppLabels::from_labels(|k| str_at(v, &["metadata", "labels", k])),
            probe_ports: probe_ports(spec),
            all_labels: v
                .get("metadata")
                .and_then(|m| m.get("labels"))
                .and_then(Value::as_object)
                .map(|l| l.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                .unwrap_or_default(),
            name,
        }))
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The ports the kubelet probes a pod on: its containers' liveness, readiness and startup
/// probes (`httpGet`, `tcpSocket` or `grpc`), a named port resolved against the container's
/// ports; sorted, each once. Exec probes use no port; a port that is neither a number in range
/// nor a name of the container's is not one (the kubelet refuses such a probe too).
pub fn probe_ports(spec: &Value) -> Vec<u16> {
    let mut out = std::collections::BTreeSet::new();
    for c in spec.get("containers").and_then(Value::as_array).into_iter().flatten() {
        let named = |name: &str| {
            c.get("ports")?
                .as_array()?
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
                .get("containerPort")?
                .as_u64()
        };
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"].iter().filter_map(|k| c.get(*k)) {
            for handler in ["httpGet", "tcpSocket", "grpc"].iter().filter_map(|k| probe.get(*k)) {
                let port = match handler.get("port") {
                    Some(Value::Number(n)) => n.as_u64(),
                    Some(Value::String(s)) => s.parse().ok().or_else(|| named(s)),
                    _ => None,
                };
                if let Some(p) = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) {
                    out.insert(p);
                }
            }
        }
    }
    out.into_iter().collect()
}

impl Node {
    pub fn from_json(v: &Value) -> Result<Node, ObjectError> {
        let name = name_of(v)?;
        let address = v
            .get("status")
            .and_then(|s| s.get("addresses"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))
            .filter_map(|a| a.get("address")?.as_str()?.parse::<Ipv4Addr>().ok())
            .next();
        Ok(Node { name, address })
    }
}

/// A Service, trimmed: its ClusterIP, TCP ports (name → port, protocol hint) and policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `namespace/name`.
    pub key: String,
    /// `None` for headless Services (nothing to balance).
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<(String, u16, Option<crate::state::ProtocolHint>)>,
    pub policy: crate::state::ServicePolicy,
}

/// An EndpointSlice, trimmed: its Service, TCP ports (name → target port) and ready IPv4
/// addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// `namespace/<service name>`, from the `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<(String, u16)>,
    pub ready: Vec<Ipv4Addr>,
}

fn tcp_ports(
    v: Option<&Value>,
    what: &'static str,
) -> Result<Vec<(String, u16, Option<crate::state::ProtocolHint>)>, ObjectError> {
    let mut out = Vec::new();
    for p in v.and_then(Value::as_array).into_iter().flatten() {
        if p.get("protocol").and_then(Value::as_str).is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let port = p.get("port").and_then(Value::as_u64).filter(|n| (1..=65535).contains(n));
        let Some(port) = port else { return Err(invalid(what, format_args!("port {}", p["port"]), "a port number")) };
        let name = p.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        let hint = crate::state::ProtocolHint::from_port(p.get("appProtocol").and_then(Value::as_str), &name);
        out.push((name, port as u16, hint));
    }
    Ok(out)
}

impl Service {
    pub fn from_json(v: &Value) -> Result<Service, ObjectError> {
        let name = name_of(v)?;
        let ns = namespace_of(v)?;
        let cluster_ip = match str_at(v, &["spec", "clusterIP"]) {
            None | Some("" | "None") => None,
            Some(ip) => {
                Some(ip.parse().map_err(|_| invalid("spec.clusterIP", format_args!("{ip:?}"), "an IPv4 address"))?)
            }
        };
        // A bad value rejects the whole update: the previous version of the Service stays.
        let annotations = v.pointer("/metadata/annotations").and_then(Value::as_object);
        let policy = crate::state::ServicePolicy::from_annotations(
            annotations.into_iter().flatten().filter_map(|(k, v)| Some((k.as_str(), v.as_str()?))),
        )?;
        Ok(Service {
            key: format!("{ns}/{name}"),
            cluster_ip,
            ports: tcp_ports(v.pointer("/spec/ports"), "spec.ports")?,
            policy,
        })
    }
}

impl EndpointSlice {
    pub fn from_json(v: &Value) -> Result<EndpointSlice, ObjectError> {
        name_of(v)?;
        let ns = namespace_of(v)?;
        let svc = str_at(v, &["metadata", "labels", "kubernetes.io/service-name"])
            .ok_or(ObjectError::Missing("label kubernetes.io/service-name"))?;
        if v.get("addressType").and_then(Value::as_str).is_some_and(|t| t != "IPv4") {
            return Ok(EndpointSlice { service: format!("{ns}/{svc}"), ports: vec![], ready: vec![] });
        }
        let mut ready = Vec::new();
        for e in v.get("endpoints").and_then(Value::as_array).into_iter().flatten() {
            // Ready unless it says otherwise (the API's own default).
            if e.pointer("/conditions/ready").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            for a in e.get("addresses").and_then(Value::as_array).into_iter().flatten() {
                let s = a.as_str().unwrap_or("");
                ready.push(
                    s.parse().map_err(|_| invalid("endpoint address", format_args!("{s:?}"), "an IPv4 address"))?,
                );
            }
        }
        let ports = tcp_ports(v.get("ports"), "ports")?.into_iter().map(|(n, p, _)| (n, p)).collect();
        Ok(EndpointSlice { service: format!("{ns}/{svc}"), ports, ready })
    }
}

/// Service virtual addresses → ready endpoints, matching Service and slice ports by name.
pub fn service_table<'a>(
    services: impl Iterator<Item = &'a Service>,
    slices: &[&EndpointSlice],
) -> std::collections::BTreeMap<SocketAddrV4, crate::state::ServiceEntry> {
    let mut out = std::collections::BTreeMap::new();
    for s in services {
        let Some(ip) = s.cluster_ip else { continue };
        for (port_name, port, hint) in &s.ports {
            let mut eps: Vec<SocketAddrV4> = slices
                .iter()
                .filter(|sl| sl.service == s.key)
                .flat_map(|sl| {
                    let target = sl.ports.iter().find(|(n, _)| n == port_name).map(|(_, p)| *p);
                    sl.ready.iter().filter_map(move |a| Some(SocketAddrV4::new(*a, target?)))
                })
                .collect();
            eps.sort();
            eps.dedup();
            let entry = crate::state::ServiceEntry {
                service: s.key.clone(),
                endpoints: eps,
                protocol: *hint,
                policy: s.policy.clone(),
            };
            out.insert(SocketAddrV4::new(ip, *port), entry);
        }
    }
    out
}

/// Everything the watches know, as the agent's state. Local pods get their cgroup from their
/// UID (`pod_root`: where the kubelet's pod cgroups are); a pod whose cgroup does not exist yet
/// has none and is picked up by a later call.
pub fn node_state<'a>(
    node: &str,
    namespaces: &HashMap<String, Namespace>,
    pods: impl IntoIterator<Item = &'a Pod>,
    nodes: &HashMap<String, Node>,
    pod_root: &Path,
) -> NodeState {
    let mut out = NodeState { node: node.to_string(), ..Default::default() };
    for n in nodes.values() {
        if let Some(address) = n.address {
            out.nodes.insert(n.name.clone(), NodeInfo { name: n.name.clone(), address });
        }
    }
    for p in pods {
        let Some(pod_node) = p.node.as_deref() else { continue };
        let local = pod_node == node;
        // A remote pod without an IP cannot be routed to; a local one is meshed by its cgroup
        // even before the API reports its IP (its containers may already be running).
        let ip = match (p.ip, local) {
            (Some(ip), _) => ip,
            (None, true) => Ipv4Addr::UNSPECIFIED,
            (None, false) => continue,
        };
        let ns = namespaces.get(&p.namespace);
        let ns = ns.map(|n| n.policy).unwrap_or_default();
        let ns_on = ns.meshed;
        let (meshed, reason) = match (ns_on, p.opt_out, p.host_network) {
            (_, _, true) => (false, MeshReason::HostNetwork),
            (true, false, false) => (true, MeshReason::Namespace),
            (true, true, false) => (false, MeshReason::PodOptOut),
            (false, _, false) => (false, MeshReason::NamespaceNotMeshed),
        };
        out.pods.insert(
            p.key(),
            Workload {
                name: p.name.clone(),
                workload: p.workload.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
                ip,
                node: pod_node.to_string(),
                cgroup: if local && !p.host_network { super::pod_cgroup::find(pod_root, &p.uid) } else { None },
                meshed,
                reason,
                mtls_mode: ns.mtls_mode,
                fail_closed: ns.fail_closed,
                capture_all: ns.capture_all,
                labels: p.labels.clone(),
                probe_ports: p.probe_ports.clone(),
                pod_labels: if local { p.all_labels.clone() } else { Default::default() },
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::state::MtlsMode;

    fn pod(name: &str, ns: &str, node: &str, extra: Value) -> Value {
        let mut v = json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"nodeName": node, "serviceAccountName": format!("sa-{name}"), "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5"}
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        v
    }

    #[test]
    fn pods_are_grouped_by_workload_as_istio_does() {
        let owned = |name: &str, kind: &str, owner: &str, hash: Option<&str>| {
            let mut meta = json!({"name": name, "namespace": "shop", "uid": "u",
                "ownerReferences": [{"kind": "Node", "name": "not-the-controller"},
                                    {"kind": kind, "name": owner, "controller": true}]});
            if let Some(h) = hash {
                meta["labels"] = json!({"pod-template-hash": h});
            }
            let v = json!({"metadata": meta, "spec": {"nodeName": "n1"}, "status": {"podIP": "10.244.1.5"}});
            Pod::from_json(&v).unwrap().unwrap().workload
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(owned("web-7d4b9c-x2x", "ReplicaSet", "web-7d4b9c", Some("7d4b9c")), some("web"));
        assert_eq!(owned("rs-abc", "ReplicaSet", "bare-rs", None), some("bare-rs"), "a ReplicaSet of its own");
        assert_eq!(owned("db-0", "StatefulSet", "db", None), some("db"));
        assert_eq!(owned("agent-x1", "DaemonSet", "agent", None), some("agent"));
        assert_eq!(owned("backup-29012345-abcde", "Job", "backup-29012345", None), some("backup"), "a CronJob's Job");
        assert_eq!(owned("migrate-x", "Job", "migrate", None), some("migrate"));
        let bare = Pod::from_json(&pod("solo", "shop", "n1", json!({}))).unwrap().unwrap();
        assert_eq!(bare.workload, None, "a pod without a controller is its own workload");
    }

    #[test]
    fn probe_ports_come_from_every_containers_probes_named_ports_resolved() {
        let spec = json!({"containers": [
            {"name": "app", "ports": [{"name": "health", "containerPort": 8081}, {"containerPort": 8080}],
             "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"}},
             "readinessProbe": {"tcpSocket": {"port": 8080}},
             "startupProbe": {"exec": {"command": ["true"]}}},
            {"name": "grpc", "readinessProbe": {"grpc": {"port": 9090}},
             "livenessProbe": {"httpGet": {"port": "8080"}}},
            {"name": "bad", "livenessProbe": {"httpGet": {"port": "nope"}},
             "readinessProbe": {"tcpSocket": {"port": 70000}}}
        ]});
        assert_eq!(
            probe_ports(&spec),
            vec![8080, 8081, 9090],
            "sorted, each once; unknown names and bad ports dropped"
        );
        assert!(probe_ports(&json!({})).is_empty());
        let p = Pod::from_json(&pod(
            "p",
            "shop",
            "n1",
            json!({"spec": {"nodeName": "n1", "containers": [
            {"name": "c", "readinessProbe": {"tcpSocket": {"port": 5432}}}]}}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(p.probe_ports, vec![5432]);
    }

    #[test]
    fn pod_labels_give_istios_canonical_service_revision_app_and_version() {
        let labels = |l: Value| {
            let v = json!({"metadata": {"name": "p", "namespace": "shop", "uid": "u", "labels": l},
                           "spec": {}, "status": {}});
            Pod::from_json(&v).unwrap().unwrap().labels
        };
        let k8s = labels(json!({"app.kubernetes.io/name": "shop-ui", "app.kubernetes.io/version": "1.4", "tier": "x"}));
        assert_eq!(k8s.canonical_name.as_deref(), Some("shop-ui"));
        assert_eq!(k8s.canonical_revision.as_deref(), Some("1.4"));
        assert_eq!((k8s.app.as_deref(), k8s.version.as_deref()), (Some("shop-ui"), Some("1.4")));
        let istio =
            labels(json!({"service.istio.io/canonical-name": "ui", "service.istio.io/canonical-revision": "canary",
                                  "app": "web", "version": "v2"}));
        assert_eq!(
            (istio.canonical_name.as_deref(), istio.canonical_revision.as_deref()),
            (Some("ui"), Some("canary"))
        );
        assert_eq!((istio.app.as_deref(), istio.version.as_deref()), (Some("web"), Some("v2")));
        assert!(labels(json!({"tier": "x"})).is_empty(), "other labels are not kept");
    }

    #[test]
    fn namespaces_opt_in_and_choose_mtls_mode() {
        let ns = |a: Value| Namespace::from_json(&json!({"metadata": {"name": "shop", "annotations": a}}));
        let policy = |a: Value| ns(a).unwrap().policy;
        assert!(policy(json!({"switchyard.io/mesh": "enabled"})).meshed);
        assert!(!policy(json!({"switchyard.io/mesh": "disabled"})).meshed);
        assert!(!policy(json!({})).meshed);
        let strict = policy(json!({"switchyard.io/mesh": "enabled", "switchyard.io/mtls-mode": "strict"}));
        assert_eq!(strict.mtls_mode, MtlsMode::Strict);
        assert!(ns(json!({"switchyard.io/mtls-mode": "sometimes"})).unwrap_err().to_string().contains("sometimes"));
        assert!(Namespace::from_json(&json!({"metadata": {}})).is_err());
        assert!(policy(json!({"switchyard.io/fail-mode": "closed"})).fail_closed);
        assert!(!policy(json!({"switchyard.io/fail-mode": "open"})).fail_closed);
        assert!(!policy(json!({})).fail_closed, "open by default");
        assert!(ns(json!({"switchyard.io/fail-mode": "ajar"})).unwrap_err().to_string().contains("ajar"));
        // As strict as the workload file: a typo is an error, not "off".
        let typo = ns(json!({"switchyard.io/mesh": "enable"})).unwrap_err().to_string();
        assert!(typo.contains("switchyard.io/mesh") && typo.contains("\"enabled\" or \"disabled\""), "{typo}");
    }

    #[test]
    fn pods_are_trimmed_and_malformed_ones_rejected_with_the_reason() {
        let p = Pod::from_json(&pod("a", "shop", "n1", json!({}))).unwrap().unwrap();
        assert_eq!(p.uid, "uid-a");
        assert_eq!(p.service_account, "sa-a");
        assert_eq!(p.ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert!(!p.host_network && !p.opt_out);
        let done = pod("b", "shop", "n1", json!({"status": {"phase": "Succeeded", "podIP": "10.244.1.6"}}));
        assert_eq!(Pod::from_json(&done).unwrap(), None);
        let dual = pod(
            "c",
            "shop",
            "n1",
            json!({"status": {"podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.244.1.7"}]}}),
        );
        assert_eq!(Pod::from_json(&dual).unwrap().unwrap().ip, Some(Ipv4Addr::new(10, 244, 1, 7)));
        for (bad, why) in [
            (pod("d", "shop", "n1", json!({"spec": "oops"})), "spec"),
            (pod("e", "shop", "n1", json!({"status": {"podIP": "ten.one"}})), "podIP"),
            (pod("f", "shop", "n1", json!({"spec": {"hostNetwork": "yes"}})), "hostNetwork"),
            (json!({"metadata": {"name": "g", "namespace": "shop"}, "spec": {}}), "uid"),
            // Found by fuzzing: these became SPIFFE IDs no certificate can carry.
            (pod("h", "shop", "n1", json!({"spec": {"serviceAccountName": "w;b"}})), "serviceAccountName"),
            (pod("i/j", "shop", "n1", json!({})), "metadata.name"),
            (pod("k", "Shop.x", "n1", json!({})), "metadata.namespace"),
        ] {
            let e = Pod::from_json(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{e} should mention {why}");
        }
    }

    #[test]
    fn state_meshes_by_namespace_honours_opt_out_and_never_host_network() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("kubepods/burstable/poduid-a")).unwrap();
        let namespaces: HashMap<_, _> = [
            (
                "shop".to_string(),
                Namespace {
                    name: "shop".into(),
                    policy: NamespacePolicy {
                        meshed: true,
                        mtls_mode: MtlsMode::Strict,
                        fail_closed: true,
                        capture_all: false,
                    },
                },
            ),
            ("legacy".to_string(), Namespace { name: "legacy".into(), policy: NamespacePolicy::default() }),
        ]
        .into();
        let mut pods = HashMap::new();
        for v in [
            pod("a", "shop", "n1", json!({})),
            pod(
                "b",
                "shop",
                "n1",
                json!({"metadata": {"name": "b", "namespace": "shop", "uid": "uid-b",
                "annotations": {"switchyard.io/mesh": "disabled"}}}),
            ),
            pod("c", "shop", "n1", json!({"spec": {"nodeName": "n1", "hostNetwork": true}})),
            pod("d", "legacy", "n1", json!({})),
            pod("e", "shop", "n2", json!({})),
            pod("f", "shop", "n2", json!({"status": {"phase": "Pending"}})),
            pod("g", "shop", "n1", json!({"status": {"phase": "Pending"}})),
        ] {
            let p = Pod::from_json(&v).unwrap().unwrap();
            pods.insert(p.key(), p);
        }
        let nodes: HashMap<_, _> = [(
            "n2".to_string(),
            Node::from_json(&json!({"metadata": {"name": "n2"}, "status": {"addresses": [
                {"type": "Hostname", "address": "n2"}, {"type": "InternalIP", "address": "192.168.77.2"}]}}))
            .unwrap(),
        )]
        .into();
        let s = node_state("n1", &namespaces, pods.values(), &nodes, root.path());
        let w = |k: &str| s.pods.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert!(w("shop/a").meshed);
        assert_eq!(w("shop/a").cgroup, Some(root.path().join("kubepods/burstable/poduid-a")));
        assert_eq!(w("shop/a").mtls_mode, MtlsMode::Strict);
        assert_eq!(w("shop/b").reason, MeshReason::PodOptOut);
        assert_eq!(w("shop/c").reason, MeshReason::HostNetwork);
        assert!(!w("shop/c").meshed && w("shop/c").cgroup.is_none());
        assert_eq!(w("legacy/d").reason, MeshReason::NamespaceNotMeshed);
        assert!(w("shop/e").meshed && w("shop/e").cgroup.is_none(), "remote pods are known, not local");
        assert!(!s.pods.contains_key("shop/f"), "a remote pod without an IP is not routable");
        assert!(w("shop/g").meshed && w("shop/g").ip.is_unspecified(), "a local pod is meshed before its IP is known");
        assert_eq!(s.nodes["n2"].address, Ipv4Addr::new(192, 168, 77, 2));
    }

    #[test]
    fn services_balance_over_ready_endpoints_matched_by_port_name() {
        let svc = Service::from_json(&json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP"}]}}))
        .unwrap();
        assert_eq!(
            svc.ports,
            vec![("http".to_string(), 80, Some(crate::state::ProtocolHint::Http))],
            "UDP ports are not proxied"
        );
        let slice = |eps: Value| {
            EndpointSlice::from_json(&json!({"metadata": {"name": "web-abc", "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}))
        };
        let a = slice(json!([{"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                             {"addresses": ["10.244.1.6"], "conditions": {"ready": false}}]))
        .unwrap();
        let b = slice(json!([{"addresses": ["10.244.2.7"]}])).unwrap();
        let t = service_table([&svc].into_iter(), &[&a, &b]);
        let vip: SocketAddrV4 = "10.96.0.10:80".parse().unwrap();
        assert_eq!(
            t[&vip].endpoints,
            vec!["10.244.1.5:8080".parse().unwrap(), "10.244.2.7:8080".parse::<SocketAddrV4>().unwrap()]
        );
        assert_eq!(t[&vip].service, "shop/web");
        let limited = |v: &str| {
            Service::from_json(&json!({"metadata": {"name": "l", "namespace": "shop",
                "annotations": {"switchyard.io/max-connections": v}}, "spec": {"clusterIP": "10.96.0.12"}}))
        };
        assert_eq!(limited("2").unwrap().policy.max_connections, Some(2));
        for bad in ["0", "-1", "lots"] {
            assert!(limited(bad).unwrap_err().to_string().contains("max-connections"), "{bad}");
        }
        let headless = Service::from_json(&json!({"metadata": {"name": "h", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}))
        .unwrap();
        assert!(service_table([&headless].into_iter(), &[]).is_empty());
        assert!(slice(json!([{"addresses": ["nope"]}])).unwrap_err().to_string().contains("nope"));
        assert!(
            Service::from_json(&json!({"metadata": {"name": "x", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 70000}]}}))
            .is_err()
        );
    }
}
