//! The agent's configuration: one [`Config`] value built by a pure function from the optional
//! config file and the command-line flags (flags win). Every knob has a named default.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::cgroup;

/// Port of the outbound (redirect) listener. 15001 is what Istio uses for the same job, which
/// keeps operators' firewall and NetworkPolicy knowledge valid.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Admin port, on the node's loopback only: debug views, the dashboard, metrics and health (as
/// ztunnel's 15000). They list the cluster's pods: never for pods or the network to read.
pub const DEFAULT_ADMIN_PORT: u16 = 15000;
/// Stats port, on all addresses: `/metrics`, `/healthz` and `/readyz` only (Istio's 15020).
pub const DEFAULT_STATS_PORT: u16 = 15020;
/// Long enough for a cross-node SYN retry (1 s) and then some; short enough that a dead
/// endpoint fails a client well before its own timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long in-flight connections may finish after SIGTERM before the agent exits.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Per-direction copy buffer. 16 KiB: against 64 KiB the full benchmark measured the agent's
/// memory with 10 000 open connections halved (457 → 238 MiB), at the cost of ~15 % single-stream
/// bulk throughput (same node 10.5 → 8.9 Gbit/s, across nodes 5.9 → 5.1). An adaptive buffer
/// (start small, grow on full reads) would get both; not built yet.
pub const DEFAULT_COPY_BUFFER: usize = 16 * 1024;
/// Same-node acceleration (sockmap + sk_msg): off until the benchmark shows it wins (bench/RESULTS.md).
pub const DEFAULT_SOCKMAP_ACCELERATION: bool = false;
/// Idle proxied TCP connections are closed after this (Istio's default).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// HBONE port, as Istio ambient (interop).
pub const DEFAULT_HBONE_PORT: u16 = 15008;
/// Workload certificate lifetime: a day, renewed at half-life, as Istio does.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// HTTP/2 streams the HBONE server allows per connection (its SETTINGS).
pub const HBONE_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 streams per pooled HBONE connection before another connection is opened.
pub const DEFAULT_POOL_MAX_STREAMS: usize = 100;
/// A pooled HBONE connection with no stream for this long is closed.
pub const DEFAULT_POOL_IDLE: Duration = Duration::from_secs(60);
/// How long the proxy waits for a client's first bytes to tell HTTP from other TCP on a port
/// without a protocol hint. Protocols where the server speaks first wait this long once per
/// connection (Linkerd's detection waits 10 s).
pub const DEFAULT_SNIFF_TIMEOUT: Duration = Duration::from_millis(100);
/// Ports never sniffed because their protocols start with the server (SMTP, MySQL) or are
/// known not to be HTTP: Linkerd's default opaque ports.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 4567, 4568, 5432, 6379, 9300, 11211];
/// Outlier detection: consecutive failures (connect errors, resets, timeouts, 5xx) that eject
/// an endpoint (Envoy's default).
pub const DEFAULT_OUTLIER_CONSECUTIVE_FAILURES: u32 = 5;
/// First ejection lasts this long; each further ejection of the same endpoint one more period.
pub const DEFAULT_OUTLIER_BASE_EJECTION: Duration = Duration::from_secs(10);
/// Never more than this share of a Service's endpoints ejected at once.
pub const DEFAULT_OUTLIER_MAX_EJECTION_PERCENT: u32 = 50;
/// Request bodies up to this size are kept so the request can be retried; larger ones are
/// streamed and never retried.
pub const DEFAULT_RETRY_BODY_LIMIT: usize = 64 * 1024;
/// Request bodies kept for retries on the whole node at once: 1024 of the largest.
pub const DEFAULT_RETRY_BODY_BUDGET: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_yaml_ng::Error },
    #[error("bypass CIDR {0:?} is not an IPv4 CIDR like 10.0.0.0/8: {1}")]
    Cidr(String, ipnet::AddrParseError),
    #[error("{0} is required: set it in the config file or with --{1}")]
    Missing(&'static str, &'static str),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("the redirect address must be a specific IPv4 address reachable from pods, not {0}")]
    RedirectAddress(Ipv4Addr),
    #[error("trust domain {0:?} is not valid: lowercase letters, digits, '.', '-', '_'")]
    TrustDomain(String),
    #[error("choose one source of workloads: a workload file or Kubernetes mode, not both")]
    TwoSources,
    #[error("OTLP endpoint {0:?} is not valid: {1}")]
    OtlpEndpoint(String, OtlpEndpointError),
    #[error("trace sample rate {0} is not between 0 and 1")]
    TraceSampleRate(f64),
    #[error("{key} is {value:?}; at most {max:?}")]
    TooLarge { key: &'static str, value: Duration, max: Duration },
    #[error("choose one CA: local CA files (ca / --ca-dir) or a CA to ask (caClient / --ca-address), not both")]
    TwoCas,
    #[error(transparent)]
    CaAddress(#[from] crate::identity::caclient::CaClientError),
}

/// The config file (YAML), every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub node_name: Option<String>,
    /// The node's cgroup: absolute, or relative to the cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    pub outbound_listen: Option<SocketAddr>,
    pub redirect_address: Option<Ipv4Addr>,
    pub admin_listen: Option<SocketAddr>,
    pub stats_listen: Option<SocketAddr>,
    pub admin_socket: Option<PathBuf>,
    pub workload_file: Option<PathBuf>,
    #[serde(default)]
    pub bypass: Bypass,
    pub workers: Option<usize>,
    pub connect_timeout_ms: Option<u64>,
    pub drain_grace_ms: Option<u64>,
    pub max_redirected_sockets: Option<u32>,
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub ca: Option<CaFiles>,
    /// A CA to ask for certificates over Istio's CA API (Switchyard's signer, istiod,
    /// istio-csr) instead of holding a CA key.
    pub ca_client: Option<CaClientFile>,
    pub cert_lifetime_secs: Option<u64>,
    pub hbone_listen: Option<SocketAddr>,
    pub pool_max_streams: Option<usize>,
    pub pool_idle_ms: Option<u64>,
    /// Size of a proxied connection's first reads, bytes (they grow to 64 KiB after 1 MiB
    /// moved, 256 KiB after 10 MiB).
    pub copy_buffer_bytes: Option<usize>,
    /// Same-node acceleration with sockmap + sk_msg.
    pub sockmap_acceleration: Option<bool>,
    /// Close proxied TCP connections idle this long, seconds (0: never).
    pub tcp_idle_timeout_secs: Option<u64>,
    /// Kubernetes mode (watch the API server instead of reading a workload file).
    pub kubernetes: Option<bool>,
    /// kubeconfig file for Kubernetes mode (default: in-cluster, then `$KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// Where the kubelet's pod cgroups are (the kubepods cgroup or a directory above it),
    /// absolute or relative to the cgroup2 mount; default: the cgroup root.
    pub pod_cgroup_root: Option<PathBuf>,
    /// Wait this long for a client's first bytes before treating an unhinted port as TCP.
    pub protocol_sniff_timeout_ms: Option<u64>,
    /// Destination ports always handled as HTTP (in addition to Service port hints).
    #[serde(default)]
    pub http_ports: Vec<u16>,
    /// Destination ports never sniffed (default: [`DEFAULT_OPAQUE_PORTS`]).
    pub opaque_ports: Option<Vec<u16>>,
    #[serde(default)]
    pub outlier_detection: OutlierFile,
    pub retry_body_limit_bytes: Option<usize>,
    /// Bytes of request bodies kept for retries on the whole node at once (past it, requests
    /// are streamed and not retried once sent, never refused).
    pub retry_body_budget_bytes: Option<usize>,
    /// HTTP/2 receive windows granted to HBONE connections at once, node-wide: bounds what
    /// the agent holds for pods that read slowly (past it, new connections get 64 KiB windows).
    pub hbone_receive_budget_bytes: Option<u64>,
    /// Deliver HBONE connections to the destination pod from the source pod's address
    /// (`IP_TRANSPARENT`, as ztunnel), so applications see their real peer (default true);
    /// false: from the node's address.
    pub transparent_delivery: Option<bool>,
    /// Istio's root namespace (Kubernetes mode): its AuthorizationPolicies and
    /// PeerAuthentications apply to the whole mesh (default `istio-system`).
    pub istio_root_namespace: Option<String>,
    /// Connections one pod may have open through the proxy at once (past it, new ones are
    /// reset).
    pub max_connections_per_pod: Option<usize>,
    /// Connections open through the proxy on the node at once.
    pub max_proxied_connections: Option<usize>,
    /// Pin the eBPF maps and links under this directory on a bpffs: a new agent then takes
    /// over from the running one without a gap, and namespaces can fail closed.
    pub bpf_pin_dir: Option<PathBuf>,
    /// W3C trace context on HTTP requests to Services: kept and continued, created when
    /// absent (default true).
    pub trace_context: Option<bool>,
    /// Share (0..1) of the traces the proxy starts that are marked sampled (default 1).
    pub trace_sample_rate: Option<f64>,
    /// OTLP/HTTP collector for the proxy's request spans, e.g. `http://otel-collector:4318`
    /// (`/v1/traces` is appended to a URL without a path). Default: no export.
    pub otlp_endpoint: Option<String>,
    /// Access log: `all` (default), `errors` (failed connections, 5xx and proxy-made
    /// responses only) or `off`.
    pub access_log: Option<AccessLogMode>,
    /// Share (0..1) of successful connections and requests logged; failures always are.
    pub access_log_sample_rate: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogMode {
    #[default]
    All,
    Errors,
    Off,
}

/// Which connections and requests get an access-log line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccessLog {
    pub mode: AccessLogMode,
    pub sample_rate: f64,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog { mode: AccessLogMode::All, sample_rate: 1.0 }
    }
}

