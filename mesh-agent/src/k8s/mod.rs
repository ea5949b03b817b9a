//! Kubernetes mode: the agent's [`NodeState`] from the API server instead of the workload file.
//!
//! One kube-rs watcher per resource (Namespaces, this node's Pods by `spec.nodeName`, other
//! nodes' Pods by `spec.nodeName!=`, Nodes, Services, EndpointSlices), each object trimmed to a few fields on arrival
//! ([`objects`]). Watchers relist by themselves after a dropped connection or a `410 Gone`; a
//! relist replaces a store only once complete (`InitDone`), so meshed pods stay meshed while the
//! API server is away. Changes are debounced (50 ms) and published; every second the state is
//! rebuilt anyway, which finds pod cgroups that appeared after their Pod object.
pub mod objects;
pub mod pod_cgroup;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{authz::istio, state::NodeState};
use objects::{Namespace, Node, Pod};

const DEBOUNCE: Duration = Duration::from_millis(50);
const RESYNC: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Namespaces,
    LocalPods,
    RemotePods,
    Nodes,
    Services,
    EndpointSlices,
    AuthorizationPolicies,
    PeerAuthentications,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Namespaces => "namespaces",
            Kind::LocalPods => "pods (this node)",
            Kind::RemotePods => "pods (other nodes)",
            Kind::Nodes => "nodes",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::AuthorizationPolicies => "authorizationpolicies.security.istio.io",
            Kind::PeerAuthentications => "peerauthentications.security.istio.io",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Obj {
    Namespace(Namespace),
    Pod(Box<Pod>),
    Node(Node),
    Service(objects::Service),
    Slice(objects::EndpointSlice),
    Policy(Box<istio::Translated>),
    PeerAuth(istio::PeerAuthentication),
}

enum Change {
    /// A complete listing: replaces the store of that kind. The keys in the set were listed
    /// but malformed: their previous version, if any, stays (a bad edit never loses an
    /// object's last good state, whether it arrives by a watch event or in a relist).
    Reset(Kind, HashMap<String, Obj>, HashSet<String>),
    Apply(Kind, String, Obj),
    Delete(Kind, String),
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn endpointslices() -> ApiResource {
    ApiResource {
        group: "discovery.k8s.io".into(),
        version: "v1".into(),
        api_version: "discovery.k8s.io/v1".into(),
        kind: "EndpointSlice".into(),
        plural: "endpointslices".into(),
    }
}

/// `namespace/name` or `name`: how an object is keyed in its store.
fn key_of(o: &DynamicObject) -> Option<String> {
    let name = o.metadata.name.as_deref()?;
    Some(match o.metadata.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    })
}

/// Trims an object of `kind`. `Ok(None)`: valid but not kept (a finished pod). `root` is
/// Istio's root namespace (its policies apply mesh-wide).
pub(crate) fn trim(kind: Kind, o: &DynamicObject, root: &str) -> Result<Option<Obj>, objects::ObjectError> {
    let v: Value = serde_json::to_value(o).map_err(|e| objects::ObjectError::Json(e.to_string()))?;
    match kind {
        Kind::Namespaces => Namespace::from_json(&v).map(|n| Some(Obj::Namespace(n))),
        Kind::LocalPods => Pod::from_json(&v).map(|p| p.map(|p| Obj::Pod(Box::new(p)))),
        // Other nodes' pods are never selected by this node's policies: their labels go.
        Kind::RemotePods => {
            Pod::from_json(&v).map(|p| p.map(|p| Obj::Pod(Box::new(Pod { all_labels: Default::default(), ..p }))))
        }
        Kind::Nodes => Node::from_json(&v).map(|n| Some(Obj::Node(n))),
        Kind::Services => objects::Service::from_json(&v).map(|s| Some(Obj::Service(s))),
        Kind::EndpointSlices => objects::EndpointSlice::from_json(&v).map(|s| Some(Obj::Slice(s))),
        Kind::AuthorizationPolicies => {
            let t = istio::authorization_policy(&v, root)?;
            announce(&t.report);
            Ok(Some(Obj::Policy(Box::new(t))))
        }
        Kind::PeerAuthentications => {
            let pa = istio::peer_authentication(&v)?;
            if pa.port_level {
                warn!(policy = %format_args!("{}/{}", pa.namespace, pa.name), "PeerAuthentication portLevelMtls is not supported: the workload's mode applies to every port");
            }
            Ok(Some(Obj::PeerAuth(pa)))
        }
    }
}

