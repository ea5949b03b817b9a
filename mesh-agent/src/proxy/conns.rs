//! Live and recently closed connections, for `/debug/connections`, the demo and the dashboard.
//! Bounded: at most [`RECENT`] closed connections are remembered.
use std::{
    collections::{BTreeMap, VecDeque},
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;

pub const RECENT: usize = 1024;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Which listener took the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Redirected from a pod on this node.
    #[default]
    Outbound,
    /// Arrived over HBONE from another node.
    Inbound,
}

/// How the connection was protected, honestly: never assumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Not decided yet, or the connection failed before it was.
    #[default]
    Unknown,
    /// HBONE: mutual TLS between the two workloads' identities.
    MutualTls,
    /// Both pods on this node: delivered locally, identities known from the kernel (cgroup).
    Local,
    /// To a destination outside the mesh: plain TCP.
    Plaintext,
}

impl Security {
    /// As serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Unknown => "unknown",
            Security::MutualTls => "mutual_tls",
            Security::Local => "local",
            Security::Plaintext => "plaintext",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnRecord {
    pub id: u64,
    pub direction: Direction,
    pub security: Security,
    pub client: SocketAddr,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    /// `namespace/name` of the source pod, from its cgroup.
    pub source_pod: Option<String>,
    /// What the application connected to (a Service's ClusterIP:port, or a pod).
    pub original_dst: SocketAddrV4,
    /// For a Service: the endpoint chosen.
    pub endpoint: Option<SocketAddrV4>,
    /// Failed connects retried on another endpoint before this one (for HTTP: retries of the
    /// latest request).
    pub retries: u32,
    /// `http1`, `http2` or `tcp`, once detected (outbound connections to Services).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    /// HTTP requests served on this connection.
    #[serde(skip_serializing_if = "is_zero")]
    pub requests: u64,
    /// `namespace/name` of the destination pod, if it is one of this node's.
    pub destination_pod: Option<String>,
    pub started_unix_ms: u64,
    pub duration_ms: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub error: Option<String>,
}

impl Default for ConnRecord {
    fn default() -> Self {
        ConnRecord {
            id: 0,
            direction: Direction::Outbound,
            security: Security::Unknown,
            client: SocketAddr::from(([0, 0, 0, 0], 0)),
            source_identity: None,
            destination_identity: None,
            source_pod: None,
            original_dst: SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
            endpoint: None,
            retries: 0,
            protocol: None,
            requests: 0,
            destination_pod: None,
            started_unix_ms: 0,
            duration_ms: None,
            bytes_sent: 0,
            bytes_received: 0,
            error: None,
        }
    }
}

#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Boxed: a B-tree node holds 11 entries and sequential ids leave nodes about half full,
    /// so unboxed records (~250 bytes) cost ~400 bytes each while open.
    active: BTreeMap<u64, Box<ConnRecord>>,
    recent: VecDeque<ConnRecord>,
    closed_total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub active: Vec<ConnRecord>,
    pub recent: Vec<ConnRecord>,
    pub closed_total: u64,
}

impl Connections {
    pub fn open(&self, mut rec: ConnRecord) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        rec.id = id;
        rec.started_unix_ms = unix_ms(SystemTime::now());
        self.lock().active.insert(id, Box::new(rec));
        id
    }

    /// Records a retry on another endpoint of the Service.
    pub fn set_endpoint(&self, id: u64, endpoint: SocketAddrV4, destination_pod: Option<String>, retries: u32) {
        if let Some(rec) = self.lock().active.get_mut(&id) {
            rec.endpoint = Some(endpoint);
            rec.destination_pod = destination_pod;
            rec.retries = retries;
        }
    }

    pub fn set_requests(&self, id: u64, requests: u64) {
        if let Some(rec) = self.lock().active.get_mut(&id) {
            rec.requests = requests;
        }
    }

    /// Records how the connection is protected once the route is chosen.
    pub fn set_source_identity(&self, id: u64, source_identity: String) {
        if let Some(rec) = self.lock().active.get_mut(&id) {
            rec.source_identity = Some(source_identity);
        }
    }

    pub fn set_security(&self, id: u64, security: Security, destination_identity: Option<String>) {
        if let Some(rec) = self.lock().active.get_mut(&id) {
            rec.security = security;
            rec.destination_identity = destination_identity;
        }
    }

    pub fn close(
        &self,
        id: u64,
        elapsed: Duration,
        sent: u64,
        received: u64,
        error: Option<String>,
    ) -> Option<ConnRecord> {
        let mut inner = self.lock();
        let mut rec = *inner.active.remove(&id)?;
        rec.duration_ms = Some(elapsed.as_millis() as u64);
        rec.bytes_sent = sent;
        rec.bytes_received = received;
        rec.error = error;
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(rec.clone());
        inner.closed_total += 1;
        Some(rec)
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            active: inner.active.values().map(|r| ConnRecord::clone(r)).collect(),
            recent: inner.recent.iter().cloned().collect(),
            closed_total: inner.closed_total,
        }
    }

    pub fn active_count(&self) -> usize {
        self.lock().active.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
