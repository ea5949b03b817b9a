//! A simulated Kubernetes node built from network namespaces and cgroups, for the end-to-end
//! tests and the demo (see `tests/README.md`).
//!
//! * A **node** is a network namespace holding a bridge (`br0`, the pods' gateway) plus a cgroup
//!   under `<cgroup2>/switchyard-test/`; the agent runs inside the node's namespace.
//! * A **pod** is a network namespace joined to the node's bridge by a veth pair, plus a cgroup
//!   under the node's; its processes are put into the cgroup, then into the namespace.
//!
//! Every address lives in namespaces made here: nothing is routed to or from the host
//! namespace. Everything is removed in `Drop`, and leftovers of killed runs (named after a PID
//! that is gone) are swept the next time a node is made.
use std::{
    ffi::CString,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
pub use mesh_agent::{
    authz::{Action, RuleSpec},
    workloads::{NamespaceSpec, NodeSpec, PodSpec, ServicePortSpec, ServiceSpec, WorkloadFile},
};

const PREFIX: &str = "syt";
const CGROUP_DIR: &str = "switchyard-test";
pub const ADMIN_PORT: u16 = 15000;
/// The agent's stats port (metrics and health only, on all addresses).
pub const STATS_PORT: u16 = 15020;
pub const OUTBOUND_PORT: u16 = 15001;

/// True when this process may build namespaces and load eBPF. Otherwise: under `CI=true` this
/// panics (a privileged test must never pass by not running); elsewhere it says so loudly and
/// returns false so the caller can return.
pub fn privileged(test: &str) -> bool {
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if cgroup2_mount().is_err() {
        Some("no cgroup2 mount".to_string())
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("iproute2 (`ip`) is not installed".to_string())
    } else {
        None
    };
    match problem {
        None => true,
        Some(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("privileged test {test} cannot run under CI=true: {why}");
            }
            eprintln!("\n!!! SKIPPED privileged test {test}: {why}. Run `cargo xtask test` as root.\n");
            false
        }
    }
}

pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| anyhow!("no cgroup2 filesystem mounted"))
}

/// Sum of the samples named `name` as exposed (e.g. `istio_requests_total`) in a `/metrics`
/// text whose labels include all of `want`.
pub fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name && want.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Path of a binary built in the same target directory as the running executable.
/// Writes an nginx configuration in `dir` that serves a 1 KiB body at `/1k` on :8080 (one
/// worker, no access log, keep-alive without limit), for the load tools; returns its path.
pub fn nginx_1k_config(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/1k"), vec![b'x'; 1024])?;
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\ndaemon off;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {d}; proxy_temp_path {d};\n\
         fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         server {{ listen 8080 reuseport; root {d}/www; location / {{ }} }} }}\n",
        d = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

pub fn bin_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    bail!("binary {name} not found next to {}: build it first (`cargo xtask test` does)", exe.display())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces and cgroups left by runs whose process is gone.
fn sweep_leftovers() {
    let owner = |name: &str| -> Option<u32> { name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok() };
    if let Ok(rd) = std::fs::read_dir("/var/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|p| !pid_alive(p)) {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    // bpffs instances of nodes whose test died.
    for line in std::fs::read_to_string("/proc/self/mounts").unwrap_or_default().lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(target), Some("bpf")) = (f.next(), f.next(), f.next()) else { continue };
        let stale = Path::new(target)
            .components()
            .any(|c| owner(&c.as_os_str().to_string_lossy()).is_some_and(|p| !pid_alive(p)));
        if stale {
            let _ = Command::new("umount").arg("-l").arg(target).status();
        }
    }
    if let Ok(mount) = cgroup2_mount()
        && let Ok(rd) = std::fs::read_dir(mount.join(CGROUP_DIR))
    {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|p| !pid_alive(p)) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}

/// Kills every process in a cgroup subtree and removes its directories, deepest first.
pub fn remove_cgroup_tree(path: &Path) {
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(path);
}

/// Runs `f` on a thread that has joined network namespace `netns`.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            use std::os::fd::AsRawFd as _;
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in {netns} panicked"))?
    })
}

/// A plain HTTP/1.0 GET, from inside `netns`, to `addr`.
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let (status, _, body) = http_get_with(netns, addr, path, &[])?;
    Ok((status, body))
}

/// [`http_get`] with extra request headers; returns the status, the response head and the body.
pub fn http_get_with(
    netns: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, String)> {
    in_netns(netns, || -> Result<(u16, String, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let status = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
        Ok((status, head.to_string(), body.to_string()))
    })?
}

pub mod fake_api;
pub mod otlp_collector;

static SWEEP: Once = Once::new();
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A pod of a simulated node.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// Name of the node it runs on.
    pub node: String,
    pub namespace: String,
    pub service_account: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub cgroup: PathBuf,
    /// Per-pod `switchyard.io/mesh` annotation, if any.
    pub annotation: Option<String>,
    /// The workload it belongs to (the workload file's `workload:`), if not itself.
    pub workload: Option<String>,
    /// Pod labels (the workload file's `labels:`).
    pub labels: Vec<(String, String)>,
    /// The ports the kubelet would probe it on (the workload file's `probePorts:`).
    pub probe_ports: Vec<u16>,
}

/// Runs `cmd` (a test program) within `timeout` and parses the last line it printed as JSON;
/// `who` names where it ran, for the error.
fn last_json_line(cmd: Command, who: &str, timeout: Duration) -> Result<serde_json::Value> {
    let what = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    let out = output_timeout(cmd, timeout)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow!("{what} in {who} printed nothing (stderr: {})", String::from_utf8_lossy(&out.stderr)))?;
    serde_json::from_str(line).with_context(|| format!("{what} output {line:?}"))
}

