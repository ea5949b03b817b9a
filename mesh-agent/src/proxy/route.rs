//! Routing: where one connection from a meshed pod goes, decided once per connection (per
//! request for HTTP) from one snapshot of the pod index, and carried as a value from there on.
//!
//! [`route`] is a pure function of the snapshot, the original destination and the source pod's
//! cgroup: it answers a [`Route`] (the source, and either a workload [`Target`] or a Service
//! whose endpoints are routed one by one with [`Route::to_endpoint`]) or a typed [`Refusal`].
//! Authorization for same-node traffic is evaluated here, once; the [`Target`] keeps what it
//! decided on ([`Authorized`]) and a [`Cancel`] handle for the connection, so a later policy
//! change can re-check it ([`Authorized::recheck`]) and close it without re-deriving anything.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use crate::{
    authz::{self, Decision},
    identity::Identity,
    proxy::idle::Cancel,
    state::PodIndex,
    state::ServiceEntry,
};

/// What routing needs beyond the pod index: fixed for the agent's life.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub trust_domain: String,
    pub hbone_port: u16,
    /// A CA is configured: other nodes' meshed pods are reachable over HBONE. Without one they
    /// are refused, never reached in plaintext.
    pub mtls: bool,
}

/// The source of a connection: this node's meshed pod, named by the kernel (its cgroup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `namespace/name`.
    pub pod: String,
    pub identity: Identity,
    pub ip: Ipv4Addr,
    /// The client socket's port (0 until the caller sets it), for HBONE's `Forwarded`.
    pub port: u16,
    /// W3C `baggage` naming the source workload, as ztunnel sends it on HBONE.
    pub baggage: String,
}

/// How bytes reach a [`Target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// A meshed pod on this node: connect directly (authorized here).
    Local,
    /// A meshed pod on another node: an HBONE tunnel to `peer`, the pod's own address on
    /// port 15008, as ztunnel dials it; that node's proxy answers there (authorized there).
    /// `node` is that node's proxy in Switchyard's older dialect (its address, SNI naming the
    /// identity): tried when the pod's address refuses, so HBONE keeps working toward nodes
    /// whose agent is not upgraded yet.
    Hbone { peer: SocketAddr, node: SocketAddr },
    /// Not a meshed pod: plain TCP from the proxy.
    Passthrough,
}

impl Path {
    /// The route label of `switchyard_outbound_routes_total`.
    pub fn label(&self) -> crate::metrics::RouteKind {
        use crate::metrics::RouteKind;
        match self {
            Path::Local => RouteKind::Local,
            Path::Hbone { .. } => RouteKind::Hbone,
            Path::Passthrough => RouteKind::Passthrough,
        }
    }

    /// Istio's `connection_security_policy`: `mutual_tls` only for bytes that cross in HBONE.
    pub fn security_policy(&self) -> &'static str {
        match self {
            Path::Hbone { .. } => "mutual_tls",
            _ => "none",
        }
    }

    pub fn security(&self) -> crate::proxy::conns::Security {
        use crate::proxy::conns::Security;
        match self {
            Path::Local => Security::Local,
            Path::Hbone { .. } => Security::MutualTls,
            Path::Passthrough => Security::Plaintext,
        }
    }
}

/// What authorization decided on for a same-node connection: enough to evaluate it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    pub src: Identity,
    /// The source pod's address, when verified.
    pub src_ip: Option<Ipv4Addr>,
    /// The destination pod (`namespace/name`).
    pub dst_pod: String,
    pub port: u16,
}

impl Authorized {
    /// The decision under `idx`'s rules, for the same source, pod and port. A pod that is gone
    /// is no longer allowed.
    pub fn recheck(&self, idx: &PodIndex, dst_ip: Ipv4Addr) -> Decision {
        match idx.by_ip(dst_ip).filter(|p| p.key == self.dst_pod) {
            Some(p) => {
                let peer = authz::Peer { identity: &self.src, ip: self.src_ip };
                authz::evaluate(&idx.authz, peer, p.workload.authz_destination(self.port))
            }
            None => Decision::NotAllowed,
        }
    }
}

