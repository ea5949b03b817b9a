//! End to end, HBONE as Istio's ztunnel speaks it: addressed to the destination pod on 15008
//! (steered to the agent in the kernel), no SNI, delivery from the source pod's address; and,
//! when `SWITCHYARD_ZTUNNEL` names a ztunnel binary, both directions with a real ztunnel.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use sim::{Cluster, Pod, Server, eventually, privileged};

const T: Duration = Duration::from_secs(30);

fn whoami(pod: &Pod, to: &str) -> Result<Value> {
    pod.workload(&["whoami", "--connect", to, "--timeout-ms", "3000"], T)
}

/// The address the server said it saw (empty: no answer).
fn answer(r: &Value) -> &str {
    r["seen_as"].as_str().unwrap_or_default()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn ebpf_event(node: &sim::Node, event: &str) -> Result<f64> {
    Ok(sim::metric(&node.admin_text("/metrics")?, "switchyard_ebpf_events_total", &[("event", event)]))
}

#[test]
fn hbone_is_addressed_to_the_pod_and_the_pod_sees_its_real_peer() -> Result<()> {
    if !privileged("hbone_pod_addressed") {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.add_node("node-a")?;
    c.add_node("node-b")?;
    c.set_namespace("shop", true, None);
    c.set_namespace("vault", true, Some("strict"));
    let client = c.node("node-a").add_pod("client", "shop", None)?;
    let server = c.node("node-b").add_pod("server", "shop", None)?;
    let locked = c.node("node-b").add_pod("locked", "vault", None)?;
    let _servers: Vec<Server> = vec![
        server.serve(&["whoami-server", "--listen", "0.0.0.0:8080"])?,
        locked.serve(&["whoami-server", "--listen", "0.0.0.0:8080"])?,
    ];
    c.start(&[])?;

    let cap = c.capture()?;
    // The application on node-b sees the client pod's own address, not node-a's: the agent
    // delivers from the source pod's address, and the kernel steers the replies back to it.
    for target in [&server, &locked] {
        let r = whoami(&client, &format!("{}:8080", target.ip))?;
        assert_eq!(r["ok"], 1, "{}: {r}", target.name);
        let seen = r["seen_as"].as_str().unwrap_or_default();
        assert!(seen.starts_with(&format!("{}:", client.ip)), "{} saw {seen}, not the client pod", target.name);
    }
    let pcap = cap.finish()?;
    // No SNI on the wire (Switchyard's own dialect named the identity there).
    assert!(contains(&pcap, &[0x16, 0x03, 0x01]), "no TLS handshake captured");
    assert!(!contains(&pcap, b"id.switchyard"), "an SNI crossed the wire");
    assert!(!contains(&pcap, b"shop"), "a workload name crossed the wire in the clear");

    // One pooled connection per destination pod, to the pod's own address on 15008.
    let pool = c.nodes[0].admin_json("/debug/pool")?;
    let mut peers: Vec<String> =
        pool.as_array().unwrap().iter().map(|p| p["peer"].as_str().unwrap().to_string()).collect();
    peers.sort();
    let mut want = vec![format!("{}:15008", server.ip), format!("{}:15008", locked.ip)];
    want.sort();
    assert_eq!(peers, want, "{pool}");

    // node-b's kernel steered the connections to its agent, and the pods' replies to the
    // agent's transparent sockets; node-a's steered nothing (it served no HBONE).
    let b = &c.nodes[1];
    assert!(ebpf_event(b, "steered_hbone")? >= 2.0, "{}", b.admin_text("/metrics")?);
    assert!(ebpf_event(b, "steered_reply")? >= 2.0);
    assert_eq!(ebpf_event(&c.nodes[0], "steered_hbone")?, 0.0);
    // The strict pod admitted the agent's connection from the client pod's address (it is one
    // of the agent's registered connections) and nothing was dropped.
    assert_eq!(ebpf_event(b, "strict_dropped")?, 0.0);

    // Without node-b's agent, HBONE to its pods is not answered by anyone else: the pod itself
    // has no listener on 15008 and resets, the client fails (and never goes around the mesh).
    c.nodes[1].stop_agent(Duration::from_secs(10))?;
    let r = whoami(&client, &format!("{}:8080", server.ip))?;
    assert_eq!(r["ok"], 0, "{r}");
    Ok(())
}

/// A ztunnel (Istio's node proxy) in dedicated mode, serving one pod from inside its network
/// namespace, as `shared/peers/ztunnel/README.md` describes.
struct Ztunnel {
    _process: Server,
    log: PathBuf,
}

impl Ztunnel {
    fn start(bin: &Path, pod: &Pod, node: &str, config: &Path, dir: &Path) -> Result<Ztunnel> {
        let log = dir.join(format!("ztunnel-{}.log", pod.name));
        let mut cmd = pod.command(bin);
        cmd.env_clear()
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", format!("{}/{}/{}", pod.namespace, pod.name, pod.service_account))
            .env("NODE_NAME", node)
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", config)
            .env("ISTIO_META_DNS_CAPTURE", "false")
            .env("PACKET_MARK", "1337")
            .env("ENABLE_ORIG_SRC", "false")
            .env("IPV6_ENABLED", "false")
            .env("RUST_LOG", "info")
            .current_dir(dir)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::OpenOptions::new().append(true).open(&log)?);
        let z = Ztunnel { _process: Server::spawn(cmd)?, log };
        let ready = std::net::SocketAddr::from(([127, 0, 0, 1], 15021));
        let up = eventually(Duration::from_secs(20), "ztunnel ready", || {
            matches!(sim::http_get(&pod.netns, ready, "/healthz/ready"), Ok((200, _))).then_some(())
        });
        if up.is_err() {
            bail!("ztunnel in {} not ready:\n{}", pod.name, z.log());
        }
        Ok(z)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// ztunnel's local workload file: every pod of the test, as HBONE workloads on their nodes.
fn ztunnel_config(pods: &[(&Pod, &str)]) -> String {
    let mut s = String::from("workloads:\n");
    for (p, node) in pods {
        s.push_str(&format!(
            "- {{uid: \"k//v1/Pod/{ns}/{name}\", name: {name}, namespace: {ns}, serviceAccount: {sa}, trustDomain: cluster.local, workloadIps: [\"{ip}\"], protocol: HBONE, node: {node}, services: {{}}}}\n",
            ns = p.namespace,
            name = p.name,
            sa = p.service_account,
            ip = p.ip,
        ));
    }
    s
}

/// Switchyard and Istio's ztunnel, one CA (ztunnel's test CA): a Switchyard pod and a ztunnel
/// pod exchange HTTP both ways over HBONE, each side logging the other's SPIFFE identity,
/// Switchyard's metrics naming ztunnel's principal; a ztunnel client whose CA Switchyard does
/// not trust is refused. Runs when `SWITCHYARD_ZTUNNEL` names the binary (its `fake-ca-root.pem`
/// and `fake-ca-key.pem` beside it); never part of what the project ships.
#[test]
fn interop_with_istio_ztunnel_both_ways() -> Result<()> {
    if !privileged("ztunnel_interop") {
        return Ok(());
    }
    let Some(bin) = std::env::var_os("SWITCHYARD_ZTUNNEL").map(PathBuf::from) else {
        eprintln!(
            "\n*** SKIPPED interop_with_istio_ztunnel_both_ways: SWITCHYARD_ZTUNNEL is not set (a ztunnel binary built with the `testing` feature) ***\n"
        );
        return Ok(());
    };
    let dir = bin.parent().context("ztunnel's directory")?;
    let (root, key) = (dir.join("fake-ca-root.pem"), dir.join("fake-ca-key.pem"));
    if !bin.is_file() || !root.is_file() || !key.is_file() {
        bail!("SWITCHYARD_ZTUNNEL={} needs fake-ca-root.pem and fake-ca-key.pem beside it", bin.display());
    }
    if Command::new("iptables").arg("--version").output().is_err() {
        bail!("iptables is needed for the ztunnel interop test (cargo xtask setup installs it)");
    }

    let mut c = Cluster::new()?;
    c.add_node("node-a")?;
    c.add_node("node-b")?;
    c.set_namespace("shop", true, None);
    // Switchyard's side (node-a): a client and an HTTP server. ztunnel's (node-b, no Switchyard
    // agent): a server pod and a client pod, each with its own ztunnel.
    let sy_client = c.node("node-a").add_pod("sy-client", "shop", None)?;
    let sy_server = c.node("node-a").add_pod("sy-server", "shop", None)?;
    let zt_server = c.node("node-b").add_pod("zt-server", "shop", None)?;
    let zt_client = c.node("node-b").add_pod("zt-client", "shop", None)?;
    let _apps = [
        sy_server.serve(&["whoami-server", "--listen", "0.0.0.0:8080"])?,
        zt_server.serve(&["whoami-server", "--listen", "0.0.0.0:8080"])?,
    ];
    let zt_yaml = c.dir.join("zt.yaml");
    std::fs::write(
        &zt_yaml,
        ztunnel_config(&[
            (&sy_client, "node-a"),
            (&sy_server, "node-a"),
            (&zt_server, "node-b"),
            (&zt_client, "node-b"),
        ]),
    )?;
    // The client pod's outbound TCP goes to its ztunnel (which marks its own sockets 1337).
    let redirect = zt_client
        .command("iptables")
        .args([
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-o",
            "lo",
            "-m",
            "mark",
            "!",
            "--mark",
            "0x539/0xfff",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ])
        .status()?;
    assert!(redirect.success(), "iptables in the ztunnel client pod");
    let zt_s = Ztunnel::start(&bin, &zt_server, "node-b", &zt_yaml, &c.dir)?;
    let zt_c = Ztunnel::start(&bin, &zt_client, "node-b", &zt_yaml, &c.dir)?;

    // First, Switchyard signs with ztunnel's CA (so ztunnel accepts its server certificates) but
    // trusts only a root of its own: ztunnel's client certificate chains to a root Switchyard
    // does not trust, and is refused.
    std::fs::copy(c.ca_dir.join("ca.crt"), c.ca_dir.join("bundle.crt"))?;
    std::fs::copy(&root, c.ca_dir.join("ca.crt"))?;
    std::fs::copy(&key, c.ca_dir.join("ca.key"))?;
    c.start_only(&["node-a"], &[])?;
    // (ztunnel accepts its pod's connection locally, then closes it when the tunnel fails: the
    // application gets no answer.)
    let r = whoami(&zt_client, &format!("{}:8080", sy_server.ip))?;
    assert!(answer(&r).is_empty(), "a foreign CA's client was served: {r}");
    let m = c.nodes[0].admin_text("/metrics")?;
    assert!(
        sim::metric(&m, "switchyard_tls_handshake_failures_total", &[("reason", "unknown_issuer")]) >= 1.0,
        "{m}\n{}",
        c.nodes[0].agent_warnings()
    );

    // One CA: ztunnel's test root is Switchyard's bundle too.
    c.nodes[0].stop_agent(Duration::from_secs(10))?;
    std::fs::copy(&root, c.ca_dir.join("bundle.crt"))?;
    c.start_only(&["node-a"], &[])?;

    // Switchyard → ztunnel.
    let r = whoami(&sy_client, &format!("{}:8080", zt_server.ip))?;
    assert!(!answer(&r).is_empty(), "Switchyard to ztunnel: {r}\n{}\n{}", c.nodes[0].agent_warnings(), zt_s.log());
    // ztunnel → Switchyard; the Switchyard pod sees the ztunnel pod's own address.
    let r = whoami(&zt_client, &format!("{}:8080", sy_server.ip))?;
    assert!(!answer(&r).is_empty(), "ztunnel to Switchyard: {r}\n{}\n{}", c.nodes[0].agent_warnings(), zt_c.log());
    assert!(r["seen_as"].as_str().unwrap_or_default().starts_with(&format!("{}:", zt_client.ip)), "{r}");

    // Each side logs the other's identity.
    let sy_id = "spiffe://cluster.local/ns/shop/sa/sy-client";
    let zt_id = "spiffe://cluster.local/ns/shop/sa/zt-client";
    let logged = format!("src.identity=\"{sy_id}\"");
    if eventually(Duration::from_secs(5), "ztunnel's access log", || zt_s.log().contains(&logged).then_some(()))
        .is_err()
    {
        bail!("ztunnel did not log {sy_id}:\n{}", zt_s.log());
    }
    let log = c.nodes[0].agent_log();
    assert!(log.contains(&format!("src_identity=\"{zt_id}\"")), "Switchyard did not log {zt_id}:\n{log}");
    // Switchyard's metrics name ztunnel's principal on the inbound side, and ztunnel's server
    // on the outbound side.
    let m = c.nodes[0].admin_text("/metrics")?;
    let inbound =
        [("reporter", "destination"), ("source_principal", zt_id), ("connection_security_policy", "mutual_tls")];
    assert_eq!(sim::metric(&m, "istio_tcp_connections_opened_total", &inbound), 1.0, "{m}");
    let outbound = [
        ("reporter", "source"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/zt-server"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(sim::metric(&m, "istio_tcp_connections_opened_total", &outbound), 1.0, "{m}");
    drop((zt_s, zt_c));
    Ok(())
}