impl AccessLog {
    pub fn wants(&self, failed: bool) -> bool {
        match self.mode {
            AccessLogMode::Off => false,
            AccessLogMode::Errors => failed,
            AccessLogMode::All => failed || self.sample_rate >= 1.0 || fastrand::f64() < self.sample_rate,
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierFile {
    pub consecutive_failures: Option<u32>,
    pub base_ejection_ms: Option<u64>,
    pub max_ejection_percent: Option<u32>,
}

/// Per-endpoint outlier detection (circuit breaking), node-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: DEFAULT_OUTLIER_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_OUTLIER_BASE_EJECTION,
            max_ejection_percent: DEFAULT_OUTLIER_MAX_EJECTION_PERCENT,
        }
    }
}

/// The mesh CA, from files (see `mesh-agent ca init`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Trust bundle (may hold several roots); the CA certificate when absent.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
}

/// `caClient` in the config file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaClientFile {
    /// `https://host:port`.
    pub address: String,
    /// PEM roots: verify the CA's serving certificate, and are the mesh trust bundle.
    pub root_cert: PathBuf,
    /// The projected ServiceAccount token the CA authenticates the agent by.
    pub token_file: PathBuf,
    #[serde(default)]
    pub cluster_id: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bypass {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub cidrs: Vec<String>,
}

