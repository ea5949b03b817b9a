//! `cargo xtask demo`: a simulated node with meshed and un-meshed pods, the real agent and real
//! eBPF, some traffic, and a report of what went where. Cleans up on exit and on Ctrl-C.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Result, bail};
use clap::Parser;
use serde_json::Value;
use sim::{Node, Pod};

#[derive(Parser)]
#[command(about = "Switchyard demo: a simulated node with meshed pods")]
struct Args {
    /// Keep the node up after the traffic run (sending a little traffic every 2 s) until Ctrl-C.
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

fn run(args: &Args) -> Result<()> {
    if !sim::privileged("demo") {
        bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }
    println!("Switchyard demo\n===============\n");
    println!("Building a simulated node: a network namespace with a bridge (10.244.1.1, the pods' gateway)");
    println!("and a cgroup; each pod is its own network namespace + cgroup on that bridge.\n");
    let mut node = Node::new("node-a", 1)?;
    node.set_namespace_meshed("shop", true);
    node.set_namespace_meshed("legacy", false);
    let frontend = node.add_pod("frontend", "shop", None)?;
    let backend = node.add_pod("backend", "shop", None)?;
    let legacy = node.add_pod("legacy", "legacy", None)?;
    for p in [&frontend, &backend, &legacy] {
        println!(
            "  pod {:<16} ip {:<12} namespace {:<7} {}",
            format!("{}/{}", p.namespace, p.name),
            p.ip,
            p.namespace,
            if p.namespace == "shop" {
                "meshed (namespace annotated switchyard.io/mesh: enabled)"
            } else {
                "not meshed"
            }
        );
    }
    let _servers = [
        backend.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?,
        backend.serve(&["udp-server", "--listen", "0.0.0.0:5353"])?,
        legacy.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?,
    ];
    println!(
        "\nStarting mesh-agent in the node (eBPF programs attached to the node's cgroup {})",
        node.cgroup.display()
    );
    node.start_agent(&[])?;
    println!("Agent ready: outbound proxy on 10.244.1.1:15001, admin on {}\n", node.admin_addr());
    if stopped() {
        return Ok(());
    }

    println!("Traffic\n-------");
    let runs: [(&Pod, &Pod, &str); 3] = [
        (&frontend, &backend, "meshed → meshed"),
        (&frontend, &legacy, "meshed → not meshed"),
        (&legacy, &backend, "not meshed → meshed"),
    ];
    for (from, to, what) in runs {
        let dst = format!("{}:8080", to.ip);
        let r = from
            .workload(&["client", "--connect", &dst, "--count", "20", "--bytes", "16384"], Duration::from_secs(30))?;
        println!(
            "  {:<16} → {:<16} {:<22} {} of 20 connections echoed {} bytes verified; getpeername() = {}",
            from.name,
            format!("{}:8080", to.name),
            format!("({what})"),
            r["ok"],
            r["bytes_verified"],
            r["peer"].as_str().unwrap_or("?")
        );
    }
    let r = frontend.workload(&["udp-query", "--to", &format!("{}:5353", backend.ip)], Duration::from_secs(10))?;
    println!("  frontend         → backend:5353 (UDP, DNS-style)   answered: {}; UDP is never redirected", r["ok"]);

    report(&node)?;
    println!("\nWhile it runs, look at the agent from the node's namespace:");
    println!("  ip netns exec {} curl -s http://{}/metrics", node.netns, node.admin_addr());
    println!("  ip netns exec {} curl -s http://{}/debug/connections", node.netns, node.admin_addr());
    println!("  ip netns exec {} curl -s http://{}/debug/pods", node.netns, node.admin_addr());
    println!("  agent log: {}", node.dir.join("agent.log").display());

    if args.keep {
        println!("\n--keep: the node stays up with a little traffic every 2 s. Ctrl-C to stop and clean up.");
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
        println!("\n(run with `cargo xtask demo --keep` to keep the node up for exploring)");
    }
    println!("\nStopping the agent (SIGTERM: programs detached, listeners closed) and removing the node.");
    let clean = node.stop_agent(Duration::from_secs(10))?;
    let left = node.attached_programs()?.len();
    println!("Agent exited cleanly: {clean}; programs still attached to the node's cgroup: {left}");
    Ok(())
}

fn report(node: &Node) -> Result<()> {
    // The proxy records a connection when it closes; the clients have finished, so wait briefly.
    std::thread::sleep(Duration::from_millis(200));
    let conns = node.admin_json("/debug/connections")?;
    let recent = conns["recent"].as_array().cloned().unwrap_or_default();
    println!("\nWhat the proxy saw ({} connections)\n------------------", conns["closed_total"]);
    let mut rows: std::collections::BTreeMap<(String, String, String), (u64, u64, u64)> = Default::default();
    for c in &recent {
        let key = (
            c["source_pod"].as_str().unwrap_or("?").to_string(),
            c["original_dst"].as_str().unwrap_or("?").to_string(),
            c["destination_pod"].as_str().unwrap_or("-").to_string(),
        );
        let e = rows.entry(key).or_default();
        e.0 += 1;
        e.1 += c["bytes_sent"].as_u64().unwrap_or(0);
        e.2 += c["bytes_received"].as_u64().unwrap_or(0);
    }
    println!(
        "  {:<16} {:<20} {:<16} {:>5} {:>10} {:>10}",
        "source", "original dst", "dst pod", "conns", "sent", "received"
    );
    for ((src, dst, pod), (n, s, r)) in rows {
        println!("  {src:<16} {dst:<20} {pod:<16} {n:>5} {s:>10} {r:>10}");
    }
    println!("  (legacy → backend is absent: legacy is not meshed, so it went direct)");
    let dp: Value = node.admin_json("/debug/datapath")?;
    println!("\nKernel-side counters (eBPF): {}", dp["events"]);
    println!("eBPF map entries now: {}", dp["maps"]);
    Ok(())
}
