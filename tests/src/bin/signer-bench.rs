//! What issuing costs: the signer (`mesh-agent identity serve`) on a simulated node beside the
//! fake API server, asked for certificates by `--concurrency` requests at a time (over one
//! HTTP/2 connection, as an agent asks) for `--secs`, as a node agent impersonating pods of its
//! node. Prints one JSON line: certificates per second, latency percentiles, the signer's CPU
//! per 1000 certificates and its RSS idle and under load. Run as root:
//! `cargo build --release --bins && target/release/signer-bench`.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use mesh_agent::identity::{
    Identity,
    caclient::{CaClient, CaClientConfig},
    csr,
    issuer::CertIssuer as _,
};
use serde_json::json;
use sim::{Node, Signer, fake_api::FakeApi};

#[derive(Parser)]
struct Args {
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Pods (and so identities) on the node the agent asks for.
    #[arg(long, default_value_t = 100)]
    pods: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !sim::privileged("signer-bench") {
        bail!("needs root (network namespaces)");
    }
    let node = Node::with_subnet("ca", 71)?;
    let api = FakeApi::start(&node.netns)?;
    let kubeconfig = node.dir.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let ca_dir = node.dir.join("ca");
    let out =
        std::process::Command::new(sim::bin_path("mesh-agent")?).args(["ca", "init", "--dir"]).arg(&ca_dir).output()?;
    if !out.status.success() {
        bail!("ca init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pod = |ns: &str, name: &str, sa: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
               "spec": {"nodeName": "node-1", "serviceAccountName": sa, "containers": []},
               "status": {"phase": "Running"}})
    };
    api.apply("pods", pod("switchyard", "mesh-agent-1", "mesh-agent"));
    for i in 0..args.pods {
        api.apply("pods", pod("shop", &format!("web-{i}"), &format!("sa-{i}")));
    }
    let signer = Signer::start(&node, &ca_dir, &kubeconfig, &["--trusted-node-account=switchyard/mesh-agent"])?;
    let pid = signer.pid().context("signer pid")?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = signer.rss_kib().unwrap_or(0);
    let token = api.token("switchyard", "mesh-agent", Some(("mesh-agent-1", "uid-mesh-agent-1")), &["istio-ca"], 3600);
    let token_file = node.dir.join("token");
    std::fs::write(&token_file, token)?;
    let config = CaClientConfig {
        address: format!("https://{}", signer.addr),
        root_cert: ca_dir.join("bundle.crt"),
        token_file,
        cluster_id: String::new(),
    };
    let client = Arc::new(CaClient::new(config, Duration::from_secs(10))?);
    // CSRs made before the clock starts: the figure is the signer's.
    let ids: Vec<Identity> =
        (0..args.pods).map(|i| Identity::new("cluster.local", "shop", &format!("sa-{i}"))).collect();
    let csrs: Arc<Vec<(Identity, String)>> =
        Arc::new(ids.iter().map(|id| Ok((id.clone(), csr::generate(id)?.csr_pem))).collect::<Result<_>>()?);
    let (concurrency, secs) = (args.concurrency, args.secs);
    let cpu0 = sim::cpu_secs_of(pid)?;
    let rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (rss_w, signer_rss) = (rss.clone(), move || sim::rss_kib_of(pid));
    let result = sim::in_netns(&node.netns, move || -> Result<(u64, u64, Vec<f64>, Duration)> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        rt.block_on(async move {
            let start = Instant::now();
            let deadline = start + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for w in 0..concurrency {
                let (client, csrs) = (client.clone(), csrs.clone());
                tasks.push(tokio::spawn(async move {
                    let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
                    let mut i = w;
                    while Instant::now() < deadline {
                        let (id, csr) = &csrs[i % csrs.len()];
                        i += concurrency;
                        let t = Instant::now();
                        match client.sign(id, csr, Duration::from_secs(3600)).await {
                            Ok(_) => {
                                ok += 1;
                                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                            }
                            Err(_) => failed += 1,
                        }
                    }
                    (ok, failed, lat)
                }));
            }
            let sampler = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Some(r) = signer_rss() {
                        rss_w.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
            let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
            for t in tasks {
                let (o, f, l) = t.await?;
                ok += o;
                failed += f;
                lat.extend(l);
            }
            sampler.abort();
            Ok((ok, failed, lat, start.elapsed()))
        })
    })??;
    let (ok, failed, mut lat, took) = result;
    let cpu = sim::cpu_secs_of(pid)? - cpu0;
    lat.sort_by(f64::total_cmp);
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
    let per_sec = ok as f64 / took.as_secs_f64();
    println!(
        "{}",
        json!({
            "certificates": ok, "failed": failed, "seconds": took.as_secs_f64(),
            "certificates_per_second": (per_sec * 10.0).round() / 10.0,
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            "signer_cpu_seconds_per_1000": if ok > 0 { (cpu / ok as f64 * 1000.0 * 1000.0).round() / 1000.0 } else { 0.0 },
            "signer_rss_kib": {"idle": rss_idle, "under_load_max": rss.load(std::sync::atomic::Ordering::Relaxed)},
            "token_reviews": api.requests().iter().filter(|r| *r == "create tokenreviews").count(),
            "concurrency": concurrency, "pods": args.pods,
        })
    );
    Ok(())
}
