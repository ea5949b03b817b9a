//! Instructions the agent executes per proxied request and per MiB of bulk, counted by
//! callgrind (valgrind): deterministic where wall-clock figures on a shared 2-vCPU machine are
//! not, so two builds of the agent can be compared in one run (`--agent` several times).
//!
//! Per agent build, on a simulated cluster (node-a with a meshed client and a server pod,
//! node-b with a server pod; nginx with a 1 KiB body and iperf3 in the server pods), with the
//! agents under `valgrind --tool=callgrind`:
//! - same node: `oha -n N -c 4` from the client to node-a's server (keep-alive HTTP/1.1 through
//!   the proxy's TCP path), then `iperf3 -n M MiB`; node-a's agent counted;
//! - across nodes: the same to node-b's server over HBONE; both agents counted.
//!
//! Counters are zeroed before each load and dumped after it (`callgrind_control`); the idle
//! agents' own instructions over the same time (measured once, per second) are subtracted.
//! Usage: `switchyard-callgrind --agent target/release/mesh-agent --agent /tmp/old/mesh-agent`
//! (the agents are started through `sim::AgentCommand`).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use sim::{AgentCommand, Cluster, Pod, Server};

#[derive(Parser)]
struct Args {
    /// An agent binary to measure (repeat to compare builds, measured in the order given).
    #[arg(long, required = true)]
    agent: Vec<PathBuf>,
    /// HTTP requests per measurement.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// MiB of bulk per measurement.
    #[arg(long, default_value_t = 64)]
    bulk_mib: u64,
    /// Keep the callgrind dumps (for `callgrind_annotate`); their directory is printed.
    #[arg(long)]
    keep: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("switchyard-callgrind: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    if !sim::privileged("callgrind") {
        bail!("the measurement builds network namespaces and loads eBPF: run it as root");
    }
    for t in ["valgrind", "callgrind_control", "oha", "iperf3", "nginx"] {
        if Command::new("sh").args(["-c", &format!("command -v {t}")]).output()?.stdout.is_empty() {
            bail!(
                "{t} is not installed (valgrind: apt-get install valgrind; the rest: cargo xtask bench installs them)"
            );
        }
    }
    println!(
        "| agent | same node: Ir per request | same node: Ir per MiB | across nodes: Ir per request (both agents) | across nodes: Ir per MiB (both agents) |"
    );
    println!("|---|---|---|---|---|");
    for agent in &args.agent {
        let m = measure(agent, &args).with_context(|| format!("measuring {}", agent.display()))?;
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            agent.display(),
            m[0] / args.requests as f64,
            m[1] / args.bulk_mib as f64,
            m[2] / args.requests as f64,
            m[3] / args.bulk_mib as f64
        );
    }
    Ok(())
}

