//! `cargo xtask bench`: Switchyard against the physical limit of this machine, every time.
//!
//! A simulated two-node cluster (real agents, real eBPF) and standard load tools: sockperf
//! (TCP ping-pong latency), iperf3 (bulk), oha (HTTP at a fixed rate, and new connections),
//! wrk (HTTP max throughput), nginx serving 1 KiB. Four paths, measured side by side and
//! interleaved within each repetition:
//!
//! * `direct-local`  pod → pod on the same node, no mesh (the physical limit);
//! * `mesh-local`    same, through the node proxy (redirect + one proxy hop);
//! * `mesh-local-sockmap` the same on a third node whose agent runs with same-node acceleration
//!   (`--sockmap-acceleration=on`), compared with `direct-local`;
//! * `direct-remote` pod → pod on another node, no mesh;
//! * `mesh-remote`   through both nodes' proxies with HBONE mTLS;
//! * `ztunnel-remote` (with `--peer-ztunnel PATH` or `SWITCHYARD_ZTUNNEL`) the same two nodes
//!   through Istio's ztunnel instead: one ztunnel per pod in dedicated mode (iptables redirect in
//!   the client pod, `FAKE_CA=true`, a local workload file), HBONE mTLS between them; its CPU and
//!   RSS measured like the agents';
//! * `baseline-local`, `baseline-remote` (with `--baseline-agent PATH`) the mesh paths again on
//!   two more nodes whose agents are another build, so a change shows its effect in one run.
//!
//! Each figure is the median over repetitions with its min-max spread, and the ratio to the
//! direct path of the same topology. Host steal time is recorded per run (runs at 5 % or more
//! are flagged). Writes JSON and a markdown table.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use serde::Serialize;
use serde_json::Value;
use sim::{Cluster, Pod, Server};

#[derive(Parser)]
#[command(about = "Switchyard benchmark harness")]
struct Args {
    /// Short runs, one repetition: under two minutes, for iteration.
    #[arg(long)]
    quick: bool,
    /// Repetitions (default 3; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    #[arg(long, default_value = "bench/results.json")]
    json: PathBuf,
    #[arg(long, default_value = "bench/RESULTS.md")]
    markdown: PathBuf,
    /// The command line to record in the results (set by `cargo xtask bench`).
    #[arg(long, default_value = "switchyard-bench")]
    command: String,
    /// Pin agents (one worker thread each), servers and load tools to this CPU: the proxy's own
    /// cost without cross-CPU wake-ups (about 0.2 ms per round trip on these VMs).
    #[arg(long)]
    pin_cpu: Option<usize>,
    /// Extra flag for every agent, e.g. `--agent-arg=--copy-buffer-bytes=16384` (repeatable).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Only the scrape-under-load comparison (issue 7): mesh-local HTTP at 1000 req/s on 4
    /// connections, unscraped and scraped 10/s back to back in each repetition.
    #[arg(long)]
    only_scrape: bool,
    /// Istio's ztunnel binary: adds the `ztunnel-remote` path (never needed; reported as not
    /// measured without it).
    #[arg(long, env = "SWITCHYARD_ZTUNNEL")]
    peer_ztunnel: Option<PathBuf>,
    /// Another build of mesh-agent: adds `baseline-local` and `baseline-remote`.
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
    /// Only these paths (comma-separated; default all that can run).
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
}

const ZTUNNEL: &str = "ztunnel-remote";
const BASELINE: [&str; 2] = ["baseline-local", "baseline-remote"];
/// Every column of the results, in order.
const ALL_PATHS: [&str; 8] = [
    "direct-local",
    "mesh-local",
    "mesh-local-sockmap",
    "baseline-local",
    "direct-remote",
    "mesh-remote",
    "baseline-remote",
    ZTUNNEL,
];

/// A path through a proxy (its CPU and memory are measured).
fn proxied(path: &str) -> bool {
    !path.starts_with("direct")
}

/// The direct path of the same topology.
fn direct_of(path: &str) -> &'static str {
    if path.ends_with("-local") || path.ends_with("-sockmap") { "direct-local" } else { "direct-remote" }
}
const SOCKMAP_FLAG: &str = "--sockmap-acceleration";

#[derive(Serialize, Clone)]
struct Figure {
    workload: String,
    metric: String,
    unit: String,
    path: String,
    values: Vec<f64>,
    median: f64,
    min: f64,
    max: f64,
    /// median / median of the direct path of the same topology.
    ratio_to_direct: Option<f64>,
    /// For the remote mesh paths: median / median of `ztunnel-remote`.
    ratio_to_ztunnel: Option<f64>,
    /// For `mesh-*`: median / median of the same `baseline-*` path.
    ratio_to_baseline: Option<f64>,
    /// Whether lower is better (latency, CPU, memory) or higher (throughput).
    lower_is_better: bool,
}

