//! `cargo xtask demo`: a simulated two-node cluster with meshed and un-meshed pods, the real
//! agent and eBPF programs, one mesh CA, some traffic, and a report of what went where and how
//! it was protected. Cleans up on exit and on Ctrl-C.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Result, bail};
use clap::Parser;
use serde_json::Value;
use sim::{Cluster, Node, Pod};

#[derive(Parser)]
#[command(about = "Switchyard demo: a simulated two-node cluster with meshed pods and mTLS")]
struct Args {
    /// Keep the cluster up after the traffic run (sending a little traffic every 2 s) until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let args = Args::parse();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if let Err(e) = run(&args) {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

const MARKER: &str = "CARD-NUMBER-4111-1111-1111-1111";

fn run(args: &Args) -> Result<()> {
    if !sim::privileged("demo") {
        bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }
    println!("Switchyard demo\n===============\n");
    println!("A simulated cluster: each node is a network namespace with a bridge (its pods' gateway) and a");
    println!("cgroup; each pod is a network namespace + cgroup; the nodes share a network of their own.\n");
    let mut c = Cluster::new()?;
    c.add_node_at("node-a", 1)?;
    c.add_node_at("node-b", 2)?;
    c.set_namespace("shop", true, None);
    c.set_namespace("vault", true, None);
    c.set_namespace("legacy", false, None);
    let frontend = c.node("node-a").add_pod("frontend", "shop", None)?;
    let legacy = c.node("node-a").add_pod("legacy", "legacy", None)?;
    let backend = c.node("node-b").add_pod("backend", "shop", None)?;
    let payments = c.node("node-b").add_pod("payments", "vault", None)?;
    // Istio's own resources, as `kubectl apply` takes them (the workload file carries them in
    // local mode; in Kubernetes the agent reads them from the API).
    c.istio = vec![
        serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "vault"}, "spec": {"mtls": {"mode": "STRICT"}}}),
        serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "payments-from-frontend-only", "namespace": "vault"},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}]}}),
    ];
    for (p, what) in [
        (&frontend, "meshed (namespace shop: switchyard.io/mesh=enabled)"),
        (&legacy, "not meshed"),
        (&backend, "meshed"),
        (&payments, "meshed, strict mTLS (PeerAuthentication vault/default: STRICT)"),
    ] {
        println!("  {:<7} pod {:<15} {:<12} {what}", p.node, format!("{}/{}", p.namespace, p.name), p.ip.to_string());
    }
    println!(
        "  authorization: AuthorizationPolicy vault/payments-from-frontend-only: ALLOW from principal cluster.local/ns/shop/sa/frontend"
    );
    let _servers = [
        backend.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?,
        backend.serve(&["udp-server", "--listen", "0.0.0.0:5353"])?,
        payments.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?,
    ];
    println!("\nCreating a mesh CA (mesh-agent ca init) and starting one mesh-agent per node");
    c.start(&[])?;
    for n in &c.nodes {
        println!(
            "  {}: outbound 15001, HBONE mTLS on <each meshed pod's address>:15008 (steered to the agent in the kernel; node address {}), admin {}",
            n.name,
            n.underlay.unwrap(),
            n.admin_addr()
        );
    }
    if stopped() {
        return Ok(());
    }

    println!("\nTraffic (echo servers; every byte is verified by the client)\n-------");
    let runs: [(&Pod, &Pod, &str); 5] = [
        (&frontend, &backend, "meshed → meshed, other node: HBONE mTLS"),
        (&frontend, &payments, "meshed → strict + allowed: HBONE mTLS"),
        (&backend, &payments, "same node, not allowed by policy"),
        (&legacy, &backend, "not meshed → permissive pod: direct"),
        (&legacy, &payments, "not meshed → strict pod: dropped in the kernel"),
    ];
    // Capture the wire between the nodes during the meshed runs, then during the un-meshed ones.
    let mut cap = Some(c.capture()?);
    let mut wire = Vec::new();
    for (i, (from, to, what)) in runs.into_iter().enumerate() {
        if i == 3 {
            wire.push(cap.take().unwrap().finish()?);
            cap = Some(c.capture()?);
        }
        let dst = format!("{}:8080", to.ip);
        let r = from.workload(
            &[
                "client",
                "--connect",
                &dst,
                "--count",
                "10",
                "--bytes",
                "16384",
                "--text",
                MARKER,
                "--timeout-ms",
                "1500",
            ],
            Duration::from_secs(60),
        )?;
        println!(
            "  {:<9} → {:<14} {:<48} {:>2}/10 ok  getpeername()={}",
            from.name,
            format!("{}:8080", to.name),
            what,
            r["ok"],
            r["peer"].as_str().unwrap_or("-")
        );
    }
    let r = frontend.workload(&["udp-query", "--to", &format!("{}:5353", backend.ip)], Duration::from_secs(10))?;
    println!("  frontend  → backend:5353    UDP (DNS-style): never redirected               answered: {}", r["ok"]);
    wire.push(cap.take().unwrap().finish()?);
    let markers = |pcap: &[u8]| pcap.windows(MARKER.len()).filter(|w| *w == MARKER.as_bytes()).count();
    let tls13 = wire[0].windows(6).any(|w| w == [0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]);
    println!("\nOn the wire between the nodes (tcpdump on the inter-node bridge):");
    println!(
        "  meshed pods:     TLS 1.3 handshake seen: {tls13}; payload marker in clear: {} times",
        markers(&wire[0])
    );
    println!("  un-meshed pod:   payload marker in clear: {} times (the mesh does not protect it)", markers(&wire[1]));

    std::thread::sleep(Duration::from_millis(300));
    for n in &c.nodes {
        report(n)?;
    }
    println!("\nLook around while it runs (from the node's namespace):");
    for n in &c.nodes {
        println!("  ip netns exec {} curl -s http://{}/metrics", n.netns, n.admin_addr());
    }
    println!("  ... and /debug/connections, /debug/pods, /debug/certs, /debug/pool, /debug/datapath");
    // Each node's dashboard, forwarded to this machine's loopback so a browser here opens it.
    println!("\nNode dashboards (served by each agent; forwarded to this machine's loopback):");
    for (i, n) in c.nodes.iter().enumerate() {
        let local = forward_to_node(n, 15120 + i as u16)?;
        let (status, page) = sim::http_get(&n.netns, n.admin_addr(), "/")?;
        let summary = n.admin_json("/debug/summary")?;
        println!(
            "  {}: http://{local}/  (page {status}, {} KiB; it shows {} pods, {} peer rows, programs attached: {})",
            n.name,
            page.len() / 1024,
            summary["pods"].as_array().map_or(0, Vec::len),
            summary["peers"].as_array().map_or(0, Vec::len),
            summary["ebpf"]["attached"]
        );
    }
    println!(
        "  agent logs: {}",
        c.nodes.iter().map(|n| n.dir.join("agent.log").display().to_string()).collect::<Vec<_>>().join(", ")
    );

    if args.keep {
        println!("\n--keep: the cluster stays up with a little traffic every 2 s. Ctrl-C to stop and clean up.");
        while !stopped() {
            let _ =
                frontend.workload(&["client", "--connect", &format!("{}:8080", backend.ip)], Duration::from_secs(10));
            for _ in 0..20 {
                if stopped() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    } else {
        println!("\n(run `cargo xtask demo --keep` to keep the cluster up for exploring)");
    }
    println!("\nStopping the agents (SIGTERM: programs detached, listeners closed) and removing the cluster.");
    for n in &mut c.nodes {
        let clean = n.stop_agent(Duration::from_secs(10))?;
        println!("  {}: exited cleanly {clean}; programs still attached {}", n.name, n.attached_programs()?.len());
    }
    Ok(())
}

/// Serves `127.0.0.1:port` of this machine by connecting, inside the node's network
/// namespace, to its agent's admin port: the node dashboards open in a browser here. Runs
/// until the demo exits; only loopback and the demo's own namespace are involved.
fn forward_to_node(n: &Node, port: u16) -> Result<std::net::SocketAddr> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", port)).or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))?;
    let local = listener.local_addr()?;
    let (netns, admin) = (n.netns.clone(), n.admin_addr());
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let netns = netns.clone();
            std::thread::spawn(move || {
                let Ok(Ok(upstream)) = sim::in_netns(&netns, || std::net::TcpStream::connect(admin)) else { return };
                let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else { return };
                let (mut c1, mut u1) = (client, upstream);
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c1, &mut u1);
                    let _ = u1.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    Ok(local)
}

fn report(n: &Node) -> Result<()> {
    let conns = n.admin_json("/debug/connections")?;
    println!("\n{} proxy: {} connections", n.name, conns["closed_total"]);
    // (direction, source, destination pod, outcome, error) → (connections, bytes)
    type Row = (String, String, String, String, String);
    let mut rows: std::collections::BTreeMap<Row, (u64, u64)> = Default::default();
    for c in conns["recent"].as_array().cloned().unwrap_or_default() {
        let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
        let src = if c["direction"] == "inbound" { s(&c["source_identity"]) } else { s(&c["source_pod"]) };
        let outcome = if c["error"].is_null() { s(&c["security"]) } else { "refused".into() };
        let e = rows.entry((s(&c["direction"]), src, s(&c["destination_pod"]), outcome, s(&c["error"]))).or_default();
        e.0 += 1;
        e.1 += c["bytes_sent"].as_u64().unwrap_or(0);
    }
    for ((dir, src, dst, outcome, err), (count, bytes)) in rows {
        println!("  {dir:<8} {src:<42} → {dst:<14} {outcome:<10} x{count:<3} {bytes:>7} B");
        if err != "-" {
            println!("           reason: {err}");
        }
    }
    let certs = n.admin_json("/debug/certs")?;
    for cert in certs.as_array().cloned().unwrap_or_default() {
        println!("  certificate {} expires in {} s", cert["identity"].as_str().unwrap_or("?"), cert["expires_in_secs"]);
    }
    let dp = n.admin_json("/debug/datapath")?;
    let ev = &dp["events"];
    println!("  kernel: redirected {}, strict drops {}, maps {}", ev["redirected"], ev["strict_dropped"], dp["maps"]);
    Ok(())
}
