//! Entry points of the fuzz targets in `fuzz/` (`cargo xtask test` runs each for a bounded
//! time): every parser that reads what a tenant, a peer or the cluster sends. Each takes
//! arbitrary bytes, must not panic, and checks the invariants the rest of the agent relies on
//! (a parsed pod's identity is a valid SPIFFE ID, no special address becomes a destination, a
//! refused CONNECT never yields a target). The seed corpora in `fuzz/corpus/<target>/` are
//! replayed by this module's tests, so a crash once found stays fixed.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
};

use kube::api::DynamicObject;
use serde_json::Value;

use crate::{
    identity::Identity,
    k8s::{self, Kind, Obj},
    proxy::{
        detect::{self, PEEK, Protocol, Verdict},
        inbound::{self, ConnectContext, Link, Refused},
    },
    state::{NodeState, PodIndex, PodStatus, special_address},
};

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary in `fuzz/fuzz_targets/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("workload_file", workload_file),
    ("k8s_objects", k8s_objects),
    ("detect", detect),
    ("forwarded", forwarded),
    ("hbone_connect", hbone_connect),
];

/// The node every target sees itself as.
const NODE: &str = "node-a";

/// Invariants of a node state, however it was read: every pod's identity is a valid SPIFFE
/// ID (it becomes a certificate's SAN and metric labels), and the destinations the kernel
/// would send to the proxy are never special addresses or a node's.
fn check_state(state: &NodeState) {
    let pods = state
        .pods
        .iter()
        .map(|(k, w)| PodStatus {
            key: k.clone(),
            workload: w.clone(),
            cgroup_id: (w.node == state.node).then_some(1),
            redirected: w.node == state.node && w.meshed,
        })
        .collect();
    let idx = PodIndex::new(state, pods);
    for p in idx.pods.iter().filter(|p| p.workload.meshed) {
        let id = p.workload.identity("cluster.local");
        assert_eq!(Identity::parse(&id.to_string()).as_ref(), Ok(&id), "pod {} has an invalid identity", p.key);
    }
    for all in [false, true] {
        for (ip, _) in idx.mesh_destinations(all) {
            if idx.by_ip(ip).is_some() {
                assert!(!special_address(ip) && !idx.is_node_address(ip), "{ip} indexed as a pod");
            }
        }
    }
}

/// The workload file (local mode), as this node reads it.
pub fn workload_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(state) = crate::workloads::parse(text, Path::new("fuzz.yaml"), NODE, Path::new("/sys/fs/cgroup")) else {
        return;
    };
    for w in state.pods.values().filter(|w| w.node == NODE) {
        let cgroup = w.cgroup.as_deref().expect("a pod of this node has a cgroup");
        assert!(cgroup.starts_with("/sys/fs/cgroup"), "cgroup {} outside the mount", cgroup.display());
    }
    check_state(&state);
}

/// Kubernetes objects as the watches trim them: one object, or a `List` of them (`items`),
/// then the node state built from every object that was kept.
pub fn k8s_objects(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    let items = match v.get("items").and_then(Value::as_array) {
        Some(items) => items.clone(),
        None => vec![v],
    };
    let (mut namespaces, mut pods, mut nodes, mut services, mut slices) =
        (HashMap::new(), Vec::new(), HashMap::new(), Vec::new(), Vec::new());
    let (mut policies, mut peer_auths) = (Vec::new(), Vec::new());
    for item in items {
        let kind = match item.get("kind").and_then(Value::as_str) {
            Some("Namespace") => Kind::Namespaces,
            Some("Pod") => Kind::LocalPods,
            Some("Node") => Kind::Nodes,
            Some("Service") => Kind::Services,
            Some("EndpointSlice") => Kind::EndpointSlices,
            Some("AuthorizationPolicy") => Kind::AuthorizationPolicies,
            Some("PeerAuthentication") => Kind::PeerAuthentications,
            _ => continue,
        };
        let Ok(o) = serde_json::from_value::<DynamicObject>(item) else { continue };
        match k8s::trim(kind, &o, crate::authz::istio::DEFAULT_ROOT_NAMESPACE) {
            Ok(Some(Obj::Namespace(n))) => {
                namespaces.insert(n.name.clone(), n);
            }
            Ok(Some(Obj::Pod(p))) => pods.push(*p),
            Ok(Some(Obj::Node(n))) => {
                nodes.insert(n.name.clone(), n);
            }
            Ok(Some(Obj::Service(s))) => services.push(s),
            Ok(Some(Obj::Slice(s))) => slices.push(s),
            Ok(Some(Obj::Policy(p))) => policies.push(*p),
            Ok(Some(Obj::PeerAuth(p))) => peer_auths.push(p),
            Ok(None) | Err(_) => {}
        }
    }
    let mut state = k8s::objects::node_state(NODE, &namespaces, &pods, &nodes, Path::new("/nonexistent"));
    let slices: Vec<_> = slices.iter().collect();
    state.services = k8s::objects::service_table(services.iter(), &slices);
    state.authz = policies.iter().filter_map(|t| t.rule.clone()).collect();
    state.authz_reports = policies.iter().map(|t| t.report.clone()).collect();
    state.apply_policies(&peer_auths, crate::authz::istio::DEFAULT_ROOT_NAMESPACE);
    check_state(&state);
    // Every pod's connections can be decided on, from any peer.
    let peer_id = Identity::new("cluster.local", "shop", "web");
    for w in state.pods.values() {
        for ip in [None, Some(Ipv4Addr::new(10, 244, 1, 7))] {
            let peer = crate::authz::Peer { identity: &peer_id, ip };
            let _ = crate::authz::evaluate(&state.authz, peer, w.authz_destination(8080));
        }
    }
}

/// Protocol detection on a connection's first bytes: HTTP/2 only after its whole preface,
/// HTTP/1 only after a method and a request line, and a decision never changes once made
/// (detection peeks at most [`PEEK`] bytes, as they arrive).
pub fn detect(data: &[u8]) {
    let data = &data[..data.len().min(PEEK)];
    let whole = detect::classify(data);
    match &whole {
        Verdict::Is(Protocol::Http2) => assert!(data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")),
        Verdict::Is(Protocol::Http1) => assert!(data.windows(2).any(|w| w == b"\r\n")),
        _ => {}
    }
    // Every prefix that decided decided the same.
    for n in (0..data.len()).step_by(data.len() / 16 + 1) {
        if let Verdict::Is(p) = detect::classify(&data[..n]) {
            assert_eq!(whole, Verdict::Is(p), "{:?} decided {p:?}, all of it {whole:?}", &data[..n]);
        }
    }
}

/// A `Forwarded` header's source address: what is read back is what was written, in both
/// the bare form and ztunnel's quoted `ip:port`.
pub fn forwarded(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(ip) = inbound::forwarded_source(text) {
        assert!(text.contains(&ip.to_string()), "{ip} read from {text:?}");
    }
    if data.len() >= 6 {
        let ip = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
        let port = u16::from_be_bytes([data[4], data[5]]);
        assert_eq!(inbound::forwarded_source(&format!("for={ip}")), Some(ip));
        assert_eq!(inbound::forwarded_source(&format!("proto=http;for=\"{ip}:{port}\", for=1.2.3.4")), Some(ip));
    }
}

/// The checks of an HBONE stream, on a node with one meshed pod of its own (`shop/web`,
/// 10.244.0.5), one pod of another node, and a node address: the input is the request's
/// method, target and headers, one per line. Whatever it is, only a CONNECT naming `shop/web`
/// may pass, and a source pod is believed only from the node it runs on or from itself; on a
/// connection addressed to a pod (ztunnel's HBONE), only one naming that pod.
pub fn hbone_connect(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else { return };
    let mut req = http::Request::builder().method(method).uri(uri);
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            req = req.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = req.body(()) else { return };
    let mut cluster = crate::testing::Cluster::new();
    cluster.add_node("node-b", Ipv4Addr::new(10, 0, 0, 2));
    cluster.add_pod("shop", "web", Ipv4Addr::new(10, 244, 0, 5), NODE);
    cluster.add_pod("shop", "client", Ipv4Addr::new(10, 244, 1, 7), "node-b");
    cluster.add_pod("shop", "db", Ipv4Addr::new(10, 244, 1, 8), "node-b");
    let idx = cluster.index(NODE);
    let (client_id, server_id) =
        (Identity::new("cluster.local", "shop", "client"), Identity::new("cluster.local", "shop", "web"));
    let web = Ipv4Addr::new(10, 244, 0, 5);
    let links = [
        // Addressed to the node, with an SNI (Switchyard's HBONE before ztunnel's), from two nodes.
        (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 1), None),
        (Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 1), None),
        // Addressed to the pod (ztunnel's HBONE), from a node and from the client pod itself.
        (Ipv4Addr::new(10, 0, 0, 2), web, Some(web)),
        (Ipv4Addr::new(10, 244, 1, 7), web, Some(web)),
    ];
    for (peer, local, pod) in links {
        let cx = ConnectContext {
            idx: &idx,
            trust_domain: "cluster.local",
            loopback_pods: false,
            link: Link { peer: SocketAddr::new(peer.into(), 40000), local: Some(local.into()), pod },
            client_id: &client_id,
            server_id: &server_id,
        };
        match inbound::check_connect(&req, &cx) {
            Ok(c) => {
                assert_eq!(req.method(), http::Method::CONNECT);
                assert_eq!(*c.target.ip(), Ipv4Addr::new(10, 244, 0, 5), "passed to {}", c.target);
                assert_eq!(c.dst_pod, "shop/web");
                if let Some(src) = &c.source_pod {
                    assert_eq!(src.as_str(), "shop/client");
                    assert!(
                        [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 244, 1, 7)].contains(&peer),
                        "believed from {peer}"
                    );
                }
            }
            Err(Refused::Rejected { status, .. }) => assert!(status.is_client_error()),
            Err(Refused::Denied { target, .. }) => {
                assert_eq!(target, SocketAddrV4::new([10, 244, 0, 5].into(), target.port()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every seed (and every crash once found, kept as a seed) of every target passes.
    #[test]
    fn the_seed_corpora_pass() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for &(name, run) in super::TARGETS {
            let dir = root.join(name);
            let mut seeds = 0;
            for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                let path = e.unwrap().path();
                run(&std::fs::read(&path).unwrap());
                seeds += 1;
            }
            assert!(seeds > 0, "no seeds for {name}");
        }
    }
}
