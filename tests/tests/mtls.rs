//! End to end, two (or three) simulated nodes with one CA: HBONE mTLS between node proxies,
//! identities, rejections, rotation, authorization, strict mode, pooling.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use mesh_agent::identity::{Identity, ca::LocalCa};
use serde_json::Value;
use sim::{Cluster, Pod, Server, eventually, in_netns, privileged};

const T: Duration = Duration::from_secs(30);

struct Setup {
    c: Cluster,
    client: Pod,
    server: Pod,
    /// Not meshed, on node-a.
    legacy: Pod,
    _servers: Vec<Server>,
}

/// node-a runs `client` (meshed, shop) and `legacy` (not meshed); node-b runs `server`
/// (meshed, shop) with an echo server on 8080.
fn setup(agent_args: &[&str], customize: impl FnOnce(&mut Cluster) -> Result<()>) -> Result<Setup> {
    setup_nodes(&["node-a", "node-b"], agent_args, customize)
}

fn setup_nodes(
    agents: &[&str],
    agent_args: &[&str],
    customize: impl FnOnce(&mut Cluster) -> Result<()>,
) -> Result<Setup> {
    let mut c = Cluster::new()?;
    c.add_node("node-a")?;
    c.add_node("node-b")?;
    c.set_namespace("shop", true, None);
    c.set_namespace("legacy", false, None);
    let client = c.node("node-a").add_pod("client", "shop", None)?;
    let legacy = c.node("node-a").add_pod("legacy", "legacy", None)?;
    let server = c.node("node-b").add_pod("server", "shop", None)?;
    let servers = vec![server.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?];
    customize(&mut c)?;
    c.start_only(agents, agent_args)?;
    Ok(Setup { c, client, server, legacy, _servers: servers })
}