#[derive(Serialize)]
struct Run {
    date: String,
    command: String,
    machine: BTreeMap<String, String>,
    quick: bool,
    agent_args: Vec<String>,
    /// All processes on this CPU, or unpinned.
    pinned_cpu: Option<usize>,
    reps: usize,
    seconds_per_measurement: f64,
    /// Host steal time per repetition, percent.
    steal_percent: Vec<f64>,
    /// The paths measured, in order.
    paths: Vec<String>,
    /// The peer and baseline binaries, when given.
    ztunnel: Option<String>,
    baseline_agent: Option<String>,
    figures: Vec<Figure>,
    not_measured: Vec<String>,
}

struct Bench {
    c: Cluster,
    pin: Option<usize>,
    /// Pods on node-b with a small HTTP server each: HBONE pools to many pods (`fan_out`).
    fan: Vec<Pod>,
    mesh_client: Pod,
    plain_client: Pod,
    local_server: Pod,
    remote_server: Pod,
    /// On node-c, whose agent accelerates.
    accel_client: Pod,
    accel_server: Pod,
    secs: f64,
    zt: Option<Ztunnel>,
    base: Option<Baseline>,
    _servers: Vec<Server>,
}

/// The ztunnel path: a client pod on node-a and a server pod on node-b, in a namespace
/// Switchyard does not mesh, each with a dedicated ztunnel.
struct Ztunnel {
    client: Pod,
    server: Pod,
    pids: Vec<u32>,
    _procs: Vec<Server>,
}

/// The baseline agent's nodes: node-d (client and local server) and node-e (remote server).
struct Baseline {
    client: Pod,
    local_server: Pod,
    remote_server: Pod,
    /// As [`Bench::fan`], on node-e.
    fan: Vec<Pod>,
}

/// Destination pods of the fan-out measurement.
const FAN: usize = 8;

/// The fan-out pods on `node`: `FAN` replicas of one Deployment `name`, one service account
/// (one identity), as a Deployment's replicas are: what pools per pod address cost against
/// pools per node shows here.
fn replicas(node: &mut sim::Node, name: &str) -> Result<Vec<Pod>> {
    let pods: Vec<Pod> =
        (0..FAN).map(|i| node.add_pod(&format!("{name}-{i}"), "bench", None)).collect::<Result<_>>()?;
    for p in &pods {
        node.set_service_account(&p.name, name);
        node.set_workload(&p.name, name);
    }
    Ok(pods)
}