/// Command-line overrides (see `mesh-agent run --help`).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunArgs {
    /// Agent config file (YAML).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Node name (defaults to the config file's, then to the hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Local-mode workload file (YAML) describing this node's pods.
    #[arg(long)]
    pub workloads: Option<PathBuf>,
    /// The node's cgroup (v2) to attach the programs to; never the cgroup2 root.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Address pods' connections are redirected to (reachable from the pods).
    #[arg(long)]
    pub redirect_address: Option<Ipv4Addr>,
    /// Outbound listener address.
    #[arg(long)]
    pub outbound_listen: Option<SocketAddr>,
    /// Admin listener (debug views, dashboard, metrics, health); default 127.0.0.1:15000.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Stats listener (`/metrics`, `/healthz`, `/readyz` only); default 0.0.0.0:15020.
    #[arg(long)]
    pub stats_listen: Option<SocketAddr>,
    /// Also serve the admin endpoint on this Unix socket, private to this agent (for
    /// `mesh-agent probe`: kubelet exec probes that reach this agent even while another one
    /// shares the admin port during an upgrade).
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// Destination ports never redirected (repeatable).
    #[arg(long = "bypass-port")]
    pub bypass_ports: Vec<u16>,
    /// Destination IPv4 CIDRs never redirected (repeatable).
    #[arg(long = "bypass-cidr")]
    pub bypass_cidrs: Vec<String>,
    /// Proxy worker threads (default: one per CPU the agent may use).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Size of the per-connection eBPF maps: redirected connections open at once, node-wide.
    #[arg(long)]
    pub max_redirected_sockets: Option<u32>,
    /// Connections one pod may have open through the proxy at once (default 16384); past it its
    /// new connections are reset, other pods' are not.
    #[arg(long)]
    pub max_connections_per_pod: Option<usize>,
    /// Connections open through the proxy on the node at once (default 65536).
    #[arg(long)]
    pub max_proxied_connections: Option<usize>,
    /// SPIFFE trust domain.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Directory holding ca.crt, ca.key and bundle.crt (as written by `mesh-agent ca init`):
    /// sign workload certificates in-process (local mode, the demo).
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Ask this CA for workload certificates over Istio's CA API (`https://host:port`:
    /// Switchyard's signer, istiod, istio-csr); the agent then holds no CA key.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM roots verifying the CA (and the mesh's trust bundle) with --ca-address.
    #[arg(long)]
    pub ca_root_cert: Option<PathBuf>,
    /// The ServiceAccount token to authenticate to the CA with (re-read for every request).
    #[arg(long)]
    pub ca_token_file: Option<PathBuf>,
    /// Sent to the CA as the `clusterid` header (istiod: `Kubernetes` by default).
    #[arg(long, env = "CLUSTER_ID")]
    pub ca_cluster_id: Option<String>,
    /// Workload certificate lifetime in seconds (renewed at half-life).
    #[arg(long)]
    pub cert_lifetime_secs: Option<u64>,
    /// HBONE (mTLS tunnel) listener address.
    #[arg(long)]
    pub hbone_listen: Option<SocketAddr>,
    /// Close pooled HBONE connections idle for this long (milliseconds).
    #[arg(long)]
    pub pool_idle_ms: Option<u64>,
    /// Size of a proxied connection's first reads, bytes (default 16384; they grow with the
    /// bytes moved).
    #[arg(long)]
    pub copy_buffer_bytes: Option<usize>,
    /// Same-node acceleration: sockets between pods and the proxy on this node exchange data
    /// socket to socket (sockmap + sk_msg) instead of through the TCP/IP stack. Probed at
    /// start; if the kernel refuses it the agent runs without it.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub sockmap_acceleration: Option<bool>,
    /// HBONE delivers to a local pod from the source pod's own address (IP_TRANSPARENT; replies
    /// steered back in the kernel), so the application sees its real peer (default on; off:
    /// from this node's address, as before).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub transparent_delivery: Option<bool>,
    /// Close a proxied TCP connection after this many seconds without a byte either way
    /// (default 3600, as Istio; 0: never).
    #[arg(long)]
    pub tcp_idle_timeout_secs: Option<u64>,
    /// Kubernetes mode: watch Namespaces, Pods and Nodes on the API server. Chosen by itself when
    /// running in a cluster (KUBERNETES_SERVICE_HOST set) without --workloads.
    #[arg(long)]
    pub kubernetes: bool,
    /// kubeconfig for Kubernetes mode (default: the in-cluster service account, then $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where the kubelet's pod cgroups are (default: the cgroup root).
    #[arg(long)]
    pub pod_cgroup_root: Option<PathBuf>,
    /// Milliseconds to wait for a client's first bytes to detect HTTP on a port without a
    /// protocol hint (default 100).
    #[arg(long)]
    pub protocol_sniff_timeout_ms: Option<u64>,
    /// Outlier detection: first ejection of a failing endpoint, milliseconds (default 10000).
    #[arg(long)]
    pub outlier_base_ejection_ms: Option<u64>,
    /// Give up a connect to an endpoint or a peer node after this long, milliseconds (default
    /// 5000); a Service's connection is then retried on another endpoint.
    #[arg(long)]
    pub connect_timeout_ms: Option<u64>,
    /// Pin eBPF maps and links under this bpffs directory (upgrade hand-over, fail modes);
    /// default: not pinned, programs detach when the agent exits.
    #[arg(long)]
    pub bpf_pin_dir: Option<PathBuf>,
    /// Access log: all connections and requests, only failed ones, or none.
    #[arg(long, value_enum)]
    pub access_log: Option<AccessLogMode>,
    /// Share (0..1) of successful connections and requests logged (failures always are).
    #[arg(long)]
    pub access_log_sample_rate: Option<f64>,
    /// Export the proxy's span of each sampled HTTP request to this OTLP/HTTP collector, e.g.
    /// http://otel-collector.observability:4318 (default: no export).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Share (0..1) of the traces the proxy starts (requests without `traceparent`) that are
    /// marked sampled; continued traces keep the client's decision (default 1).
    #[arg(long)]
    pub trace_sample_rate: Option<f64>,
}

