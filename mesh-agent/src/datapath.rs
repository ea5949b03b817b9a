//! The kernel side as the agent sees it: loads the eBPF object, attaches its programs to the
//! node's cgroup, and owns the maps.
//!
//! Two modes. Unpinned (no `bpfPinDir`): the attachments are bpf_links owned by this process,
//! so dropping [`Datapath`] (or a crash) detaches every program and pods connect directly.
//! Pinned (`bpfPinDir` on a bpffs): maps and links live in `<bpfPinDir>/v1-cg<cgroup id>/`.
//! A starting agent reuses the maps (so records written by the previous agent's programs are
//! found by the new proxy) and switches each pinned link to its own program with
//! `BPF_LINK_UPDATE`: one atomic swap per hook, never a moment without a program, never two.
//! The programs outlive the agent; whether an agent serves is the heartbeat it writes to
//! `MESH_CONFIG` every 250 ms ([`mesh_common::agent_alive`]): without one, fail-open pods
//! connect directly and fail-closed pods are refused.
use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, SchedClassifier, SkMsg, SockOps,
        TcAttachType, tc::SchedClassifierLinkId,
    },
};
use ipnet::Ipv4Net;
use mesh_common::{
    AgentId, MAP_ACCEL_PATH, MAP_ACCEL_SOCKS, MAP_AGENT_CONNS, MAP_AGENT_SOCKS, MAP_BYPASS_CIDRS, MAP_BYPASS_PORTS,
    MAP_CONFIG, MAP_HBONE_PODS, MAP_MESH_DESTS, MAP_MESHED_CGROUPS, MAP_ORIG_BY_CLIENT, MAP_SOCK_ORIG, MAP_STATS,
    MESH_FLAG_ACCEL, MeshConfig, MeshDest, OrigDst, PodPolicy, SockKey4, SockTuple4, Stat,
};
use tracing::{info, warn};

/// The eBPF object built by build.rs from mesh-ebpf (empty in a build with the `fuzzing`
/// feature, which fuzzes the parsers without building it).
static EBPF_OBJECT_BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

fn ebpf_object() -> Result<&'static [u8], DatapathError> {
    if EBPF_OBJECT_BYTES.is_empty() {
        return Err(DatapathError::NotBuilt);
    }
    Ok(EBPF_OBJECT_BYTES)
}

/// Programs and the attach point each needs, in attach order. sockops goes first so that no
/// connection is redirected before its records can be tracked.
pub const PROGRAMS: [(&str, ProgramKind); 7] = [
    (mesh_common::PROG_SOCKOPS, ProgramKind::SockOps),
    (mesh_common::PROG_INGRESS, ProgramKind::SkbIngress),
    (mesh_common::PROG_SOCK_RELEASE, ProgramKind::SockRelease),
    (mesh_common::PROG_GETPEERNAME4, ProgramKind::SockAddr),
    (mesh_common::PROG_GETPEERNAME6, ProgramKind::SockAddr),
    (mesh_common::PROG_CONNECT4, ProgramKind::SockAddr),
    (mesh_common::PROG_CONNECT6, ProgramKind::SockAddr),
];

#[derive(Debug, Clone, Copy)]
pub enum ProgramKind {
    SockAddr,
    SockOps,
    SkbIngress,
    SockRelease,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed (is this root with CAP_BPF? `mesh-agent check` tells): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source} (`mesh-agent check` lists what the kernel lacks)")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("too many bypass entries for map {0}")]
    BypassFull(&'static str),
    #[error("bpfPinDir {0} is not on a BPF filesystem (mount one: mount -t bpf bpf {0}); {1}")]
    NotBpffs(PathBuf, String),
    #[error("pinning under {path}: {source}")]
    Pin { path: PathBuf, source: std::io::Error },
    #[error("this agent was built without its eBPF programs (the `fuzzing` feature); build it without that feature")]
    NotBuilt,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// What the datapath needs to be set up.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub cgroup_root: PathBuf,
    pub bypass_ports: Vec<u16>,
    pub bypass_cidrs: Vec<Ipv4Net>,
    /// This agent, as the connect hooks recognise it (see [`AgentId`] and [`agent_id`]).
    pub agent: AgentId,
    /// How long after taking the programs over from a previous agent that agent's own
    /// connections are still recognised (its drain).
    pub previous_agent_grace: Duration,
    /// Capacity of `SOCK_ORIG` and `ORIG_BY_CLIENT`: redirected connections open at once.
    pub max_redirected_sockets: u32,
    /// The node proxy's address (the redirect address).
    pub proxy_ip4: Ipv4Addr,
    /// Same-node acceleration (sockmap + sk_msg) wanted. It is turned on only if the kernel
    /// accepts the program and its attachment; otherwise the agent runs without it.
    pub accel: bool,
    /// Pin maps and links under this bpffs directory (hand-over between agents, fail modes).
    pub pin_dir: Option<PathBuf>,
    /// Steer HBONE addressed to this node's pods (and their replies to transparent
    /// connections) to the agent: `mesh_steer` on the node's interfaces and its routing rule.
    pub steer: bool,
}

