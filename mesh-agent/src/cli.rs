//! Operator commands (`mesh-agent status`, `workloads`, `connections`): what the admin
//! endpoint knows, for terminals (tables) and scripts (`-o json`). They talk to a running
//! agent's admin port (default `127.0.0.1:15020`: the agent runs in the node's network
//! namespace), never to the kernel.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// One HTTP/1.0 GET of `path` over `stream`: (status, body); when the answer is not HTTP, no
/// status and the whole answer.
fn exchange(mut stream: impl Read + Write, host: &str, path: &str) -> anyhow::Result<(Option<String>, String)> {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).context("reading the agent's answer")?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    Ok(match head.split_whitespace().nth(1) {
        Some(status) => (Some(status.to_string()), body.to_string()),
        None => (None, buf),
    })
}

/// GET `path` on the admin endpoint; the body.
pub fn get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let s = TcpStream::connect_timeout(&admin, Duration::from_secs(3))
        .with_context(|| format!("cannot reach the agent's admin endpoint at {admin} (is the agent running?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (status, body) = exchange(s, &admin.to_string(), path)?;
    let status = status.unwrap_or_else(|| "?".into());
    if status != "200" && path != "/readyz" {
        bail!("{path} answered {status}: {}", body.trim());
    }
    Ok(body)
}

/// `mesh-agent probe healthz|readyz --socket PATH`: asks the agent of this pod over its own
/// admin Unix socket (kubelet exec probes); `Ok` when it answers 200, else why not.
pub fn probe(socket: &std::path::Path, path: &str) -> anyhow::Result<String> {
    let s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("cannot reach this agent's admin socket {} (is it running?)", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    match exchange(s, "localhost", path)? {
        (Some(status), body) if status == "200" => Ok(body),
        (Some(status), body) => bail!("{path} answered {status}: {}", body.trim()),
        (None, body) => bail!("{path}: the agent's answer is not HTTP: {body:?}"),
    }
}

fn get_json(admin: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let body = get(admin, path)?;
    serde_json::from_str(&body).with_context(|| format!("{path} did not answer JSON"))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `mesh-agent status`: health, datapath, pods, connections, certificates.
pub fn status(admin: SocketAddr, out: Output) -> anyhow::Result<String> {
    let ready = get(admin, "/readyz")?.trim() == "ready";
    let dp = get_json(admin, "/debug/datapath")?;
    let pods = get_json(admin, "/debug/pods")?;
    let conns = get_json(admin, "/debug/connections")?;
    let certs = get_json(admin, "/debug/certs")?;
    let summary = get_json(admin, "/debug/summary")?;
    let local: Vec<&Value> =
        pods.as_array().map(|a| a.iter().filter(|p| p["cgroup_id"].is_number()).collect()).unwrap_or_default();
    let meshed = local.iter().filter(|p| p["redirected"] == true).count();
    let v = json!({
        "ready": ready,
        "datapath": dp,
        "pods_on_node": local.len(),
        "pods_meshed": meshed,
        "connections_active": conns["active"].as_array().map_or(0, Vec::len),
        "connections_closed": conns["closed_total"],
        "certificates": certs,
        "totals": summary["totals"],
        "services": summary["services"],
        "reasons": summary["reasons"],
    });
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    let mut t = String::new();
    t += &format!("agent          {}\n", if ready { "ready" } else { "NOT READY" });
    t += &format!(
        "eBPF           attached {}, pinned {}, acceleration {}\n",
        s(&dp["attached"]),
        s(&dp["pinned"]),
        s(&dp["sockmap_acceleration"]["state"])
    );
    t += &format!("maps           {}\n", dp["maps"]);
    t += &format!("pods           {} on this node, {} meshed\n", local.len(), meshed);
    t += &format!("connections    {} active, {} closed\n", v["connections_active"], s(&conns["closed_total"]));
    for c in certs.as_array().into_iter().flatten() {
        t += &format!("certificate    {} expires in {} s\n", s(&c["identity"]), s(&c["expires_in_secs"]));
    }
    let tot = &summary["totals"];
    t += &format!(
        "resilience     {} HTTP requests, {} retries ({} refused by the budget), {} timeouts, {} limit hits, {} ejections\n",
        s(&tot["http_requests"]),
        s(&tot["http_retries"]),
        s(&tot["retry_budget_exhausted"]),
        s(&tot["timeouts"]),
        s(&tot["limit_hits"]),
        s(&tot["ejections"])
    );
    for svc in summary["services"].as_array().into_iter().flatten() {
        t += &format!(
            "service        {} {} requests, {} 5xx, p50 {:.2} ms, p99 {:.2} ms\n",
            s(&svc["service"]),
            s(&svc["requests"]),
            s(&svc["errors"]),
            svc["p50_ms"].as_f64().unwrap_or(0.0),
            svc["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    for (kind, reasons) in summary["reasons"].as_object().into_iter().flatten() {
        let nonzero: Vec<String> = reasons
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if !nonzero.is_empty() {
            t += &format!("{:<14} {}\n", kind.replace('_', " "), nonzero.join(", "));
        }
    }
    Ok(t)
}

/// `mesh-agent workloads`: this node's pods and how they are meshed.
pub fn workloads(admin: SocketAddr, out: Output) -> anyhow::Result<String> {
    // What the dashboard's pod table shows: the node's pods with identity, certificate,
    // mTLS, opt-in and fail mode, and the requests each sent over the last seconds.
    let summary = get_json(admin, "/debug/summary")?;
    let pods: Vec<Value> = summary["pods"].as_array().cloned().unwrap_or_default();
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&pods)? + "\n");
    }
    let expiry = |v: &Value| match v.as_i64() {
        None => "-".to_string(),
        Some(s) if s < 0 => "expired".into(),
        Some(s) if s > 7200 => format!("{} h", s / 3600),
        Some(s) => format!("{} min", s / 60),
    };
    let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let mut t = format!(
        "{:<28} {:<16} {:<44} {:<8} {:<11} {:<20} {:<5} {:<9} {:>7} {:>8} {:>8}\n",
        "POD", "IP", "IDENTITY", "CERT", "MTLS", "OPT-IN", "FAIL", "REDIRECT", "REQ/S", "P50 MS", "P99 MS"
    );
    for p in &pods {
        t += &format!(
            "{:<28} {:<16} {:<44} {:<8} {:<11} {:<20} {:<5} {:<9} {:>7.1} {:>8} {:>8}\n",
            s(&p["pod"]),
            s(&p["ip"]),
            s(&p["identity"]),
            expiry(&p["cert_expires_in_secs"]),
            s(&p["mtls_mode"]),
            s(&p["reason"]),
            s(&p["fail_mode"]),
            s(&p["redirected"]),
            p["requests_per_s"].as_f64().unwrap_or(0.0),
            ms(&p["p50_ms"]),
            ms(&p["p99_ms"]),
        );
    }
    Ok(t)
}

/// What `mesh-agent authz` asks about: a pod, and optionally a connection to it.
#[derive(Debug, Default, Clone)]
pub struct AuthzQuery {
    /// `namespace/name`.
    pub pod: Option<String>,
    /// The source's SPIFFE ID.
    pub from: Option<String>,
    pub ip: Option<std::net::Ipv4Addr>,
    pub port: Option<u16>,
}

/// `mesh-agent authz`: the authorization policies this node enforces and what became of every
/// Istio policy it read (ignored, not enforced, L4 only, malformed: with the reasons); with a
/// pod, the policies that apply to it and, with `from` and `port`, how that connection would
/// be decided.
pub fn authz(admin: SocketAddr, out: Output, q: &AuthzQuery) -> anyhow::Result<String> {
    let mut path = "/debug/authz".to_string();
    let params: Vec<String> = [
        q.pod.as_ref().map(|p| format!("pod={p}")),
        q.from.as_ref().map(|f| format!("from={f}")),
        q.ip.map(|i| format!("ip={i}")),
        q.port.map(|p| format!("port={p}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !params.is_empty() {
        path = format!("{path}?{}", params.join("&"));
    }
    let a = get_json(admin, &path)?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&a)? + "\n");
    }
    if let Some(pod) = a.get("pod") {
        return Ok(authz_for_pod(pod, &a));
    }
    let empty = Vec::new();
    let reports = a["reports"].as_array().unwrap_or(&empty);
    let policies = a["policies"].as_array().unwrap_or(&empty);
    let report_of = |name: &str| reports.iter().find(|r| r["policy"].as_str() == Some(name));
    let mut t = format!("{:<40} {:<16} {:<7} {:<30} {}\n", "POLICY", "STATUS", "ACTION", "APPLIES TO", "NOTES");
    let mut row = |name: &str, status: &str, action: &str, applies: &str, notes: &[Value]| {
        let notes: Vec<&str> = notes.iter().filter_map(Value::as_str).collect();
        t += &format!("{name:<40} {status:<16} {action:<7} {applies:<30} {}\n", notes.join("; "));
    };
    for p in policies {
        let name = s(&p["name"]);
        let report = report_of(&name);
        let warnings = report.and_then(|r| r["warnings"].as_array()).unwrap_or(&empty);
        let status = match report.map(|r| &r["status"]) {
            Some(s) if s == "malformed" => "MALFORMED",
            _ if warnings.is_empty() => "enforced",
            _ => "enforced (L4)",
        };
        row(&name, status, &s(&p["action"]), &scope(p), warnings);
    }
    for r in reports.iter().filter(|r| r["status"] == "ignored" || r["status"] == "not_enforced") {
        let status = if r["status"] == "ignored" { "ignored" } else { "NOT ENFORCED" };
        row(&s(&r["policy"]), status, "-", "-", r["warnings"].as_array().unwrap_or(&empty));
    }
    if policies.is_empty() && reports.is_empty() {
        t += "(no authorization policies: every connection within the mesh is allowed)\n";
    }
    Ok(t)
}

/// Where a policy applies, as the table says it.
fn scope(p: &Value) -> String {
    match &p["scope"] {
        Value::String(s) => s.to_lowercase(),
        Value::Object(o) => match o.iter().next() {
            Some((k, v)) if k == "Pod" => format!("pod {}", s(v)),
            Some((_, v)) => format!("labels {}", v["labels"]),
            None => "-".into(),
        },
        _ => "-".into(),
    }
}

fn authz_for_pod(pod: &Value, a: &Value) -> String {
    let empty = Vec::new();
    let names: Vec<String> = a["applies"].as_array().unwrap_or(&empty).iter().map(s).collect();
    let mut t = format!("pod {}: {} polic{} apply\n", s(pod), names.len(), if names.len() == 1 { "y" } else { "ies" });
    for n in &names {
        t += &format!("  {n}\n");
    }
    if let Some(d) = a.get("decision") {
        t += &format!(
            "from {} (address {}) to port {}: {}{}\n",
            s(&a["from"]),
            s(&a["ip"]),
            s(&a["port"]),
            s(&d["result"]),
            d.get("policy").map(|p| format!(" by {}", s(p))).unwrap_or_default()
        );
    }
    t
}

/// `mesh-agent connections`: open connections, then the most recent closed ones.
pub fn connections(admin: SocketAddr, out: Output, recent: usize) -> anyhow::Result<String> {
    let c = get_json(admin, "/debug/connections")?;
    let active: Vec<Value> = c["active"].as_array().cloned().unwrap_or_default();
    let mut closed: Vec<Value> = c["recent"].as_array().cloned().unwrap_or_default();
    closed.reverse();
    closed.truncate(recent);
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&json!({"active": active, "recent": closed}))? + "\n");
    }
    let mut t = format!(
        "{:<7} {:<9} {:<22} {:<22} {:<22} {:<11} {:<6} {:>10} {:>10} {}\n",
        "STATE", "DIR", "SOURCE", "DESTINATION", "ENDPOINT", "SECURITY", "PROTO", "SENT", "RECEIVED", "ERROR"
    );
    for (state, list) in [("open", &active), ("closed", &closed)] {
        for r in list {
            t += &format!(
                "{:<7} {:<9} {:<22} {:<22} {:<22} {:<11} {:<6} {:>10} {:>10} {}\n",
                state,
                s(&r["direction"]),
                r["source_pod"].as_str().or(r["source_identity"].as_str()).unwrap_or("-"),
                s(&r["original_dst"]),
                s(&r["endpoint"]),
                s(&r["security"]),
                r["protocol"].as_str().unwrap_or("tcp"),
                s(&r["bytes_sent"]),
                s(&r["bytes_received"]),
                s(&r["error"])
            );
        }
    }
    Ok(t)
}