/// One endpoint to connect to, and how.
#[derive(Debug, Clone)]
pub struct Target {
    pub ep: SocketAddrV4,
    pub path: Path,
    /// The destination workload's identity (meshed pods only).
    pub dst: Option<Identity>,
    /// `namespace/name` of the destination pod, when it is a known pod.
    pub dst_pod: Option<String>,
    /// For [`Path::Local`]: what authorization allowed.
    pub authorized: Option<Authorized>,
    /// Cancelled to close the connection (e.g. when a policy change no longer allows it).
    pub cancel: Cancel,
}

/// A Service's virtual address and its entry as the snapshot has it.
#[derive(Debug, Clone)]
pub struct ServiceTarget {
    pub vip: SocketAddrV4,
    pub entry: Arc<ServiceEntry>,
}

/// Where a connection goes.
// The workload target is the common case and lives in the connection's future: boxing it would
// add an allocation per connection to save bytes in a value that exists once per connection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Destination {
    Workload(Target),
    /// A Service's ClusterIP:port: each attempt routes one of its endpoints.
    Service(ServiceTarget),
}

/// A routed connection: its source and its destination, from one snapshot.
#[derive(Debug, Clone)]
pub struct Route {
    pub source: Source,
    pub destination: Destination,
    pub snapshot: Arc<PodIndex>,
}

/// Why a connection is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("cgroup {0} is not a known pod of this node")]
    UnknownSource(u64),
    #[error(transparent)]
    Denied(Box<Denial>),
    #[error("pod {pod} is on node {node}, whose address is unknown")]
    UnknownNode { pod: String, node: String },
    #[error("pod {0} is meshed on another node but this agent has no CA configured")]
    MtlsUnavailable(String),
}

/// A connection authorization policy refused: who, to whom, and what decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connection from {src} to {dst} ({ep}) denied by authorization policy ({})", match decision {
    Decision::Denied(rule) => format!("deny rule {rule}"),
    _ => "no allow rule matches".into(),
})]
pub struct Denial {
    pub src: Identity,
    pub dst: Identity,
    pub ep: SocketAddrV4,
    pub decision: Decision,
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UnknownSource(_) => "unknown_source",
            Refusal::Denied(d) => d.decision.reason(),
            Refusal::UnknownNode { .. } => "unknown_node",
            Refusal::MtlsUnavailable(_) => "mtls_unavailable",
        }
    }

    /// Refused by authorization policy (also counted as a denial).
    pub fn is_denial(&self) -> bool {
        matches!(self, Refusal::Denied(_))
    }
}

/// Routes a connection from the pod with cgroup `source_cgroup` to `original`.
pub fn route(
    snapshot: &Arc<PodIndex>,
    cfg: &RouteConfig,
    original: SocketAddrV4,
    source_cgroup: u64,
) -> Result<Route, Refusal> {
    let source = source(snapshot, cfg, source_cgroup)?;
    let destination = match snapshot.services.get(&original) {
        Some(entry) => Destination::Service(ServiceTarget { vip: original, entry: entry.clone() }),
        None => Destination::Workload(target(snapshot, cfg, &source, original)?),
    };
    Ok(Route { source, destination, snapshot: snapshot.clone() })
}

/// This node's pod with this cgroup.
pub fn source(idx: &PodIndex, cfg: &RouteConfig, cgroup: u64) -> Result<Source, Refusal> {
    let pod = idx.by_cgroup(cgroup).ok_or(Refusal::UnknownSource(cgroup))?;
    Ok(Source {
        pod: pod.key.clone(),
        identity: pod.workload.identity(&cfg.trust_domain),
        ip: pod.workload.ip,
        port: 0,
        baggage: pod.workload.baggage(),
    })
}

