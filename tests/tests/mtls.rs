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

/// node-a (10.244.<a>.0/24) runs `client` (meshed, shop) and `legacy` (not meshed);
/// node-b (10.244.<a+1>.0/24) runs `server` (meshed, shop) with an echo server on 8080.
fn setup(a: u8, agent_args: &[&str], customize: impl FnOnce(&mut Cluster) -> Result<()>) -> Result<Setup> {
    setup_nodes(a, &["node-a", "node-b"], agent_args, customize)
}

fn setup_nodes(
    a: u8,
    agents: &[&str],
    agent_args: &[&str],
    customize: impl FnOnce(&mut Cluster) -> Result<()>,
) -> Result<Setup> {
    let mut c = Cluster::new()?;
    c.add_node("node-a", a)?;
    c.add_node("node-b", a + 1)?;
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
    let s = setup(31, &[], |_| Ok(()))?;
    let to = format!("{}:8080", s.server.ip);
    let marker = "SWITCHYARD-PLAINTEXT-MARKER";

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
    // A third node hosts "victim", but what answers on its HBONE port is a rogue presenting a
    // valid certificate for another identity.
    let s = setup_nodes(33, &["node-a", "node-b"], &[], |c| {
        c.add_node("rogue", 35)?;
        c.node("rogue").add_pod("victim", "shop", None)?;
        Ok(())
    })?;
    let ca = LocalCa::load(&s.c.ca_dir.join("ca.crt"), &s.c.ca_dir.join("ca.key"))?;
    let rogue = &s.c.nodes[2];
    let victim = rogue.pods[0].clone();
    let h = rogue_server(
        rogue.netns.clone(),
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
    let s = setup(37, &[], |_| Ok(()))?;
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
    Ok(())
}

/// Keeps the compiler honest about unused helpers while tests are added.
#[allow(dead_code)]
fn _unused(_: Ipv4Addr, _: TcpStream) {
    let _ = std::io::sink().write(b"");
}