fn run(pod: &Pod, to: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["client", "--connect", to];
    args.extend_from_slice(extra);
    pod.workload(&args, T)
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn cross_node_traffic_is_mutual_tls_on_the_wire() -> Result<()> {
    if !privileged("cross_node_mtls") {
        return Ok(());
    }
    let s = setup(&[], |_| Ok(()))?;
    let to = format!("{}:8080", s.server.ip);
    let marker = "SWITCHYARD-PLAINTEXT-MARKER";

    let m0 = (s.c.nodes[0].admin_text("/metrics")?, s.c.nodes[1].admin_text("/metrics")?);
    let cap = s.c.capture()?;
    let r = run(&s.client, &to, &["--count", "20", "--bytes", "20000", "--text", marker])?;
    assert_eq!(r["ok"], 20, "{r}");
    assert_eq!(r["peer"], to.as_str(), "the application still sees the server's address");
    let pcap = cap.finish()?;
    assert!(!contains(&pcap, marker.as_bytes()), "the plaintext marker crossed the wire in the clear");
    // A TLS handshake record, and a ServerHello selecting TLS 1.3 (supported_versions = 0x0304).
    assert!(contains(&pcap, &[0x16, 0x03, 0x01]) || contains(&pcap, &[0x16, 0x03, 0x03]), "no TLS handshake captured");
    assert!(contains(&pcap, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]), "no TLS 1.3 ServerHello captured");
    assert!(contains(&pcap, &[0x17, 0x03, 0x03]), "no TLS application data captured");

    // Control: a non-meshed pod's traffic on the same wire is visible in the capture, so the
    // capture does see payloads.
    let cap = s.c.capture()?;
    let r = run(&s.legacy, &to, &["--bytes", "2000", "--text", marker])?;
    assert_eq!(r["ok"], 1, "{r}");
    let pcap = cap.finish()?;
    assert!(contains(&pcap, marker.as_bytes()), "control: plaintext should be visible ({} bytes captured)", pcap.len());

    // Both proxies recorded it, with honest security labels and identities.
    let a = s.c.nodes[0].admin_json("/debug/connections")?;
    let out = &a["recent"].as_array().unwrap()[0];
    assert_eq!(out["security"], "mutual_tls", "{out}");
    assert_eq!(out["destination_identity"], "spiffe://cluster.local/ns/shop/sa/server");
    let b = s.c.nodes[1].admin_json("/debug/connections")?;
    let inbound: Vec<_> =
        b["recent"].as_array().unwrap().iter().filter(|c| c["direction"] == "inbound").cloned().collect();
    assert_eq!(inbound.len(), 20, "{b}");
    assert!(inbound.iter().all(|c| c["source_identity"] == "spiffe://cluster.local/ns/shop/sa/client"), "{b}");
    assert!(inbound.iter().all(|c| c["bytes_sent"] == 20000 && c["bytes_received"] == 20000), "{b}");
    // The legacy pod went direct: node-b's proxy never saw it.
    assert_eq!(b["closed_total"], 20);

    // The destination node names the source workload too (from the `Forwarded` address the
    // source node sent, believed because that pod has the verified identity).
    let m_b = s.c.nodes[1].admin_text("/metrics")?;
    let src_named = [("reporter", "destination"), ("source_workload", "client"), ("source_workload_namespace", "shop")];
    assert_eq!(sim::metric(&m_b, "istio_tcp_connections_opened_total", &src_named), 20.0, "{m_b}");
    assert!(inbound.iter().all(|c| c["source_pod"] == "shop/client"), "{b}");
    // Istio's standard metrics on both sides say mutual_tls, with both principals.
    let m1 = (s.c.nodes[0].admin_text("/metrics")?, s.c.nodes[1].admin_text("/metrics")?);
    let common = [
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/client"),
        ("destination_workload", "server"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/server"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (reporter, before, after) in [("source", &m0.0, &m1.0), ("destination", &m0.1, &m1.1)] {
        let mut want = common.to_vec();
        want.push(("reporter", reporter));
        let d = |name: &str| sim::metric(after, name, &want) - sim::metric(before, name, &want);
        assert_eq!(d("istio_tcp_connections_opened_total"), 20.0, "{reporter}: {after}");
        assert_eq!(d("istio_tcp_connections_closed_total"), 20.0, "{reporter}");
        assert_eq!(d("istio_tcp_received_bytes_total"), 400_000.0, "{reporter}");
        assert_eq!(d("istio_tcp_sent_bytes_total"), 400_000.0, "{reporter}");
    }
    Ok(())
}

/// HTTP across nodes: requests to a Service whose endpoint is on another node are balanced by
/// the calling node's proxy and ride HBONE; Istio's request metrics say `mutual_tls`, with both
/// principals, and the access log says so too.
#[test]
fn http_to_a_service_on_another_node_is_mutual_tls_in_the_request_metrics() -> Result<()> {
    if !privileged("cross_node_http_metrics") {
        return Ok(());
    }
    let vip: SocketAddr = "10.96.0.41:80".parse()?;
    let s = setup(&[], |c| {
        let server = c.nodes[1].pods.iter().find(|p| p.name == "server").map(|p| p.ip).expect("server pod");
        c.services = vec![
            sim::service("web", "shop", vip, "http", 8081, &[server], &[]),
            sim::service("admin", "shop", "10.96.0.42:80".parse().unwrap(), "http", 8082, &[server], &[]),
        ];
        // The server's node denies the client its admin port.
        c.authz = vec![sim::rule(
            "no-admin-for-client",
            "shop",
            Some("server"),
            &[8082],
            sim::Action::Deny,
            &["spiffe://cluster.local/ns/shop/sa/client"],
        )];
        Ok(())
    })?;
    let _web = s.server.serve_tool("sim-http", &["serve", "--listen", "0.0.0.0:8081", "--name", "server"])?;
    let _admin = s.server.serve_tool("sim-http", &["serve", "--listen", "0.0.0.0:8082", "--name", "admin"])?;
    let (a0, b0) = (s.c.nodes[0].admin_text("/metrics")?, s.c.nodes[1].admin_text("/metrics")?);
    let r = s.client.http(&["load", "--url", &format!("http://{vip}/status/200"), "--requests", "6"], T)?;
    assert_eq!(r["statuses"]["200"], 6, "{r}");
    let want = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/client"),
        ("destination_workload", "server"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/server"),
        ("destination_service_name", "web"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let a1 = eventually(Duration::from_secs(3), "requests counted", || {
        let m = s.c.nodes[0].admin_text("/metrics").ok()?;
        (sim::metric(&m, "istio_requests_total", &want) - sim::metric(&a0, "istio_requests_total", &want) >= 6.0)
            .then_some(m)
    })?;
    let d = |name: &str| sim::metric(&a1, name, &want) - sim::metric(&a0, name, &want);
    assert_eq!(d("istio_requests_total"), 6.0, "{a1}");
    assert_eq!(d("istio_request_duration_milliseconds_count"), 6.0);
    assert_eq!(d("istio_response_bytes_sum"), 66.0, "\"status 200\\n\" six times");
    assert_eq!(sim::metric(&a1, "istio_requests_total", &[("connection_security_policy", "none")]), 0.0);
    // The destination node saw the tunnelled connection(s) as mutual TLS.
    let b1 = s.c.nodes[1].admin_text("/metrics")?;
    let dest =
        [("reporter", "destination"), ("connection_security_policy", "mutual_tls"), ("destination_workload", "server")];
    let opened = sim::metric(&b1, "istio_tcp_connections_opened_total", &dest)
        - sim::metric(&b0, "istio_tcp_connections_opened_total", &dest);
    assert!(opened >= 1.0, "{b1}");
    let log = strip_ansi(&s.c.nodes[0].agent_log());
    let line = log.lines().find(|l| l.contains("http request") && l.contains("/status/200")).unwrap_or_default();
    assert!(line.contains("security=\"mutual_tls\"") || line.contains("security=mutual_tls"), "{line}");
    // Denied by the peer node's policy: the client gets 403 (as for a same-node denial), and the
    // request is not retried elsewhere (one denial per request at the destination).
    let r = s.client.http(&["load", "--url", "http://10.96.0.42/", "--requests", "3"], T)?;
    assert_eq!(r["statuses"]["403"], 3, "{r}");
    assert_eq!(r["reasons"]["denied"], 3, "{r}");
    let b2 = s.c.nodes[1].admin_text("/metrics")?;
    assert_eq!(metric(&b2, "switchyard_authorization_denials_total{reason=\"deny_rule\"}"), 3.0, "{b2}");
    Ok(())
}

/// A TLS server in `netns` on `addr` presenting `identity`'s certificate from the real CA.
fn rogue_server(
    netns: String,
    addr: SocketAddr,
    ca: &LocalCa,
    identity: &Identity,
) -> Result<std::thread::JoinHandle<()>> {
    let issued = ca.issue_between(
        identity,
        SystemTime::now() - Duration::from_secs(60),
        SystemTime::now() + Duration::from_secs(600),
    )?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(issued.chain, issued.key)?;
    let cfg = Arc::new(cfg);
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = in_netns(&netns, || {
            let l = std::net::TcpListener::bind(addr).unwrap();
            tx.send(()).unwrap();
            if let Ok((tcp, _)) = l.accept() {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 64];
                let _ = tls.read(&mut buf);
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(5)).context("rogue server did not start")?;
    Ok(h)
}

#[test]
fn identities_are_checked_both_ways() -> Result<()> {
    if !privileged("identities_checked") {
        return Ok(());
    }
    // A third node hosts "victim", but what answers on its HBONE address (the pod's own, port
    // 15008) is a rogue presenting a valid certificate for another identity.
    let s = setup_nodes(&["node-a", "node-b"], &[], |c| {
        c.add_node("rogue")?;
        c.node("rogue").add_pod("victim", "shop", None)?;
        Ok(())
    })?;
    let ca = LocalCa::load(&s.c.ca_dir.join("ca.crt"), &s.c.ca_dir.join("ca.key"))?;
    let rogue = &s.c.nodes[2];
    let victim = rogue.pods[0].clone();
    let h = rogue_server(
        victim.netns.clone(),
        SocketAddr::from(([0, 0, 0, 0], 15008)),
        &ca,
        &Identity::new("cluster.local", "shop", "impostor"),
    )?;
    let r = run(&s.client, &format!("{}:8080", victim.ip), &["--timeout-ms", "5000"])?;
    assert_eq!(r["ok"], 0, "a connection to an impostor must fail: {r}");
    let _ = h.join();
    let log = s.c.nodes[0].agent_log();
    assert!(
        log.contains("server presented spiffe://cluster.local/ns/shop/sa/impostor, expected spiffe://cluster.local/ns/shop/sa/victim"),
        "{log}"
    );
    let m = s.c.nodes[0].admin_text("/metrics")?;
    assert_eq!(metric(&m, "switchyard_outbound_errors_total{reason=\"hbone_tls_failed\"}"), 1.0, "{m}");

    // And the honest path still works, with the source identity seen at the destination.
    let r = run(&s.client, &format!("{}:8080", s.server.ip), &[])?;
    assert_eq!(r["ok"], 1, "{r}");
    let b = s.c.nodes[1].admin_json("/debug/connections")?;
    assert_eq!(b["recent"][0]["source_identity"], "spiffe://cluster.local/ns/shop/sa/client", "{b}");
    Ok(())
}

#[test]
fn many_connections_share_one_pooled_http2_connection() -> Result<()> {
    if !privileged("pooling") {
        return Ok(());
    }
    let s = setup(&["--pool-idle-ms", "3000"], |_| Ok(()))?;
    let to = format!("{}:8080", s.server.ip);
    let r = run(&s.client, &to, &["--count", "200", "--concurrency", "8"])?;
    assert_eq!(r["ok"], 200, "{r}");
    let m = s.c.nodes[0].admin_text("/metrics")?;
    assert_eq!(metric(&m, "switchyard_hbone_client_handshakes_total"), 1.0, "200 connections, one handshake: {m}");
    let m = s.c.nodes[1].admin_text("/metrics")?;
    assert_eq!(metric(&m, "switchyard_inbound_connections_total"), 200.0, "{m}");
    // More than 100 at once need a second connection (at most 100 streams each).
    let r = run(&s.client, &to, &["--count", "150", "--concurrency", "150", "--hold"])?;
    assert_eq!(r["ok"], 150, "{r}");
    let m = s.c.nodes[0].admin_text("/metrics")?;
    assert_eq!(metric(&m, "switchyard_hbone_client_handshakes_total"), 2.0, "{m}");
    // Idle connections are released after the configured idle time (3 s here).
    eventually(Duration::from_secs(15), "idle pooled connections released", || {
        let open = metric(&s.c.nodes[0].admin_text("/metrics").ok()?, "switchyard_hbone_pool_connections");
        (open == 0.0).then_some(())
    })?;
    Ok(())
}

/// Issue 6, L4 retries across nodes: a Service whose endpoints are on another node, two of
/// them dead (meshed pods with nothing listening: the peer node answers the HBONE CONNECT with
/// an error). Every connection reaches the live one, over mTLS, retried at most twice.
#[test]
fn service_connects_to_dead_endpoints_on_another_node_are_retried_on_live_ones() -> Result<()> {
    if !privileged("cross_node_service_retries") {
        return Ok(());
    }
    let vip: SocketAddr = "10.96.0.40:80".parse()?;
    let s = setup(&[], |c| {
        let dead1 = c.node("node-b").add_pod("dead1", "shop", None)?;
        let dead2 = c.node("node-b").add_pod("dead2", "shop", None)?;
        let server = c.nodes[1].pods.iter().find(|p| p.name == "server").map(|p| p.ip).expect("server pod");
        c.services = vec![sim::service("echo", "shop", vip, "tcp-echo", 8080, &[server, dead1.ip, dead2.ip], &[])];
        Ok(())
    })?;
    let r = run(&s.client, &vip.to_string(), &["--count", "30"])?;
    assert_eq!(r["ok"], 30, "every connection reaches the live endpoint: {r}\n{}", s.c.nodes[0].agent_log());
    let conns = eventually(Duration::from_secs(3), "all recorded", || {
        let conns = s.c.nodes[0].admin_json("/debug/connections").ok()?;
        let recent: Vec<Value> = conns["recent"]
            .as_array()?
            .iter()
            .filter(|c| c["original_dst"] == vip.to_string().as_str() && !c["duration_ms"].is_null())
            .cloned()
            .collect();
        (recent.len() == 30).then_some(recent)
    })?;
    assert_eq!(conns.len(), 30, "{conns:?}");
    for c in &conns {
        assert_eq!(c["destination_pod"], "shop/server", "{c}");
        assert_eq!(c["security"], "mutual_tls", "{c}");
        assert!(c["error"].is_null(), "{c}");
        assert!(c["retries"].as_u64().unwrap_or(0) <= 2, "bounded: {c}");
    }
    let retries: u64 = conns.iter().map(|c| c["retries"].as_u64().unwrap_or(0)).sum();
    assert!(retries >= 1, "the dead endpoints were tried and retried: {conns:?}");
    assert!(s.c.nodes[0].agent_log().contains("retrying on another endpoint"));
    Ok(())
}

#[test]
fn certificates_rotate_every_few_seconds_under_a_minute_of_traffic_without_a_failure() -> Result<()> {
    if !privileged("rotation") {
        return Ok(());
    }
    // 4 s certificates, renewed every 2 s, on both nodes.
    let s = setup(&["--cert-lifetime-secs", "4"], |_| Ok(()))?;
    let to = format!("{}:8080", s.server.ip);
    let r = s.client.workload(
        &["client", "--connect", &to, "--duration-ms", "60000", "--concurrency", "4", "--bytes", "4096"],
        Duration::from_secs(120),
    )?;
    let ok = r["ok"].as_u64().unwrap();
    assert_eq!(r["failed"], 0, "{r}\n{}\n{}", s.c.nodes[0].agent_warnings(), s.c.nodes[1].agent_warnings());
    assert!(ok > 100, "{r}");
    assert_eq!(r["bytes_verified"].as_u64().unwrap(), ok * 4096, "no byte lost: {r}");
    for (i, node) in s.c.nodes.iter().enumerate() {
        let certs = node.admin_json("/debug/certs")?;
        let generation = certs[0]["generation"].as_u64().unwrap();
        assert!(generation >= 20, "node {i} renewed only {generation} times in a minute: {certs}");
        assert!(certs[0]["expires_in_secs"].as_i64().unwrap() > 0, "{certs}");
    }
    let m = s.c.nodes[0].admin_text("/metrics")?;
    let handshakes = metric(&m, "switchyard_hbone_client_handshakes_total");
    assert!(handshakes >= 20.0, "new certificates mean new pooled connections: {handshakes}");
    // Connections made with old certificates are released, not accumulated.
    eventually(Duration::from_secs(5), "stale pooled connections released", || {
        let open = metric(&s.c.nodes[0].admin_text("/metrics").ok()?, "switchyard_hbone_pool_connections");
        (open <= 2.0).then_some(())
    })?;
    Ok(())
}

#[test]
fn authorization_and_strict_mode_are_enforced() -> Result<()> {
    if !privileged("authz_strict") {
        return Ok(());
    }
    let mut vault = None;
    let mut extra = None;
    let s = setup(&[], |c| {
        c.set_namespace("vault", true, Some("strict"));
        let batch = c.node("node-a").add_pod("batch", "shop", None)?;
        let db = c.node("node-b").add_pod("db", "vault", None)?;
        let neighbour = c.node("node-b").add_pod("neighbour", "shop", None)?;
        c.authz = vec![
            sim::rule(
                "server-from-client-only",
                "shop",
                Some("server"),
                &[8080],
                sim::Action::Allow,
                &["spiffe://cluster.local/ns/shop/sa/client"],
            ),
            sim::rule(
                "no-batch-in-vault",
                "vault",
                None,
                &[],
                sim::Action::Deny,
                &["spiffe://cluster.local/ns/shop/sa/batch"],
            ),
        ];
        vault = Some((
            db.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?,
            neighbour.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?,
        ));
        extra = Some((batch, db, neighbour));
        Ok(())
    })?;
    let (batch, db, neighbour) = extra.unwrap();
    let server = format!("{}:8080", s.server.ip);
    let db_addr = format!("{}:8080", db.ip);
    let quick = ["--timeout-ms", "2000"];

    // Allowed, across nodes.
    assert_eq!(run(&s.client, &server, &quick)?["ok"], 1);
    // Not on the allow list: denied at the destination node, across nodes and on the same node.
    assert_eq!(run(&batch, &server, &quick)?["ok"], 0);
    assert_eq!(run(&neighbour, &server, &quick)?["ok"], 0);
    // A deny rule.
    assert_eq!(run(&batch, &db_addr, &quick)?["ok"], 0);
    let mb = s.c.nodes[1].admin_text("/metrics")?;
    // One across nodes (batch) and one on the same node (neighbour).
    assert_eq!(metric(&mb, "switchyard_authorization_denials_total{reason=\"no_allow_rule\"}"), 2.0, "{mb}");
    assert_eq!(metric(&mb, "switchyard_authorization_denials_total{reason=\"deny_rule\"}"), 1.0, "{mb}");
    assert_eq!(
        metric(&mb, "switchyard_outbound_errors_total{reason=\"no_allow_rule\"}"),
        1.0,
        "same-node denial: {mb}"
    );
    let log = strip_ansi(&s.c.nodes[1].agent_log());
    assert!(
        log.contains("connection denied by authorization policy src=spiffe://cluster.local/ns/shop/sa/batch dst=spiffe://cluster.local/ns/shop/sa/server"),
        "{log}"
    );
    assert!(log.contains("rule=\"no-batch-in-vault\""), "{log}");
    let ma = s.c.nodes[0].admin_text("/metrics")?;
    assert_eq!(metric(&ma, "switchyard_outbound_errors_total{reason=\"hbone_denied\"}"), 2.0, "{ma}");

    // Strict: a meshed client gets through (via the proxy); a non-mesh client's SYN is dropped.
    assert_eq!(run(&s.client, &db_addr, &quick)?["ok"], 1);
    let r = run(&s.legacy, &db_addr, &quick)?;
    assert_eq!(r["ok"], 0, "strict mode must block a non-mesh client: {r}");
    let dp = s.c.nodes[1].admin_json("/debug/datapath")?;
    assert!(dp["events"]["strict_dropped"].as_u64().unwrap() >= 1, "{dp}");
    // An allow list makes its pod reachable only through the mesh (a plaintext client has no
    // identity to match it): the non-mesh client's SYN to the server is dropped too.
    let before = s.c.nodes[1].admin_json("/debug/datapath")?["events"]["strict_dropped"].as_u64().unwrap();
    let r = run(&s.legacy, &server, &quick)?;
    assert_eq!(r["ok"], 0, "an allow-listed pod admits no plaintext: {r}");
    let dp = s.c.nodes[1].admin_json("/debug/datapath")?;
    assert!(dp["events"]["strict_dropped"].as_u64().unwrap() > before, "{dp}");
    // Permissive: the same non-mesh client reaches a permissive meshed pod without policies.
    let r = run(&s.legacy, &format!("{}:8080", neighbour.ip), &quick)?;
    assert_eq!(r["ok"], 1, "permissive mode admits plaintext: {r}");
    drop(vault);
    Ok(())
}

/// Istio policies on source addresses across nodes: the destination node matches `ipBlocks`
/// and `when: source.ip` against the source pod's address that HBONE names (`Forwarded`),
/// believed because that pod has the client's identity and runs on the node the connection
/// comes from. Two pods of one service account on one node: only the listed address is allowed.
#[test]
fn ip_blocks_match_the_verified_source_pod_address_across_nodes() -> Result<()> {
    if !privileged("authz_ip_blocks") {
        return Ok(());
    }
    let mut twin = None;
    let s = setup(&[], |c| {
        // A second pod with the client's service account, on the client's node.
        let t = c.node("node-a").add_pod("twin", "shop", None)?;
        c.node("node-a").set_service_account("twin", "client");
        let client_ip = c.node("node-a").pods.iter().find(|p| p.name == "client").unwrap().ip;
        c.istio = vec![serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "server-from-one-address", "namespace": "shop"},
            "spec": {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"],
                                                     "ipBlocks": [format!("{client_ip}/32")]}}],
                                 "when": [{"key": "source.ip", "notValues": ["192.0.2.0/24"]}]}]}
        })];
        twin = Some(t);
        Ok(())
    })?;
    let twin = twin.unwrap();
    let server = format!("{}:8080", s.server.ip);
    let quick = ["--timeout-ms", "2000"];
    assert_eq!(run(&s.client, &server, &quick)?["ok"], 1, "the listed address, verified across nodes");
    assert_eq!(run(&twin, &server, &quick)?["ok"], 0, "same identity, another address");
    let mb = s.c.nodes[1].admin_text("/metrics")?;
    assert_eq!(metric(&mb, "switchyard_authorization_denials_total{reason=\"no_allow_rule\"}"), 1.0, "{mb}");
    Ok(())
}