type Samples = BTreeMap<(String, String, String, String, bool), Vec<f64>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn tool(name: &str) -> Result<()> {
    if Command::new("sh").args(["-c", &format!("command -v {name}")]).output()?.status.success() {
        Ok(())
    } else {
        bail!("{name} is not installed: run `cargo xtask bench` (it installs the load tools)")
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    if !sim::privileged("bench") {
        bail!("the benchmark builds network namespaces and loads eBPF: run it as root");
    }
    for t in ["oha", "wrk", "iperf3", "sockperf", "nginx"] {
        tool(t)?;
    }
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let secs = if args.quick { 2.0 } else { 8.0 };
    let mut agent_args = args.agent_args.clone();
    if args.pin_cpu.is_some() && !agent_args.iter().any(|a| a.starts_with("--workers")) {
        agent_args.push("--workers=1".into());
    }
    let mut not_measured = Vec::new();
    if args.peer_ztunnel.is_none() {
        not_measured.push(format!("{ZTUNNEL}: no ztunnel given (--peer-ztunnel PATH or SWITCHYARD_ZTUNNEL)"));
    }
    if args.baseline_agent.is_none() {
        not_measured.push("baseline-local, baseline-remote: no --baseline-agent given".to_string());
    }
    let b = setup(secs, &agent_args, args.pin_cpu, args.peer_ztunnel.as_deref(), args.baseline_agent.as_deref())?;
    let paths: Vec<&str> = ALL_PATHS
        .into_iter()
        .filter(|p| (*p != ZTUNNEL || b.zt.is_some()) && (!BASELINE.contains(p) || b.base.is_some()))
        .filter(|p| args.paths.is_empty() || args.paths.iter().any(|a| a == p))
        .collect();
    let mut samples: Samples = BTreeMap::new();
    let mut steal = Vec::new();
    let mut add = |w: &str, m: &str, u: &str, p: &str, lower: bool, v: f64| {
        samples.entry((w.into(), m.into(), u.into(), p.into(), lower)).or_default().push(v);
    };

    // Memory at idle, before any load.
    for path in paths.iter().copied().filter(|p| proxied(p) && p.ends_with("-remote")) {
        let idle_rss = b.agents_rss_kib(path)?;
        add("agent memory", "RSS idle (both proxies)", "MiB", path, true, idle_rss as f64 / 1024.0);
    }

    // HBONE pools to many pods, before any load (no pooled connection exists yet): the first
    // request to each of FAN pods on another node. Pools per destination pod (HBONE as
    // ztunnel speaks it) against the baseline's, whatever its sharing was.
    if !args.only_scrape {
        for path in paths.iter().copied().filter(|p| ["mesh-remote", "baseline-remote"].contains(p)) {
            let (latency, handshakes, rss) = b.fan_out(path)?;
            let w = format!("first request to each of {FAN} pods on another node");
            add(&w, "latency (median)", "ms", path, true, latency);
            add(&w, "HBONE handshakes", "count", path, true, handshakes);
            add(&w, "RSS growth (both proxies)", "KiB", path, true, rss);
        }
    }

    let started = Instant::now();
    for rep in 0..reps {
        let st0 = steal_sample()?;
        eprintln!("== repetition {}/{reps}", rep + 1);
        if args.only_scrape {
            let (client, target) = b.path("mesh-local");
            let ip = target.ip.to_string();
            let w = "http 1000 req/s, 1 KiB, 4 conns";
            let (p50, p99, _) = b.oha_rate(client, &ip, 4)?;
            add(w, "p50", "ms", "mesh-local", true, p50);
            add(w, "p99", "ms", "mesh-local", true, p99);
            let (p50, p99, scrapes) = b.oha_rate_scraped(client, &ip)?;
            add(w, "p50 while admin scraped 10/s", "ms", "mesh-local", true, p50);
            add(w, "p99 while admin scraped 10/s", "ms", "mesh-local", true, p99);
            eprintln!("   {scrapes} admin scrapes during the run");
            steal.push(steal_percent(st0, steal_sample()?));
            continue;
        }
        for path in paths.iter().copied() {
            let (client, target) = b.path(path);
            let ip = target.ip.to_string();
            // TCP ping-pong latency.
            let l = b.sockperf(client, &ip)?;
            add("tcp ping-pong 64 B", "p50", "µs", path, true, l[0]);
            add("tcp ping-pong 64 B", "p99", "µs", path, true, l[1]);
            add("tcp ping-pong 64 B", "p99.9", "µs", path, true, l[2]);
            // HTTP at a fixed 1000 req/s, 1 KiB bodies, 4 and 16 keep-alive connections, with
            // the agents' CPU over the run.
            for conns in [4, 16] {
                let cpu0 = b.agents_cpu_secs(path)?;
                let t0 = Instant::now();
                let (p50, p99, rps) = b.oha_rate(client, &ip, conns)?;
                let cores = (b.agents_cpu_secs(path)? - cpu0) / t0.elapsed().as_secs_f64();
                let w = format!("http 1000 req/s, 1 KiB, {conns} conns");
                add(&w, "p50", "ms", path, true, p50);
                add(&w, "p99", "ms", path, true, p99);
                if proxied(path) {
                    add(&w, "proxy CPU per 1000 req/s", "cores", path, true, cores / (rps / 1000.0));
                }
            }
            // The same 1000 req/s on 4 connections while the node's admin endpoint is scraped
            // 10 times a second (/metrics and the dashboard's /debug/summary, alternately): the
            // scrape must not show in the data plane's p99.
            if path == "mesh-local" {
                let (p50, p99, scrapes) = b.oha_rate_scraped(client, &ip)?;
                let w = "http 1000 req/s, 1 KiB, 4 conns";
                add(w, "p50 while admin scraped 10/s", "ms", path, true, p50);
                add(w, "p99 while admin scraped 10/s", "ms", path, true, p99);
                eprintln!("   {scrapes} admin scrapes during the run");
            }
            // Max throughput, 16 connections; memory sampled under that load.
            let (rps, rss) = b.wrk_max(client, &ip, path)?;
            add("http max, 16 conns", "throughput", "req/s", path, false, rps);
            if proxied(path) {
                let what = if path.ends_with("-remote") {
                    "RSS under load (both proxies)"
                } else {
                    "RSS under load (one agent)"
                };
                add("agent memory", what, "MiB", path, true, rss as f64 / 1024.0);
            }
            // New connections per second (no keep-alive).
            add("new connections", "rate", "conn/s", path, false, b.oha_new_conns(client, &ip)?);
            // Bulk throughput, and the proxies' CPU per Gbit/s of it.
            for streams in [1, 8] {
                let cpu0 = b.agents_cpu_secs(path)?;
                let t0 = Instant::now();
                let gbps = b.iperf(client, &ip, streams)?;
                let cores = (b.agents_cpu_secs(path)? - cpu0) / t0.elapsed().as_secs_f64();
                let w = format!("bulk tcp, {streams} stream{}", if streams == 1 { "" } else { "s" });
                add(&w, "throughput", "Gbit/s", path, false, gbps);
                if proxied(path) {
                    add(&w, "proxy CPU per Gbit/s", "cores", path, true, cores / gbps);
                }
            }
        }
        steal.push(steal_percent(st0, steal_sample()?));
    }
    // Memory with many open idle connections through each proxied path.
    if !args.only_scrape {
        let open = if args.quick { 2_000 } else { 10_000 };
        for path in paths.iter().copied().filter(|p| proxied(p) && *p != "mesh-local-sockmap") {
            let (rss, per_conn) = b.rss_with_open_connections(path, open)?;
            let w = format!("{open} open idle connections");
            add(&w, "RSS", "MiB", path, true, rss as f64 / 1024.0);
            add(&w, "memory per connection", "KiB", path, true, per_conn);
        }
    }
    eprintln!("measured in {:?}", started.elapsed());

    let figures = figures(samples);
    let run = Run {
        date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command: args.command.clone(),
        machine: machine(),
        quick: args.quick,
        agent_args,
        pinned_cpu: args.pin_cpu,
        reps,
        seconds_per_measurement: secs,
        steal_percent: steal,
        paths: paths.iter().map(|p| p.to_string()).collect(),
        ztunnel: args.peer_ztunnel.as_ref().map(|p| p.display().to_string()),
        baseline_agent: args.baseline_agent.as_ref().map(|p| p.display().to_string()),
        figures,
        not_measured,
    };
    if let Some(d) = args.json.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&run)?)?;
    std::fs::write(&args.markdown, markdown(&run))?;
    println!("{}", markdown(&run));
    eprintln!("wrote {} and {}", args.json.display(), args.markdown.display());
    Ok(())
}