/// Layout of the pinned maps: bumped whenever a map's key or value layout changes, so an agent
/// never reuses maps it cannot read (it starts a fresh set instead).
const PIN_LAYOUT: &str = "v3";

/// Maps shared by successive agents when pinned.
const PINNED_MAPS: [&str; 12] = [
    MAP_MESHED_CGROUPS,
    MAP_SOCK_ORIG,
    MAP_ORIG_BY_CLIENT,
    MAP_BYPASS_PORTS,
    MAP_BYPASS_CIDRS,
    MAP_CONFIG,
    MAP_STATS,
    MAP_ACCEL_SOCKS,
    MAP_ACCEL_PATH,
    MAP_AGENT_SOCKS,
    MAP_AGENT_CONNS,
    MAP_MESH_DESTS,
];

/// This process as the connect hooks recognise it: its PID in its own PID namespace and that
/// namespace's device and inode (`/proc/self/ns/pid`). In a container the PID the kernel's
/// `bpf_get_current_pid_tgid` reports is the host's, not `getpid()`'s; the programs ask
/// `bpf_get_ns_current_pid_tgid` for the caller's PID in this namespace instead.
pub fn agent_id() -> std::io::Result<AgentId> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = std::fs::metadata("/proc/self/ns/pid")?;
    Ok(AgentId { tgid: std::process::id(), _pad: 0, pidns_dev: ns.dev(), pidns_ino: ns.ino() })
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The per-cgroup pin directory, after checking `base` is on a bpffs.
fn pin_dir(base: &Path, cgroup_root: &Path) -> Result<PathBuf, DatapathError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    std::fs::create_dir_all(base).map_err(|source| DatapathError::Pin { path: base.into(), source })?;
    let c = std::ffi::CString::new(base.as_os_str().as_encoded_bytes())
        .map_err(|e| DatapathError::NotBpffs(base.into(), e.to_string()))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(DatapathError::NotBpffs(base.into(), std::io::Error::last_os_error().to_string()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs(base.into(), format!("filesystem type {:#x}", st.f_type)));
    }
    let id = crate::cgroup::cgroup_id(cgroup_root).map_err(|e| DatapathError::Cgroup {
        path: cgroup_root.into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let dir = base.join(format!("{PIN_LAYOUT}-cg{id}"));
    for sub in ["maps", "links"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|source| DatapathError::Pin { path: d, source })?;
    }
    Ok(dir)
}

/// `BPF_LINK_UPDATE` on the link pinned at `path`: it runs `prog` from now on.
fn link_update(path: &Path, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: [u8; 108],
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
        _pad: [u8; 112],
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut get = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: [0; 108] };
    // SAFETY: the bpf(2) ABI with a zero-padded attribute union of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &mut get as *mut ObjGet, size_of::<ObjGet>() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned to us.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut upd = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
        _pad: [0; 112],
    };
    // SAFETY: as above.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &mut upd as *mut LinkUpdate, size_of::<LinkUpdate>() as u32)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether same-node acceleration runs, and why not if it does not.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum AccelState {
    On,
    /// Not asked for.
    Off,
    /// Asked for, but the kernel refused it (the reason); the agent runs without it.
    Unavailable(String),
}

