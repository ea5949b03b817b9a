use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_agent::config::{Config, RunArgs};

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "Switchyard node agent: eBPF redirect + node proxy")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = mesh_agent::logging::Format::Text, global = true)]
    log_format: mesh_agent::logging::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Report whether this kernel has what the agent needs.
    Check,
    /// Mesh CA tasks.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Workload identity services.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// A running agent's health, datapath, pods, connections and certificates.
    Status(AdminArgs),
    /// This node's pods as the running agent sees them.
    Workloads(AdminArgs),
    /// Authorization policies this node enforces, and what became of every Istio
    /// AuthorizationPolicy it read (ignored, not enforced, enforced at L4 only, malformed).
    /// With a pod (`namespace/name`): the policies that apply to it, and with `--from` and
    /// `--port` how such a connection would be decided.
    Authz {
        #[command(flatten)]
        admin: AdminArgs,
        /// A pod of this node, `namespace/name`.
        pod: Option<String>,
        /// The source's SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<sa>`).
        #[arg(long, requires = "pod")]
        from: Option<String>,
        /// The source pod's address (policies on ipBlocks); unverified when absent.
        #[arg(long, requires = "from")]
        ip: Option<std::net::Ipv4Addr>,
        /// The destination port.
        #[arg(long, requires = "from")]
        port: Option<u16>,
    },
    /// Open and recent connections through the running agent.
    Connections {
        #[command(flatten)]
        admin: AdminArgs,
        /// Recent closed connections to show.
        #[arg(long, default_value_t = 20)]
        recent: usize,
    },
    /// How to open a node's dashboard from here: prints the `kubectl port-forward` to that
    /// node's agent (its admin port is on the node's loopback only), or runs it with --run.
    Dashboard {
        /// The node whose agent to open.
        node: String,
        /// The namespace Switchyard is installed in.
        #[arg(long, short, default_value = "switchyard-system")]
        namespace: String,
        /// Local port to forward.
        #[arg(long, default_value_t = 15000)]
        port: u16,
        /// Run the port-forward (kubectl must be on PATH) instead of printing it.
        #[arg(long)]
        run: bool,
    },
    /// Health or readiness of the agent of this pod, over its own admin socket (for kubelet
    /// exec probes): exit 0 when it answers 200.
    Probe {
        #[arg(value_enum)]
        what: ProbeKind,
        /// The agent's admin socket (its `--admin-socket`).
        #[arg(long, default_value = "/run/switchyard/admin.sock")]
        socket: std::path::PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProbeKind {
    Healthz,
    Readyz,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The agent's admin endpoint (on the node's loopback).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: std::net::SocketAddr,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = mesh_agent::cli::Output::Table)]
    output: mesh_agent::cli::Output,
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Run the signer: the only holder of the CA key, serving Istio's CA API (gRPC over TLS)
    /// and signing only identities of pods on the calling agent's node.
    Serve(Box<mesh_agent::identity::signer::SignerArgs>),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a self-signed mesh CA (ca.crt, ca.key, bundle.crt) for local mode and the demo.
    Init {
        /// Directory to write into (created if missing; existing CA files are never overwritten).
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value = mesh_agent::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// CA certificate lifetime in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = mesh_agent::logging::init(cli.log_format);
    match cli.command {
        Command::Check => {
            let checks = mesh_agent::check::run();
            let mut ok = true;
            for c in &checks {
                println!("{} {:<32} {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
                ok &= c.ok;
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Ca(CaCommand::Init { dir, trust_domain, days }) => {
            match mesh_agent::identity::ca::init(&dir, &trust_domain, std::time::Duration::from_secs(days * 86400)) {
                Ok(p) => {
                    println!("mesh CA for trust domain {trust_domain} written:");
                    println!(
                        "  certificate {}\n  key         {} (keep it secret: it can mint any identity)\n  bundle      {}",
                        p.cert.display(),
                        p.key.display(),
                        p.bundle.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ca init: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status(a) => print(mesh_agent::cli::status(a.admin, a.output)),
        Command::Workloads(a) => print(mesh_agent::cli::workloads(a.admin, a.output)),
        Command::Authz { admin: a, pod, from, ip, port } => {
            let q = mesh_agent::cli::AuthzQuery { pod, from, ip, port };
            print(mesh_agent::cli::authz(a.admin, a.output, &q))
        }
        Command::Connections { admin: a, recent } => print(mesh_agent::cli::connections(a.admin, a.output, recent)),
        Command::Dashboard { node, namespace, port, run } => dashboard(&node, &namespace, port, run),
        Command::Probe { what, socket } => {
            let path = match what {
                ProbeKind::Healthz => "/healthz",
                ProbeKind::Readyz => "/readyz",
            };
            print(mesh_agent::cli::probe(&socket, path))
        }
        Command::Identity(IdentityCommand::Serve(args)) => match serve_identity(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn dashboard(node: &str, namespace: &str, port: u16, run: bool) -> ExitCode {
    let script = match mesh_agent::cli::dashboard_command(node, namespace, port) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dashboard: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !run {
        println!("{script}\nthen open http://localhost:{port}/");
        return ExitCode::SUCCESS;
    }
    eprintln!("{script}\nopen http://localhost:{port}/ (Ctrl-C to stop)");
    match std::process::Command::new("sh").arg("-c").arg(&script).status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("kubectl port-forward ended with {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot run the port-forward (is kubectl on PATH?): {e}");
            ExitCode::FAILURE
        }
    }
}

fn print(r: anyhow::Result<String>) -> ExitCode {
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let config = Config::load(args)?;
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(config.workers).enable_all().build()?;
    rt.block_on(mesh_agent::app::run(config, shutdown_signal()))
}

fn serve_identity(args: mesh_agent::identity::signer::SignerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(mesh_agent::identity::signer::serve(args, stop.clone()));
        tokio::pin!(serving);
        tokio::select! {
            r = &mut serving => return r?,
            _ = shutdown_signal() => stop.cancel(),
        }
        serving.await?
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL (programs still detach)");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Every proxied connection costs two file descriptors (three with HBONE pooling aside): raise
/// the soft limit to the hard limit, as proxies do, and say what we got.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                lim = wanted;
            }
        }
    }
    tracing::info!(open_files = lim.rlim_cur, "file descriptor limit");
}