/// Accepts any server certificate: the hostile client only cares how the server reacts.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn hostile_config(issued: mesh_agent::identity::issuer::Issued) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(issued.chain, issued.key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// A TLS session to `addr` with the given client certificate; returns what the first read gave.
fn tls_attempt(cfg: Arc<rustls::ClientConfig>, addr: SocketAddr, sni: &str) -> String {
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let mut buf = [0u8; 256];
    match tls.read(&mut buf) {
        Ok(n) => format!("read {n} bytes"),
        Err(e) => e.to_string(),
    }
}

/// CONNECTs over a properly authenticated HBONE connection; returns each answer's status (or
/// the error), followed by ` baggage=<value>` when the answer has one. `sni` may be an address:
/// no SNI is sent then (ztunnel's HBONE).
fn h2_attempts(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
    reqs: Vec<hyper::Request<http_body_util::Empty<bytes::Bytes>>>,
) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut out = Vec::new();
        for req in reqs {
            let r = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await;
            out.push(match r {
                Ok(Ok(resp)) => match resp.headers().get("baggage").and_then(|v| v.to_str().ok()) {
                    Some(b) => format!("{} baggage={b}", resp.status().as_u16()),
                    None => resp.status().as_u16().to_string(),
                },
                Ok(Err(e)) => format!("error: {e}"),
                Err(_) => "timeout".into(),
            });
        }
        out
    })
}

