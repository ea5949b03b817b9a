//! A small fake Kubernetes API server for end-to-end tests: LIST and WATCH over HTTP/1.1 on
//! loopback (inside a node's network namespace), for Namespaces, Pods, Nodes, Services and
//! EndpointSlices, with resourceVersions, field and label selectors, paginated lists, bookmarks
//! and `410 Gone`,
//! driven by the test (apply, delete, compact, stop, start, raw malformed objects).
//!
//! It also issues projected ServiceAccount tokens ([`FakeApi::token`]: JWTs signed with a key of
//! its own) and answers TokenReviews for them as the real one does (signature, expiry,
//! `spec.audiences`, the bound pod still existing with that uid; `status.user.extra` naming the
//! pod), and serves get and server-side-apply patch of ConfigMaps. Istio's AuthorizationPolicies
//! and PeerAuthentications (`security.istio.io/v1`) are served, and discovered, only once the
//! test installs their CRDs ([`FakeApi::install_istio_crds`]).
//!
//! Plain threads and hand-written HTTP: the agent's real `kube::Client` is what is under test,
//! not this server.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// Resource types served: (plural, kind, API path prefix).
const RESOURCES: [(&str, &str, &str); 7] = [
    ("namespaces", "Namespace", "/api/v1"),
    ("pods", "Pod", "/api/v1"),
    ("nodes", "Node", "/api/v1"),
    ("services", "Service", "/api/v1"),
    ("endpointslices", "EndpointSlice", "/apis/discovery.k8s.io/v1"),
    ("authorizationpolicies", "AuthorizationPolicy", ISTIO_SECURITY),
    ("peerauthentications", "PeerAuthentication", ISTIO_SECURITY),
];
const ISTIO_SECURITY: &str = "/apis/security.istio.io/v1";