/// Says what became of a policy that is not simply enforced: loudly for one that is not
/// enforced at all.
fn announce(r: &istio::Report) {
    match r.status {
        istio::Status::NotEnforced => {
            warn!(policy = %r.policy, why = %r.warnings.join("; "), "AuthorizationPolicy NOT ENFORCED")
        }
        istio::Status::Malformed => {
            warn!(policy = %r.policy, why = %r.warnings.join("; "), "AuthorizationPolicy malformed: DENYING its workloads")
        }
        istio::Status::Ignored => {
            info!(policy = %r.policy, why = %r.warnings.join("; "), "AuthorizationPolicy not applied here")
        }
        istio::Status::Enforced if !r.warnings.is_empty() => {
            warn!(policy = %r.policy, warnings = %r.warnings.join("; "), "AuthorizationPolicy enforced at L4 only")
        }
        istio::Status::Enforced => {}
    }
}

/// Runs one watcher until `stop`, sending trimmed changes.
async fn watch_kind(
    api: Api<DynamicObject>,
    cfg: watcher::Config,
    kind: Kind,
    root: std::sync::Arc<str>,
    tx: mpsc::Sender<Change>,
) {
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let mut listing: Option<HashMap<String, Obj>> = None;
    let mut malformed = HashSet::new();
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                // The watcher backs off and relists by itself; say so once per outage.
                if !failing {
                    warn!(watch = kind.name(), error = %e, "watch failed; retrying with backoff, state kept");
                }
                failing = true;
                continue;
            }
        };
        let change = match ev {
            watcher::Event::Init => {
                listing = Some(HashMap::new());
                malformed.clear();
                continue;
            }
            watcher::Event::InitApply(o) => {
                if let (Some(l), Some(k)) = (listing.as_mut(), key_of(&o)) {
                    match trim(kind, &o, &root) {
                        Ok(Some(obj)) => {
                            l.insert(k, obj);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!(watch = kind.name(), object = %k, error = %e, "skipping malformed object; its last good version stays");
                            malformed.insert(k);
                        }
                    }
                }
                continue;
            }
            watcher::Event::InitDone => {
                let l = listing.take().unwrap_or_default();
                info!(watch = kind.name(), objects = l.len(), "watch synced");
                failing = false;
                Change::Reset(kind, l, std::mem::take(&mut malformed))
            }
            watcher::Event::Apply(o) => {
                let Some(k) = key_of(&o) else { continue };
                match trim(kind, &o, &root) {
                    Ok(Some(obj)) => Change::Apply(kind, k, obj),
                    Ok(None) => Change::Delete(kind, k),
                    Err(e) => {
                        warn!(watch = kind.name(), object = %k, error = %e, "skipping malformed object");
                        continue;
                    }
                }
            }
            watcher::Event::Delete(o) => {
                let Some(k) = key_of(&o) else { continue };
                Change::Delete(kind, k)
            }
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

#[derive(Default)]
struct Stores {
    namespaces: HashMap<String, Namespace>,
    local_pods: HashMap<String, Pod>,
    remote_pods: HashMap<String, Pod>,
    nodes: HashMap<String, Node>,
    services: HashMap<String, objects::Service>,
    slices: HashMap<String, objects::EndpointSlice>,
    policies: std::collections::BTreeMap<String, istio::Translated>,
    peer_auths: std::collections::BTreeMap<String, istio::PeerAuthentication>,
    synced: std::collections::HashSet<Kind>,
}

impl Stores {
    fn apply(&mut self, c: Change) {
        match c {
            Change::Reset(kind, objs, malformed) => {
                self.synced.insert(kind);
                let keep = |k: &String| malformed.contains(k);
                match kind {
                    Kind::Namespaces => self.namespaces.retain(|k, _| keep(k)),
                    Kind::LocalPods | Kind::RemotePods => self.pods_mut(kind).retain(|k, _| keep(k)),
                    Kind::Nodes => self.nodes.retain(|k, _| keep(k)),
                    Kind::Services => self.services.retain(|k, _| keep(k)),
                    Kind::EndpointSlices => self.slices.retain(|k, _| keep(k)),
                    Kind::AuthorizationPolicies => self.policies.retain(|k, _| keep(k)),
                    Kind::PeerAuthentications => self.peer_auths.retain(|k, _| keep(k)),
                }
                for (k, o) in objs {
                    self.insert(kind, k, o);
                }
            }
            Change::Apply(kind, k, o) => self.insert(kind, k, o),
            Change::Delete(kind, k) => {
                match kind {
                    Kind::Namespaces => self.namespaces.remove(&k).map(drop),
                    Kind::LocalPods | Kind::RemotePods => self.pods_mut(kind).remove(&k).map(drop),
                    Kind::Nodes => self.nodes.remove(&k).map(drop),
                    Kind::Services => self.services.remove(&k).map(drop),
                    Kind::EndpointSlices => self.slices.remove(&k).map(drop),
                    Kind::AuthorizationPolicies => self.policies.remove(&k).map(drop),
                    Kind::PeerAuthentications => self.peer_auths.remove(&k).map(drop),
                };
            }
        }
    }

    fn insert(&mut self, kind: Kind, k: String, o: Obj) {
        match o {
            Obj::Namespace(n) => {
                self.namespaces.insert(k, n);
            }
            Obj::Pod(p) => {
                self.pods_mut(kind).insert(k, *p);
            }
            Obj::Node(n) => {
                self.nodes.insert(k, n);
            }
            Obj::Service(s) => {
                self.services.insert(k, s);
            }
            Obj::Slice(s) => {
                self.slices.insert(k, s);
            }
            Obj::Policy(p) => {
                self.policies.insert(k, *p);
            }
            Obj::PeerAuth(p) => {
                self.peer_auths.insert(k, p);
            }
        }
    }

    fn pods_mut(&mut self, kind: Kind) -> &mut HashMap<String, Pod> {
        if kind == Kind::LocalPods { &mut self.local_pods } else { &mut self.remote_pods }
    }

    fn state(&self, node: &str, pod_root: &std::path::Path, root: &str) -> NodeState {
        // Local pods from the node-scoped watch win over a stale copy from the other one (they
        // come last, so they replace it). Nothing is cloned but what the state keeps.
        let pods =
            self.remote_pods.values().filter(|p| p.node.as_deref() != Some(node)).chain(self.local_pods.values());
        let mut state = objects::node_state(node, &self.namespaces, pods, &self.nodes, pod_root);
        let slices: Vec<&objects::EndpointSlice> = self.slices.values().collect();
        state.services = objects::service_table(self.services.values(), &slices);
        state.authz = self.policies.values().filter_map(|t| t.rule.clone()).collect();
        state.authz_reports = self.policies.values().map(|t| t.report.clone()).collect();
        let peer_auths: Vec<istio::PeerAuthentication> = self.peer_auths.values().cloned().collect();
        state.apply_policies(&peer_auths, root);
        state
    }
}

/// Istio's security resources, at the version the API server serves (`v1` since Istio 1.22,
/// else `v1beta1`: the same objects). `None`: their CRDs are not installed.
async fn istio_security(client: &Client) -> Option<[ApiResource; 2]> {
    for version in ["v1", "v1beta1"] {
        let gv = format!("security.istio.io/{version}");
        let Ok(list) = client.list_api_group_resources(&gv).await else { continue };
        let served = |plural: &str| list.resources.iter().any(|r| r.name == plural);
        if served("authorizationpolicies") && served("peerauthentications") {
            let res = |kind: &str, plural: &str| ApiResource {
                group: "security.istio.io".into(),
                version: version.into(),
                api_version: gv.clone(),
                kind: kind.into(),
                plural: plural.into(),
            };
            return Some([
                res("AuthorizationPolicy", "authorizationpolicies"),
                res("PeerAuthentication", "peerauthentications"),
            ]);
        }
    }
    None
}

/// How often the agent looks again for Istio's security CRDs while they are absent.
const CRD_RECHECK: Duration = Duration::from_secs(30);

/// Watches AuthorizationPolicies and PeerAuthentications once their CRDs exist: at once if
/// they do, else after they are installed (looked for every [`CRD_RECHECK`]). Says clearly
/// while they are absent that nothing is enforced.
async fn watch_istio(client: Client, root: std::sync::Arc<str>, tx: mpsc::Sender<Change>, stop: CancellationToken) {
    let mut said = false;
    let resources = loop {
        if let Some(r) = istio_security(&client).await {
            break r;
        }
        if !said {
            warn!(
                "Istio's security CRDs (authorizationpolicies, peerauthentications.security.istio.io) are not installed: no AuthorizationPolicy or PeerAuthentication is enforced. Install them with Istio's base chart (see the README); the agent picks them up within {} s",
                CRD_RECHECK.as_secs()
            );
            said = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CRD_RECHECK) => {}
        }
    };
    info!(version = %resources[0].version, "watching Istio's AuthorizationPolicies and PeerAuthentications");
    let [ap, pa] = resources;
    let kinds = [(ap, Kind::AuthorizationPolicies), (pa, Kind::PeerAuthentications)];
    let tasks: Vec<_> = kinds
        .into_iter()
        .map(|(res, kind)| {
            let api = Api::<DynamicObject>::all_with(client.clone(), &res);
            tokio::spawn(watch_kind(api, watcher::Config::default().any_semantic(), kind, root.clone(), tx.clone()))
        })
        .collect();
    stop.cancelled().await;
    for t in tasks {
        t.abort();
    }
}