/// A flag value that is neither on nor off.
#[derive(Debug, thiserror::Error)]
#[error("expected on or off, got {0:?}")]
pub struct OnOffError(String);

fn parse_on_off(s: &str) -> Result<bool, OnOffError> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(OnOffError(s.into())),
    }
}

/// Why an OTLP endpoint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtlpEndpointError {
    #[error("not a URL: {0}")]
    NotUrl(String),
    #[error(
        "https is not supported yet: use the collector's plain OTLP/HTTP port (4318) on the node or in the cluster"
    )]
    Https,
    #[error("must start with http://")]
    NotHttp,
    #[error("no host")]
    NoHost,
}

/// Checks an OTLP endpoint and returns the URL spans are posted to: `http://host:port` gets
/// OTLP's `/v1/traces`; a URL with a path is used as it is.
pub fn traces_url(endpoint: &str) -> Result<String, OtlpEndpointError> {
    let uri: hyper::Uri =
        endpoint.parse().map_err(|e: hyper::http::uri::InvalidUri| OtlpEndpointError::NotUrl(e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(OtlpEndpointError::Https),
        _ => return Err(OtlpEndpointError::NotHttp),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(OtlpEndpointError::NoHost);
    }
    Ok(match uri.path() {
        "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_string(),
    })
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub cgroup_root: PathBuf,
    pub redirect_address: Ipv4Addr,
    pub outbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub stats_listen: SocketAddr,
    pub admin_socket: Option<PathBuf>,
    pub workload_file: Option<PathBuf>,
    pub bypass_ports: Vec<u16>,
    pub bypass_cidrs: Vec<Ipv4Net>,
    pub workers: usize,
    pub connect_timeout: Duration,
    pub drain_grace: Duration,
    pub copy_buffer: usize,
    pub max_redirected_sockets: u32,
    pub max_connections_per_pod: usize,
    pub max_proxied_connections: usize,
    pub retry_body_budget: usize,
    pub hbone_receive_budget: u64,
    pub transparent_delivery: bool,
    pub istio_root_namespace: String,
    pub trust_domain: String,
    /// Without a CA there is no mTLS: connections to other nodes' meshed pods are refused.
    pub ca: Option<CaFiles>,
    /// A CA to ask instead (no CA key on the node).
    pub ca_client: Option<crate::identity::caclient::CaClientConfig>,
    pub cert_lifetime: Duration,
    pub hbone_listen: SocketAddr,
    pub pool_max_streams: usize,
    pub pool_idle: Duration,
    pub sockmap_acceleration: bool,
    pub tcp_idle_timeout: Option<Duration>,
    /// Kubernetes mode, with an explicit kubeconfig or `None` for in-cluster/`$KUBECONFIG`.
    pub kubernetes: Option<Option<PathBuf>>,
    pub pod_cgroup_root: PathBuf,
    pub sniff_timeout: Duration,
    pub http_ports: Vec<u16>,
    pub opaque_ports: Vec<u16>,
    pub outlier: Outlier,
    pub retry_body_limit: usize,
    pub bpf_pin_dir: Option<PathBuf>,
    pub trace_context: bool,
    pub trace_sample_rate: f64,
    /// Where spans are posted: the OTLP endpoint, checked, with `/v1/traces` added when it
    /// had no path (see [`traces_url`]).
    pub otlp_traces_url: Option<String>,
    pub access_log: AccessLog,
}

/// What the configuration's defaults depend on outside the file and the flags, read once by
/// [`Environment::detect`] so that [`Config::build`] is a pure function of its inputs.
#[derive(Debug, Clone)]
pub struct Environment {
    /// Where cgroup2 is mounted (relative cgroup paths are under it).
    pub cgroup2_mount: PathBuf,
    /// The node's hostname: the default node name.
    pub hostname: Option<String>,
    /// Running in a pod (`KUBERNETES_SERVICE_HOST` is set): Kubernetes mode by default.
    pub in_cluster: bool,
    /// CPUs available: the default number of proxy workers.
    pub cpus: usize,
}

impl Environment {
    pub fn detect() -> Result<Self, ConfigError> {
        Ok(Environment {
            cgroup2_mount: cgroup::cgroup2_mount()?,
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string()),
            in_cluster: std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }
}

impl Config {
    /// Reads the file named by `args.config` (if any) and merges the flags over it.
    pub fn load(args: &RunArgs) -> Result<Self, ConfigError> {
        let (file, base) = match &args.config {
            Some(path) => (read_file(path)?, path.parent().map(Path::to_path_buf)),
            None => (FileConfig::default(), None),
        };
        Self::build(file, base.as_deref(), args, &Environment::detect()?)
    }

    /// Pure merge of file and flags over the defaults. Relative paths in the file are relative
    /// to `base` (the file's directory); relative cgroup paths are relative to the cgroup2
    /// mount.
    pub fn build(
        mut file: FileConfig,
        base: Option<&Path>,
        args: &RunArgs,
        env: &Environment,
    ) -> Result<Self, ConfigError> {
        let rel = |p: PathBuf| match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let (workload_file, kubernetes) = sources(&mut file, args, env, rel)?;
        let (ca, ca_client) = certificate_source(&mut file, args, rel)?;
        let node = NodeSettings::merge(&mut file, args, env)?;
        let (trace_sample_rate, otlp_traces_url) = tracing(&mut file, args)?;
        // Flag, else file, else the default address.
        let listen = |flag: Option<SocketAddr>, file: Option<SocketAddr>, ip: [u8; 4], port: u16| {
            flag.or(file).unwrap_or(SocketAddr::from((ip, port)))
        };
        let trust_domain = trust_domain(&mut file, args)?;
        let (bypass_ports, bypass_cidrs) = bypass(file.bypass, args)?;
        let workers = args.workers.or(file.workers).unwrap_or(env.cpus).max(1);
        Config {
            node_name: node.name,
            cgroup_root: node.cgroup_root,
            pod_cgroup_root: node.pod_cgroup_root,
            redirect_address: node.redirect_address,
            outbound_listen: listen(args.outbound_listen, file.outbound_listen, [0, 0, 0, 0], DEFAULT_OUTBOUND_PORT),
            admin_listen: listen(args.admin_listen, file.admin_listen, [127, 0, 0, 1], DEFAULT_ADMIN_PORT),
            stats_listen: listen(args.stats_listen, file.stats_listen, [0, 0, 0, 0], DEFAULT_STATS_PORT),
            admin_socket: args.admin_socket.clone().or(file.admin_socket),
            workload_file,
            bypass_ports,
            bypass_cidrs,
            workers,
            connect_timeout: millis(args.connect_timeout_ms.or(file.connect_timeout_ms).filter(|ms| *ms > 0))
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            drain_grace: millis(file.drain_grace_ms).unwrap_or(DEFAULT_DRAIN_GRACE),
            copy_buffer: args
                .copy_buffer_bytes
                .or(file.copy_buffer_bytes)
                .unwrap_or(DEFAULT_COPY_BUFFER)
                .clamp(1024, 1 << 20),
            max_redirected_sockets: args
                .max_redirected_sockets
                .or(file.max_redirected_sockets)
                .unwrap_or(mesh_common::MAX_REDIRECTED_SOCKETS)
                .max(1),
            trust_domain,
            ca,
            ca_client,
            cert_lifetime: args
                .cert_lifetime_secs
                .or(file.cert_lifetime_secs)
                .map_or(DEFAULT_CERT_LIFETIME, Duration::from_secs)
                .max(Duration::from_secs(1)),
            hbone_listen: listen(args.hbone_listen, file.hbone_listen, [0, 0, 0, 0], DEFAULT_HBONE_PORT),
            // Never above what our own HBONE server allows per connection.
            pool_max_streams: file
                .pool_max_streams
                .unwrap_or(DEFAULT_POOL_MAX_STREAMS)
                .clamp(1, HBONE_MAX_CONCURRENT_STREAMS as usize),
            pool_idle: millis(args.pool_idle_ms.or(file.pool_idle_ms)).unwrap_or(DEFAULT_POOL_IDLE),
            sockmap_acceleration: args
                .sockmap_acceleration
                .or(file.sockmap_acceleration)
                .unwrap_or(DEFAULT_SOCKMAP_ACCELERATION),
            kubernetes,
            // 0: never.
            tcp_idle_timeout: match args.tcp_idle_timeout_secs.or(file.tcp_idle_timeout_secs) {
                Some(0) => None,
                s => Some(s.map_or(DEFAULT_TCP_IDLE_TIMEOUT, Duration::from_secs)),
            },
            sniff_timeout: millis(args.protocol_sniff_timeout_ms.or(file.protocol_sniff_timeout_ms))
                .unwrap_or(DEFAULT_SNIFF_TIMEOUT),
            http_ports: file.http_ports,
            opaque_ports: file.opaque_ports.unwrap_or_else(|| DEFAULT_OPAQUE_PORTS.to_vec()),
            outlier: Outlier::merge(&file.outlier_detection, args),
            retry_body_limit: file.retry_body_limit_bytes.unwrap_or(DEFAULT_RETRY_BODY_LIMIT),
            retry_body_budget: file.retry_body_budget_bytes.unwrap_or(DEFAULT_RETRY_BODY_BUDGET),
            hbone_receive_budget: file.hbone_receive_budget_bytes.unwrap_or(crate::proxy::caps::DEFAULT_RECEIVE_BUDGET),
            transparent_delivery: args.transparent_delivery.or(file.transparent_delivery).unwrap_or(true),
            istio_root_namespace: file
                .istio_root_namespace
                .unwrap_or_else(|| crate::authz::istio::DEFAULT_ROOT_NAMESPACE.into()),
            max_connections_per_pod: cap(
                args.max_connections_per_pod,
                file.max_connections_per_pod,
                crate::proxy::caps::DEFAULT_PER_POD,
            ),
            max_proxied_connections: cap(
                args.max_proxied_connections,
                file.max_proxied_connections,
                crate::proxy::caps::DEFAULT_NODE,
            ),
            bpf_pin_dir: args.bpf_pin_dir.clone().or(file.bpf_pin_dir),
            trace_context: file.trace_context.unwrap_or(true),
            trace_sample_rate,
            otlp_traces_url,
            access_log: AccessLog {
                mode: args.access_log.or(file.access_log).unwrap_or_default(),
                sample_rate: args.access_log_sample_rate.or(file.access_log_sample_rate).unwrap_or(1.0).clamp(0.0, 1.0),
            },
        }
        .bounded()
    }

    /// Durations within sane bounds, so that no later arithmetic on them (`now + lifetime`,
    /// `pool_idle * 2`, deadlines) can overflow: a huge value is a clear error at start-up,
    /// not a panic later.
    fn bounded(self) -> Result<Self, ConfigError> {
        const DAY: u64 = 86_400;
        let check = |key: &'static str, d: Duration, max_secs: u64| {
            if d > Duration::from_secs(max_secs) {
                Err(ConfigError::TooLarge { key, value: d, max: Duration::from_secs(max_secs) })
            } else {
                Ok(())
            }
        };
        check("certLifetimeSecs", self.cert_lifetime, 366 * DAY)?;
        check("poolIdleMs", self.pool_idle, DAY)?;
        check("connectTimeoutMs", self.connect_timeout, 600)?;
        check("drainGraceMs", self.drain_grace, 3600)?;
        check("tcpIdleTimeoutSecs", self.tcp_idle_timeout.unwrap_or_default(), 365 * DAY)?;
        check("protocolSniffTimeoutMs", self.sniff_timeout, 10)?;
        check("outlierDetection.baseEjectionMs", self.outlier.base_ejection, DAY)?;
        Ok(self)
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
}

/// Who this node is and where its pods' cgroups are.
struct NodeSettings {
    name: String,
    cgroup_root: PathBuf,
    pod_cgroup_root: PathBuf,
    redirect_address: Ipv4Addr,
}

impl NodeSettings {
    fn merge(file: &mut FileConfig, args: &RunArgs, env: &Environment) -> Result<Self, ConfigError> {
        let mount = env.cgroup2_mount.as_path();
        let name = args
            .node_name
            .clone()
            .or(file.node_name.take())
            .or_else(|| env.hostname.clone())
            .ok_or(ConfigError::Missing("nodeName", "node-name"))?;
        let cgroup_root = args
            .cgroup_root
            .clone()
            .or(file.cgroup_root.take())
            .ok_or(ConfigError::Missing("cgroupRoot", "cgroup-root"))?;
        let cgroup_root = cgroup::node_cgroup(mount, &cgroup_root)?;
        let redirect_address = args
            .redirect_address
            .or(file.redirect_address)
            .ok_or(ConfigError::Missing("redirectAddress", "redirect-address"))?;
        if redirect_address.is_unspecified() || redirect_address.is_loopback() || redirect_address.is_broadcast() {
            return Err(ConfigError::RedirectAddress(redirect_address));
        }
        let pod_cgroup_root = match args.pod_cgroup_root.clone().or(file.pod_cgroup_root.take()) {
            Some(p) => cgroup::resolve(mount, &p)?,
            None => cgroup_root.clone(),
        };
        Ok(NodeSettings { name, cgroup_root, pod_cgroup_root, redirect_address })
    }
}

/// The share of new traces sampled, and where spans go.
/// A connection cap: the flag, else the file, else `default`; at least 1.
fn cap(flag: Option<usize>, file: Option<usize>, default: usize) -> usize {
    flag.or(file).unwrap_or(default).max(1)
}

/// The trust domain: the flag, else the file, else Kubernetes' default; it must be a valid
/// SPIFFE trust domain.
fn trust_domain(file: &mut FileConfig, args: &RunArgs) -> Result<String, ConfigError> {
    let td = args
        .trust_domain
        .clone()
        .or(file.trust_domain.take())
        .unwrap_or_else(|| crate::identity::DEFAULT_TRUST_DOMAIN.into());
    if !crate::identity::is_trust_domain(&td) {
        return Err(ConfigError::TrustDomain(td));
    }
    Ok(td)
}

fn tracing(file: &mut FileConfig, args: &RunArgs) -> Result<(f64, Option<String>), ConfigError> {
    let rate = match args.trace_sample_rate.or(file.trace_sample_rate).unwrap_or(1.0) {
        r if (0.0..=1.0).contains(&r) => r,
        r => return Err(ConfigError::TraceSampleRate(r)),
    };
    let url = args
        .otlp_endpoint
        .clone()
        .or(file.otlp_endpoint.take())
        .filter(|e| !e.is_empty())
        .map(|e| traces_url(&e).map_err(|why| ConfigError::OtlpEndpoint(e, why)))
        .transpose()?;
    Ok((rate, url))
}

fn millis(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

/// Where pods come from: the workload file, or the Kubernetes API (asked for, or by default
/// in a pod without a workload file; with an explicit kubeconfig or `None` for in-cluster).
#[allow(clippy::type_complexity)]
fn sources(
    file: &mut FileConfig,
    args: &RunArgs,
    env: &Environment,
    rel: impl Fn(PathBuf) -> PathBuf,
) -> Result<(Option<PathBuf>, Option<Option<PathBuf>>), ConfigError> {
    let workload_file = args.workloads.clone().or(file.workload_file.take().map(&rel));
    let kubernetes = (args.kubernetes || file.kubernetes == Some(true) || (env.in_cluster && workload_file.is_none()))
        .then(|| args.kubeconfig.clone().or(file.kubeconfig.take().map(&rel)));
    if kubernetes.is_some() && workload_file.is_some() {
        return Err(ConfigError::TwoSources);
    }
    Ok((workload_file, kubernetes))
}

/// Ports and CIDRs never redirected: the file's and the flags', deduplicated.
fn bypass(file: Bypass, args: &RunArgs) -> Result<(Vec<u16>, Vec<Ipv4Net>), ConfigError> {
    let mut ports = file.ports;
    ports.extend(&args.bypass_ports);
    ports.sort_unstable();
    ports.dedup();
    let cidrs = file
        .cidrs
        .iter()
        .chain(&args.bypass_cidrs)
        .map(|c| c.parse::<Ipv4Net>().map(|n| n.trunc()).map_err(|e| ConfigError::Cidr(c.clone(), e)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ports, cidrs))
}

impl Outlier {
    fn merge(file: &OutlierFile, args: &RunArgs) -> Self {
        Outlier {
            consecutive_failures: file.consecutive_failures.unwrap_or(DEFAULT_OUTLIER_CONSECUTIVE_FAILURES).max(1),
            base_ejection: args
                .outlier_base_ejection_ms
                .or(file.base_ejection_ms)
                .map_or(DEFAULT_OUTLIER_BASE_EJECTION, Duration::from_millis),
            max_ejection_percent: file.max_ejection_percent.unwrap_or(DEFAULT_OUTLIER_MAX_EJECTION_PERCENT).min(100),
        }
    }
}

/// Where workload certificates come from: local CA files, or a CA to ask (one of them).
fn certificate_source(
    file: &mut FileConfig,
    args: &RunArgs,
    rel: impl Fn(PathBuf) -> PathBuf,
) -> Result<(Option<CaFiles>, Option<crate::identity::caclient::CaClientConfig>), ConfigError> {
    let local = match &args.ca_dir {
        Some(d) => Some(CaFiles::in_dir(d)),
        None => file.ca.take().map(|c| CaFiles { cert: rel(c.cert), key: rel(c.key), bundle: c.bundle.map(&rel) }),
    };
    let from_file = file.ca_client.take();
    let address = args.ca_address.clone().or(from_file.as_ref().map(|c| c.address.clone()));
    let Some(address) = address else { return Ok((local, None)) };
    if local.is_some() {
        return Err(ConfigError::TwoCas);
    }
    let root_cert = args
        .ca_root_cert
        .clone()
        .or(from_file.as_ref().map(|c| rel(c.root_cert.clone())))
        .ok_or(ConfigError::Missing("the CA's root certificate", "ca-root-cert"))?;
    let token_file = args
        .ca_token_file
        .clone()
        .or(from_file.as_ref().map(|c| rel(c.token_file.clone())))
        .ok_or(ConfigError::Missing("the token file for the CA", "ca-token-file"))?;
    let cluster_id = args.ca_cluster_id.clone().or(from_file.and_then(|c| c.cluster_id)).unwrap_or_default();
    let client = crate::identity::caclient::CaClientConfig { address, root_cert, token_file, cluster_id };
    // Checked now, so a bad address fails the start.
    crate::identity::caclient::CaClient::new(client.clone(), Duration::from_secs(1))?;
    Ok((None, Some(client)))
}

impl CaFiles {
    /// `ca.crt`, `ca.key` and `bundle.crt` in `dir` (as `mesh-agent ca init` writes them).
    pub fn in_dir(dir: &Path) -> Self {
        CaFiles { cert: dir.join("ca.crt"), key: dir.join("ca.key"), bundle: Some(dir.join("bundle.crt")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_are_errors_naming_the_key_not_panics() {
        let m = mount();
        for (yaml, key) in [
            ("certLifetimeSecs: 18446744073709551615", "certLifetimeSecs"),
            ("poolIdleMs: 18446744073709551615", "poolIdleMs"),
            ("connectTimeoutMs: 18446744073709551615", "connectTimeoutMs"),
            ("drainGraceMs: 18446744073709551615", "drainGraceMs"),
            ("tcpIdleTimeoutSecs: 18446744073709551615", "tcpIdleTimeoutSecs"),
            ("protocolSniffTimeoutMs: 3600000", "protocolSniffTimeoutMs"),
        ] {
            let text = format!("cgroupRoot: nodes/a\nredirectAddress: 10.0.0.1\n{yaml}\n");
            let file: FileConfig = serde_yaml_ng::from_str(&text).unwrap();
            let e = Config::build(file, None, &RunArgs::default(), &env(&m))
                .err()
                .unwrap_or_else(|| panic!("{yaml} accepted"));
            assert!(e.to_string().starts_with(key), "{yaml}: {e}");
        }
    }

    fn mount() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("nodes/a")).unwrap();
        d
    }

    /// Outside a cluster, on a node named `host`, 2 CPUs.
    fn env(m: &tempfile::TempDir) -> Environment {
        Environment { cgroup2_mount: m.path().into(), hostname: Some("host".into()), in_cluster: false, cpus: 2 }
    }

    #[test]
    fn endpoints_get_the_traces_path_and_bad_ones_say_why() {
        assert_eq!(traces_url("http://collector:4318").unwrap(), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/").unwrap(), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://10.0.0.1:4318/otlp/v1/traces").unwrap(), "http://10.0.0.1:4318/otlp/v1/traces");
        assert!(traces_url("https://collector:4318").unwrap_err().to_string().contains("https"));
        assert!(traces_url("collector:4318").unwrap_err().to_string().contains("http://"));
        assert!(traces_url("not a url").is_err());
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let m = mount();
        let file: FileConfig = serde_yaml_ng::from_str(
            "nodeName: file-node\ncgroupRoot: nodes/a\nredirectAddress: 10.0.0.1\nbypass: {ports: [22], cidrs: ['10.96.0.5/16']}\n",
        )
        .unwrap();
        let args = RunArgs { node_name: Some("flag-node".into()), bypass_ports: vec![22, 53], ..Default::default() };
        let c = Config::build(file, None, &args, &env(&m)).unwrap();
        assert_eq!(c.node_name, "flag-node");
        assert_eq!(c.cgroup_root, m.path().join("nodes/a"));
        assert_eq!(c.outbound_listen.port(), DEFAULT_OUTBOUND_PORT);
        assert_eq!(c.bypass_ports, vec![22, 53]);
        assert_eq!(c.bypass_cidrs, vec!["10.96.0.0/16".parse().unwrap()]);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let m = mount();
        let err = serde_yaml_ng::from_str::<FileConfig>("nodeName: a\nbogus: 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let file = FileConfig {
            cgroup_root: Some("nodes/a".into()),
            redirect_address: Some(Ipv4Addr::LOCALHOST),
            ..Default::default()
        };
        let args = RunArgs { node_name: Some("n".into()), ..Default::default() };
        assert!(matches!(Config::build(file, None, &args, &env(&m)), Err(ConfigError::RedirectAddress(_))));
        let file = FileConfig {
            cgroup_root: Some("nodes/a".into()),
            redirect_address: Some([10, 0, 0, 1].into()),
            ..Default::default()
        };
        let args = RunArgs { node_name: Some("n".into()), bypass_cidrs: vec!["nope".into()], ..Default::default() };
        let e = Config::build(file, None, &args, &env(&m)).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn the_cgroup2_root_is_refused() {
        let m = mount();
        let file = FileConfig {
            cgroup_root: Some(m.path().into()),
            redirect_address: Some([10, 0, 0, 1].into()),
            ..Default::default()
        };
        let args = RunArgs { node_name: Some("n".into()), ..Default::default() };
        let e = Config::build(file, None, &args, &env(&m)).unwrap_err();
        assert!(e.to_string().contains("root"), "{e}");
    }
}