/// The shell command that forwards local `port` to the admin port (127.0.0.1:15000 on the node)
/// of the agent on `node`: the dashboard and debug views are the node's, reached through the
/// API server's port-forward (which needs `pods/portforward` in `namespace`), never over the
/// network.
pub fn dashboard_command(node: &str, namespace: &str, port: u16) -> anyhow::Result<String> {
    // Names go into a shell command: only what Kubernetes allows in them.
    if !crate::identity::is_dns_subdomain(node) {
        bail!("{node:?} is not a node name");
    }
    if !crate::identity::is_dns_label(namespace) {
        bail!("{namespace:?} is not a namespace name");
    }
    let pod = format!(
        "$(kubectl -n {namespace} get pod -l app.kubernetes.io/component=mesh-agent \\\n    --field-selector spec.nodeName={node} -o name | head -n 1)"
    );
    Ok(format!(
        "kubectl -n {namespace} port-forward {pod} \\\n  {port}:{port_admin}",
        port_admin = crate::config::DEFAULT_ADMIN_PORT
    ))
}

#[cfg(test)]
mod dashboard_tests {
    #[test]
    fn the_dashboard_command_forwards_to_the_nodes_agent_and_refuses_odd_names() {
        let c = super::dashboard_command("worker-1", "switchyard-system", 15000).unwrap();
        assert!(c.contains("--field-selector spec.nodeName=worker-1"), "{c}");
        assert!(c.contains("port-forward") && c.contains("15000:15000"), "{c}");
        assert!(super::dashboard_command("x; rm -rf /", "switchyard-system", 1).is_err());
        assert!(super::dashboard_command("worker-1", "$(id)", 1).is_err());
    }
}