impl Pod {
    /// A command that runs in this pod: its cgroup first (joining it needs the host's view of
    /// the cgroup2 mount), then its network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        enter(&mut cmd, Some(&self.cgroup), &self.netns);
        cmd
    }

    /// Runs `sim-workload ARGS` in the pod and parses its JSON line.
    pub fn workload(&self, args: &[&str], timeout: Duration) -> Result<serde_json::Value> {
        self.tool("sim-workload", args, timeout)
    }

    /// Runs `sim-http ARGS` in the pod and parses its JSON line.
    /// `sim-workload client --connect <to> <args>` from this pod, its report typed.
    pub fn client(&self, to: &str, args: &[&str], timeout: Duration) -> Result<ClientReport> {
        let mut a = vec!["client", "--connect", to];
        a.extend_from_slice(args);
        let v = self.workload(&a, timeout)?;
        serde_json::from_value(v.clone()).with_context(|| format!("a client report: {v}"))
    }

    /// `sim-http load --url <url> <args>` from this pod, its report typed.
    pub fn load(&self, url: &str, args: &[&str], timeout: Duration) -> Result<LoadReport> {
        let mut a = vec!["load", "--url", url];
        a.extend_from_slice(args);
        let v = self.http(&a, timeout)?;
        serde_json::from_value(v.clone()).with_context(|| format!("a load report: {v}"))
    }

    pub fn http(&self, args: &[&str], timeout: Duration) -> Result<serde_json::Value> {
        self.tool("sim-http", args, timeout)
    }

    /// Runs one of the test programs in the pod and parses its last JSON line.
    pub fn tool(&self, program: &str, args: &[&str], timeout: Duration) -> Result<serde_json::Value> {
        let mut cmd = self.command(bin_path(program)?);
        cmd.args(args);
        last_json_line(cmd, &self.name, timeout)
    }

    /// Opens `count` connections to `to` (`sim-workload hold`) and keeps them open, for at most
    /// `seconds`, until the returned process is dropped. Fails unless every one was opened.
    pub fn hold(&self, to: &str, count: usize, seconds: u64) -> Result<Server> {
        let mut cmd = self.command(bin_path("sim-workload")?);
        cmd.args(["hold", "--connect", to, "--count", &count.to_string(), "--seconds", &seconds.to_string()])
            .stdout(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let holder = Server { child };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("hold said {line:?}"))?;
        if v["held"].as_u64() != Some(count as u64) {
            bail!("could only open {} of {count} connections to {to}: {}", v["held"], v["error"]);
        }
        Ok(holder)
    }

    /// Starts a long-running `sim-workload` server in the pod and waits for it to be listening.
    pub fn serve(&self, args: &[&str]) -> Result<Server> {
        self.serve_tool("sim-workload", args)
    }

    /// Starts a long-running server (`sim-workload` or `sim-http`) and waits for it to listen.
    pub fn serve_tool(&self, program: &str, args: &[&str]) -> Result<Server> {
        let mut cmd = self.command(bin_path(program)?);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow!("server {args:?} did not start"))?;
        if !line.contains("ready") {
            let _ = child.kill();
            bail!("server {args:?} failed to start: {line:?}");
        }
        Ok(Server { child })
    }
}

/// A process started in a pod; killed on drop.
pub struct Server {
    child: Child,
}

impl Server {
    /// Starts `cmd` (typically from [`Pod::command`]) as a server killed on drop.
    pub fn spawn(mut cmd: Command) -> Result<Server> {
        Ok(Server { child: cmd.spawn().with_context(|| format!("spawn {cmd:?}"))? })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn enter(cmd: &mut Command, cgroup: Option<&Path>, netns: &str) {
    let procs = cgroup.map(|c| CString::new(c.join("cgroup.procs").to_string_lossy().as_bytes()).unwrap());
    let ns = CString::new(format!("/var/run/netns/{netns}")).unwrap();
    // SAFETY: between fork and exec only async-signal-safe calls (open, write, setns, close)
    // on buffers prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Load tools and connection holders need many sockets: soft limit up to the hard.
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::setns(fd, libc::CLONE_NEWNET);
            libc::close(fd);
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits for a command with a deadline; kills it when the deadline passes.
pub fn output_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = Instant::now() + timeout;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?} (hung)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() })
}

/// `on` or `off`: whether agents started by the harness use same-node acceleration. The suite
/// runs both ways (`cargo xtask test` sets `SWITCHYARD_TEST_SOCKMAP`); `None` (unset) leaves the
/// agent's own default.
pub fn sockmap_mode() -> Option<&'static str> {
    match std::env::var("SWITCHYARD_TEST_SOCKMAP").as_deref() {
        Ok("on") => Some("on"),
        Ok("off") => Some("off"),
        _ => None,
    }
}