/// Routes `source`'s connection to the workload address `ep`.
pub fn target(idx: &PodIndex, cfg: &RouteConfig, source: &Source, ep: SocketAddrV4) -> Result<Target, Refusal> {
    let dst = idx.by_ip(*ep.ip());
    let mut t = Target {
        ep,
        path: Path::Passthrough,
        dst: None,
        dst_pod: dst.map(|p| p.key.clone()),
        authorized: None,
        cancel: Cancel::default(),
    };
    let Some(d) = dst.filter(|d| d.workload.meshed) else { return Ok(t) };
    let dst_id = d.workload.identity(&cfg.trust_domain);
    if idx.is_local(d) {
        // A pod of this node: its address is its own (the kernel named it by its cgroup).
        let peer = authz::Peer { identity: &source.identity, ip: Some(source.ip) };
        match authz::decide(&idx.authz, peer, d.workload.authz_destination(ep.port())) {
            Decision::Allow => {
                t.authorized = Some(Authorized {
                    src: source.identity.clone(),
                    src_ip: Some(source.ip),
                    dst_pod: d.key.clone(),
                    port: ep.port(),
                })
            }
            decision => {
                return Err(Refusal::Denied(Box::new(Denial {
                    src: source.identity.clone(),
                    dst: dst_id,
                    ep,
                    decision,
                })));
            }
        }
        t.path = Path::Local;
    } else {
        let Some(node) = idx.nodes.get(&d.workload.node) else {
            return Err(Refusal::UnknownNode { pod: d.key.clone(), node: d.workload.node.clone() });
        };
        if !cfg.mtls {
            return Err(Refusal::MtlsUnavailable(d.key.clone()));
        }
        t.path = Path::Hbone {
            peer: SocketAddr::from((*ep.ip(), cfg.hbone_port)),
            node: SocketAddr::from((node.address, cfg.hbone_port)),
        };
    }
    t.dst = Some(dst_id);
    Ok(t)
}

impl Route {
    /// Routes one endpoint of this route's Service (or the workload target itself).
    pub fn to_endpoint(&self, cfg: &RouteConfig, ep: SocketAddrV4) -> Result<Target, Refusal> {
        match &self.destination {
            Destination::Workload(t) if t.ep == ep => Ok(t.clone()),
            _ => target(&self.snapshot, cfg, &self.source, ep),
        }
    }

    /// The Service, if the destination is one.
    pub fn service(&self) -> Option<&ServiceTarget> {
        match &self.destination {
            Destination::Service(s) => Some(s),
            Destination::Workload(_) => None,
        }
    }

    /// What the application connected to.
    pub fn original(&self) -> SocketAddrV4 {
        match &self.destination {
            Destination::Service(s) => s.vip,
            Destination::Workload(t) => t.ep,
        }
    }

    /// Istio labels (reporter `source`) for this route's connection or request to `ep` (`None`:
    /// answered by the proxy itself) along `path` (`None`: refused, or no endpoint).
    pub fn istio_labels(
        &self,
        cfg: &RouteConfig,
        ep: Option<SocketAddrV4>,
        path: Option<&Path>,
        protocol: &'static str,
    ) -> crate::metrics::IstioLabels {
        let mut l = crate::metrics::IstioLabels::unknown("source", protocol);
        if let Some(src) = self.snapshot.by_ip(self.source.ip).filter(|p| p.key == self.source.pod) {
            l = l.source(&src.workload, &cfg.trust_domain);
        }
        if let Some(dst) = self.snapshot.by_ip(*ep.unwrap_or_else(|| self.original()).ip()) {
            l = l.destination(&dst.workload, &cfg.trust_domain);
        }
        if let Some(s) = self.service() {
            l = l.service(&s.entry.service);
        }
        l.connection_security_policy = path.map_or("none", Path::security_policy);
        l
    }

    /// `namespace/name` of the pod at `ep`, when it is a known pod.
    pub fn pod_at(&self, ep: SocketAddrV4) -> Option<String> {
        self.snapshot.by_ip(*ep.ip()).map(|p| p.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        authz::{Action, RuleSpec},
        state::PodStatus,
        state::{NodeInfo, NodeState, ServiceEntry, Workload},
    };

    fn pod(ns: &str, name: &str, ip: [u8; 4], node: &str, meshed: bool) -> Workload {
        Workload { meshed, ..crate::testing::pod(ns, name, ip.into(), node) }
    }

    const CLIENT_CG: u64 = 1;
    const SVC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80);