#[derive(Default)]
struct Store {
    rv: u64,
    /// plural → key → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (rv, plural, event type, object).
    log: Vec<(u64, String, &'static str, Value)>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    compacted_below: u64,
    /// Bumped to end every open watch.
    generation: u64,
    /// Requests served, by plural and verb ("list"/"watch"): what the agent asked for.
    requests: Vec<String>,
    /// Istio's security CRDs are installed: their resources are discovered and served.
    istio_crds: bool,
}

struct Shared {
    /// Signs the tokens it issues.
    token_key: ring::hmac::Key,
    store: Mutex<Store>,
    changed: Condvar,
    down: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// The running fake API server.
pub struct FakeApi {
    shared: Arc<Shared>,
    netns: String,
    pub addr: SocketAddr,
    listener: Option<std::thread::JoinHandle<()>>,
}

fn key_of(obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

impl FakeApi {
    /// Starts serving on 127.0.0.1 (an ephemeral port) inside network namespace `netns`.
    pub fn start(netns: &str) -> Result<FakeApi> {
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        let shared = Arc::new(Shared {
            token_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            store: Mutex::new(Store { rv: 1000, ..Default::default() }),
            changed: Condvar::new(),
            down: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let listener = crate::in_netns(netns, || TcpListener::bind("127.0.0.1:0"))??;
        let addr = listener.local_addr()?;
        let mut api = FakeApi { shared, netns: netns.to_string(), addr, listener: None };
        api.serve(listener)?;
        Ok(api)
    }

    fn serve(&mut self, listener: TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let shared = self.shared.clone();
        shared.down.store(false, Ordering::SeqCst);
        self.listener = Some(std::thread::spawn(move || {
            while !shared.down.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        if let Ok(c) = s.try_clone() {
                            shared.conns.lock().unwrap().push(c);
                        }
                        let shared = shared.clone();
                        std::thread::spawn(move || {
                            let _ = serve_conn(&shared, s);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
        Ok(())
    }

    /// Installs Istio's security CRDs: `security.istio.io/v1` is discovered and served from
    /// now on (before, it is 404, as on a cluster without Istio's base chart).
    pub fn install_istio_crds(&self) {
        self.shared.store.lock().unwrap().istio_crds = true;
    }

    /// A kubeconfig file pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self, path: &std::path::Path) -> Result<()> {
        let cfg = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, cfg).with_context(|| format!("write {}", path.display()))
    }

    /// Creates or replaces an object (`plural` as in the URL); returns its resourceVersion.
    pub fn apply(&self, plural: &str, mut obj: Value) -> u64 {
        let mut st = self.shared.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let key = key_of(&obj);
        let existed = st.objects.get(plural).is_some_and(|m| m.contains_key(&key));
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            m.entry("uid").or_insert_with(|| json!(format!("uid-{}", key.replace('/', "-"))));
        }
        st.objects.entry(plural.into()).or_default().insert(key, obj.clone());
        st.log.push((rv, plural.into(), if existed { "MODIFIED" } else { "ADDED" }, obj));
        self.shared.changed.notify_all();
        rv
    }

    pub fn delete(&self, plural: &str, key: &str) {
        let mut st = self.shared.store.lock().unwrap();
        let Some(mut obj) = st.objects.get_mut(plural).and_then(|m| m.remove(key)) else { return };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.log.push((rv, plural.into(), "DELETED", obj));
        self.shared.changed.notify_all();
    }

    /// Forgets history: every open watch ends, and resuming from any earlier resourceVersion is
    /// answered with `410 Gone` (as after etcd compaction), forcing clients to relist.
    pub fn compact(&self) {
        let mut st = self.shared.store.lock().unwrap();
        st.compacted_below = st.rv + 1;
        st.log.clear();
        st.generation += 1;
        self.shared.changed.notify_all();
    }

    /// Kills the server: the listener closes and every connection is cut.
    pub fn stop(&mut self) {
        self.shared.down.store(true, Ordering::SeqCst);
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        let mut st = self.shared.store.lock().unwrap();
        st.generation += 1;
        self.shared.changed.notify_all();
    }

    /// Starts serving again on the same address, with the same objects.
    pub fn restart(&mut self) -> Result<()> {
        let addr = self.addr;
        let listener = crate::in_netns(&self.netns, || TcpListener::bind(addr))??;
        self.serve(listener)
    }

    /// A projected ServiceAccount token, as the kubelet mounts one: for `namespace/sa`, bound to
    /// `pod` (name, uid) when given, for `audiences`, expiring in `expires_in` (negative:
    /// already expired).
    pub fn token(
        &self,
        namespace: &str,
        sa: &str,
        pod: Option<(&str, &str)>,
        audiences: &[&str],
        expires_in: i64,
    ) -> String {
        sign_token(&self.shared.token_key, namespace, sa, pod, audiences, expires_in)
    }

    /// The same, signed with a key this server does not know (a forgery).
    pub fn forged_token(namespace: &str, sa: &str, pod: Option<(&str, &str)>, audiences: &[&str]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"not the API server's key");
        sign_token(&key, namespace, sa, pod, audiences, 3600)
    }

    /// An object as stored (`plural`, `namespace/name`).
    pub fn get(&self, plural: &str, key: &str) -> Option<Value> {
        self.shared.store.lock().unwrap().objects.get(plural).and_then(|m| m.get(key)).cloned()
    }

    /// The requests served so far, e.g. "watch pods fieldSelector=spec.nodeName=node".
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let method = line.split_whitespace().next().context("bad request line")?.to_string();
    let target = line.split_whitespace().nth(1).context("bad request line")?.to_string();
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().context("bad content-length")?;
        }
    }
    let mut body = vec![0u8; length];
    std::io::Read::read_exact(r, &mut body)?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect();
    Ok(Some(Request { method, path: path.to_string(), query, body }))
}

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn sign_token(
    key: &ring::hmac::Key,
    namespace: &str,
    sa: &str,
    pod: Option<(&str, &str)>,
    audiences: &[&str],
    expires_in: i64,
) -> String {
    let mut k8s =
        json!({"namespace": namespace, "serviceaccount": {"name": sa, "uid": format!("sa-{namespace}-{sa}")}});
    if let Some((name, uid)) = pod {
        k8s["pod"] = json!({"name": name, "uid": uid});
    }
    let claims = json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{namespace}:{sa}"),
        "aud": audiences,
        "exp": now_secs() + expires_in,
        "iat": now_secs(),
        "kubernetes.io": k8s,
    });
    let signing_input = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims.to_string().as_bytes()));
    let sig = ring::hmac::sign(key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64(sig.as_ref()))
}

/// The claims of a token this server signed, if the signature verifies.
fn verify_token(key: &ring::hmac::Key, token: &str) -> Option<Value> {
    use base64::Engine as _;
    let (input, sig) = token.rsplit_once('.')?;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).ok()?;
    ring::hmac::verify(key, input.as_bytes(), &sig).ok()?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(input.split_once('.')?.1).ok()?;
    serde_json::from_slice(&payload).ok()
}