/// [same-node request Ir, same-node bulk Ir, cross-node request Ir, cross-node bulk Ir].
fn measure(agent: &Path, args: &Args) -> Result<[f64; 4]> {
    let name = agent.file_name().and_then(|n| n.to_str()).unwrap_or("agent");
    let out_dir = std::env::temp_dir().join(format!("switchyard-callgrind-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&out_dir)?;
    let mut c = Cluster::new()?;
    c.add_node_at("node-a", 56)?;
    c.add_node_at("node-b", 57)?;
    let command = AgentCommand {
        bin: Some(agent.canonicalize()?),
        wrapper: vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}/cg.%p", out_dir.display()),
        ],
    };
    for n in &mut c.nodes {
        n.agent_command = command.clone();
    }
    c.set_namespace("bench", true, None);
    let client = c.node("node-a").add_pod("client", "bench", None)?;
    let local = c.node("node-a").add_pod("local-server", "bench", None)?;
    let remote = c.node("node-b").add_pod("remote-server", "bench", None)?;
    let mut servers = Vec::new();
    for s in [&local, &remote] {
        servers.push(nginx(&c, s)?);
        servers.push(daemon(s, "iperf3", &["-s", "-p", "5201"])?);
    }
    c.start_only(&["node-a", "node-b"], &["--sockmap-acceleration=off"])?;
    let pid = |name: &str| c.nodes.iter().find(|n| n.name == name).and_then(|n| n.agent_pid()).context("agent pid");
    let (a, b) = (pid("node-a")?, pid("node-b")?);
    // Warm up both paths (connections pooled, certificates issued, code paged in).
    for s in [&local, &remote] {
        oha(&client, &s.ip.to_string(), 200)?;
    }
    let idle_per_sec = [idle_rate(a, &out_dir)?, idle_rate(b, &out_dir)?];
    let mut m = [0.0; 4];
    for (i, (server, agents)) in [(&local, vec![(a, 0)]), (&remote, vec![(a, 0), (b, 1)])].into_iter().enumerate() {
        let ip = server.ip.to_string();
        m[i * 2] = counted(&agents, &out_dir, idle_per_sec, || oha(&client, &ip, args.requests))?;
        m[i * 2 + 1] = counted(&agents, &out_dir, idle_per_sec, || iperf(&client, &ip, args.bulk_mib))?;
    }
    drop(servers);
    drop(c);
    if args.keep {
        eprintln!("callgrind dumps of {} kept in {}", agent.display(), out_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    Ok(m)
}

/// Instructions of `agents` (pid, index into `idle`) during `load`, minus their idle rate.
fn counted(agents: &[(u32, usize)], dir: &Path, idle: [f64; 2], load: impl FnOnce() -> Result<()>) -> Result<f64> {
    for (pid, _) in agents {
        control(&["-z", &pid.to_string()])?;
    }
    let t = Instant::now();
    load()?;
    let secs = t.elapsed().as_secs_f64();
    let mut total = 0.0;
    for (pid, i) in agents {
        total += dump(*pid, dir)? - idle[*i] * secs;
    }
    Ok(total)
}

/// Instructions per second of an idle agent (timers, reconcile passes).
fn idle_rate(pid: u32, dir: &Path) -> Result<f64> {
    control(&["-z", &pid.to_string()])?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    Ok(dump(pid, dir)? / t.elapsed().as_secs_f64())
}

fn control(args: &[&str]) -> Result<()> {
    let out = Command::new("callgrind_control").args(args).output()?;
    if !out.status.success() {
        bail!("callgrind_control {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Dumps `pid`'s counters and returns the instructions (Ir) of that dump.
fn dump(pid: u32, dir: &Path) -> Result<f64> {
    let before = dumps(pid, dir)?;
    control(&["-d", &pid.to_string()])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = dumps(pid, dir)?;
        if let Some(new) = now.iter().find(|p| !before.contains(p)) {
            // Written whole once the summary line is there.
            let text = std::fs::read_to_string(new)?;
            if let Some(ir) =
                text.lines().find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
            {
                return ir.split_whitespace().next().context("empty summary")?.parse().context("Ir");
            }
        }
        if Instant::now() > deadline {
            bail!("no callgrind dump for {pid} in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn dumps(pid: u32, dir: &Path) -> Result<Vec<PathBuf>> {
    let prefix = format!("cg.{pid}.");
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
        .collect())
}

fn oha(client: &Pod, ip: &str, n: u64) -> Result<()> {
    let url = format!("http://{ip}:8080/1k");
    let mut cmd = client.command("oha");
    cmd.args(["-n", &n.to_string(), "-c", "4", "--no-tui", "--output-format", "json", &url]);
    let out = sim::output_timeout(cmd, Duration::from_secs(600))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha output")?;
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    if ok != n {
        bail!("oha: {ok} of {n} requests answered 200: {v}");
    }
    Ok(())
}

fn iperf(client: &Pod, ip: &str, mib: u64) -> Result<()> {
    let mut cmd = client.command("iperf3");
    cmd.args(["-c", ip, "-p", "5201", "-n", &format!("{mib}M"), "-J"]);
    let out = sim::output_timeout(cmd, Duration::from_secs(600))?;
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

fn daemon(pod: &Pod, program: &str, args: &[&str]) -> Result<Server> {
    let mut cmd = pod.command(program);
    cmd.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let server = Server::spawn(cmd)?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(server)
}

/// nginx serving a 1 KiB body on :8080, one worker, no access log.
fn nginx(c: &Cluster, pod: &Pod) -> Result<Server> {
    let dir = c.dir.join(format!("nginx-{}", pod.name));
    let conf_path = sim::nginx_1k_config(&dir)?;
    daemon(pod, "nginx", &["-c", conf_path.to_str().context("path")?, "-p", dir.to_str().context("path")?])
}