/// A simulated node: network namespace, bridge, cgroup, pods, and (once started) an agent.
pub struct Node {
    pub id: String,
    /// Node name as the agent and the workload file know it.
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub gateway: Ipv4Addr,
    pub pods: Vec<Pod>,
    pub namespaces: Vec<(String, bool)>,
    pub dir: PathBuf,
    /// Address on the network between nodes (cluster nodes only).
    pub underlay: Option<Ipv4Addr>,
    /// The workload file the agent reads; a cluster's nodes share one.
    workloads: PathBuf,
    /// Namespace annotations written for a standalone node: (namespace, meshed, mtls mode).
    pub mtls_modes: Vec<(String, String)>,
    agent: Option<Child>,
    cluster_cgroup: PathBuf,
    /// Kubernetes mode: the agent reads this kubeconfig instead of a workload file.
    pub kubeconfig: Option<PathBuf>,
    /// Services (see [`service`]); standalone node only.
    pub services: Vec<ServiceSpec>,
    /// A bpffs of this node's own (see [`Node::pin_programs`]): agents pin there.
    pub bpffs: Option<PathBuf>,
    /// Namespaces annotated `switchyard.io/fail-mode: closed` (standalone node).
    pub fail_closed: Vec<String>,
    /// Other namespace annotations: (namespace, key, value) (standalone node).
    pub ns_annotations: Vec<(String, String, String)>,
    /// How its agents are started (default: `mesh-agent` next to the test binaries).
    pub agent_command: AgentCommand,
}

/// How a node's agent is started: another build than the one next to the test binaries, or
/// under a wrapper command (e.g. `valgrind --tool=callgrind ...`) for a measurement.
#[derive(Debug, Clone, Default)]
pub struct AgentCommand {
    pub bin: Option<PathBuf>,
    /// Program and arguments put before the agent binary.
    pub wrapper: Vec<String>,
}

impl AgentCommand {
    fn command(&self) -> Result<Command> {
        let bin = match &self.bin {
            Some(b) => b.clone(),
            None => bin_path("mesh-agent")?,
        };
        Ok(match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        })
    }

    /// How long an agent may take to report ready: 20 s, longer under a wrapper (valgrind).
    fn ready_wait(&self) -> Duration {
        if self.wrapper.is_empty() { Duration::from_secs(20) } else { Duration::from_secs(180) }
    }
}

/// A pod range (10.244.<n>.0/24) no other node of this process has: nodes need distinct ranges
/// only within a cluster (everything else lives in namespaces of its own), but distinct ones
/// everywhere keep agent logs and captures unambiguous. 100 to 249, then round again.
pub fn next_subnet() -> u8 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (100 + NEXT.fetch_add(1, Ordering::Relaxed) % 150) as u8
}

impl Node {
    /// Creates an empty node with a pod range of its own (see [`next_subnet`]).
    pub fn new(name: &str) -> Result<Node> {
        Self::with_subnet(name, next_subnet())
    }

    /// Creates an empty node with pod range 10.244.<subnet>.0/24 (a tool whose addresses must
    /// not move between runs).
    pub fn with_subnet(name: &str, subnet: u8) -> Result<Node> {
        Self::with_id(&new_id(), name, subnet)
    }