/// The answer to a TokenReview, as the real API server gives it.
fn review(shared: &Shared, body: &Value) -> Value {
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    // The API server's own audience when the review names none.
    let wanted: Vec<String> = match body["spec"]["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        _ => vec!["https://kubernetes.default.svc.cluster.local".into()],
    };
    let fail = |error: &str| {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": body["spec"],
               "status": {"authenticated": false, "error": error, "user": {}}})
    };
    let Some(claims) = verify_token(&shared.token_key, token) else { return fail("invalid bearer token") };
    if claims["exp"].as_i64().unwrap_or(0) <= now_secs() {
        return fail("invalid bearer token, token has expired");
    }
    let has: Vec<String> =
        claims["aud"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
    let granted: Vec<&String> = wanted.iter().filter(|a| has.contains(a)).collect();
    if granted.is_empty() {
        return fail("token audiences are invalid for the target audiences");
    }
    let k8s = &claims["kubernetes.io"];
    let (ns, sa) =
        (k8s["namespace"].as_str().unwrap_or_default(), k8s["serviceaccount"]["name"].as_str().unwrap_or_default());
    let mut extra = json!({});
    if let (Some(name), Some(uid)) = (k8s["pod"]["name"].as_str(), k8s["pod"]["uid"].as_str()) {
        // A bound token dies with its pod.
        let st = shared.store.lock().unwrap();
        let live = st
            .objects
            .get("pods")
            .and_then(|m| m.get(&format!("{ns}/{name}")))
            .is_some_and(|p| p["metadata"]["uid"] == uid);
        if !live {
            return fail("invalid bearer token, the pod it is bound to no longer exists");
        }
        extra = json!({"authentication.kubernetes.io/pod-name": [name], "authentication.kubernetes.io/pod-uid": [uid]});
    }
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": body["spec"],
           "status": {"authenticated": true, "audiences": granted,
                      "user": {"username": format!("system:serviceaccount:{ns}:{sa}"),
                               "uid": format!("sa-{ns}-{sa}"),
                               "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                               "extra": extra}}})
}

/// TokenReviews and ConfigMaps (get, server-side apply); `None` for the list/watch paths.
fn serve_other(shared: &Shared, req: &Request) -> Option<(u16, Value)> {
    if req.path.starts_with("/apis/security.istio.io") {
        let st = shared.store.lock().unwrap();
        let not_found =
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"});
        if !st.istio_crds {
            return Some((404, not_found));
        }
        if req.path == ISTIO_SECURITY {
            let res = |name: &str, kind: &str| {
                json!({"name": name, "singularName": "", "namespaced": true, "kind": kind,
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]})
            };
            return Some((
                200,
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "security.istio.io/v1",
                       "resources": [res("authorizationpolicies", "AuthorizationPolicy"),
                                     res("peerauthentications", "PeerAuthentication")]}),
            ));
        }
        if !RESOURCES.iter().any(|(p, _, prefix)| req.path == format!("{prefix}/{p}")) {
            return Some((404, not_found));
        }
        // The resources themselves: served as the others.
        return None;
    }
    if req.method == "POST" && req.path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        shared.store.lock().unwrap().requests.push("create tokenreviews".into());
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        return Some((201, review(shared, &body)));
    }
    let rest = req.path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once('/')?;
    let name = rest.strip_prefix("configmaps/")?;
    let key = format!("{ns}/{name}");
    let mut st = shared.store.lock().unwrap();
    st.requests.push(format!("{} configmaps {key}", req.method.to_lowercase()));
    match req.method.as_str() {
        "GET" => match st.objects.get("configmaps").and_then(|m| m.get(&key)) {
            Some(o) => Some((200, o.clone())),
            None => Some((
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}),
            )),
        },
        "PATCH" => {
            // Server-side apply of a whole object: stored as sent.
            let Ok(mut obj) = serde_json::from_slice::<Value>(&req.body) else {
                return Some((400, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 400})));
            };
            st.rv += 1;
            obj["metadata"]["namespace"] = json!(ns);
            obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.entry("configmaps".into()).or_default().insert(key, obj.clone());
            Some((200, obj))
        }
        _ => Some((405, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 405}))),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=b,c!=d` over a JSON object: field paths like `spec.nodeName`, `metadata.name`.
fn fields_match(sel: &str, obj: &Value) -> bool {
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (path, want, neg) = match term.split_once("!=") {
            Some((p, v)) => (p, v, true),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((p, v)) => (p, v, false),
                None => return true,
            },
        };
        let got = path.split('.').try_fold(obj, |v, k| v.get(k)).and_then(Value::as_str).unwrap_or("");
        (got == want) != neg
    })
}

/// `k=v`, `k!=v`, `k` (exists), `!k` over metadata.labels.
fn labels_match(sel: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k].as_str() == Some(v)
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else {
            labels.get(term).is_some()
        }
    })
}

fn respond(s: &mut TcpStream, code: u16, body: &Value) -> Result<()> {
    let b = body.to_string();
    write!(s, "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())?;
    Ok(())
}

fn chunk(s: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let b = format!("{line}\n");
    write!(s, "{:x}\r\n{b}\r\n", b.len())?;
    s.flush()
}

fn serve_conn(shared: &Shared, s: TcpStream) -> Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    while let Some(req) = read_request(&mut r)? {
        if let Some((code, body)) = serve_other(shared, &req) {
            respond(&mut w, code, &body)?;
            continue;
        }
        let Some((plural, kind, _)) = RESOURCES.iter().find(|(p, _, prefix)| req.path == format!("{prefix}/{p}"))
        else {
            respond(&mut w, 404, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}))?;
            continue;
        };
        let fields = req.query.get("fieldSelector").cloned().unwrap_or_default();
        let labels = req.query.get("labelSelector").cloned().unwrap_or_default();
        let matches = |o: &Value| fields_match(&fields, o) && labels_match(&labels, o);
        let watch = matches!(req.query.get("watch").map(String::as_str), Some("true" | "1"));
        shared.store.lock().unwrap().requests.push(format!(
            "{} {plural} fieldSelector={fields} labelSelector={labels}",
            if watch { "watch" } else { "list" }
        ));
        if !watch {
            // Paginated as the real API server does when the client sends `limit` (kube-rs asks
            // for pages of 500): `continue` is the offset of the next page.
            let st = shared.store.lock().unwrap();
            let limit: usize =
                req.query.get("limit").and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or(usize::MAX);
            let offset: usize = req.query.get("continue").and_then(|v| v.parse().ok()).unwrap_or(0);
            let all: Vec<&Value> =
                st.objects.get(*plural).into_iter().flat_map(|m| m.values()).filter(|o| matches(o)).collect();
            let page: Vec<Value> = all.iter().skip(offset).take(limit).map(|o| (*o).clone()).collect();
            let mut meta = json!({"resourceVersion": st.rv.to_string()});
            if offset.saturating_add(limit) < all.len() {
                meta["continue"] = json!((offset + limit).to_string());
            }
            let body = json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": meta, "items": page});
            drop(st);
            respond(&mut w, 200, &body)?;
            continue;
        }
        // WATCH: chunked stream of events after the given resourceVersion.
        let from: u64 = req.query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let bookmarks = req.query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = Duration::from_secs(req.query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
        write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")?;
        let deadline = Instant::now() + timeout;
        let mut st = shared.store.lock().unwrap();
        if from != 0 && from < st.compacted_below {
            let message = format!("too old resource version: {from} ({})", st.compacted_below);
            drop(st);
            chunk(
                &mut w,
                &json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "status": "Failure", "reason": "Expired", "code": 410, "message": message}}),
            )?;
            write!(w, "0\r\n\r\n")?;
            continue;
        }
        let generation = st.generation;
        let mut sent = from;
        let mut last_bookmark = Instant::now();
        loop {
            let events: Vec<Value> = st
                .log
                .iter()
                .filter(|(rv, p, _, o)| *rv > sent && p == plural && matches(o))
                .map(|(_, _, t, o)| json!({"type": t, "object": o}))
                .collect();
            let head = st.rv;
            if st.generation != generation || shared.down.load(Ordering::SeqCst) || Instant::now() >= deadline {
                drop(st);
                break;
            }
            drop(st);
            for e in &events {
                chunk(&mut w, e)?;
            }
            sent = head;
            if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
                chunk(
                    &mut w,
                    &json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1",
                    "metadata": {"resourceVersion": head.to_string()}}}),
                )?;
                last_bookmark = Instant::now();
            }
            st = shared.store.lock().unwrap();
            if st.rv == sent {
                st = shared.changed.wait_timeout(st, Duration::from_millis(500)).unwrap().0;
            }
        }
        write!(w, "0\r\n\r\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let pod = json!({"metadata": {"name": "a", "labels": {"app": "web"}}, "spec": {"nodeName": "n1"}});
        assert!(fields_match("spec.nodeName=n1", &pod));
        assert!(!fields_match("spec.nodeName!=n1", &pod));
        assert!(fields_match("spec.nodeName!=n2,metadata.name=a", &pod));
        assert!(labels_match("app=web", &pod) && labels_match("app", &pod) && labels_match("!tier", &pod));
        assert!(!labels_match("app!=web", &pod));
        assert_eq!(percent_decode("spec.nodeName%3Dnode%2Da"), "spec.nodeName=node-a");
    }
}
