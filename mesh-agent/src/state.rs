//! The agent's view of the node's workloads, whatever feeds it (the local workload file today,
//! Kubernetes watches later). The reconciler turns it into datapath state; the proxy uses it to
//! name the source and destination of a connection.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

/// The annotation that opts a namespace in (`enabled`) or a pod out (`disabled`).
pub const MESH_ANNOTATION: &str = "switchyard.io/mesh";

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
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: Ipv4Addr,
    /// Absolute path of the pod's cgroup (v2).
    pub cgroup: PathBuf,
    pub meshed: bool,
    pub reason: MeshReason,
}

impl Workload {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }
}

/// Everything known about this node's workloads at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeState {
    /// Keyed by `namespace/name`.
    pub pods: BTreeMap<String, Workload>,
}

impl NodeState {
    pub fn meshed(&self) -> impl Iterator<Item = &Workload> {
        self.pods.values().filter(|w| w.meshed)
    }

    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.pods.values().find(|w| w.ip == ip)
    }
}