fn setup(
    secs: f64,
    agent_args: &[String],
    pin: Option<usize>,
    ztunnel: Option<&std::path::Path>,
    baseline: Option<&std::path::Path>,
) -> Result<Bench> {
    let mut c = Cluster::new()?;
    c.add_node_at("node-a", 51)?;
    c.add_node_at("node-b", 52)?;
    c.add_node_at("node-c", 53)?;
    if let Some(bin) = baseline {
        for (name, subnet) in [("node-d", 54), ("node-e", 55)] {
            c.add_node_at(name, subnet)?;
            c.node(name).agent_command.bin = Some(bin.to_path_buf());
        }
    }
    c.set_namespace("bench", true, None);
    c.set_namespace("plain", false, None);
    let mesh_client = c.node("node-a").add_pod("mesh-client", "bench", None)?;
    let plain_client = c.node("node-a").add_pod("plain-client", "plain", None)?;
    let local_server = c.node("node-a").add_pod("local-server", "bench", None)?;
    let remote_server = c.node("node-b").add_pod("remote-server", "bench", None)?;
    let accel_client = c.node("node-c").add_pod("accel-client", "bench", None)?;
    let accel_server = c.node("node-c").add_pod("accel-server", "bench", None)?;
    let fan = replicas(c.node("node-b"), "fan")?;
    let base = match baseline {
        Some(_) => Some(Baseline {
            client: c.node("node-d").add_pod("base-client", "bench", None)?,
            local_server: c.node("node-d").add_pod("base-local-server", "bench", None)?,
            remote_server: c.node("node-e").add_pod("base-remote-server", "bench", None)?,
            fan: replicas(c.node("node-e"), "base-fan")?,
        }),
        None => None,
    };
    // The ztunnel pods: in a namespace Switchyard leaves alone.
    c.set_namespace("ztunnel", false, None);
    let zt_pods = match ztunnel {
        Some(_) => Some((
            c.node("node-a").add_pod("zt-client", "ztunnel", None)?,
            c.node("node-b").add_pod("zt-server", "ztunnel", None)?,
        )),
        None => None,
    };
    let mut servers = Vec::new();
    let mut server_pods = vec![&local_server, &remote_server, &accel_server];
    if let Some(b) = &base {
        server_pods.extend([&b.local_server, &b.remote_server]);
    }
    if let Some((_, zs)) = &zt_pods {
        server_pods.push(zs);
    }
    for p in fan.iter().chain(base.iter().flat_map(|b| &b.fan)) {
        servers.push(p.serve_tool("sim-http", &["serve", "--listen", "0.0.0.0:8080", "--name", &p.name])?);
    }
    for s in server_pods {
        servers.push(nginx(&c, s, pin)?);
        servers.push(daemon(s, pin, "iperf3", &["-s", "-p", "5201"])?);
        servers.push(daemon(s, pin, "sockperf", &["server", "--tcp", "-p", "11111"])?);
    }
    // node-a and node-b run as configured (acceleration off unless the flags say otherwise);
    // node-c always accelerates.
    let mut plain: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    if !plain.iter().any(|a| a.starts_with(SOCKMAP_FLAG)) {
        plain.push("--sockmap-acceleration=off");
    }
    let mut accel: Vec<&str> = agent_args.iter().map(String::as_str).filter(|a| !a.starts_with(SOCKMAP_FLAG)).collect();
    accel.push("--sockmap-acceleration=on");
    c.start_only(&["node-a", "node-b"], &plain)?;
    c.start_only(&["node-c"], &accel)?;
    if base.is_some() {
        c.start_only(&["node-d", "node-e"], &plain)?;
    }
    let zt = match (ztunnel, zt_pods) {
        (Some(bin), Some((client, server))) => Some(start_ztunnels(&c, bin, client, server, pin)?),
        _ => None,
    };
    if let Some(cpu) = pin {
        let mut pids: Vec<u32> = c.nodes.iter().map(|n| n.agent_pid().context("agent pid")).collect::<Result<_>>()?;
        pids.extend(zt.iter().flat_map(|z| z.pids.iter().copied()));
        for pid in pids {
            let ok = Command::new("taskset")
                .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
                .output()?
                .status
                .success();
            if !ok {
                bail!("taskset could not pin proxy {pid} to CPU {cpu}");
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok(Bench {
        c,
        pin,
        fan,
        mesh_client,
        plain_client,
        local_server,
        remote_server,
        accel_client,
        accel_server,
        secs,
        zt,
        base,
        _servers: servers,
    })
}

/// One dedicated-mode ztunnel in each of the two pods, as `../shared/peers/ztunnel/README.md`
/// (or ztunnel's own docs) runs it without istiod: a local workload file naming both pods
/// (HBONE), `FAKE_CA=true` (both sign with ztunnel's built-in test root), and the client pod's
/// outbound TCP redirected to its ztunnel's 15001 (ztunnel marks its own sockets 1337).
fn start_ztunnels(c: &Cluster, bin: &std::path::Path, client: Pod, server: Pod, pin: Option<usize>) -> Result<Ztunnel> {
    let dir = c.dir.join("ztunnel");
    std::fs::create_dir_all(&dir)?;
    let workload = |p: &Pod| {
        format!(
            "- {{uid: k//v1/Pod/{ns}/{name}, name: {name}, namespace: {ns}, serviceAccount: {name}, \
             trustDomain: cluster.local, workloadIps: [\"{ip}\"], protocol: HBONE, node: {node}, services: {{}}}}\n",
            ns = p.namespace,
            name = p.name,
            ip = p.ip,
            node = p.node
        )
    };
    let yaml = format!("workloads:\n{}{}", workload(&client), workload(&server));
    let xds = dir.join("zt.yaml");
    std::fs::write(&xds, yaml)?;
    let redirect = ["-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-o", "lo", "-m", "mark", "!", "--mark"];
    let out = client
        .command("iptables")
        .args(redirect)
        .args(["0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15001"])
        .output()?;
    if !out.status.success() {
        bail!("iptables redirect in {}: {}", client.name, String::from_utf8_lossy(&out.stderr));
    }
    let mut procs = Vec::new();
    for p in [&client, &server] {
        let log = std::fs::File::create(dir.join(format!("{}.log", p.name)))?;
        let mut cmd = pod_cmd(p, pin, bin.to_str().context("ztunnel path")?);
        cmd.envs([
            ("PROXY_MODE", "dedicated".to_string()),
            ("PROXY_WORKLOAD_INFO", format!("{}/{}/{}", p.namespace, p.name, p.name)),
            ("NODE_NAME", p.node.clone()),
            ("FAKE_CA", "true".into()),
            ("XDS_ADDRESS", String::new()),
            ("LOCAL_XDS_PATH", xds.display().to_string()),
            ("ISTIO_META_DNS_CAPTURE", "false".into()),
            ("PACKET_MARK", "1337".into()),
            ("ENABLE_ORIG_SRC", "false".into()),
            ("IPV6_ENABLED", "false".into()),
            ("RUST_LOG", "warn".into()),
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(log);
        if pin.is_some() {
            cmd.env("ZTUNNEL_WORKER_THREADS", "1");
        }
        procs.push(Server::spawn(cmd)?);
    }
    for p in [&client, &server] {
        sim::eventually(Duration::from_secs(20), &format!("ztunnel in {} ready", p.name), || {
            matches!(sim::http_get(&p.netns, "127.0.0.1:15021".parse().ok()?, "/healthz/ready"), Ok((200, _)))
                .then_some(())
        })
        .with_context(|| std::fs::read_to_string(dir.join(format!("{}.log", p.name))).unwrap_or_default())?;
    }
    let pids = procs.iter().map(|s| s.pid()).collect();
    Ok(Ztunnel { client, server, pids, _procs: procs })
}

/// `program` in `pod`, on CPU `pin` if set.
fn pod_cmd(pod: &Pod, pin: Option<usize>, program: &str) -> Command {
    match pin {
        Some(cpu) => {
            let mut c = pod.command("taskset");
            c.args(["-c", &cpu.to_string(), program]);
            c
        }
        None => pod.command(program),
    }
}

/// A long-running tool in a pod, killed with the bench.
fn daemon(pod: &Pod, pin: Option<usize>, program: &str, args: &[&str]) -> Result<Server> {
    let mut cmd = pod_cmd(pod, pin, program);
    cmd.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let server = Server::spawn(cmd)?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(server)
}

/// nginx serving a 1 KiB body on :8080, one worker, no access log.
fn nginx(c: &Cluster, pod: &Pod, pin: Option<usize>) -> Result<Server> {
    let dir = c.dir.join(format!("nginx-{}", pod.name));
    let conf_path = sim::nginx_1k_config(&dir)?;
    daemon(pod, pin, "nginx", &["-c", conf_path.to_str().unwrap(), "-p", dir.to_str().unwrap()])
}

impl Bench {
    fn path(&self, p: &str) -> (&Pod, &Pod) {
        let zt = || self.zt.as_ref().expect("the ztunnel path runs only with ztunnel");
        let base = || self.base.as_ref().expect("the baseline paths run only with a baseline agent");
        match p {
            "direct-local" => (&self.plain_client, &self.local_server),
            "mesh-local" => (&self.mesh_client, &self.local_server),
            "mesh-local-sockmap" => (&self.accel_client, &self.accel_server),
            "direct-remote" => (&self.plain_client, &self.remote_server),
            ZTUNNEL => (&zt().client, &zt().server),
            "baseline-local" => (&base().client, &base().local_server),
            "baseline-remote" => (&base().client, &base().remote_server),
            _ => (&self.mesh_client, &self.remote_server),
        }
    }

    fn secs_arg(&self) -> String {
        format!("{}", self.secs.ceil() as u64)
    }

    fn in_pod(&self, pod: &Pod, program: &str, args: &[&str]) -> Result<String> {
        let mut cmd = pod_cmd(pod, self.pin, program);
        cmd.args(args);
        let out = sim::output_timeout(cmd, Duration::from_secs_f64(self.secs * 4.0 + 30.0))?;
        if !out.status.success() {
            bail!("{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// p50, p99, p99.9 in µs (sockperf reports half the round trip).
    fn sockperf(&self, client: &Pod, ip: &str) -> Result<[f64; 3]> {
        let out = self.in_pod(
            client,
            "sockperf",
            &["ping-pong", "--tcp", "-i", ip, "-p", "11111", "-m", "64", "-t", &self.secs_arg()],
        )?;
        let pct = |p: &str| -> Result<f64> {
            out.lines()
                .find(|l| l.contains(&format!("percentile {p} =")))
                .and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
                .with_context(|| format!("no percentile {p} in sockperf output:\n{out}"))
        };
        Ok([pct("50.000")?, pct("99.000")?, pct("99.900")?])
    }

    fn oha_json(&self, client: &Pod, args: &[&str]) -> Result<Value> {
        let out = self.in_pod(client, "oha", args)?;
        serde_json::from_str(&out).with_context(|| format!("oha output is not JSON: {out}"))
    }

    /// (p50 ms, p99 ms, achieved req/s) at a fixed 1000 req/s.
    fn oha_rate(&self, client: &Pod, ip: &str, conns: usize) -> Result<(f64, f64, f64)> {
        let url = format!("http://{ip}:8080/1k");
        let z = format!("{}s", self.secs_arg());
        let c = conns.to_string();
        let v = self.oha_json(
            client,
            &["-z", &z, "-q", "1000", "-c", &c, "--latency-correction", "--no-tui", "--output-format", "json", &url],
        )?;
        let p = &v["latencyPercentiles"];
        let ok = v["statusCodeDistribution"]["200"].as_f64().unwrap_or(0.0);
        if ok == 0.0 {
            bail!("oha got no 200 from {url}: {v}");
        }
        Ok((
            p["p50"].as_f64().unwrap_or(f64::NAN) * 1000.0,
            p["p99"].as_f64().unwrap_or(f64::NAN) * 1000.0,
            v["summary"]["requestsPerSec"].as_f64().unwrap_or(f64::NAN),
        ))
    }

    /// One request to each fan-out pod of `path`'s other node, each the first to that pod:
    /// (median latency ms, HBONE handshakes the client's agent made, growth of both agents'
    /// RSS in KiB with the pools open).
    fn fan_out(&self, path: &str) -> Result<(f64, f64, f64)> {
        let (client, pods, node) = match (path, &self.base) {
            ("baseline-remote", Some(b)) => (&b.client, &b.fan, "node-d"),
            _ => (&self.mesh_client, &self.fan, "node-a"),
        };
        let node = self.c.nodes.iter().find(|n| n.name == node).context("the client's node")?;
        let handshakes = || -> Result<f64> {
            Ok(sim::metric(&node.admin_text("/metrics")?, "switchyard_hbone_client_handshakes_total", &[]))
        };
        let (h0, rss0) = (handshakes()?, self.agents_rss_kib(path)?);
        let mut latencies = Vec::new();
        for p in pods {
            let url = format!("http://{}:8080/", p.ip);
            let v = self.oha_json(client, &["-n", "1", "-c", "1", "--no-tui", "--output-format", "json", &url])?;
            if v["statusCodeDistribution"]["200"].as_f64().unwrap_or(0.0) != 1.0 {
                bail!("no 200 from {url}: {v}");
            }
            latencies.push(v["latencyPercentiles"]["p50"].as_f64().unwrap_or(f64::NAN) * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(500));
        let (h1, rss1) = (handshakes()?, self.agents_rss_kib(path)?);
        Ok((median(&latencies), h1 - h0, rss1 as f64 - rss0 as f64))
    }

    /// New connections per second: one request per connection.
    /// [`Self::oha_rate`] with 4 connections while a thread scrapes the client node's admin
    /// endpoint 10 times a second; returns (p50, p99, scrapes made).
    fn oha_rate_scraped(&self, client: &Pod, ip: &str) -> Result<(f64, f64, u64)> {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        };
        let node = self.c.nodes.iter().find(|n| n.name == client.node).context("client's node")?;
        let (netns, admin) = (node.netns.clone(), node.admin_addr());
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (s, d) = (stop.clone(), done.clone());
        let scraper = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let path = if i.is_multiple_of(2) { "/metrics" } else { "/debug/summary" };
                if matches!(sim::http_get(&netns, admin, path), Ok((200, _))) {
                    d.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = self.oha_rate(client, ip, 4);
        stop.store(true, Ordering::Relaxed);
        let _ = scraper.join();
        let (p50, p99, _) = r?;
        Ok((p50, p99, done.load(Ordering::Relaxed)))
    }

    fn oha_new_conns(&self, client: &Pod, ip: &str) -> Result<f64> {
        let url = format!("http://{ip}:8080/1k");
        let z = format!("{}s", self.secs_arg());
        let v = self.oha_json(
            client,
            &["-z", &z, "-c", "16", "--disable-keepalive", "--no-tui", "--output-format", "json", &url],
        )?;
        Ok(v["summary"]["requestsPerSec"].as_f64().unwrap_or(f64::NAN))
    }

    /// (req/s, max agents' RSS KiB during the run).
    fn wrk_max(&self, client: &Pod, ip: &str, path: &str) -> Result<(f64, u64)> {
        let url = format!("http://{ip}:8080/1k");
        let d = format!("{}s", self.secs_arg());
        let (out, rss) = std::thread::scope(|s| {
            let h = s.spawn(|| self.in_pod(client, "wrk", &["-t", "1", "-c", "16", "-d", &d, &url]));
            let mut max = 0;
            while !h.is_finished() {
                max = max.max(self.agents_rss_kib(path).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(200));
            }
            (h.join().unwrap(), max)
        });
        let out = out?;
        let rps = out
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:").and_then(|v| v.trim().parse().ok()))
            .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
        Ok((rps, rss))
    }

    /// Gbit/s received.
    fn iperf(&self, client: &Pod, ip: &str, streams: usize) -> Result<f64> {
        let p = streams.to_string();
        let out = self.in_pod(client, "iperf3", &["-c", ip, "-p", "5201", "-t", &self.secs_arg(), "-P", &p, "-J"])?;
        let v: Value = serde_json::from_str(&out)?;
        Ok(v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(f64::NAN) / 1e9)
    }

    /// The agents on a path: node-a's for mesh-local, node-c's for mesh-local-sockmap, node-a's
    /// and node-b's otherwise.
    fn agent_pids(&self, path: &str) -> Vec<u32> {
        if path == ZTUNNEL {
            return self.zt.as_ref().map(|z| z.pids.clone()).unwrap_or_default();
        }
        let names: &[&str] = match path {
            "mesh-local" => &["node-a"],
            "mesh-local-sockmap" => &["node-c"],
            "baseline-local" => &["node-d"],
            "baseline-remote" => &["node-d", "node-e"],
            _ => &["node-a", "node-b"],
        };
        self.c.nodes.iter().filter(|n| names.contains(&n.name.as_str())).filter_map(|n| n.agent_pid()).collect()
    }

    fn agents_cpu_secs(&self, path: &str) -> Result<f64> {
        self.agent_pids(path).into_iter().map(sim::cpu_secs_of).sum()
    }

    fn agents_rss_kib(&self, path: &str) -> Result<u64> {
        self.agent_pids(path).into_iter().map(rss_kib).sum()
    }

    /// Opens `n` idle connections on `path` in two halves and reads its proxies' RSS: (KiB with
    /// all open, KiB per connection). The per-connection figure is the growth over the second
    /// half: the first half takes up what the allocator kept free from the earlier loads, so
    /// the growth from zero would understate what a connection costs.
    fn rss_with_open_connections(&self, path: &str, n: usize) -> Result<(u64, f64)> {
        let (client, server) = self.path(path);
        let to = format!("{}:8080", server.ip);
        // Each hold waits until its connections are accepted; the proxies open their upstream
        // side (a tunnel each, on another node) just after: give that time to settle.
        let first = client.hold(&to, n / 2, 60)?;
        std::thread::sleep(Duration::from_secs(3));
        let half = self.agents_rss_kib(path)?;
        let second = client.hold(&to, n - n / 2, 50)?;
        std::thread::sleep(Duration::from_secs(3));
        let rss = self.agents_rss_kib(path)?;
        drop((first, second));
        std::thread::sleep(Duration::from_millis(500));
        Ok((rss, (rss as f64 - half as f64) / (n - n / 2) as f64))
    }
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    sim::rss_kib_of(pid).with_context(|| format!("no resident memory for process {pid}"))
}

fn steal_sample() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    Ok((cpu.get(7).copied().unwrap_or(0), cpu.iter().sum()))
}

fn steal_percent(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = (b.1 - a.1) as f64;
    if total == 0.0 { 0.0 } else { 100.0 * (b.0 - a.0) as f64 / total }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn figures(samples: Samples) -> Vec<Figure> {
    let mut out: Vec<Figure> = samples
        .iter()
        .map(|((w, m, u, p, lower), v)| Figure {
            workload: w.clone(),
            metric: m.clone(),
            unit: u.clone(),
            path: p.clone(),
            values: v.clone(),
            median: median(v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ratio_to_direct: None,
            ratio_to_ztunnel: None,
            ratio_to_baseline: None,
            lower_is_better: *lower,
        })
        .collect();
    let medians: BTreeMap<(String, String, String), f64> =
        out.iter().map(|f| ((f.workload.clone(), f.metric.clone(), f.path.clone()), f.median)).collect();
    let of = |f: &Figure, path: &str| medians.get(&(f.workload.clone(), f.metric.clone(), path.to_string())).copied();
    for f in &mut out {
        if proxied(&f.path) {
            f.ratio_to_direct = of(f, direct_of(&f.path)).map(|d| f.median / d);
        }
        if f.path == "mesh-remote" || f.path == "baseline-remote" {
            f.ratio_to_ztunnel = of(f, ZTUNNEL).map(|z| f.median / z);
        }
        if let Some(rest) = f.path.strip_prefix("mesh-").filter(|r| *r != "local-sockmap") {
            f.ratio_to_baseline = of(f, &format!("baseline-{rest}")).map(|b| f.median / b);
        }
    }
    out
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> BTreeMap<String, String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    BTreeMap::from([
        ("kernel".into(), cmd_out("uname", &["-r"])),
        ("cpus".into(), std::thread::available_parallelism().map_or(0, |n| n.get()).to_string()),
        ("cpu model".into(), model.unwrap_or_default()),
        ("memory".into(), mem.lines().next().unwrap_or("").trim_start_matches("MemTotal:").trim().to_string()),
        ("tools".into(), tool_versions()),
    ])
}

/// First line of each tool's version output (wrk prints it on stderr, with a non-zero exit).
fn tool_versions() -> String {
    [("oha", "--version"), ("wrk", "-v"), ("iperf3", "-v"), ("sockperf", "--version"), ("nginx", "-v")]
        .iter()
        .map(|(t, flag)| {
            let o = Command::new(t).arg(flag).output();
            let text = o
                .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
                .unwrap_or_default();
            text.lines().next().unwrap_or(t).trim().to_string()
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn markdown(r: &Run) -> String {
    let mut s = String::new();
    s += "# Switchyard benchmark results\n\n";
    s += "Generated by the benchmark harness; do not edit by hand. See `bench/README.md` for how to read it.\n\n";
    s += &format!("- date: {}\n- command: `{}`\n", r.date, r.command);
    match r.pinned_cpu {
        Some(cpu) => s += &format!("- pinned: agents (one worker each), servers and load tools all on CPU {cpu}\n"),
        None => s += "- unpinned (what users see)\n",
    }
    if !r.agent_args.is_empty() {
        s += &format!("- agent flags: `{}`\n", r.agent_args.join(" "));
    }
    for (k, v) in &r.machine {
        s += &format!("- {k}: {v}\n");
    }
    s += &format!(
        "- repetitions: {} of {} s per measurement{}; host steal per repetition: {}\n\n",
        r.reps,
        r.seconds_per_measurement,
        if r.quick { " (--quick)" } else { "" },
        r.steal_percent
            .iter()
            .map(|p| format!("{p:.1}%{}", if *p >= 5.0 { " (noisy)" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(z) = &r.ztunnel {
        s += &format!("- peer: ztunnel `{z}`\n");
    }
    if let Some(b) = &r.baseline_agent {
        s += &format!("- baseline agent: `{b}`\n");
    }
    s += "\nEach cell: median [min-max] (ratio to the direct path of the same topology; `zt` ratio to \
          ztunnel-remote; `base` ratio to the baseline agent's same path).\n\n";
    s += &format!("| workload | metric | unit | {} |\n", r.paths.join(" | "));
    s += &format!("|---|---|---|{}\n", "---|".repeat(r.paths.len()));
    let mut rows: BTreeMap<(String, String, String), BTreeMap<String, &Figure>> = BTreeMap::new();
    for f in &r.figures {
        rows.entry((f.workload.clone(), f.metric.clone(), f.unit.clone())).or_default().insert(f.path.clone(), f);
    }
    for ((w, m, u), cells) in rows {
        s += &format!("| {w} | {m} | {u} |");
        for p in r.paths.iter().map(String::as_str) {
            match cells.get(p) {
                Some(f) if f.values.iter().all(|v| !v.is_finite()) => s += " failed in every repetition |",
                Some(f) => {
                    let spread =
                        if f.values.len() > 1 { format!(" [{}-{}]", fmt(f.min), fmt(f.max)) } else { String::new() };
                    let ratios: Vec<String> = [
                        f.ratio_to_direct.map(|x| format!("{x:.2}x")),
                        f.ratio_to_ztunnel.map(|x| format!("zt {x:.2}x")),
                        f.ratio_to_baseline.map(|x| format!("base {x:.2}x")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    let ratio = if ratios.is_empty() { String::new() } else { format!(" ({})", ratios.join("; ")) };
                    s += &format!(" {}{spread}{ratio} |", fmt(f.median));
                }
                None => s += " |",
            }
        }
        s += "\n";
    }
    if !r.not_measured.is_empty() {
        s += "\nNot measured:\n";
        for n in &r.not_measured {
            s += &format!("- {n}\n");
        }
    }
    s
}
