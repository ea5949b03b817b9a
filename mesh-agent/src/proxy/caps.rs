//! What one tenant may hold of the node's proxy: connections per pod, and for the node as a
//! whole. A pod past its cap has its new connections reset at once (other pods are not
//! affected); the node past its cap resets new connections from every pod. Both are counted
//! (`switchyard_outbound_errors_total{reason="pod_connection_limit"|"node_connection_limit"}`)
//! and logged at most once every 10 s per pod.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::warn;

/// Open connections one pod may have through the proxy at once, by default: well above what
/// one busy pod holds (the benchmark holds 10 000 from one pod).
pub const DEFAULT_PER_POD: usize = 16_384;
/// Open proxied connections on the node at once, by default: the kernel's redirect map holds
/// as many.
pub const DEFAULT_NODE: usize = mesh_common::MAX_REDIRECTED_SOCKETS as usize;
/// A cap hit is logged at most this often per pod.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Which cap a connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapHit {
    Pod { limit: usize },
    Node { limit: usize },
}

impl CapHit {
    pub fn reason(self) -> &'static str {
        match self {
            CapHit::Pod { .. } => "pod_connection_limit",
            CapHit::Node { .. } => "node_connection_limit",
        }
    }
}

impl std::fmt::Display for CapHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CapHit::Pod { limit } => {
                write!(f, "the pod has {limit} connections open through the proxy (maxConnectionsPerPod)")
            }
            CapHit::Node { limit } => {
                write!(f, "the node has {limit} connections open through the proxy (maxProxiedConnections)")
            }
        }
    }
}

#[derive(Default)]
struct Open {
    total: usize,
    /// Per pod cgroup id: open connections, and when a cap hit was last logged.
    pods: HashMap<u64, (usize, Option<Instant>)>,
}

pub struct ConnectionCaps {
    per_pod: usize,
    node: usize,
    open: Mutex<Open>,
}

/// One open connection, given back when dropped.
pub struct CapSlot {
    caps: Arc<ConnectionCaps>,
    pod: u64,
}

impl ConnectionCaps {
    pub fn new(per_pod: usize, node: usize) -> Arc<Self> {
        Arc::new(ConnectionCaps { per_pod: per_pod.max(1), node: node.max(1), open: Mutex::default() })
    }

    /// A slot for a new connection of the pod with cgroup `pod`, or the cap it hit (logged
    /// here, at most every 10 s per pod).
    pub fn open(self: &Arc<Self>, pod: u64, name: &str) -> Result<CapSlot, CapHit> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let total = open.total;
        let entry = open.pods.entry(pod).or_default();
        let hit = if entry.0 >= self.per_pod {
            Some(CapHit::Pod { limit: self.per_pod })
        } else if total >= self.node {
            Some(CapHit::Node { limit: self.node })
        } else {
            None
        };
        if let Some(hit) = hit {
            let now = Instant::now();
            if entry.1.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                entry.1 = Some(now);
                warn!(
                    pod = name,
                    "new connections refused (reset): {hit}; further refusals are counted, logged again in 10 s"
                );
            }
            if entry.0 == 0 {
                open.pods.remove(&pod);
            }
            return Err(hit);
        }
        entry.0 += 1;
        open.total += 1;
        Ok(CapSlot { caps: self.clone(), pod })
    }

    /// Open connections of the pod with cgroup `pod`.
    pub fn open_of(&self, pod: u64) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).pods.get(&pod).map_or(0, |e| e.0)
    }
}

impl Drop for CapSlot {
    fn drop(&mut self) {
        let mut open = self.caps.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(e) = open.pods.get_mut(&self.pod) {
            e.0 = e.0.saturating_sub(1);
            if e.0 == 0 && e.1.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                open.pods.remove(&self.pod);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_past_its_cap_is_refused_while_others_are_not_and_slots_come_back() {
        let caps = ConnectionCaps::new(2, 3);
        let a1 = caps.open(1, "a").unwrap();
        let _a2 = caps.open(1, "a").unwrap();
        assert_eq!(caps.open(1, "a").err(), Some(CapHit::Pod { limit: 2 }));
        let _b1 = caps.open(2, "b").unwrap();
        assert_eq!(caps.open(3, "c").err(), Some(CapHit::Node { limit: 3 }), "the node is full");
        drop(a1);
        assert_eq!(caps.open_of(1), 1);
        let _c1 = caps.open(3, "c").unwrap();
        assert_eq!(caps.open(3, "c").err(), Some(CapHit::Node { limit: 3 }));
        assert_eq!(CapHit::Pod { limit: 2 }.reason(), "pod_connection_limit");
    }
}
