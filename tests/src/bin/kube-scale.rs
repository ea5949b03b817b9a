//! How much agent memory a cluster's pods cost in Kubernetes mode: one simulated node whose
//! agent watches the fake API server, RSS with no pods, then with `--pods` pods of other nodes
//! (the agent keeps every pod trimmed, for routing and identities) added over the watch and
//! again after a relist. Prints one JSON line. Run as root:
//! `cargo build --release --bins && target/release/kube-scale --pods 10000`.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use serde_json::json;
use sim::{Node, fake_api::FakeApi};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
}

fn rss_kib(pid: u32) -> Result<u64> {
    sim::rss_kib_of(pid).context("VmRSS")
}

fn known_pods(node: &Node) -> usize {
    node.admin_json("/debug/pods").ok().and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !sim::privileged("kube-scale") {
        bail!("needs root (network namespaces, eBPF)");
    }
    let mut node = Node::with_subnet("node", 70)?;
    let mut api = FakeApi::start(&node.netns)?;
    let kubeconfig = node.dir.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    node.kubeconfig = Some(kubeconfig);
    api.apply("namespaces", json!({"metadata": {"name": "shop", "annotations": {"switchyard.io/mesh": "enabled"}}}));
    node.start_agent(&[])?;
    std::thread::sleep(Duration::from_secs(2));
    let pid = node.agent_pid().context("agent")?;
    let empty = rss_kib(pid)?;
    let t0 = Instant::now();
    for i in 0..args.pods {
        let name = format!("app-{i:05}-7d9f8c6b5-x2k4q");
        api.apply(
            "pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "shop", "uid": format!("0b5e{i:08x}-1c2d-4e5f-8a9b-0c1d2e3f4a5b"),
                    "labels": {"app": "app", "pod-template-hash": "7d9f8c6b5"},
                    "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-25T00:00:00Z"},
                    "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {"f:podIP": {}}}}]},
                "spec": {"nodeName": format!("node-{}", i % 100), "serviceAccountName": "app",
                    "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
                "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
                    "qosClass": "Burstable"}}),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while known_pods(&node) < args.pods {
        if Instant::now() > deadline {
            bail!("agent knows {} of {} pods after 120 s", known_pods(&node), args.pods);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let synced = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let watched = rss_kib(pid)?;
    // A relist (after 410 Gone) holds the old and the new listing at once for a moment.
    api.compact();
    std::thread::sleep(Duration::from_secs(5));
    let relisted = rss_kib(pid)?;
    println!(
        "{}",
        json!({"pods": args.pods, "rss_kib_no_pods": empty, "rss_kib_with_pods": watched,
               "rss_kib_after_relist": relisted,
               "kib_per_pod": (watched as f64 - empty as f64) / args.pods as f64,
               "seconds_to_sync": synced.as_secs_f64()})
    );
    api.stop();
    Ok(())
}