pub struct Datapath {
    // Declared first so it drops first: programs detach before the maps close. Owns the
    // programs and (unpinned) their links: dropping it detaches them.
    ebpf: Ebpf,
    meshed: HashMap<MapData, u64, PodPolicy>,
    sock_orig: HashMap<MapData, u64, OrigDst>,
    stats: PerCpuArray<MapData, u64>,
    orig: Arc<OrigDstTable>,
    accel_socks: Option<AccelMaps>,
    accel_state: AccelState,
    cgroup_root: PathBuf,
    _logger: Option<tokio::task::JoinHandle<()>>,
    config: Array<MapData, MeshConfig>,
    mesh_config: MeshConfig,
    /// When the previous agent (`mesh_config.agents[1]`) stops being recognised.
    previous_until: Option<Instant>,
    agent_conns: HashMap<MapData, SockTuple4, u8>,
    mesh_dests: HashMap<MapData, MeshDest, u8>,
    /// This node's meshed pods, for `mesh_steer`.
    hbone_pods: HashMap<MapData, u32, u8>,
    steering: Steering,
    /// Pinned mode: the pin directory, and our connect4 program's id (to tell whether a newer
    /// agent has taken the links over).
    pinned: Option<(PathBuf, u32)>,
    /// Links this agent created and pinned (kept open; the pins keep them attached).
    _links: Vec<aya::programs::links::PinnedLink>,
    /// Capacity of `SOCK_ORIG` and `ORIG_BY_CLIENT`.
    max_redirected: u32,
}

/// A removal from map `name` that succeeded or found nothing to remove.
fn gone(r: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), DatapathError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        r => r.map_err(map_err(name)),
    }
}

/// This agent's `MeshConfig`, and the agent it takes over from: in pinned mode, a serving
/// predecessor (fresh heartbeat in the pinned config) whose connections stay recognised
/// through its drain.
fn initial_config(
    config: &Array<MapData, MeshConfig>,
    cfg: &DatapathConfig,
    accel: bool,
) -> (MeshConfig, Option<AgentId>) {
    let previous = config
        .get(&0, 0)
        .ok()
        .filter(|c| c.agents[0].tgid != 0 && mesh_common::agent_alive(c.heartbeat_ns, monotonic_ns()))
        .map(|c| c.agents[0])
        .filter(|a| *a != cfg.agent);
    let mesh_config = MeshConfig {
        agents: [cfg.agent, previous.unwrap_or_default()],
        flags: if accel { MESH_FLAG_ACCEL } else { 0 },
        proxy_ip4: u32::from_ne_bytes(cfg.proxy_ip4.octets()),
        heartbeat_ns: monotonic_ns(),
    };
    (mesh_config, previous)
}

/// Fills the bypass maps. Pinned maps may hold the previous agent's entries: ours are added
/// first, then the stale ones dropped (never a moment without the bypasses both agree on).
/// Returns the maps, to be held until the programs are loaded (after that the programs'
/// references keep them alive).
fn fill_bypass(ebpf: &mut Ebpf, cfg: &DatapathConfig) -> Result<BypassMaps, DatapathError> {
    let mut ports: HashMap<_, u16, u8> = take(ebpf, MAP_BYPASS_PORTS)?;
    if cfg.bypass_ports.len() > mesh_common::MAX_BYPASS_PORTS as usize {
        return Err(DatapathError::BypassFull(MAP_BYPASS_PORTS));
    }
    for p in &cfg.bypass_ports {
        ports.insert(p, 1, 0).map_err(map_err(MAP_BYPASS_PORTS))?;
    }
    let stale: Vec<u16> = ports.keys().filter_map(Result::ok).filter(|p| !cfg.bypass_ports.contains(p)).collect();
    for p in stale {
        let _ = ports.remove(&p);
    }
    let mut cidrs: LpmTrie<_, [u8; 4], u8> = take(ebpf, MAP_BYPASS_CIDRS)?;
    if cfg.bypass_cidrs.len() > mesh_common::MAX_BYPASS_CIDRS as usize {
        return Err(DatapathError::BypassFull(MAP_BYPASS_CIDRS));
    }
    let wanted: Vec<(u32, [u8; 4])> =
        cfg.bypass_cidrs.iter().map(|c| (u32::from(c.prefix_len()), c.network().octets())).collect();
    for (len, net) in &wanted {
        cidrs.insert(&Key::new(*len, *net), 1, 0).map_err(map_err(MAP_BYPASS_CIDRS))?;
    }
    let stale: Vec<Key<[u8; 4]>> =
        cidrs.keys().filter_map(Result::ok).filter(|k| !wanted.contains(&(k.prefix_len(), k.data()))).collect();
    for k in stale {
        let _ = cidrs.remove(&k);
    }
    Ok((ports, cidrs))
}

type BypassMaps = (HashMap<MapData, u16, u8>, LpmTrie<MapData, [u8; 4], u8>);

