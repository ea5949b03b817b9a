//! Connections open under an authorization decision, evaluated again whenever the pod index
//! changes (new rules, a pod gone or replaced): one the rules no longer allow is closed, as
//! ztunnel closes connections that a policy update denies. Covers same-node connections
//! (decided by the outbound proxy) and HBONE streams (decided by this node's inbound side);
//! a connection to another node is decided, and re-checked, at its destination.
use std::{net::Ipv4Addr, sync::Arc};

use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    authz::Decision,
    proxy::{
        idle::{Cancel, Live, LiveHandle},
        route::Authorized,
    },
    state::PodIndex,
};

pub struct Open {
    authorized: Authorized,
    dst_ip: Ipv4Addr,
    cancel: Cancel,
}

/// The open authorized connections.
#[derive(Default)]
pub struct OpenAuthorizations {
    open: Arc<Live<Open>>,
    /// Connections closed because a policy change no longer allows them.
    pub closed: Counter,
}

/// Held for as long as the connection is open; dropping it forgets the connection.
pub type Registration = LiveHandle<Open>;

impl OpenAuthorizations {
    /// Remembers a connection to `dst_ip` allowed as `authorized`, closed through `cancel`.
    pub fn register(&self, authorized: Authorized, dst_ip: Ipv4Addr, cancel: Cancel) -> Registration {
        self.open.insert(Open { authorized, dst_ip, cancel })
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Evaluates every open connection under `idx` and closes those no longer allowed.
    /// Returns how many it closed.
    pub fn recheck(&self, idx: &PodIndex) -> usize {
        let mut closed = 0;
        self.open.for_each(|o| {
            if o.cancel.is_cancelled() {
                return;
            }
            let decision = o.authorized.recheck(idx, o.dst_ip);
            if decision != Decision::Allow {
                info!(
                    src = %o.authorized.src, dst = %o.authorized.dst_pod, port = o.authorized.port,
                    reason = decision.reason(), "closing a connection the authorization rules no longer allow"
                );
                o.cancel.cancel();
                closed += 1;
            }
        });
        self.closed.inc_by(closed as u64);
        closed
    }

    /// Re-checks on every change of the pod index, until `stop`.
    pub async fn run(self: Arc<Self>, mut pods: watch::Receiver<Arc<PodIndex>>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = pods.changed() => if r.is_err() { return },
            }
            let idx = pods.borrow_and_update().clone();
            if !self.is_empty() {
                self.recheck(&idx);
            }
        }
    }

    pub fn register_metrics(&self, reg: &mut Registry) {
        reg.register(
            "connections_closed_by_policy",
            "Open connections closed because a change of the authorization rules no longer allows them",
            self.closed.clone(),
        );
    }
}