    /// Node `a` (this one) with a client and a server pod, node `b` with a meshed pod, node `c`
    /// (address unknown) with one, an unmeshed pod, a Service and a deny rule.
    fn index() -> Arc<PodIndex> {
        let mut state = NodeState { node: "a".into(), ..Default::default() };
        let pods = [
            ("shop/client", pod("shop", "client", [10, 0, 0, 1], "a", true), Some(CLIENT_CG)),
            ("shop/server", pod("shop", "server", [10, 0, 0, 2], "a", true), Some(2)),
            ("shop/vault", pod("shop", "vault", [10, 0, 0, 3], "a", true), Some(3)),
            ("shop/remote", pod("shop", "remote", [10, 0, 1, 1], "b", true), None),
            ("shop/lost", pod("shop", "lost", [10, 0, 2, 1], "c", true), None),
            ("legacy/old", pod("legacy", "old", [10, 0, 0, 9], "a", false), Some(9)),
        ];
        for (k, w, _) in &pods {
            state.pods.insert(k.to_string(), w.clone());
        }
        state.nodes.insert("b".into(), NodeInfo { name: "b".into(), address: [192, 168, 0, 2].into() });
        state.services.insert(
            SVC,
            ServiceEntry {
                service: "shop/web".into(),
                endpoints: vec![SocketAddrV4::new([10, 0, 0, 2].into(), 8080)],
                ..Default::default()
            },
        );
        state.authz.push(
            RuleSpec {
                name: "no-vault".into(),
                namespace: "shop".into(),
                workload: Some("vault".into()),
                ports: vec![],
                action: Action::Deny,
                from: vec!["spiffe://cluster.local/ns/shop/sa/client".into()],
            }
            .try_into()
            .unwrap(),
        );
        let statuses = pods
            .into_iter()
            .map(|(k, w, cg)| PodStatus { key: k.into(), workload: w, cgroup_id: cg, redirected: cg.is_some() })
            .collect();
        Arc::new(PodIndex::new(&state, statuses))
    }

    fn cfg(mtls: bool) -> RouteConfig {
        RouteConfig { trust_domain: "cluster.local".into(), hbone_port: 15008, mtls }
    }

