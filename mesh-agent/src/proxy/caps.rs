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

/// The HTTP/2 receive windows an HBONE connection asks for, largest first: what a peer may
/// send before the proxy has passed it on, so what the agent may have to hold toward a slow
/// reader. A connection gets the largest that still fits in the node's budget.
pub const RECEIVE_WINDOWS: [u32; 4] = [16 << 20, 4 << 20, 1 << 20, 256 << 10];
/// HTTP/2's own initial window: what a connection gets when the budget is spent (a
/// connection window cannot start lower).
pub const RECEIVE_WINDOW_FLOOR: u32 = 65_535;
/// The node's budget by default: a quarter of the chart's memory limit (512 MiB).
pub const DEFAULT_RECEIVE_BUDGET: u64 = 128 << 20;

/// Receive windows granted to HBONE connections, node-wide (`hboneReceiveBudgetBytes`).
/// HTTP/2 flow control then bounds what the agent buffers for them: the copy toward a pod
/// stops reading while the pod does not read, so a peer can have at most its window in
/// flight. Past the budget, new connections get the protocol's 64 KiB (slower for bulk,
/// never refused): the total is at most the budget plus 64 KiB per connection.
pub struct ReceiveBudget {
    limit: u64,
    granted: std::sync::atomic::AtomicU64,
    /// The same, exported (`switchyard_hbone_receive_window_bytes`).
    gauge: prometheus_client::metrics::gauge::Gauge,
}

/// One connection's window, given back when it closes.
pub struct ReceiveGrant {
    budget: Arc<ReceiveBudget>,
    bytes: u32,
}

impl ReceiveBudget {
    pub fn new(limit: u64, gauge: prometheus_client::metrics::gauge::Gauge) -> Arc<Self> {
        Arc::new(ReceiveBudget { limit, granted: Default::default(), gauge })
    }

    /// The largest window of [`RECEIVE_WINDOWS`] that fits, else the floor.
    pub fn grant(self: &Arc<Self>) -> ReceiveGrant {
        use std::sync::atomic::Ordering;
        let fits = |w: u32| {
            self.granted
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                    (g + u64::from(w) <= self.limit).then_some(g + u64::from(w))
                })
                .is_ok()
        };
        let bytes = RECEIVE_WINDOWS.into_iter().find(|&w| fits(w)).unwrap_or_else(|| {
            self.granted.fetch_add(u64::from(RECEIVE_WINDOW_FLOOR), Ordering::AcqRel);
            RECEIVE_WINDOW_FLOOR
        });
        self.gauge.inc_by(i64::from(bytes));
        ReceiveGrant { budget: self.clone(), bytes }
    }

    /// Bytes of window granted to the connections open now.
    pub fn granted(&self) -> u64 {
        self.granted.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl ReceiveGrant {
    /// The connection's window; each stream's is at most 4 MiB of it.
    pub fn connection_window(&self) -> u32 {
        self.bytes
    }
    pub fn stream_window(&self) -> u32 {
        self.bytes.min(4 << 20)
    }
    /// Whether the budget was short (the connection got less than the largest window).
    pub fn reduced(&self) -> bool {
        self.bytes < RECEIVE_WINDOWS[0]
    }
}

impl Drop for ReceiveGrant {
    fn drop(&mut self) {
        self.budget.granted.fetch_sub(u64::from(self.bytes), std::sync::atomic::Ordering::AcqRel);
        self.budget.gauge.dec_by(i64::from(self.bytes));
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

    #[test]
    fn receive_windows_shrink_as_the_budget_is_spent_and_come_back_on_close() {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let budget = ReceiveBudget::new((21 << 20) + (256 << 10), gauge.clone());
        let a = budget.grant();
        let b = budget.grant();
        let c = budget.grant();
        let d = budget.grant();
        let windows: Vec<u32> = [&a, &b, &c, &d].iter().map(|g| g.connection_window()).collect();
        assert_eq!(windows, [16 << 20, 4 << 20, 1 << 20, 256 << 10]);
        assert!(!a.reduced() && b.reduced());
        assert_eq!((a.stream_window(), d.stream_window()), (4 << 20, 256 << 10));
        // Spent: the protocol's own window, still counted.
        let floor: Vec<ReceiveGrant> = (0..5).map(|_| budget.grant()).collect();
        assert!(floor.iter().all(|g| g.connection_window() == RECEIVE_WINDOW_FLOOR));
        assert_eq!(budget.granted(), (21 << 20) + (256 << 10) + 5 * u64::from(RECEIVE_WINDOW_FLOOR));
        assert_eq!(gauge.get() as u64, budget.granted());
        drop((a, floor));
        assert_eq!(budget.grant().connection_window(), 16 << 20, "a closed connection's window is free again");
        drop((b, c, d));
        assert_eq!((budget.granted(), gauge.get()), (0, 0));
    }
}