/// Watches the cluster and publishes this node's view into `tx` until `stop`. `root` is
/// Istio's root namespace: its policies apply to the whole mesh.
pub async fn run(
    client: Client,
    node: String,
    pod_root: PathBuf,
    root: String,
    tx: watch::Sender<NodeState>,
    stop: CancellationToken,
) {
    let (ctx, mut crx) = mpsc::channel(4096);
    let root: std::sync::Arc<str> = root.into();
    // Before the first publication: if the CRDs exist, nothing is published before the
    // policies are listed (a pod must not be reachable without them for a moment).
    let istio_installed = istio_security(&client).await.is_some();
    let istio = tokio::spawn(watch_istio(client.clone(), root.clone(), ctx.clone(), stop.child_token()));
    let ns_api = Api::<DynamicObject>::all_with(client.clone(), &resource("Namespace", "namespaces"));
    let pod_api = Api::<DynamicObject>::all_with(client.clone(), &resource("Pod", "pods"));
    let node_api = Api::<DynamicObject>::all_with(client.clone(), &resource("Node", "nodes"));
    let svc_api = Api::<DynamicObject>::all_with(client.clone(), &resource("Service", "services"));
    let slice_api = Api::<DynamicObject>::all_with(client, &endpointslices());
    let watches = [
        (ns_api, watcher::Config::default(), Kind::Namespaces),
        (pod_api.clone(), watcher::Config::default().fields(&format!("spec.nodeName={node}")), Kind::LocalPods),
        (pod_api, watcher::Config::default().fields(&format!("spec.nodeName!={node}")), Kind::RemotePods),
        (node_api, watcher::Config::default(), Kind::Nodes),
        (svc_api, watcher::Config::default(), Kind::Services),
        // Only slices managed for Services (not mirrored or custom ones without a Service).
        (slice_api, watcher::Config::default().labels("kubernetes.io/service-name"), Kind::EndpointSlices),
    ];
    let mut tasks = vec![istio];
    for (api, cfg, kind) in watches {
        tasks.push(tokio::spawn(watch_kind(api, cfg.any_semantic(), kind, root.clone(), ctx.clone())));
    }
    drop(ctx);
    let mut stores = Stores::default();
    let mut tick = tokio::time::interval(RESYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announced = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            c = crx.recv() => {
                let Some(c) = c else { break };
                stores.apply(c);
                // Debounce: take whatever else arrives shortly after, then publish once.
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(c) = crx.try_recv() {
                    stores.apply(c);
                }
            }
            _ = tick.tick() => {}
        }
        // Nothing is published before namespaces and this node's pods are listed (a half
        // picture would unmesh pods), nor before the policies when Istio's CRDs exist.
        let needed = [Kind::Namespaces, Kind::LocalPods, Kind::AuthorizationPolicies, Kind::PeerAuthentications];
        if !needed.iter().take(if istio_installed { 4 } else { 2 }).all(|k| stores.synced.contains(k)) {
            continue;
        }
        if !announced {
            info!(
                namespaces = stores.namespaces.len(),
                local_pods = stores.local_pods.len(),
                "Kubernetes state synced"
            );
            announced = true;
        }
        let state = stores.state(&node, &pod_root, &root);
        tx.send_if_modified(|old| {
            let changed = *old != state;
            if changed {
                *old = state;
            }
            changed
        });
    }
    for t in tasks {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    //! kube-rs against `tower_test::mock`: the requests the watcher makes and what the agent
    //! makes of the answers (trimming, skipping malformed objects, relisting after 410 Gone).
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    use super::*;

    fn pod(name: &str, node: &str, rv: u64) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "resourceVersion": rv.to_string()},
               "spec": {"nodeName": node}, "status": {"phase": "Running", "podIP": "10.244.1.9"}})
    }

    /// A kube client whose requests the test answers through the handle.
    fn mock_api() -> (Client, tower_test::mock::Handle<Request<Body>, Response<Body>>) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(svc, "default"), handle)
    }

    async fn body_of(resp: Value) -> Response<Body> {
        Response::builder().body(Body::from(serde_json::to_vec(&resp).unwrap())).unwrap()
    }

    #[tokio::test]
    async fn watcher_requests_are_node_scoped_malformed_objects_skipped_and_410_relists() {
        let (client, mut handle) = mock_api();
        let api = Api::<DynamicObject>::all_with(client, &resource("Pod", "pods"));
        let (tx, mut rx) = mpsc::channel(16);
        let cfg = watcher::Config::default().fields("spec.nodeName=n1").any_semantic();
        let task = tokio::spawn(watch_kind(api, cfg, Kind::LocalPods, "istio-system".into(), tx));

        // 1. LIST, node-scoped; one good pod and one malformed.
        let (req, send) = handle.next_request().await.expect("list");
        let uri = req.uri().to_string();
        assert!(uri.starts_with("/api/v1/pods?"), "{uri}");
        assert!(uri.contains("fieldSelector=spec.nodeName%3Dn1"), "{uri}");
        assert!(!uri.contains("watch=true"), "{uri}");
        let mut bad = pod("bad", "n1", 5);
        bad["spec"] = json!("oops");
        send.send_response(
            body_of(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"},
                           "items": [pod("a", "n1", 5), bad]}))
            .await,
        );
        match rx.recv().await.unwrap() {
            Change::Reset(Kind::LocalPods, objs, bad) => {
                assert_eq!(objs.len(), 1, "the malformed pod is skipped");
                assert!(objs.contains_key("shop/a"));
                assert_eq!(bad, HashSet::from(["shop/bad".to_string()]), "and named, so a good version would stay");
            }
            _ => panic!("expected a reset"),
        }

        // 2. WATCH from the list's version: an update, then 410 Gone.
        let (req, send) = handle.next_request().await.expect("watch");
        let uri = req.uri().to_string();
        assert!(uri.contains("watch=true") && uri.contains("resourceVersion=10"), "{uri}");
        assert!(uri.contains("allowWatchBookmarks=true"), "{uri}");
        let lines = [
            json!({"type": "ADDED", "object": pod("b", "n1", 11)}).to_string(),
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "Expired", "code": 410, "message": "too old resource version"}})
            .to_string(),
        ]
        .join("\n");
        send.send_response(Response::builder().body(Body::from(lines.into_bytes())).unwrap());
        match rx.recv().await.unwrap() {
            Change::Apply(Kind::LocalPods, k, Obj::Pod(p)) => {
                assert_eq!((k.as_str(), p.uid.as_str()), ("shop/b", "uid-b"))
            }
            _ => panic!("expected an apply"),
        }

        // 3. After 410 the watcher lists again, and the new listing replaces the store.
        let (req, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request())
            .await
            .expect("relist after 410")
            .expect("relist");
        assert!(!req.uri().to_string().contains("watch=true"), "{}", req.uri());
        send.send_response(
            body_of(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "20"},
                           "items": [pod("b", "n1", 11)]}))
            .await,
        );
        match rx.recv().await.unwrap() {
            Change::Reset(Kind::LocalPods, objs, bad) => {
                assert_eq!(objs.keys().collect::<Vec<_>>(), vec!["shop/b"]);
                assert!(bad.is_empty());
            }
            _ => panic!("expected a reset after relisting"),
        }
        task.abort();
    }

    /// Services and EndpointSlices: the slice watch asks only for slices managed for a Service
    /// (label selector); a bookmark moves the watch on without a change; a Service update with
    /// an invalid policy annotation is skipped (the good version stays), a valid one applies.
    #[tokio::test]
    async fn service_and_slice_watches_select_skip_bad_policies_and_follow_bookmarks() {
        let (client, mut handle) = mock_api();
        let service = |rv: u64, timeout: &str| {
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "web", "namespace": "shop", "resourceVersion": rv.to_string(),
                                "annotations": {"switchyard.io/timeout": timeout}},
                   "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}})
        };
        let (tx, mut rx) = mpsc::channel(16);
        let api = Api::<DynamicObject>::all_with(client, &resource("Service", "services"));
        let task = tokio::spawn(watch_kind(
            api,
            watcher::Config::default().any_semantic(),
            Kind::Services,
            "istio-system".into(),
            tx,
        ));
        let (req, send) = handle.next_request().await.expect("list services");
        assert!(req.uri().to_string().starts_with("/api/v1/services?"), "{}", req.uri());
        send.send_response(
            body_of(json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "5"},
                           "items": [service(5, "2s")]}))
            .await,
        );
        match rx.recv().await.unwrap() {
            Change::Reset(Kind::Services, objs, bad) => {
                let Some(Obj::Service(s)) = objs.get("shop/web") else { panic!("no shop/web") };
                assert_eq!(s.policy.timeout, Some(Duration::from_secs(2)));
                assert!(bad.is_empty());
            }
            _ => panic!("expected a reset"),
        }
        let (req, send) = handle.next_request().await.expect("watch services");
        assert!(req.uri().to_string().contains("watch=true"), "{}", req.uri());
        let lines = [
            json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"resourceVersion": "6"}}})
            .to_string(),
            json!({"type": "MODIFIED", "object": service(7, "soon")}).to_string(),
            json!({"type": "MODIFIED", "object": service(8, "500ms")}).to_string(),
        ]
        .join("\n");
        send.send_response(Response::builder().body(Body::from(lines.into_bytes())).unwrap());
        // The bookmark and the bad update produce nothing; the next change is the good one.
        match rx.recv().await.unwrap() {
            Change::Apply(Kind::Services, k, Obj::Service(s)) => {
                assert_eq!(k, "shop/web");
                assert_eq!(s.policy.timeout, Some(Duration::from_millis(500)));
            }
            _ => panic!("expected the valid update"),
        }
        task.abort();

        let (client, mut handle) = mock_api();
        let (tx, mut rx) = mpsc::channel(16);
        let api = Api::<DynamicObject>::all_with(client, &endpointslices());
        let cfg = watcher::Config::default().labels("kubernetes.io/service-name").any_semantic();
        let task = tokio::spawn(watch_kind(api, cfg, Kind::EndpointSlices, "istio-system".into(), tx));
        let (req, send) = handle.next_request().await.expect("list slices");
        let uri = req.uri().to_string();
        assert!(uri.starts_with("/apis/discovery.k8s.io/v1/endpointslices?"), "{uri}");
        assert!(uri.contains("labelSelector=kubernetes.io%2Fservice-name"), "{uri}");
        send.send_response(
            body_of(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                           "metadata": {"resourceVersion": "9"},
                           "items": [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                                      "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "9",
                                                   "labels": {"kubernetes.io/service-name": "web"}},
                                      "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                                      "endpoints": [{"addresses": ["10.244.1.5"]},
                                                    {"addresses": ["10.244.1.6"], "conditions": {"ready": false}}]}]}))
            .await,
        );
        match rx.recv().await.unwrap() {
            Change::Reset(Kind::EndpointSlices, objs, _) => {
                let Some(Obj::Slice(sl)) = objs.get("shop/web-1") else { panic!("no slice") };
                assert_eq!(sl.service, "shop/web");
                assert_eq!(sl.ready, vec![std::net::Ipv4Addr::new(10, 244, 1, 5)], "only ready endpoints");
            }
            _ => panic!("expected a reset"),
        }
        task.abort();
    }

    /// The policy watches: the API's v1 path, a listing of an enforced, a malformed and a
    /// waypoint policy (each kept, with what became of it), then PeerAuthentications; the
    /// store turns them into rules, reports and strict pods.
    #[tokio::test]
    async fn istio_policy_watches_list_translate_and_reach_the_state() {
        let (client, mut handle) = mock_api();
        let (tx, mut rx) = mpsc::channel(16);
        let res = |kind: &str, plural: &str| ApiResource {
            group: "security.istio.io".into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api = Api::<DynamicObject>::all_with(client, &res("AuthorizationPolicy", "authorizationpolicies"));
        let cfg = watcher::Config::default().any_semantic();
        let task =
            tokio::spawn(watch_kind(api, cfg.clone(), Kind::AuthorizationPolicies, "istio-system".into(), tx.clone()));
        let (req, send) = handle.next_request().await.expect("list policies");
        let uri = req.uri().to_string();
        assert!(uri.starts_with("/apis/security.istio.io/v1/authorizationpolicies?"), "{uri}");
        let ap = |name: &str, spec: Value| {
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": name, "namespace": "shop", "resourceVersion": "3"}, "spec": spec})
        };
        send.send_response(
            body_of(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicyList",
                           "metadata": {"resourceVersion": "3"},
                           "items": [ap("db", json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]})),
                                     ap("bad", json!({"action": "SOMETIMES"})),
                                     ap("wp", json!({"targetRefs": [{"kind": "Service", "name": "db"}]}))]}))
            .await,
        );
        let mut stores = Stores::default();
        match rx.recv().await.unwrap() {
            c @ Change::Reset(Kind::AuthorizationPolicies, ..) => stores.apply(c),
            _ => panic!("expected a reset"),
        }
        task.abort();
        let (client, mut handle) = mock_api();
        let api = Api::<DynamicObject>::all_with(client, &res("PeerAuthentication", "peerauthentications"));
        let task = tokio::spawn(watch_kind(api, cfg, Kind::PeerAuthentications, "istio-system".into(), tx));
        let (_, send) = handle.next_request().await.expect("list peer authentications");
        send.send_response(
            body_of(json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthenticationList",
                           "metadata": {"resourceVersion": "4"},
                           "items": [{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                                      "metadata": {"name": "default", "namespace": "istio-system", "resourceVersion": "4"},
                                      "spec": {"mtls": {"mode": "STRICT"}}}]}))
            .await,
        );
        match rx.recv().await.unwrap() {
            c @ Change::Reset(Kind::PeerAuthentications, ..) => stores.apply(c),
            _ => panic!("expected a reset"),
        }
        task.abort();
        let mut web = Pod::from_json(&pod("web", "n1", 1)).unwrap().unwrap();
        web.all_labels = [("app".to_string(), "web".to_string())].into();
        stores.local_pods.insert("shop/web".into(), web);
        stores.namespaces.insert(
            "shop".into(),
            Namespace::from_json(
                &json!({"metadata": {"name": "shop", "annotations": {"switchyard.io/mesh": "enabled"}}}),
            )
            .unwrap(),
        );
        let state = stores.state("n1", std::path::Path::new("/nonexistent"), "istio-system");
        let names: Vec<&str> = state.authz.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["shop/bad", "shop/db"], "the waypoint policy is not applied");
        let status = |p: &str| state.authz_reports.iter().find(|r| r.policy == p).map(|r| r.status.clone());
        assert_eq!(status("shop/bad"), Some(istio::Status::Malformed));
        assert_eq!(status("shop/wp"), Some(istio::Status::Ignored));
        assert_eq!(state.pods["shop/web"].mtls_mode, crate::state::MtlsMode::Strict, "mesh-wide STRICT");
    }

    #[test]
    fn stores_keep_local_pods_authoritative_and_resets_replace() {
        let mut s = Stores::default();
        let p = |name: &str, node: &str| Pod::from_json(&pod(name, node, 1)).unwrap().unwrap();
        s.apply(Change::Reset(
            Kind::RemotePods,
            [("shop/x".to_string(), Obj::Pod(Box::new(p("x", "n1"))))].into(),
            HashSet::new(),
        ));
        s.apply(Change::Reset(
            Kind::LocalPods,
            [("shop/a".to_string(), Obj::Pod(Box::new(p("a", "n1"))))].into(),
            HashSet::new(),
        ));
        let st = s.state("n1", std::path::Path::new("/nonexistent"), "istio-system");
        assert!(st.pods.contains_key("shop/a"));
        assert!(!st.pods.contains_key("shop/x"), "a stale copy from the other-nodes watch is ignored");
        s.apply(Change::Delete(Kind::LocalPods, "shop/a".into()));
        assert!(s.state("n1", std::path::Path::new("/nonexistent"), "istio-system").pods.is_empty());
    }

    /// A relist (after 410 Gone, an API restart) that brings a malformed version of an object
    /// keeps its last good version, as a malformed watch event does; the rest is replaced.
    #[test]
    fn a_relist_keeps_the_last_good_version_of_a_malformed_object() {
        let mut s = Stores::default();
        let p = |name: &str| Pod::from_json(&pod(name, "n1", 1)).unwrap().unwrap();
        let listing = |names: &[&str]| -> HashMap<String, Obj> {
            names.iter().map(|n| (format!("shop/{n}"), Obj::Pod(Box::new(p(n))))).collect()
        };
        s.apply(Change::Reset(Kind::LocalPods, listing(&["a", "b", "c"]), HashSet::new()));
        // Relisted: a is fine, b is now malformed, c is gone.
        s.apply(Change::Reset(Kind::LocalPods, listing(&["a"]), HashSet::from(["shop/b".to_string()])));
        let mut keys: Vec<&String> = s.local_pods.keys().collect();
        keys.sort();
        assert_eq!(keys, vec!["shop/a", "shop/b"]);
    }
}