    fn with_id(id: &str, name: &str, subnet: u8) -> Result<Node> {
        SWEEP.call_once(sweep_leftovers);
        let id = id.to_string();
        let netns = format!("{id}-{name}");
        let mount = cgroup2_mount()?;
        let cluster_cgroup = mount.join(CGROUP_DIR).join(&id);
        let cgroup = cluster_cgroup.join(name);
        let dir = std::env::temp_dir().join(&netns);
        let gateway = Ipv4Addr::new(10, 244, subnet, 1);
        let node = Node {
            id,
            name: name.into(),
            netns: netns.clone(),
            cgroup: cgroup.clone(),
            gateway,
            pods: vec![],
            namespaces: vec![],
            dir: dir.clone(),
            underlay: None,
            workloads: dir.join("workloads.yaml"),
            mtls_modes: vec![],
            agent: None,
            cluster_cgroup,
            kubeconfig: None,
            services: Vec::new(),
            bpffs: None,
            fail_closed: vec![],
            ns_annotations: vec![],
            agent_command: AgentCommand::default(),
        };
        std::fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        std::fs::create_dir_all(&dir)?;
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        // A MAC of its own: a bridge without one takes the lowest of its ports', so a pod added
        // later could change the gateway's MAC under the other pods' ARP caches, and their
        // packets would be dropped as not for this host until the entries expire.
        let o = gateway.octets();
        let mac = format!("02:5e:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        ip(&["-n", &netns, "link", "add", "br0", "address", &mac, "type", "bridge"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{gateway}/24"), "dev", "br0"])?;
        ip(&["-n", &netns, "link", "set", "br0", "up"])?;
        Ok(node)
    }

    /// The third octet of the node's pod range 10.244.<subnet>.0/24.
    pub fn subnet(&self) -> u8 {
        self.gateway.octets()[2]
    }

    /// Adds a pod at 10.244.<subnet>.<10+n>. `annotation` is the pod's own
    /// `switchyard.io/mesh` annotation, if any.
    pub fn add_pod(&mut self, name: &str, namespace: &str, annotation: Option<&str>) -> Result<Pod> {
        self.add_pod_at(name, namespace, annotation, name)
    }

    /// A pod whose cgroup is at `cgroup` below the node's (e.g. the kubelet's
    /// `kubepods/burstable/pod<uid>`).
    pub fn add_pod_at(&mut self, name: &str, namespace: &str, annotation: Option<&str>, cgroup: &str) -> Result<Pod> {
        let n = self.pods.len() as u8;
        let o = self.gateway.octets();
        let ipaddr = Ipv4Addr::new(o[0], o[1], o[2], 10 + n);
        let netns = format!("{}-{name}", self.id);
        let cgroup = self.cgroup.join(cgroup);
        std::fs::create_dir_all(&cgroup)?;
        ip(&["netns", "add", &netns])?;
        let host_if = format!("veth{n}");
        ip(&["-n", &self.netns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip(&["-n", &self.netns, "link", "set", &host_if, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{ipaddr}/24"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", &self.gateway.to_string()])?;
        let pod = Pod {
            name: name.into(),
            node: self.name.clone(),
            namespace: namespace.into(),
            service_account: name.into(),
            netns,
            ip: ipaddr,
            cgroup,
            annotation: annotation.map(str::to_owned),
            workload: None,
            labels: Vec::new(),
            probe_ports: Vec::new(),
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Runs pod `pod` as service account `sa` (by default a pod's is its name).
    pub fn set_service_account(&mut self, pod: &str, sa: &str) {
        for p in self.pods.iter_mut().filter(|p| p.name == pod) {
            p.service_account = sa.to_string();
        }
    }

    /// Names the workload (a Deployment, say) pod `pod` belongs to, for metric labels.
    pub fn set_workload(&mut self, pod: &str, workload: &str) {
        for p in self.pods.iter_mut().filter(|p| p.name == pod) {
            p.workload = Some(workload.to_string());
        }
    }

    /// Sets a label of pod `pod` (e.g. `app`, `version`), for metric labels.
    pub fn set_label(&mut self, pod: &str, key: &str, value: &str) {
        for p in self.pods.iter_mut().filter(|p| p.name == pod) {
            p.labels.push((key.to_string(), value.to_string()));
        }
    }

    /// Declares the ports the kubelet probes pod `pod` on (a strict pod admits them from the
    /// node).
    pub fn set_probe_ports(&mut self, pod: &str, ports: &[u16]) {
        for p in self.pods.iter_mut().filter(|p| p.name == pod) {
            p.probe_ports = ports.to_vec();
        }
    }

    /// A command that runs on the node itself, outside the agent and every pod (a host
    /// process, a host-network pod, the kubelet): in a cgroup of its own below the node's and
    /// in the node's network namespace.
    pub fn host_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let cgroup = self.cgroup.join("host");
        std::fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        let mut cmd = Command::new(program);
        enter(&mut cmd, Some(&cgroup), &self.netns);
        Ok(cmd)
    }

    /// `sim-workload client --connect <to> <args>` from the node itself (see
    /// [`Node::host_command`]), its report typed.
    pub fn host_client(&self, to: &str, args: &[&str], timeout: Duration) -> Result<ClientReport> {
        let mut cmd = self.host_command(bin_path("sim-workload")?)?;
        cmd.args(["client", "--connect", to]).args(args);
        let v = last_json_line(cmd, &self.name, timeout)?;
        serde_json::from_value(v.clone()).with_context(|| format!("a client report: {v}"))
    }

    /// Sets whether a namespace carries `switchyard.io/mesh: enabled`.
    /// (Standalone node; a cluster's namespaces are set on the cluster.)
    pub fn set_namespace_meshed(&mut self, namespace: &str, meshed: bool) {
        self.namespaces.retain(|(n, _)| n != namespace);
        self.namespaces.push((namespace.into(), meshed));
    }

    pub fn workload_file(&self) -> PathBuf {
        self.workloads.clone()
    }

    /// Writes the local-mode workload file (atomically, as a ConfigMap update would).
    pub fn write_workloads(&self) -> Result<()> {
        write_atomic(
            &self.workloads,
            &workload_file(&[], &self.namespaces, &self.mtls_modes, &self.pods, &[], &self.services, &{
                let mut a = self.ns_annotations.clone();
                a.extend(
                    self.fail_closed.iter().map(|ns| (ns.clone(), "switchyard.io/fail-mode".into(), "closed".into())),
                );
                a
            })
            .to_yaml(),
        )
    }

    /// The admin port over the node's loopback (the agent listens on all addresses): admin
    /// requests then never count as same-node proxy traffic.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT))
    }

    /// Starts the real `mesh-agent` binary inside the node's network namespace and waits until
    /// it reports ready. Its log goes to `<dir>/agent.log`.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        let child = self.spawn_agent(extra)?;
        self.agent = Some(child);
        let wait = self.agent_command.ready_wait();
        let deadline = Instant::now() + wait;
        loop {
            if let Ok((200, _)) = http_get(&self.netns, self.admin_addr(), "/readyz") {
                return Ok(());
            }
            if let Some(status) = self.agent.as_mut().unwrap().try_wait()? {
                bail!("mesh-agent exited with {status} before becoming ready:\n{}", self.agent_log());
            }
            if Instant::now() > deadline {
                bail!("mesh-agent not ready after {wait:?}:\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the agent and waits only until it is alive (`/healthz`), not ready: for agents
    /// expected to stay unready.
    pub fn start_agent_alive(&mut self, extra: &[&str]) -> Result<()> {
        let child = self.spawn_agent(extra)?;
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&self.netns, self.admin_addr(), "/healthz") {
                return Ok(());
            }
            if let Some(status) = self.agent.as_mut().unwrap().try_wait()? {
                bail!("mesh-agent exited with {status}:\n{}", self.agent_log());
            }
            if Instant::now() > deadline {
                bail!("mesh-agent not alive after 30 s:\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Gives the node a bpffs of its own (mounted in its directory, unmounted on drop) and
    /// makes its agents pin their programs and maps there (`--bpf-pin-dir`).
    pub fn pin_programs(&mut self) -> Result<PathBuf> {
        let dir = self.dir.join("bpffs");
        std::fs::create_dir_all(&dir)?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir))?;
        self.bpffs = Some(dir.clone());
        Ok(dir)
    }

    /// An upgrade as a surge rollout does it: a second agent starts while the first runs,
    /// takes over, and only then is the first one stopped (SIGTERM). Returns how long after
    /// the start the new agent was ready, and how long the old one then took to exit.
    pub fn upgrade_agent(&mut self, extra: &[&str]) -> Result<(Duration, Duration)> {
        let ready_lines = |log: &str| log.matches("agent ready").count();
        let before = ready_lines(&self.agent_log());
        let t = Instant::now();
        let mut new = self.spawn_agent(extra)?;
        loop {
            if ready_lines(&self.agent_log()) > before {
                break;
            }
            if let Some(status) = new.try_wait()? {
                bail!("the new mesh-agent exited with {status} before becoming ready:\n{}", self.agent_log());
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = new.kill();
                bail!("the new mesh-agent not ready after 20 s:\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ready = t.elapsed();
        let t = Instant::now();
        let clean = self.stop_agent(Duration::from_secs(20))?;
        let exited = t.elapsed();
        self.agent = Some(new);
        if !clean {
            bail!("the old agent did not exit cleanly:\n{}", self.agent_log());
        }
        Ok((ready, exited))
    }

    /// SIGKILL for the agent (a crash).
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn_agent(&mut self, extra: &[&str]) -> Result<Child> {
        if self.underlay.is_none() && self.kubeconfig.is_none() {
            self.write_workloads()?;
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log"))?;
        let mut cmd = self.agent_command.command()?;
        cmd.args(["run", "--node-name", &self.name]);
        match &self.kubeconfig {
            Some(k) => cmd.arg("--kubernetes").arg("--kubeconfig").arg(k),
            None => cmd.arg("--workloads").arg(self.workload_file()),
        };
        cmd.arg("--cgroup-root")
            .arg(&self.cgroup)
            .args(["--redirect-address", &self.gateway.to_string()])
            .args(if extra.iter().any(|a| a.starts_with("--workers")) { &[][..] } else { &["--workers", "2"][..] })
            // Said explicitly, so a baseline build from before the admin/stats split (whose
            // admin port was 15020 on all addresses) is reached where this harness looks.
            .args(if extra.iter().any(|a| a.starts_with("--admin-listen")) {
                vec![]
            } else {
                vec!["--admin-listen".to_string(), format!("127.0.0.1:{ADMIN_PORT}")]
            })
            .args(match sockmap_mode() {
                Some(mode) if !extra.iter().any(|a| a.starts_with("--sockmap-acceleration")) => {
                    vec!["--sockmap-acceleration", mode]
                }
                _ => vec![],
            })
            .args(extra)
            .args(match &self.bpffs {
                Some(d) => vec!["--bpf-pin-dir".to_string(), d.to_string_lossy().into_owned()],
                None => vec![],
            })
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // The agent runs in a cgroup of its own below the node's, as a DaemonSet pod sits
        // below the node's pod cgroups: the sockops program sees the proxy's sockets (which
        // same-node acceleration needs), while its connects are never redirected (its cgroup
        // is not a meshed pod's, and the programs skip the agent's process anyway).
        let agent_cgroup = self.cgroup.join("mesh-agent");
        std::fs::create_dir_all(&agent_cgroup).with_context(|| format!("mkdir {}", agent_cgroup.display()))?;
        enter(&mut cmd, Some(&agent_cgroup), &self.netns);
        cmd.spawn().context("spawn mesh-agent")
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The agent's warnings and errors, and the access-log lines of connections that ended
    /// with an error, for a failing assertion's message.
    pub fn agent_warnings(&self) -> String {
        let log = self.agent_log();
        let failed_conn = |l: &str| l.contains("access:") && !l.contains("error=\"-\"") && !l.contains("error=-");
        let lines: Vec<&str> =
            log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR") || failed_conn(l)).collect();
        format!("{} ({} warnings and errors):\n{}", self.name, lines.len(), lines.join("\n"))
    }

    /// SIGTERM, then waits (killing it after `timeout`). Returns whether it exited by itself.
    pub fn stop_agent(&mut self, timeout: Duration) -> Result<bool> {
        let Some(mut child) = self.agent.take() else { return Ok(true) };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s.success());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the agent's admin port, parsed as JSON.
    /// Waits until the agent knows every pod the harness made on this node, and every one of
    /// them it meshes is redirected (its cgroup in the datapath).
    pub fn wait_meshed(&self) -> Result<()> {
        eventually(Duration::from_secs(10), "the node's pods meshed", || {
            let listed = self.admin_json("/debug/pods").ok()?;
            let listed = listed.as_array()?;
            let ready = self.pods.iter().all(|p| {
                let key = format!("{}/{}", p.namespace, p.name);
                listed.iter().any(|l| l["key"] == key.as_str() && (l["meshed"] != true || l["redirected"] == true))
            });
            ready.then_some(())
        })
        .with_context(|| format!("/debug/pods: {}", self.admin_json("/debug/pods").unwrap_or_default()))
    }

    pub fn admin_json(&self, path: &str) -> Result<serde_json::Value> {
        let (status, body) = http_get(&self.netns, self.admin_addr(), path)?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The kernel-side counters (`/debug/datapath` `events`: `redirected`, `strict_dropped`, ...).
    pub fn kernel_events(&self) -> Result<serde_json::Value> {
        Ok(self.admin_json("/debug/datapath")?["events"].clone())
    }

    pub fn admin_text(&self, path: &str) -> Result<String> {
        Ok(http_get(&self.netns, self.admin_addr(), path)?.1)
    }

    /// Captures everything crossing the node's pod bridge (pods and the proxy) until the capture
    /// is dropped (or [`Capture::finish`]ed).
    pub fn capture(&self) -> Result<Capture> {
        Capture::start(&self.dir, &self.netns, "br0")
    }

    /// Number of connections the proxy has finished so far.
    pub fn proxied_total(&self) -> Result<u64> {
        Ok(self.admin_json("/debug/connections")?["closed_total"].as_u64().unwrap_or(0))
    }

    /// Open file descriptors of the agent process.
    pub fn agent_fds(&self) -> Result<usize> {
        let pid = self.agent_pid().ok_or_else(|| anyhow!("agent not running"))?;
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// Ids of the BPF programs attached to the node's cgroup, over the attach types the agent
    /// uses (`BPF_PROG_QUERY`, as `bpftool cgroup show` does).
    pub fn attached_programs(&self) -> Result<Vec<u32>> {
        attached_programs(&self.cgroup)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop_agent(Duration::from_secs(5));
        // Unmounting the node's bpffs drops the pins: the programs detach.
        if let Some(d) = &self.bpffs {
            let _ = Command::new("umount").arg("-l").arg(d).status();
        }
        for p in &self.pods {
            remove_cgroup_tree(&p.cgroup);
            let _ = ip(&["netns", "del", &p.netns]);
        }
        remove_cgroup_tree(&self.cgroup);
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = std::fs::remove_dir(&self.cluster_cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_id() -> String {
    format!("{PREFIX}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?
        .write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The workload file for nodes `nodes` (name, address), namespaces, pods, authorization rules
/// and Services, in the agent's own types.
fn workload_file(
    nodes: &[(String, Ipv4Addr)],
    namespaces: &[(String, bool)],
    mtls_modes: &[(String, String)],
    pods: &[Pod],
    authorization: &[RuleSpec],
    services: &[ServiceSpec],
    ns_annotations: &[(String, String, String)],
) -> WorkloadFile {
    let namespace = |ns: &str, meshed: bool| {
        let mut annotations = std::collections::BTreeMap::new();
        if meshed {
            annotations.insert("switchyard.io/mesh".into(), "enabled".into());
        }
        if let Some((_, mode)) = mtls_modes.iter().find(|(n, _)| n == ns) {
            annotations.insert("switchyard.io/mtls-mode".into(), mode.clone());
        }
        for (_, k, v) in ns_annotations.iter().filter(|(n, _, _)| n == ns) {
            annotations.insert(k.clone(), v.clone());
        }
        NamespaceSpec { name: ns.into(), annotations }
    };
    WorkloadFile {
        nodes: nodes.iter().map(|(name, address)| NodeSpec { name: name.clone(), address: *address }).collect(),
        namespaces: namespaces.iter().map(|(ns, meshed)| namespace(ns, *meshed)).collect(),
        pods: pods
            .iter()
            .map(|p| PodSpec {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
                ip: p.ip,
                node: Some(p.node.clone()),
                cgroup: Some(p.cgroup.clone()),
                workload: p.workload.clone(),
                annotations: p.annotation.iter().map(|a| ("switchyard.io/mesh".to_string(), a.clone())).collect(),
                labels: p.labels.iter().cloned().collect(),
                probe_ports: p.probe_ports.clone(),
            })
            .collect(),
        authorization: authorization.to_vec(),
        services: services.to_vec(),
        ..Default::default()
    }
}

/// What `sim-workload client` reports (it writes this type; tests read it back).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ClientReport {
    /// Connections that connected and echoed every byte back.
    pub ok: u64,
    pub failed: u64,
    pub bytes_verified: u64,
    /// getpeername() of the first connection: what the application believes it talks to.
    pub peer: Option<String>,
    /// getsockname() of the first connection.
    pub local: Option<String>,
    /// The first few errors.
    pub errors: Vec<String>,
    pub elapsed_ms: u64,
}

impl std::fmt::Display for ClientReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| std::fmt::Error)?)
    }
}

/// What `sim-http load` reports (it writes this type; tests read it back).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub total: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Responses by status code.
    pub statuses: std::collections::BTreeMap<String, u64>,
    /// Responses by the proxy's `x-switchyard-error` reason.
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Responses by the `x-served-by` of the server that answered.
    pub served_by: std::collections::BTreeMap<String, u64>,
    /// Requests that got no response, by error.
    pub errors: std::collections::BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub elapsed_ms: u64,
    /// Connections the client had to open again after one closed.
    pub reconnects: u64,
    /// The `traceparent` each server saw (`x-seen-traceparent`).
    pub seen_traceparents: Vec<String>,
    /// The first few errors, with their time since the start of the run (ms).
    pub error_times_ms: Vec<(u64, String)>,
}

impl LoadReport {
    /// Responses with status `code`.
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code.to_string()).copied().unwrap_or(0)
    }

    /// Responses served by the server named `name`.
    pub fn served(&self, name: &str) -> u64 {
        self.served_by.get(name).copied().unwrap_or(0)
    }

    /// Responses the proxy made for `reason`.
    pub fn reason(&self, reason: &str) -> u64 {
        self.reasons.get(reason).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| std::fmt::Error)?)
    }
}

/// A Service `name` in `namespace` at `vip` (port `port`, its name `port_name`, for protocol
/// hints) over `endpoints` at `target_port`.
pub fn service(
    name: &str,
    namespace: &str,
    vip: SocketAddr,
    port_name: &str,
    target_port: u16,
    endpoints: &[Ipv4Addr],
    annotations: &[(&str, &str)],
) -> ServiceSpec {
    let SocketAddr::V4(vip) = vip else { panic!("a Service address is IPv4: {vip}") };
    ServiceSpec {
        name: name.into(),
        namespace: namespace.into(),
        cluster_ip: *vip.ip(),
        annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ports: vec![ServicePortSpec {
            name: port_name.into(),
            port: vip.port(),
            target_port: Some(target_port),
            app_protocol: None,
        }],
        endpoints: endpoints.to_vec(),
    }
}

/// An authorization rule for pods of `namespace` (one pod: `workload`; some ports: `ports`)
/// matching sources `from` (SPIFFE IDs or patterns).
pub fn rule(
    name: &str,
    namespace: &str,
    workload: Option<&str>,
    ports: &[u16],
    action: Action,
    from: &[&str],
) -> RuleSpec {
    RuleSpec {
        name: name.into(),
        namespace: namespace.into(),
        workload: workload.map(Into::into),
        ports: ports.to_vec(),
        action,
        from: from.iter().map(|f| f.to_string()).collect(),
    }
}

/// Several nodes joined by a network of their own: a namespace with a bridge, each node
/// attached at 192.168.77.<subnet> with routes to the others' pod ranges. One workload file
/// describes the whole cluster; one CA signs for every node.
pub struct Cluster {
    pub id: String,
    /// The network namespace holding the bridge between the nodes.
    pub netns: String,
    pub nodes: Vec<Node>,
    pub namespaces: Vec<(String, bool)>,
    pub mtls_modes: Vec<(String, String)>,
    /// Authorization rules (see [`rule`]).
    pub authz: Vec<RuleSpec>,
    /// Istio AuthorizationPolicy and PeerAuthentication objects, as `kubectl apply` takes them.
    pub istio: Vec<serde_json::Value>,
    /// Services (see [`service`]).
    pub services: Vec<ServiceSpec>,
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
}

impl Cluster {
    pub fn new() -> Result<Cluster> {
        SWEEP.call_once(sweep_leftovers);
        let id = new_id();
        let netns = format!("{id}-net");
        let dir = std::env::temp_dir().join(&netns);
        std::fs::create_dir_all(&dir)?;
        let ca_dir = dir.join("ca");
        let cluster = Cluster {
            id,
            netns: netns.clone(),
            nodes: vec![],
            namespaces: vec![],
            mtls_modes: vec![],
            authz: Vec::new(),
            istio: Vec::new(),
            services: Vec::new(),
            dir,
            ca_dir: ca_dir.clone(),
        };
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &netns, "link", "set", "br0", "up"])?;
        let out = Command::new(bin_path("mesh-agent")?).args(["ca", "init", "--dir"]).arg(&ca_dir).output()?;
        if !out.status.success() {
            bail!("mesh-agent ca init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(cluster)
    }

    /// Adds a node with a pod range of its own (see [`next_subnet`]); returns its index.
    pub fn add_node(&mut self, name: &str) -> Result<usize> {
        self.add_node_at(name, next_subnet())
    }

    /// Adds a node with pod range 10.244.<subnet>.0/24 at 192.168.77.<subnet>.
    pub fn add_node_at(&mut self, name: &str, subnet: u8) -> Result<usize> {
        let mut node = Node::with_id(&self.id, name, subnet)?;
        let underlay = Ipv4Addr::new(192, 168, 77, subnet);
        let ul = format!("ul{subnet}");
        ip(&["-n", &self.netns, "link", "add", &ul, "type", "veth", "peer", "name", "eth0", "netns", &node.netns])?;
        ip(&["-n", &self.netns, "link", "set", &ul, "master", "br0", "up"])?;
        ip(&["-n", &node.netns, "addr", "add", &format!("{underlay}/24"), "dev", "eth0"])?;
        ip(&["-n", &node.netns, "link", "set", "eth0", "up"])?;
        run(Command::new("ip").args(["netns", "exec", &node.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]))?;
        for other in &self.nodes {
            let (o_ul, o_gw) = (other.underlay.unwrap(), other.gateway.octets());
            ip(&["-n", &node.netns, "route", "add", &format!("10.244.{}.0/24", o_gw[2]), "via", &o_ul.to_string()])?;
            ip(&["-n", &other.netns, "route", "add", &format!("10.244.{subnet}.0/24"), "via", &underlay.to_string()])?;
        }
        node.underlay = Some(underlay);
        node.workloads = self.dir.join("cluster.yaml");
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.name == name).expect("no such node")
    }

    pub fn set_namespace(&mut self, namespace: &str, meshed: bool, mtls_mode: Option<&str>) {
        self.namespaces.retain(|(n, _)| n != namespace);
        self.namespaces.push((namespace.into(), meshed));
        self.mtls_modes.retain(|(n, _)| n != namespace);
        if let Some(m) = mtls_mode {
            self.mtls_modes.push((namespace.into(), m.into()));
        }
    }

    pub fn write_workloads(&self) -> Result<()> {
        let nodes: Vec<_> = self.nodes.iter().map(|n| (n.name.clone(), n.underlay.unwrap())).collect();
        let pods: Vec<Pod> = self.nodes.iter().flat_map(|n| n.pods.clone()).collect();
        let mut file =
            workload_file(&nodes, &self.namespaces, &self.mtls_modes, &pods, &self.authz, &self.services, &[]);
        let kind = |o: &serde_json::Value, k: &str| o["kind"] == k;
        file.authorization_policies = self.istio.iter().filter(|o| kind(o, "AuthorizationPolicy")).cloned().collect();
        file.peer_authentications = self.istio.iter().filter(|o| kind(o, "PeerAuthentication")).cloned().collect();
        write_atomic(&self.dir.join("cluster.yaml"), &file.to_yaml())
    }

    /// Starts every node's agent with the cluster's CA; `extra` goes to each.
    pub fn start(&mut self, extra: &[&str]) -> Result<()> {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        self.start_only(&names.iter().map(String::as_str).collect::<Vec<_>>(), extra)
    }

    /// Starts the agents of the named nodes only.
    pub fn start_only(&mut self, names: &[&str], extra: &[&str]) -> Result<()> {
        self.write_workloads()?;
        let ca = self.ca_dir.to_string_lossy().into_owned();
        let mut args = vec!["--ca-dir", ca.as_str()];
        args.extend_from_slice(extra);
        for n in self.nodes.iter_mut().filter(|n| names.contains(&n.name.as_str())) {
            n.start_agent(&args)?;
        }
        Ok(())
    }

    /// Captures everything crossing the bridge between the nodes until the capture is dropped
    /// (or [`Capture::finish`]ed).
    pub fn capture(&self) -> Result<Capture> {
        Capture::start(&self.dir, &self.netns, "br0")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process's CPU time (user + system), seconds, from `/proc/<pid>/stat`.
pub fn cpu_secs_of(pid: u32) -> Result<f64> {
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    anyhow::ensure!(f.len() > 12, "/proc/{pid}/stat is short");
    Ok((f[11].parse::<f64>()? + f[12].parse::<f64>()?) / tick)
}

/// A process's resident memory, KiB.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The signer (`mesh-agent identity serve`) in a node's network namespace (a node without an
/// agent, as a Deployment's pod), listening on the node's underlay address; killed on drop.
pub struct Signer {
    child: Option<Child>,
    netns: String,
    args: Vec<String>,
    /// The CA API (TLS, gRPC).
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Signer {
    /// Starts it on `node` with `ca_dir`'s CA and `kubeconfig`'s API server, serving as the
    /// node's underlay address; `extra` goes to it. Waits until it is ready.
    pub fn start(node: &Node, ca_dir: &Path, kubeconfig: &Path, extra: &[&str]) -> Result<Signer> {
        // A cluster node's underlay address, or a lone node's own.
        let ip = node.underlay.unwrap_or(node.gateway);
        let addr = SocketAddr::from((ip, 15012));
        let admin = SocketAddr::from((ip, 15014));
        let mut args: Vec<String> = vec![
            "identity".into(),
            "serve".into(),
            format!("--listen={addr}"),
            format!("--admin={admin}"),
            format!("--ca-dir={}", ca_dir.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--serving-name={ip}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut s =
            Signer { child: None, netns: node.netns.clone(), args, addr, admin, log: node.dir.join("signer.log") };
        s.restart()?;
        Ok(s)
    }

    /// Kills it (SIGKILL: a replica lost).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same arguments and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(bin_path("mesh-agent")?);
        cmd.args(&self.args).env("RUST_LOG", "info").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        enter(&mut cmd, None, &self.netns);
        self.child = Some(cmd.spawn().context("spawn the signer")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http_get(&self.netns, self.admin, "/readyz") {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("the signer exited with {status}:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("the signer is not ready after 20 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> Result<String> {
        Ok(http_get(&self.netns, self.admin, "/metrics")?.1)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's resident memory, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib_of(self.pid()?)
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running packet capture.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    /// tcpdump on `iface` in namespace `netns`, writing a pcap file under `dir`.
    pub fn start(dir: &Path, netns: &str, iface: &str) -> Result<Capture> {
        let file = dir.join(format!("capture-{}.pcap", SEQ.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", iface, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        enter(&mut cmd, None, netns);
        let mut child = cmd.spawn().context("tcpdump (installed by `cargo xtask setup`)")?;
        // tcpdump says "listening on <iface>" once the capture runs.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                line.clear();
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow!("tcpdump did not start"))?;
        Ok(Capture { child: Some(child), file })
    }

    /// Stops the capture and returns the pcap bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.stop();
        Ok(std::fs::read(&self.file)?)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Attach types of the agent's programs (from the kernel's `enum bpf_attach_type`).
pub const ATTACH_TYPES: [(u32, &str); 7] = [
    (0, "cgroup_skb/ingress"),
    (3, "sock_ops"),
    (10, "connect4"),
    (11, "connect6"),
    (29, "getpeername4"),
    (30, "getpeername6"),
    (34, "sock_release"),
];

/// `BPF_PROG_QUERY` on a cgroup for each attach type the agent uses.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    let dir = std::fs::File::open(cgroup)?;
    let mut all = Vec::new();
    for (attach_type, name) in ATTACH_TYPES {
        let mut ids = [0u32; 64];
        // union bpf_attr, query variant: target_fd, attach_type, query_flags, attach_flags,
        // prog_ids (u64 pointer), prog_cnt.
        #[repr(C)]
        struct Query {
            target_fd: u32,
            attach_type: u32,
            query_flags: u32,
            attach_flags: u32,
            prog_ids: u64,
            prog_cnt: u32,
            _pad: [u8; 100],
        }
        let mut q = Query {
            target_fd: dir.as_raw_fd() as u32,
            attach_type,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            _pad: [0; 100],
        };
        const BPF_PROG_QUERY: libc::c_long = 16;
        let r = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut q as *mut Query, std::mem::size_of::<Query>() as u32)
        };
        if r != 0 {
            bail!("BPF_PROG_QUERY {name} on {}: {}", cgroup.display(), std::io::Error::last_os_error());
        }
        all.extend_from_slice(&ids[..q.prog_cnt as usize]);
    }
    Ok(all)
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