    fn dst(ip: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip.into(), port)
    }

    /// What a route comes to, in one comparable line.
    /// Path, destination identity, destination pod, authorized here.
    type Summary = Result<(Option<Path>, Option<String>, Option<String>, bool), String>;

    fn summary(r: Result<Route, Refusal>) -> Summary {
        let r = r.map_err(|e| e.reason().to_string())?;
        Ok(match &r.destination {
            Destination::Workload(t) => {
                (Some(t.path.clone()), t.dst.as_ref().map(|i| i.to_string()), t.dst_pod.clone(), t.authorized.is_some())
            }
            Destination::Service(s) => (None, None, Some(s.entry.service.clone()), false),
        })
    }

    #[test]
    fn the_route_table() {
        let idx = index();
        // The pod's own address on 15008 (ztunnel's HBONE), its node's for the older dialect.
        let peer_b: SocketAddr = "10.0.1.1:15008".parse().unwrap();
        let node_b: SocketAddr = "192.168.0.2:15008".parse().unwrap();
        let id = |sa: &str| Some(format!("spiffe://cluster.local/ns/shop/sa/{sa}"));
        type Want = Summary;
        let cases: Vec<(&str, SocketAddrV4, u64, bool, Want)> = vec![
            (
                "same node, authorized here",
                dst([10, 0, 0, 2], 8080),
                CLIENT_CG,
                true,
                Ok((Some(Path::Local), id("server"), Some("shop/server".into()), true)),
            ),
            (
                "other node over HBONE",
                dst([10, 0, 1, 1], 80),
                CLIENT_CG,
                true,
                Ok((Some(Path::Hbone { peer: peer_b, node: node_b }), id("remote"), Some("shop/remote".into()), false)),
            ),
            (
                "outside the mesh",
                dst([1, 1, 1, 1], 443),
                CLIENT_CG,
                true,
                Ok((Some(Path::Passthrough), None, None, false)),
            ),
            (
                "an unmeshed pod: passthrough, named",
                dst([10, 0, 0, 9], 5432),
                CLIENT_CG,
                true,
                Ok((Some(Path::Passthrough), None, Some("legacy/old".into()), false)),
            ),
            ("a Service", SVC, CLIENT_CG, true, Ok((None, None, Some("shop/web".into()), false))),
            ("unknown source", dst([10, 0, 0, 2], 8080), 77, true, Err("unknown_source".into())),
            (
                "an unmeshed source",
                dst([10, 0, 0, 2], 8080),
                9,
                true,
                Ok((Some(Path::Local), id("server"), Some("shop/server".into()), true)),
            ),
            ("denied here", dst([10, 0, 0, 3], 8200), CLIENT_CG, true, Err("deny_rule".into())),
            ("node address unknown", dst([10, 0, 2, 1], 80), CLIENT_CG, true, Err("unknown_node".into())),
            ("no CA: never plaintext", dst([10, 0, 1, 1], 80), CLIENT_CG, false, Err("mtls_unavailable".into())),
            (
                "no CA: same node still works",
                dst([10, 0, 0, 2], 8080),
                CLIENT_CG,
                false,
                Ok((Some(Path::Local), id("server"), Some("shop/server".into()), true)),
            ),
        ];
        for (what, original, cg, mtls, want) in cases {
            assert_eq!(summary(route(&idx, &cfg(mtls), original, cg)), want, "{what}");
        }
    }

    #[test]
    fn a_services_endpoints_are_routed_from_the_same_snapshot() {
        let idx = index();
        let r = route(&idx, &cfg(true), SVC, CLIENT_CG).unwrap();
        let svc = r.service().unwrap();
        assert_eq!(r.original(), SVC);
        let t = r.to_endpoint(&cfg(true), svc.entry.endpoints[0]).unwrap();
        assert_eq!(t.path, Path::Local);
        assert!(Arc::ptr_eq(&r.snapshot, &idx));
        // An endpoint behind a deny rule is refused, typed.
        let denied = r.to_endpoint(&cfg(true), dst([10, 0, 0, 3], 80)).unwrap_err();
        assert!(denied.is_denial());
        assert!(denied.to_string().contains("deny rule no-vault"), "{denied}");
    }

    #[test]
    fn labels_follow_the_target() {
        let idx = index();
        let r = route(&idx, &cfg(true), SVC, CLIENT_CG).unwrap();
        let none = r.istio_labels(&cfg(true), None, None, "http");
        assert_eq!(none.destination_service, "web.shop.svc.cluster.local");
        assert_eq!(none.connection_security_policy, "none");
        let remote = r.to_endpoint(&cfg(true), dst([10, 0, 1, 1], 80)).unwrap();
        let l = r.istio_labels(&cfg(true), Some(remote.ep), Some(&remote.path), "http");
        assert_eq!(l.connection_security_policy, "mutual_tls");
        assert_eq!(l.destination_principal, "spiffe://cluster.local/ns/shop/sa/remote");
        assert_eq!(l.source_principal, "spiffe://cluster.local/ns/shop/sa/client");
    }

    #[test]
    fn an_authorization_can_be_rechecked_against_a_new_snapshot() {
        let idx = index();
        let r = route(&idx, &cfg(true), dst([10, 0, 0, 2], 8080), CLIENT_CG).unwrap();
        let Destination::Workload(t) = &r.destination else { panic!() };
        let a = t.authorized.as_ref().unwrap();
        assert_eq!(a.recheck(&idx, [10, 0, 0, 2].into()), Decision::Allow);
        // The pod's IP now belongs to another pod (or to none): no longer allowed.
        assert_eq!(a.recheck(&idx, [10, 0, 0, 3].into()), Decision::NotAllowed);
        assert!(!t.cancel.is_cancelled());
    }
}
