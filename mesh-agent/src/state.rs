//! The agent's view of the node's workloads, whatever feeds it (the local workload file today,
//! Kubernetes watches later). The reconciler turns it into datapath state; the proxy uses it to
//! name the source and destination of a connection.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use crate::{authz::Rule, identity::Identity};

/// The annotation that opts a namespace in (`enabled`) or a pod out (`disabled`).
pub const MESH_ANNOTATION: &str = "switchyard.io/mesh";
/// Namespace annotation: `permissive` (default) or `strict`.
pub const MTLS_MODE_ANNOTATION: &str = "switchyard.io/mtls-mode";

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
}

impl Workload {
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
    /// Service virtual addresses (ClusterIP:port) → ready endpoints (pod IP:target port),
    /// balanced over by the proxy (no kube-proxy needed for meshed pods).
    pub services: BTreeMap<SocketAddrV4, ServiceEntry>,
}

/// Annotation on a Service: connections open at once through the mesh to it, node-wide per
/// agent; past it new connections are reset at once (fail fast) instead of queueing.
pub const MAX_CONNECTIONS_ANNOTATION: &str = "switchyard.io/max-connections";

/// One Service port as the proxy serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceEntry {
    /// `namespace/name`.
    pub service: String,
    /// Ready endpoints (pod IP:target port).
    pub endpoints: Vec<SocketAddrV4>,
    /// From [`MAX_CONNECTIONS_ANNOTATION`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl NodeState {
    /// This node's meshed pods.
    pub fn meshed(&self) -> impl Iterator<Item = &Workload> {
        self.pods.values().filter(|w| w.meshed && w.node == self.node)
    }

    pub fn local(&self) -> impl Iterator<Item = (&String, &Workload)> {
        self.pods.iter().filter(|(_, w)| w.node == self.node)
    }

    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.pods.values().find(|w| w.ip == ip)
    }
}