#[test]
fn hostile_peers_are_rejected_counted_and_logged_and_nothing_crashes() -> Result<()> {
    if !privileged("hostile_peers") {
        return Ok(());
    }
    // Pool idle 1 s: the server closes connections without a stream after 2 s.
    let s = setup(&["--pool-idle-ms", "1000"], |_| Ok(()))?;
    let node_a = s.c.nodes[0].netns.clone();
    let hbone = SocketAddr::from((s.c.nodes[1].underlay.unwrap(), 15008));
    let server_ip = s.server.ip;
    let ca = LocalCa::load(&s.c.ca_dir.join("ca.crt"), &s.c.ca_dir.join("ca.key"))?;
    let other_dir = s.c.dir.join("other-ca");
    let other_paths = mesh_agent::identity::ca::init(&other_dir, "cluster.local", Duration::from_secs(3600))?;
    let other_ca = LocalCa::load(&other_paths.cert, &other_paths.key)?;
    let client_id = Identity::new("cluster.local", "shop", "client");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let sni = Identity::new("cluster.local", "shop", "server").sni();

    // 1. Plaintext to :15008.
    in_netns(&node_a, || {
        let mut t = TcpStream::connect_timeout(&hbone, Duration::from_secs(3)).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let garbage = format!("CONNECT {server_ip}:8080 HTTP/1.1\r\nHost: x\r\n\r\nhello in plaintext");
        let _ = t.write_all(garbage.as_bytes());
        let mut buf = Vec::new();
        let _ = t.read_to_end(&mut buf);
    })?;
    // 2. A client certificate from another CA.
    let foreign = hostile_config(other_ca.issue_between(&client_id, now - hour, now + hour)?);
    // 3. An expired certificate from the real CA.
    let expired = hostile_config(ca.issue_between(&client_id, now - 2 * hour, now - hour)?);
    // 4. A real-CA certificate whose identity is from another trust domain.
    let wrong =
        hostile_config(ca.issue_between(&Identity::new("evil.example", "shop", "client"), now - hour, now + hour)?);
    for cfg in [foreign, expired, wrong] {
        let sni = sni.clone();
        in_netns(&node_a, move || tls_attempt(cfg, hbone, &sni))?;
    }
    // 5. Authenticated, then silent (no HTTP/2 preface): closed by the idle timeout.
    let silent = hostile_config(ca.issue_between(&client_id, now - hour, now + hour)?);
    let sni2 = sni.clone();
    let closed_after = in_netns(&node_a, move || {
        let name = rustls::pki_types::ServerName::try_from(sni2).unwrap();
        let conn = rustls::ClientConnection::new(silent, name).unwrap();
        let tcp = TcpStream::connect_timeout(&hbone, Duration::from_secs(3)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        let t0 = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        // The server's SETTINGS may arrive first; read until the connection ends.
        loop {
            match tls.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        t0.elapsed()
    })?;
    assert!(closed_after < Duration::from_secs(12), "a silent authenticated peer must be dropped: {closed_after:?}");
    // 6. Malformed, oversized and misdirected CONNECTs on a valid mTLS connection.
    let good = hostile_config(ca.issue_between(&client_id, now - hour, now + hour)?);
    let connect = |authority: &str| {
        hyper::Request::builder().method("CONNECT").uri(authority).body(http_body_util::Empty::new()).unwrap()
    };
    let huge = "x".repeat(64 * 1024);
    let reqs = vec![
        hyper::Request::builder()
            .method("GET")
            .uri(format!("https://{server_ip}/"))
            .body(http_body_util::Empty::new())
            .unwrap(),
        connect("not-an-address:8080"),
        connect(&format!("{}:8080", s.client.ip)),
        // Never proxied to: the unspecified address, the node's loopback (its admin port), the
        // node itself, the cloud metadata service.
        connect("0.0.0.0:8080"),
        connect("127.0.0.1:15000"),
        connect(&format!("{}:15020", s.c.nodes[1].underlay.unwrap())),
        connect("169.254.169.254:80"),
        // A valid CONNECT naming, as its source, a pod of another identity (the un-meshed
        // legacy pod): served, but the claim is not believed.
        hyper::Request::builder()
            .method("CONNECT")
            .uri(format!("{}:8080", s.server.ip))
            .header("forwarded", format!("for={}", s.legacy.ip))
            .body(http_body_util::Empty::new())
            .unwrap(),
        // Last: it ends the whole HTTP/2 connection.
        hyper::Request::builder()
            .method("CONNECT")
            .uri(format!("{}:8080", s.server.ip))
            .header("x-padding", huge)
            .body(http_body_util::Empty::new())
            .unwrap(),
    ];
    let first = good.clone();
    let answers = in_netns(&node_a, move || h2_attempts(first, hbone, &sni, reqs))?;
    // As ztunnel answers: 400 for anything but a CONNECT to a pod it serves.
    assert_eq!(answers[0], "400", "{answers:?}");
    assert_eq!(answers[1], "400", "{answers:?}");
    assert_eq!(answers[2], "400", "a pod on another node: {answers:?}");
    assert_eq!(
        &answers[3..7],
        ["400", "400", "400", "400"],
        "forbidden targets: {answers:?}\n{}",
        s.c.nodes[1].agent_warnings()
    );
    assert!(answers[7].starts_with("200 baggage="), "{answers:?}");
    assert_ne!(answers[8], "200", "an oversized CONNECT must not be served: {answers:?}");

    // 7. ztunnel's HBONE: a connection addressed to the server pod itself (no SNI; the kernel
    // steers it to node-b's agent, which presents the pod's certificate). Every CONNECT on it
    // must name that pod (400), upstream failures are 503, and a 200 names the destination.
    let pod_hbone = SocketAddr::from((server_ip, 15008));
    let reqs = vec![
        hyper::Request::builder()
            .method("GET")
            .uri(format!("https://{server_ip}/"))
            .body(http_body_util::Empty::new())
            .unwrap(),
        connect(&format!("{}:8080", s.client.ip)),
        connect(&format!("{}:8080", s.c.nodes[1].underlay.unwrap())),
        connect(&format!("{server_ip}:9")),
        connect(&format!("{server_ip}:8080")),
    ];
    let answers = in_netns(&node_a, move || h2_attempts(good, pod_hbone, &server_ip.to_string(), reqs))?;
    assert_eq!(&answers[..4], ["400", "400", "400", "503"], "{answers:?}");
    assert!(answers[4].starts_with("200 baggage="), "{answers:?}");
    assert!(
        answers[4].contains("k8s.namespace.name=shop") && answers[4].contains("service.name=server"),
        "{answers:?}"
    );

    let m = s.c.nodes[1].admin_text("/metrics")?;
    let claimed = [("reporter", "destination"), ("source_workload", "legacy")];
    assert_eq!(sim::metric(&m, "istio_tcp_connections_opened_total", &claimed), 0.0, "a forged source is not believed");
    let verified = [
        ("reporter", "destination"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/client"),
        ("source_workload", "unknown"),
    ];
    assert_eq!(
        sim::metric(&m, "istio_tcp_connections_opened_total", &verified),
        2.0,
        "known by its identity only (the forged claim, and the pod-addressed CONNECT that named no source): {m}"
    );
    for (reason, n) in
        [("not_tls", 1.0), ("unknown_issuer", 1.0), ("expired_certificate", 1.0), ("bad_client_identity", 1.0)]
    {
        assert_eq!(
            metric(&m, &format!("switchyard_tls_handshake_failures_total{{reason=\"{reason}\"}}")),
            n,
            "{reason}: {m}"
        );
    }
    for (reason, n) in [
        ("not_connect", 2.0),
        ("bad_authority", 1.0),
        ("not_on_this_node", 1.0),
        ("forbidden_target", 4.0),
        ("authority_mismatch", 2.0),
        ("pod_refused", 1.0),
    ] {
        assert_eq!(
            metric(&m, &format!("switchyard_inbound_rejected_total{{reason=\"{reason}\"}}")),
            n,
            "{reason}: {m}"
        );
    }
    let log = s.c.nodes[1].agent_log();
    for needle in [
        "HBONE mTLS handshake rejected",
        "reason=\"not_tls\"",
        "reason=\"unknown_issuer\"",
        "reason=\"expired_certificate\"",
        "is from another trust domain",
        "no meshed pod with that address on this node",
    ] {
        assert!(log.contains(needle) || strip_ansi(&log).contains(needle), "log lacks {needle:?}:\n{log}");
    }
    // Still serving, still mTLS.
    let r = run(&s.client, &format!("{}:8080", s.server.ip), &["--count", "5"])?;
    assert_eq!(r["ok"], 5, "{r}");
    Ok(())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Keeps the compiler honest about unused helpers while tests are added.
#[allow(dead_code)]
fn _unused(_: Ipv4Addr, _: TcpStream) {
    let _ = std::io::sink().write(b"");
}

/// Issue 15, one tenant cannot take the node's mesh down: a peer (here a third node) opening
/// hundreds of silent connections to a node's HBONE port holds at most its own share of the
/// handshake slots, each for at most the ClientHello deadline, so another node's mTLS traffic to
/// that node keeps flowing.
#[test]
fn silent_connections_from_one_address_cannot_keep_other_nodes_out() -> Result<()> {
    if !privileged("hbone_slowloris") {
        return Ok(());
    }
    let s = setup(&[], |c| {
        c.add_node("node-c")?;
        Ok(())
    })?;
    let hbone = SocketAddr::from((s.c.nodes[1].underlay.unwrap(), 15008));
    let attacker = s.c.nodes[2].netns.clone();
    // More than one address may hold (64), more than all slots (256).
    let silent: Vec<TcpStream> = in_netns(&attacker, || {
        (0..400).filter_map(|_| TcpStream::connect_timeout(&hbone, Duration::from_secs(2)).ok()).collect()
    })?;
    assert!(silent.len() > 300, "{}", silent.len());
    // Meanwhile node-a's clients, new connections each, over new pooled HBONE connections.
    let r = run(&s.client, &format!("{}:8080", s.server.ip), &["--count", "40", "--concurrency", "4"])?;
    assert_eq!(r["ok"], 40, "{r}\n{}", s.c.nodes[1].agent_warnings());
    let m = s.c.nodes[1].admin_text("/metrics")?;
    assert!(
        metric(&m, "switchyard_tls_handshake_failures_total{reason=\"source_handshake_limit\"}") >= 300.0,
        "the address's share was capped: {m}"
    );
    eventually(Duration::from_secs(10), "silent connections cut at the ClientHello deadline", || {
        let m = s.c.nodes[1].admin_text("/metrics").ok()?;
        (metric(&m, "switchyard_tls_handshake_failures_total{reason=\"client_hello_timeout\"}") >= 60.0).then_some(())
    })?;
    drop(silent);
    Ok(())
}