impl Datapath {
    /// Loads the programs, fills the configuration maps and attaches to `cfg.cgroup_root`.
    /// Must be called inside a tokio runtime (the kernel log reader is a task).
    pub fn start(cfg: &DatapathConfig) -> Result<Self, DatapathError> {
        let pins = cfg.pin_dir.as_deref().map(|b| pin_dir(b, &cfg.cgroup_root)).transpose()?;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_SOCK_ORIG, cfg.max_redirected_sockets)
            .map_max_entries(MAP_ORIG_BY_CLIENT, cfg.max_redirected_sockets);
        if let Some(dir) = &pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join("maps").join(name));
            }
        }
        let mut ebpf = loader.load(ebpf_object()?)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(tokio::spawn(poll_kernel_logs(logger))),
            Err(e) => {
                warn!(error = %e, "kernel-side logging unavailable");
                None
            }
        };

        // Acceleration first: its flag must be in the config before sockops can see a socket.
        let (accel_socks, accel_state) = if cfg.accel {
            match start_accel(&mut ebpf) {
                Ok(map) => (Some(map), AccelState::On),
                Err(e) => {
                    warn!(error = %e, "same-node acceleration unavailable; running without it");
                    (None, AccelState::Unavailable(e.to_string()))
                }
            }
        } else {
            (None, AccelState::Off)
        };
        let mut config: Array<_, MeshConfig> = take(&mut ebpf, MAP_CONFIG)?;
        let (mesh_config, previous) = initial_config(&config, cfg, accel_state == AccelState::On);
        config.set(0, mesh_config, 0).map_err(map_err(MAP_CONFIG))?;
        let bypass = fill_bypass(&mut ebpf, cfg)?;
        let meshed = take(&mut ebpf, MAP_MESHED_CGROUPS)?;
        let sock_orig = take(&mut ebpf, MAP_SOCK_ORIG)?;
        let by_client = take(&mut ebpf, MAP_ORIG_BY_CLIENT)?;
        let stats = take(&mut ebpf, MAP_STATS)?;
        let agent_conns = take(&mut ebpf, MAP_AGENT_CONNS)?;
        let mesh_dests = take(&mut ebpf, MAP_MESH_DESTS)?;
        let hbone_pods = take(&mut ebpf, MAP_HBONE_PODS)?;
        let steering = if cfg.steer { start_steering(&mut ebpf) } else { Steering::Off };

        let cgroup = File::open(&cfg.cgroup_root)
            .map_err(|source| DatapathError::Cgroup { path: cfg.cgroup_root.clone(), source })?;
        let mut links = Vec::new();
        let mut took_over = 0;
        for (name, kind) in PROGRAMS {
            match load(&mut ebpf, name, kind, Some(&cgroup), pins.as_deref())? {
                Attached::New(Some(link)) => links.push(link),
                Attached::New(None) => {}
                Attached::TookOver => took_over += 1,
            }
        }
        let pinned = match &pins {
            Some(dir) => {
                let id =
                    ebpf.program(mesh_common::PROG_CONNECT4).and_then(|p| p.info().ok()).map(|i| i.id()).unwrap_or(0);
                Some((dir.clone(), id))
            }
            None => None,
        };
        drop(bypass);
        info!(
            cgroup = %cfg.cgroup_root.display(),
            programs = PROGRAMS.len(),
            taken_over_from_previous_agent = took_over,
            pinned = pins.as_ref().map(|d| d.display().to_string()).unwrap_or_else(|| "no".into()),
            accel = ?accel_state,
            "eBPF programs attached"
        );
        Ok(Datapath {
            ebpf,
            meshed,
            sock_orig,
            stats,
            orig: Arc::new(OrigDstTable { map: Mutex::new(by_client) }),
            accel_socks,
            accel_state,
            cgroup_root: cfg.cgroup_root.clone(),
            _logger: logger,
            config,
            mesh_config,
            previous_until: previous.map(|_| Instant::now() + cfg.previous_agent_grace),
            agent_conns,
            mesh_dests,
            hbone_pods,
            steering,
            pinned,
            _links: links,
            max_redirected: cfg.max_redirected_sockets,
        })
    }

    /// Each program and whether this agent's copy is attached: the cgroup programs are all
    /// attached by [`Datapath::start`] or none is; a newer agent may have taken them over since;
    /// `mesh_sk_msg` only with acceleration on.
    pub fn programs(&self) -> Vec<(&'static str, bool)> {
        let ours = !self.superseded();
        let mut v: Vec<(&'static str, bool)> = PROGRAMS.iter().map(|(n, _)| (*n, ours)).collect();
        v.push((mesh_common::PROG_SK_MSG, ours && self.accel_state == AccelState::On));
        v
    }

    /// Capacity of each map [`Datapath::map_usage`] counts.
    pub fn map_capacity(&self) -> [(&'static str, u32); 7] {
        [
            ("mesh_destinations", mesh_common::MAX_MESH_DESTS),
            ("agent_connections", mesh_common::MAX_AGENT_CONNS),
            ("meshed_cgroups", mesh_common::MAX_MESHED_CGROUPS),
            ("sock_orig", self.max_redirected),
            ("orig_by_client", self.max_redirected),
            ("accel_sockets", mesh_common::MAX_ACCEL_SOCKETS),
            ("accel_paths", mesh_common::MAX_ACCEL_SOCKETS),
        ]
    }

    /// Unpinned mode, first step of a shutdown: detaches the connect programs only, so no new
    /// connection is redirected while `sockops` still records the ones whose `connect()` was
    /// redirected an instant ago (their client-address entry is written when they are
    /// established; without it the proxy could not tell where they were going). Dropping the
    /// datapath a moment later detaches the rest. Pinned mode leaves the links alone.
    pub fn stop_redirecting(&mut self) {
        if self.pinned.is_some() {
            return;
        }
        for name in [mesh_common::PROG_CONNECT4, mesh_common::PROG_CONNECT6] {
            let Some(prog) = self.ebpf.program_mut(name) else { continue };
            let detached = <&mut CgroupSockAddr>::try_from(prog).and_then(|p| p.unload());
            if let Err(e) = detached {
                warn!(program = name, error = %e, "cannot detach the program ahead of the others");
            }
        }
    }

    /// Whether the programs outlive this agent (pinned mode).
    pub fn pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Pinned mode: whether a newer agent has switched the links to its programs.
    pub fn superseded(&self) -> bool {
        let Some((dir, ours)) = &self.pinned else { return false };
        match aya::programs::links::PinnedLink::from_pin(dir.join("links").join(mesh_common::PROG_CONNECT4)) {
            Ok(l) => aya::programs::links::FdLink::from(l).info().map(|i| i.program_id() != *ours).unwrap_or(true),
            // Pins removed (`mesh-agent` uninstalled by hand): nothing to serve either.
            Err(_) => true,
        }
    }

    /// Writes the heartbeat (`0`: this agent stops and has no successor).
    pub fn heartbeat(&mut self, ns: u64) -> Result<(), DatapathError> {
        if self.previous_until.is_some_and(|t| Instant::now() >= t) {
            self.previous_until = None;
            self.mesh_config.agents[1] = AgentId::default();
            info!("the previous agent's drain is over: its connections are no longer recognised");
        }
        self.config.set(0, MeshConfig { heartbeat_ns: ns, ..self.mesh_config }, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Meshed cgroup ids currently in the map (pinned mode: possibly the previous agent's).
    pub fn meshed_ids(&self) -> Vec<u64> {
        self.meshed.keys().filter_map(Result::ok).collect()
    }

    /// The table the proxy reads original destinations from.
    pub fn orig_dst_table(&self) -> Arc<OrigDstTable> {
        self.orig.clone()
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn accel_state(&self) -> &AccelState {
        &self.accel_state
    }

    /// Marks the cgroup as meshed: connects from tasks in it (or below it) are redirected.
    pub fn mesh(&mut self, cgroup_id: u64, policy: PodPolicy) -> Result<(), DatapathError> {
        self.meshed.insert(cgroup_id, policy, 0).map_err(map_err(MAP_MESHED_CGROUPS))
    }

    pub fn unmesh(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        gone(self.meshed.remove(&cgroup_id), MAP_MESHED_CGROUPS)
    }

    /// The destinations connect4 captures now (pinned mode: possibly the previous agent's).
    pub fn mesh_destinations(&self) -> Vec<MeshDest> {
        self.mesh_dests.keys().filter_map(Result::ok).collect()
    }

    /// Captures `dest` from now on.
    pub fn add_mesh_destination(&mut self, dest: MeshDest) -> Result<(), DatapathError> {
        self.mesh_dests.insert(dest, 1, 0).map_err(map_err(MAP_MESH_DESTS))
    }

    /// Stops capturing `dest`.
    pub fn remove_mesh_destination(&mut self, dest: &MeshDest) -> Result<(), DatapathError> {
        gone(self.mesh_dests.remove(dest), MAP_MESH_DESTS)
    }

    /// HBONE steering's state.
    pub fn steering(&self) -> &Steering {
        &self.steering
    }

    /// Attaches `mesh_steer` to every interface of the node that does not have it yet (new
    /// bridges, veths and tunnel devices included); forgets interfaces that are gone. Returns
    /// how many were attached by this call.
    pub fn steer_interfaces(&mut self) -> usize {
        let Steering::On(attached) = &mut self.steering else { return 0 };
        let Ok(now) = crate::steer::interfaces() else { return 0 };
        let Some(prog) = self.ebpf.program_mut(mesh_common::PROG_STEER) else { return 0 };
        let Ok(prog) = <&mut SchedClassifier>::try_from(prog) else { return 0 };
        let gone: Vec<u32> = attached
            .iter()
            .filter(|(i, (n, _))| !now.iter().any(|(j, m)| j == *i && m == n))
            .map(|(i, _)| *i)
            .collect();
        for i in gone {
            if let Some((_, link)) = attached.remove(&i) {
                // The interface went with its attachment; only our handle is left.
                drop(prog.take_link(link));
            }
        }
        let mut added = 0;
        for (index, name) in now {
            if attached.contains_key(&index) {
                continue;
            }
            let link = prog.attach(&name, TcAttachType::Ingress).or_else(|_| {
                // Kernels before tcx (6.6) attach through a clsact qdisc.
                let _ = aya::programs::tc::qdisc_add_clsact(&name);
                prog.attach(&name, TcAttachType::Ingress)
            });
            match link {
                Ok(link) => {
                    info!(interface = %name, "HBONE steering attached");
                    attached.insert(index, (name, link));
                    added += 1;
                }
                Err(e) => {
                    // Interfaces come and go (a pod's veth): tried again on the next pass.
                    tracing::debug!(interface = %name, error = %e, "cannot attach HBONE steering");
                }
            }
        }
        added
    }

    /// This node's meshed pods, as `mesh_steer` reads them.
    pub fn hbone_pods(&self) -> Vec<Ipv4Addr> {
        self.hbone_pods.keys().filter_map(Result::ok).map(|k| Ipv4Addr::from(k.to_ne_bytes())).collect()
    }

    pub fn add_hbone_pod(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.hbone_pods.insert(u32::from_ne_bytes(ip.octets()), 1, 0).map_err(map_err(MAP_HBONE_PODS))
    }

    pub fn remove_hbone_pod(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        gone(self.hbone_pods.remove(&u32::from_ne_bytes(ip.octets())), MAP_HBONE_PODS)
    }

    /// Sum over CPUs of every kernel-side counter.
    pub fn stats(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|s| {
                let v = self.stats.get(&(*s as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
                (*s, v)
            })
            .collect()
    }

    /// Entries in each map that grows with traffic or pods.
    pub fn map_usage(&self) -> MapUsage {
        MapUsage {
            mesh_destinations: self.mesh_dests.keys().count(),
            agent_connections: self.agent_conns.keys().count(),
            meshed_cgroups: self.meshed.keys().count(),
            sock_orig: self.sock_orig.keys().count(),
            orig_by_client: self.orig.len(),
            accel_sockets: self.accel_socks.as_ref().map_or(0, |(m, _)| m.keys().count()),
            accel_paths: self.accel_socks.as_ref().map_or(0, |(_, m)| m.keys().count()),
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MapUsage {
    pub mesh_destinations: usize,
    pub agent_connections: usize,
    pub meshed_cgroups: usize,
    pub sock_orig: usize,
    pub orig_by_client: usize,
    pub accel_sockets: usize,
    pub accel_paths: usize,
}

impl MapUsage {
    /// Entries per map, named as [`Datapath::map_capacity`] names them.
    pub fn entries(&self) -> [(&'static str, usize); 7] {
        [
            ("mesh_destinations", self.mesh_destinations),
            ("agent_connections", self.agent_connections),
            ("meshed_cgroups", self.meshed_cgroups),
            ("sock_orig", self.sock_orig),
            ("orig_by_client", self.orig_by_client),
            ("accel_sockets", self.accel_sockets),
            ("accel_paths", self.accel_paths),
        ]
    }
}

/// HBONE steering (`mesh_steer`): whether it runs, and where it is attached.
#[derive(Debug)]
pub enum Steering {
    /// Not wanted (no mTLS on this node).
    Off,
    /// The program could not be loaded or the routing rule added: connections addressed to
    /// this node's pods on 15008 reach the pods, not the agent.
    Unavailable(String),
    /// Loaded; attached to these interfaces (index → name and link).
    On(std::collections::BTreeMap<u32, (String, SchedClassifierLinkId)>),
}

impl Steering {
    pub fn is_on(&self) -> bool {
        matches!(self, Steering::On(_))
    }
}

/// Loads `mesh_steer` and adds its routing rule; attaching follows the interfaces
/// ([`Datapath::steer_interfaces`]). A failure leaves the agent running without it.
fn start_steering(ebpf: &mut Ebpf) -> Steering {
    let name = mesh_common::PROG_STEER;
    let loaded = ebpf
        .program_mut(name)
        .ok_or(aya::programs::ProgramError::NotLoaded)
        .and_then(<&mut SchedClassifier>::try_from)
        .and_then(|p| p.load());
    if let Err(e) = loaded {
        warn!(program = name, error = %e, "HBONE steering unavailable (no bpf_sk_assign?): ztunnel-style HBONE addressed to this node's pods will not reach the agent");
        return Steering::Unavailable(format!("loading {name}: {e}"));
    }
    if let Err(e) = crate::steer::ensure_routing() {
        warn!(error = %e, "HBONE steering unavailable: cannot add its routing rule");
        return Steering::Unavailable(e.to_string());
    }
    Steering::On(Default::default())
}

/// Loads `mesh_sk_msg` and attaches it to the accelerated-socket map: the feature probe and
/// the set-up in one (a kernel without sockmap support fails here, before any socket is
/// touched).
/// The accelerated sockets and the path each chose.
type AccelMaps = (SockHash<MapData, SockTuple4>, HashMap<MapData, SockTuple4, u8>);

fn start_accel(ebpf: &mut Ebpf) -> Result<AccelMaps, DatapathError> {
    let name = mesh_common::PROG_SK_MSG;
    let perr = |source| DatapathError::Program { name, source };
    let socks: SockHash<MapData, SockTuple4> = take(ebpf, MAP_ACCEL_SOCKS)?;
    let prog: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
        .try_into()
        .map_err(perr)?;
    prog.load().map_err(perr)?;
    prog.attach(socks.fd()).map_err(perr)?;
    let paths = take(ebpf, MAP_ACCEL_PATH)?;
    Ok((socks, paths))
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// How a program got attached.
enum Attached {
    /// A link of its own (pinned in pinned mode).
    New(Option<aya::programs::links::PinnedLink>),
    /// The previous agent's pinned link now runs it.
    TookOver,
}

/// Loads program `name` into the kernel (the verifier's verdict) and, given a cgroup, attaches
/// it there: in pinned mode by switching the pinned link to it if there is one, else by a new
/// link, pinned.
fn load(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: ProgramKind,
    cgroup: Option<&File>,
    pins: Option<&Path>,
) -> Result<Attached, DatapathError> {
    use std::os::fd::AsFd as _;
    let perr = |source| DatapathError::Program { name, source };
    let prog = ebpf
        .program_mut(name)
        .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    let pin = pins.map(|d| d.join("links").join(name));
    let pin_err = |path: &Path, e: aya::pin::PinError| DatapathError::Pin {
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    };
    // Takes over the pinned link if there is one that accepts the program.
    macro_rules! take_over {
        ($p:expr) => {
            if let Some(path) = &pin
                && path.exists()
            {
                match link_update(path, $p.fd().map_err(perr)?.as_fd()) {
                    Ok(()) => return Ok(Attached::TookOver),
                    Err(e) => {
                        warn!(program = name, pin = %path.display(), error = %e, "cannot take the pinned link over; attaching anew");
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        };
    }
    // Pins the new link (pinned mode only: unpinned links stay owned by the program, and are
    // detached when it is dropped).
    macro_rules! pin_link {
        ($p:expr, $id:expr, $path:expr) => {{
            let link = $p.take_link($id).map_err(perr)?;
            let fd = aya::programs::links::FdLink::try_from(link).map_err(|e| DatapathError::Pin {
                path: $path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            Attached::New(Some(fd.pin($path).map_err(|e| pin_err($path, e))?))
        }};
    }
    // Mode `Single` means attach flags 0, which is what a cgroup bpf_link requires (the kernel
    // rejects any flag on BPF_LINK_CREATE): links always coexist with other programs on the
    // cgroup (a CNI's, say), as BPF_F_ALLOW_MULTI would.
    let Some(cg) = cgroup else {
        match kind {
            ProgramKind::SockAddr => <&mut CgroupSockAddr>::try_from(prog).map_err(perr)?.load().map_err(perr)?,
            ProgramKind::SockOps => <&mut SockOps>::try_from(prog).map_err(perr)?.load().map_err(perr)?,
            ProgramKind::SkbIngress => <&mut CgroupSkb>::try_from(prog).map_err(perr)?.load().map_err(perr)?,
            ProgramKind::SockRelease => <&mut CgroupSock>::try_from(prog).map_err(perr)?.load().map_err(perr)?,
        }
        return Ok(Attached::New(None));
    };
    // Loads, takes the pinned link over or attaches anew (and pins the new link).
    macro_rules! attach {
        ($ty:ty, $($arg:expr),+) => {{
            let p: &mut $ty = prog.try_into().map_err(perr)?;
            p.load().map_err(perr)?;
            take_over!(p);
            let id = p.attach(cg, $($arg),+).map_err(perr)?;
            match &pin {
                Some(path) => pin_link!(p, id, path),
                None => Attached::New(None),
            }
        }};
    }
    Ok(match kind {
        ProgramKind::SockAddr => attach!(CgroupSockAddr, CgroupAttachMode::Single),
        ProgramKind::SockOps => attach!(SockOps, CgroupAttachMode::Single),
        ProgramKind::SkbIngress => attach!(CgroupSkb, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single),
        ProgramKind::SockRelease => attach!(CgroupSock, CgroupAttachMode::Single),
    })
}

async fn poll_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring-buffer fd and the AsyncFd owns the logger, so the fd
    // stays open for as long as it is registered.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll kernel-side logs");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Original destinations, keyed by the client address the proxy sees on `accept()`.
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, SockKey4, OrigDst>>,
}

impl OrigDstTable {
    fn len(&self) -> usize {
        self.map.lock().map(|m| m.keys().count()).unwrap_or(0)
    }
}

/// Where an accepted connection was really going, and which pod cgroup made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Original {
    pub dst: SocketAddrV4,
    pub pod_cgroup: u64,
}

impl From<OrigDst> for Original {
    fn from(o: OrigDst) -> Self {
        Original {
            dst: SocketAddrV4::new(Ipv4Addr::from(o.ip4.to_ne_bytes()), u16::from_be(o.port)),
            pod_cgroup: o.pod_cgroup,
        }
    }
}

/// The proxy's view of the original-destination records: take one for an accepted client.
pub trait OrigDstLookup: Send + Sync + 'static {
    /// Removes and returns the record for `client`; `None` if there is none.
    fn take(&self, client: SocketAddr) -> std::io::Result<Option<Original>>;
}

/// The key for a client address, v4-mapped IPv6 included.
pub fn client_key(client: SocketAddr) -> Option<SockKey4> {
    let v4 = match client {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => SocketAddrV4::new(a.ip().to_ipv4_mapped()?, a.port()),
    };
    Some(SockKey4::new(u32::from_ne_bytes(v4.ip().octets()), v4.port().to_be()))
}

impl OrigDstLookup for OrigDstTable {
    fn take(&self, client: SocketAddr) -> std::io::Result<Option<Original>> {
        let Some(key) = client_key(client) else { return Ok(None) };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let orig = match map.get(&key, 0) {
            Ok(o) => o,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(std::io::Error::other(e)),
        };
        // The entry has done its job; the per-socket record (for getpeername) lives on in the
        // kernel until the client's socket closes.
        let _ = map.remove(&key);
        Ok(Some(orig.into()))
    }
}

/// Loads every program into the kernel without attaching it: the verifier's verdict.
pub fn verify_programs() -> Result<(), DatapathError> {
    let mut ebpf = EbpfLoader::new().load(ebpf_object()?)?;
    for (name, kind) in PROGRAMS {
        load(&mut ebpf, name, kind, None, None)?;
    }
    Ok(())
}

/// Whether same-node acceleration would start here: loads the sk_msg program and attaches it
/// to a fresh socket map (no socket is ever added).
pub fn probe_accel() -> Result<(), DatapathError> {
    let mut ebpf = EbpfLoader::new().load(ebpf_object()?)?;
    start_accel(&mut ebpf).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_are_network_order_and_accept_v4_mapped() {
        let k = client_key("10.1.2.3:40000".parse().unwrap()).unwrap();
        assert_eq!(k.ip4.to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(k.port, 40000u16.to_be());
        assert_eq!(client_key("[::ffff:10.1.2.3]:40000".parse().unwrap()), Some(k));
        assert_eq!(client_key("[2001:db8::1]:1".parse().unwrap()), None);
        let o = OrigDst { pod_cgroup: 7, ip4: k.ip4, port: 8080u16.to_be(), flags: 0 };
        assert_eq!(Original::from(o).dst, "10.1.2.3:8080".parse().unwrap());
    }
}
