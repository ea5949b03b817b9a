//! The contract between Switchyard's eBPF programs and the agent.
//!
//! Everything the kernel and user space both read lives here: map names and sizes, the
//! `#[repr(C)]` key and value types (with explicit padding and the byte order of every field),
//! the statistics indices, and the pure decisions the programs make, so that ordinary unit tests
//! can reach them.
//!
//! Byte order convention: addresses and ports are stored exactly as the kernel hands them to a
//! `cgroup/connect4` program (`bpf_sock_addr.user_ip4` / `user_port`): **network byte order**.
//! In user space, `u32::from_ne_bytes(ipv4.octets())` and `port.to_be()` produce that form.
#![no_std]

/// Map of meshed pod cgroups: `u64` cgroup id → [`PodPolicy`].
pub const MAP_MESHED_CGROUPS: &str = "MESHED_CGROUPS";
/// Map of redirected sockets: `u64` socket cookie → [`OrigDst`]. Written by connect4/6,
/// read by getpeername4/6, removed by sockops when the socket closes.
pub const MAP_SOCK_ORIG: &str = "SOCK_ORIG";
/// Map the proxy reads: [`SockKey4`] (the client's address as the proxy sees it) → [`OrigDst`].
/// Written by sockops when a redirected connection is established; the proxy removes the entry
/// when it accepts the connection.
pub const MAP_ORIG_BY_CLIENT: &str = "ORIG_BY_CLIENT";
/// The destinations the mesh serves, which connect4 captures: hash of [`MeshDest`] (a meshed
/// pod's address with port 0 for any port, or a Service's `ClusterIP:port`) → `u8` (unused).
/// Filled by the agent's reconciler. A pod whose namespace captures everything
/// ([`POD_FLAG_CAPTURE_ALL`]) does not look here.
pub const MAP_MESH_DESTS: &str = "MESH_DESTS";
/// Destination ports never redirected: `u16` port (host byte order) → `u8` (unused).
pub const MAP_BYPASS_PORTS: &str = "BYPASS_PORTS";
/// Destination CIDRs never redirected: LPM trie keyed by the IPv4 address bytes (network order).
pub const MAP_BYPASS_CIDRS: &str = "BYPASS_CIDRS";
/// Single-entry array holding the [`MeshConfig`].
pub const MAP_CONFIG: &str = "MESH_CONFIG";
/// Per-CPU array of `u64` counters indexed by [`Stat`].
pub const MAP_STATS: &str = "MESH_STATS";
/// Same-node acceleration: SOCKHASH of established sockets with the node proxy at one end,
/// keyed by [`SockTuple4`] as the socket sees itself (local first).
pub const MAP_ACCEL_SOCKS: &str = "ACCEL_SOCKS";
/// The agent's own TCP sockets: `u64` socket cookie → `u8` (unused). Written by connect4/6 when
/// the agent connects, removed when the socket closes or is released.
pub const MAP_AGENT_SOCKS: &str = "AGENT_SOCKS";
/// The agent's own TCP connections, keyed by [`SockTuple4`] as the agent's socket sees itself
/// (local first), registered by sockops just before the SYN leaves (`TCP_CONNECT_CB`) and
/// removed when the socket closes. `mesh_ingress` admits a SYN to a strict pod only if it is
/// one of these (or loopback, or a kubelet probe: see [`strict_allows`]).
pub const MAP_AGENT_CONNS: &str = "AGENT_CONNS";
/// Same-node acceleration: [`SockTuple4`] of a sending socket → [`ACCEL_VIA_SOCKMAP`] or
/// [`ACCEL_VIA_STACK`], decided once at the socket's first send and kept until it closes, so one
/// direction of a connection never mixes the two paths (which could reorder bytes).
pub const MAP_ACCEL_PATH: &str = "ACCEL_PATH";
/// This node's meshed pods, for HBONE steering (`mesh_steer`): `u32` IPv4 address (network
/// order) → `u8` (unused). Filled by the agent's reconciler; not pinned (each agent's own tc
/// program reads its own copy).
pub const MAP_HBONE_PODS: &str = "HBONE_PODS";

/// Upper bounds on every map. A full map never fails a connection: the connection is simply not
/// redirected (fail-open) and [`Stat::MapFull`] counts it.
pub const MAX_MESHED_CGROUPS: u32 = 16_384;
pub const MAX_REDIRECTED_SOCKETS: u32 = 65_536;
pub const MAX_BYPASS_PORTS: u32 = 256;
pub const MAX_BYPASS_CIDRS: u32 = 256;
/// Capacity of [`MAP_ACCEL_SOCKS`] and [`MAP_ACCEL_PATH`]. A full map leaves a connection on
/// the ordinary TCP path ([`Stat::AccelFull`]).
pub const MAX_ACCEL_SOCKETS: u32 = 65_536;
/// Capacity of [`MAP_AGENT_SOCKS`] and [`MAP_AGENT_CONNS`]: connections the agent has open at
/// once. Full: the connection is not registered ([`Stat::AgentConnsFull`]), so a strict pod
/// drops it (strict stays strict).
pub const MAX_AGENT_CONNS: u32 = 65_536;
/// Capacity of [`MAP_MESH_DESTS`]: meshed pods in the cluster plus Service ports the mesh
/// serves. Full: the destinations that did not fit are not captured (logged and counted as the
/// map's usage).
pub const MAX_MESH_DESTS: u32 = 131_072;
/// Probe ports kept per pod ([`PodPolicy::probe_ports`]).
pub const MAX_PROBE_PORTS: usize = 4;

/// How many cgroup levels below the root the programs inspect when deciding whether the calling
/// task belongs to a meshed pod. Kubernetes nests containers two or three levels below the pod
/// cgroup (`kubepods/burstable/pod<uid>/<container>`), which sits within this depth.
pub const MAX_CGROUP_DEPTH: i32 = 12;

/// Names of the programs in the object file, as the agent looks them up.
pub const PROG_CONNECT4: &str = "mesh_connect4";
pub const PROG_CONNECT6: &str = "mesh_connect6";
pub const PROG_GETPEERNAME4: &str = "mesh_getpeername4";
pub const PROG_GETPEERNAME6: &str = "mesh_getpeername6";
pub const PROG_SOCKOPS: &str = "mesh_sockops";
pub const PROG_INGRESS: &str = "mesh_ingress";
/// `cgroup/sock_release`: reclaims the records of sockets freed without ever closing as a
/// connection (a connect that failed before its SYN).
pub const PROG_SOCK_RELEASE: &str = "mesh_sock_release";
/// `tc` ingress program on the node's interfaces: steers HBONE (TCP to a local meshed pod's
/// address on [`HBONE_PORT`]) to the agent's listener, and replies of a local pod to the
/// agent's transparent sockets (connections it made from a remote source pod's address) to
/// those sockets, with `bpf_sk_assign` and [`STEER_MARK`].
pub const PROG_STEER: &str = "mesh_steer";
/// HBONE's port, as ztunnel has it.
pub const HBONE_PORT: u16 = 15008;
/// The packet mark (`skb->mark`, under [`STEER_MARK_MASK`]) `mesh_steer` sets on packets it
/// assigned to a socket: the agent's policy-routing rule sends them to local delivery (a table
/// whose only route is `local 0.0.0.0/0 dev lo`), without which the kernel would forward them
/// to the pod (a packet for a non-local address is routed even with a socket assigned).
pub const STEER_MARK: u32 = 0x1508;
pub const STEER_MARK_MASK: u32 = 0xffff;
/// The routing table and rule priority of that rule.
pub const STEER_TABLE: u32 = 1508;
pub const STEER_RULE_PRIORITY: u32 = 1508;
/// Capacity of [`MAP_HBONE_PODS`]: one node's meshed pods.
pub const MAX_HBONE_PODS: u32 = MAX_MESHED_CGROUPS;

/// `sk_msg` program attached to [`MAP_ACCEL_SOCKS`] when same-node acceleration is on.
pub const PROG_SK_MSG: &str = "mesh_sk_msg";

/// [`MeshConfig::flags`] bit: same-node acceleration (sockmap + sk_msg) is on.
pub const MESH_FLAG_ACCEL: u32 = 1;
/// Values of [`MAP_ACCEL_PATH`].
pub const ACCEL_VIA_STACK: u8 = 1;
pub const ACCEL_VIA_SOCKMAP: u8 = 2;

/// [`PodPolicy::flags`] bit: the pod is in a `strict` namespace; TCP connections to it are
/// accepted only from the agent (see [`strict_allows`]), whether or not an agent is running.
pub const POD_FLAG_STRICT: u16 = 1;
/// Pod flag: while no agent is alive, the pod's TCP connects are refused (`EPERM`) instead of
/// going direct (namespace annotation `switchyard.io/fail-mode: closed`).
pub const POD_FLAG_FAIL_CLOSED: u16 = 2;
/// Pod flag: its namespace captures every TCP destination (`switchyard.io/capture: all`), not
/// only those in [`MAP_MESH_DESTS`].
pub const POD_FLAG_CAPTURE_ALL: u16 = 4;
/// No heartbeat for this long (or a heartbeat of 0, written by an agent stopping without a
/// successor): no agent is serving the node.
pub const AGENT_HEARTBEAT_TIMEOUT_NS: u64 = 2_000_000_000;

/// Whether an agent is serving, from [`MeshConfig::heartbeat_ns`] and the current
/// `CLOCK_MONOTONIC` time (what `bpf_ktime_get_ns` returns).
#[inline(always)]
pub fn agent_alive(heartbeat_ns: u64, now_ns: u64) -> bool {
    heartbeat_ns != 0 && now_ns.saturating_sub(heartbeat_ns) <= AGENT_HEARTBEAT_TIMEOUT_NS
}

/// Redirect target and options for one meshed pod (value of [`MAP_MESHED_CGROUPS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    /// Proxy address the pod's connects are rewritten to, network byte order. It must be
    /// reachable from the pod's network namespace (e.g. the node side of its veth or bridge).
    pub proxy_ip4: u32,
    /// Proxy outbound port, network byte order.
    pub proxy_port: u16,
    /// Per-pod flags: [`POD_FLAG_STRICT`], [`POD_FLAG_FAIL_CLOSED`].
    pub flags: u16,
    /// The ports the kubelet probes the pod on (network byte order; 0: none): a strict pod
    /// admits SYNs to them from the node's address ([`strict_allows`]).
    pub probe_ports: [u16; MAX_PROBE_PORTS],
}

/// Where a redirected connection was going (value of [`MAP_SOCK_ORIG`] and
/// [`MAP_ORIG_BY_CLIENT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// cgroup id of the meshed pod that made the connection: the proxy identifies the source
    /// workload from this, not from the source IP.
    pub pod_cgroup: u64,
    /// Original destination IPv4 address, network byte order.
    pub ip4: u32,
    /// Original destination port, network byte order.
    pub port: u16,
    /// Bit 0: the application used an AF_INET6 socket with a v4-mapped address.
    pub flags: u16,
}

pub const ORIG_FLAG_V4_MAPPED: u16 = 1;

/// A destination the mesh serves (key of [`MAP_MESH_DESTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MeshDest {
    /// IPv4 address, network byte order.
    pub ip4: u32,
    /// Port, network byte order; 0: every port of the address (a meshed pod).
    pub port: u16,
    /// Explicit padding, always zero (hash keys compare all bytes).
    pub _pad: u16,
}

impl MeshDest {
    pub const fn new(ip4_be: u32, port_be: u16) -> Self {
        Self { ip4: ip4_be, port: port_be, _pad: 0 }
    }
}

/// A TCP endpoint as the proxy sees the client of an accepted connection (key of
/// [`MAP_ORIG_BY_CLIENT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey4 {
    /// IPv4 address, network byte order.
    pub ip4: u32,
    /// Port, network byte order.
    pub port: u16,
    /// Explicit padding, always zero (hash keys compare all bytes).
    pub _pad: u16,
}

impl SockKey4 {
    pub const fn new(ip4_be: u32, port_be: u16) -> Self {
        Self { ip4: ip4_be, port: port_be, _pad: 0 }
    }
}

/// Who the agent is, as the kernel can tell from inside a connect hook: its process id in its
/// own PID namespace, and that namespace (device and inode of `/proc/self/ns/pid`). In a
/// container the agent's PID is not the host's; `bpf_get_ns_current_pid_tgid` asks for the
/// calling task's id in the agent's namespace, which only the agent's own tasks can match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentId {
    /// The agent's PID (thread-group id) in its PID namespace; 0: no agent.
    pub tgid: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
    pub pidns_dev: u64,
    pub pidns_ino: u64,
}

/// Node-wide settings (index 0 of [`MAP_CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// The serving agent ([`MeshConfig::agents`]`[0]`) and, during a hand-over, the agent it
    /// took over from (`[1]`, cleared once that one's drain is over): their connects are never
    /// redirected and their connections are the ones strict pods admit.
    pub agents: [AgentId; 2],
    /// [`MESH_FLAG_ACCEL`].
    pub flags: u32,
    /// The node proxy's address (network order): sockets with it at one end are candidates
    /// for same-node acceleration.
    pub proxy_ip4: u32,
    /// `CLOCK_MONOTONIC` nanoseconds of the serving agent's latest heartbeat (every 250 ms);
    /// 0 once it stopped without a successor. See [`agent_alive`].
    pub heartbeat_ns: u64,
}

/// A TCP socket's own view of its connection (key of [`MAP_ACCEL_SOCKS`] and
/// [`MAP_ACCEL_PATH`]): addresses and ports in network byte order, local first. The peer's key
/// is the same tuple swapped ([`SockTuple4::peer`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockTuple4 {
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u16,
    pub remote_port: u16,
}

impl SockTuple4 {
    /// The key under which the other end of this connection is stored.
    #[inline(always)]
    pub const fn peer(&self) -> Self {
        SockTuple4 {
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }

    /// From the headers of a packet: source and destination addresses and ports exactly as
    /// they are on the wire (network byte order). For a packet the local socket sent, this is
    /// that socket's own key; for a received SYN, the key of the connecting socket.
    #[inline(always)]
    pub const fn from_packet(src_ip4: u32, dst_ip4: u32, src_port: u16, dst_port: u16) -> Self {
        SockTuple4 { local_ip4: src_ip4, remote_ip4: dst_ip4, local_port: src_port, remote_port: dst_port }
    }

    /// From the context fields of `sockops` and `sk_msg` programs, which share one convention:
    /// `local_port` in host byte order, `remote_port` in network byte order in the upper half of
    /// the 32-bit field on little-endian machines (the lower half on kernels or architectures
    /// that do not shift it).
    #[inline(always)]
    pub const fn from_ctx(local_ip4: u32, remote_ip4: u32, local_port_host: u32, remote_port_field: u32) -> Self {
        let remote_port =
            if remote_port_field & 0xffff == 0 { (remote_port_field >> 16) as u16 } else { remote_port_field as u16 };
        SockTuple4 { local_ip4, remote_ip4, local_port: (local_port_host as u16).to_be(), remote_port }
    }
}

/// Same-node acceleration: is a socket with this tuple a candidate? One end must be the node
/// proxy and neither end loopback (loopback addresses repeat in every pod's namespace, so they
/// cannot key a node-wide map).
#[inline(always)]
pub fn accel_candidate(t: &SockTuple4, proxy_ip4: u32) -> bool {
    let lo = |ip: u32| ip.to_ne_bytes()[0] == 127 || ip == 0;
    proxy_ip4 != 0 && (t.local_ip4 == proxy_ip4 || t.remote_ip4 == proxy_ip4) && !lo(t.local_ip4) && !lo(t.remote_ip4)
}

/// Indices of the kernel-side counters in [`MAP_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect4/6 from a meshed pod, TCP.
    MeshedConnects = 0,
    /// Rewritten to the proxy.
    Redirected = 1,
    SkipLoopback = 2,
    SkipBypassPort = 3,
    SkipBypassCidr = 4,
    SkipProxySelf = 5,
    /// IPv6 destinations are not meshed yet: passed through untouched.
    SkipIpv6 = 6,
    /// [`MAP_SOCK_ORIG`] was full: connection not redirected (fail-open).
    MapFull = 7,
    /// [`MAP_ORIG_BY_CLIENT`] was full when a redirected connection was established: the proxy
    /// will not find it and closes it.
    ClientMapFull = 8,
    /// Redirected connection established (sockops saw it).
    Established = 9,
    /// Redirected socket closed and its record removed.
    Closed = 10,
    /// getpeername answered with the original destination.
    PeernameRestored = 11,
    /// The agent's own connects.
    SkipAgent = 12,
    /// A SYN to a strict pod from outside the mesh, dropped.
    StrictDropped = 13,
    /// Same-node acceleration: sockets put in [`MAP_ACCEL_SOCKS`].
    AccelSockets = 14,
    /// Same-node acceleration: a map was full; the connection stays on the TCP path.
    AccelFull = 15,
    /// Same-node acceleration: a connection direction whose peer socket was found at the
    /// first send, so it goes socket to socket.
    AccelPaths = 16,
    /// Same-node acceleration: a connection direction whose peer socket was not (yet) in the
    /// map at the first send (or is not on this node): it stays on the TCP path.
    AccelStackPaths = 17,
    /// Same-node acceleration: messages (sendmsg calls) handed socket to socket.
    AccelMessages = 18,
    /// No agent alive: a meshed pod's connect went direct (fail-open namespace).
    AgentDownDirect = 19,
    /// No agent alive: a meshed pod's connect was refused (fail-closed namespace).
    AgentDownRefused = 20,
    /// The agent's own connections registered for strict admission ([`MAP_AGENT_CONNS`]).
    AgentConns = 21,
    /// [`MAP_AGENT_SOCKS`] or [`MAP_AGENT_CONNS`] was full: that agent connection is not
    /// admitted by strict pods.
    AgentConnsFull = 22,
    /// Records of sockets released without a TCP close (a connect that failed before its SYN),
    /// reclaimed by `mesh_sock_release`.
    Reclaimed = 23,
    /// [`MAP_SOCK_ORIG`] was full and the pod fails closed: the connect was refused rather
    /// than sent direct.
    MapFullRefused = 24,
    /// A destination the mesh does not serve (not a meshed pod, not a Service it serves): left
    /// on the pod's own path.
    SkipOutsideMesh = 25,
    /// HBONE packets (to a local meshed pod on port 15008) assigned to the agent's socket.
    SteeredHbone = 26,
    /// A local pod's packets to one of the agent's transparent sockets, assigned to it.
    SteeredReply = 27,
    /// HBONE packets to a local meshed pod for which no agent socket listens (no agent up):
    /// left to the stack (the pod answers, or resets).
    SteerNoListener = 28,
}

impl Stat {
    pub const COUNT: u32 = 29;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::MeshedConnects,
        Stat::Redirected,
        Stat::SkipLoopback,
        Stat::SkipBypassPort,
        Stat::SkipBypassCidr,
        Stat::SkipProxySelf,
        Stat::SkipIpv6,
        Stat::MapFull,
        Stat::ClientMapFull,
        Stat::Established,
        Stat::Closed,
        Stat::PeernameRestored,
        Stat::SkipAgent,
        Stat::StrictDropped,
        Stat::AccelSockets,
        Stat::AccelFull,
        Stat::AccelPaths,
        Stat::AccelStackPaths,
        Stat::AccelMessages,
        Stat::AgentDownDirect,
        Stat::AgentDownRefused,
        Stat::AgentConns,
        Stat::AgentConnsFull,
        Stat::Reclaimed,
        Stat::MapFullRefused,
        Stat::SkipOutsideMesh,
        Stat::SteeredHbone,
        Stat::SteeredReply,
        Stat::SteerNoListener,
    ];

    /// Stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::MeshedConnects => "meshed_connects",
            Stat::Redirected => "redirected",
            Stat::SkipLoopback => "skip_loopback",
            Stat::SkipBypassPort => "skip_bypass_port",
            Stat::SkipBypassCidr => "skip_bypass_cidr",
            Stat::SkipProxySelf => "skip_proxy_self",
            Stat::SkipIpv6 => "skip_ipv6",
            Stat::MapFull => "map_full",
            Stat::ClientMapFull => "client_map_full",
            Stat::Established => "established",
            Stat::Closed => "closed",
            Stat::PeernameRestored => "peername_restored",
            Stat::SkipAgent => "skip_agent",
            Stat::StrictDropped => "strict_dropped",
            Stat::AccelSockets => "accel_sockets",
            Stat::AccelFull => "accel_map_full",
            Stat::AccelPaths => "accel_paths",
            Stat::AccelStackPaths => "accel_stack_paths",
            Stat::AccelMessages => "accel_messages",
            Stat::AgentDownDirect => "agent_down_direct",
            Stat::AgentDownRefused => "agent_down_refused",
            Stat::AgentConns => "agent_connections",
            Stat::AgentConnsFull => "agent_connections_map_full",
            Stat::Reclaimed => "reclaimed",
            Stat::MapFullRefused => "map_full_refused",
            Stat::SkipOutsideMesh => "skip_outside_mesh",
            Stat::SteeredHbone => "steered_hbone",
            Stat::SteeredReply => "steered_reply",
            Stat::SteerNoListener => "steer_no_listener",
        }
    }
}

/// What connect4/6 does with a TCP connect from a meshed pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Redirect,
    Skip(Stat),
}

/// Decides whether a TCP connect from a meshed pod to `dst_ip4:dst_port` (both network byte
/// order) is sent to the proxy. `bypass_port` and `bypass_cidr` are the results of the bypass
/// map lookups, `in_mesh` whether the destination is one the mesh serves (or the pod's
/// namespace captures everything), which only the kernel side can find out.
#[inline(always)]
pub fn decide_v4(
    policy: &PodPolicy,
    dst_ip4: u32,
    dst_port: u16,
    bypass_port: bool,
    bypass_cidr: bool,
    in_mesh: bool,
) -> Verdict {
    let first_octet = dst_ip4.to_ne_bytes()[0];
    // 127.0.0.0/8 never leaves the pod; 0.0.0.0 means "this host" to connect().
    if first_octet == 127 || dst_ip4 == 0 {
        return Verdict::Skip(Stat::SkipLoopback);
    }
    // Already aimed at the proxy (or a pod talking to the proxy port on purpose): no loop.
    if dst_ip4 == policy.proxy_ip4 && dst_port == policy.proxy_port {
        return Verdict::Skip(Stat::SkipProxySelf);
    }
    if bypass_port {
        return Verdict::Skip(Stat::SkipBypassPort);
    }
    if bypass_cidr {
        return Verdict::Skip(Stat::SkipBypassCidr);
    }
    // Link-local (the metadata service) is never proxied, whatever the namespace captures.
    if first_octet == 169 && dst_ip4.to_ne_bytes()[1] == 254 {
        return Verdict::Skip(Stat::SkipOutsideMesh);
    }
    if !in_mesh {
        return Verdict::Skip(Stat::SkipOutsideMesh);
    }
    Verdict::Redirect
}

/// Strict mode: may a TCP SYN from `src_ip4` to port `dst_port` (both network order) reach a
/// pod with `policy`? `agent_conn`: the SYN is one of the agent's own connections
/// ([`MAP_AGENT_CONNS`]). Admitted: the agent's connections (it delivers all mesh traffic,
/// local or from HBONE), the pod's own loopback, and SYNs from the node's address to one of the
/// pod's probe ports (the kubelet's probes). Every other process on the node (host-network
/// pods, NodePort traffic rewritten to the node's address) is refused, and so is everyone
/// while no agent runs.
#[inline(always)]
pub fn strict_allows(policy: &PodPolicy, src_ip4: u32, dst_port: u16, agent_conn: bool) -> bool {
    if policy.flags & POD_FLAG_STRICT == 0 || agent_conn || src_ip4.to_ne_bytes()[0] == 127 {
        return true;
    }
    if src_ip4 != policy.proxy_ip4 || dst_port == 0 {
        return false;
    }
    let p = &policy.probe_ports;
    p[0] == dst_port || p[1] == dst_port || p[2] == dst_port || p[3] == dst_port
}

/// IPv6 next-header values of extension headers (hop-by-hop, routing, fragment, ESP, AH,
/// destination options, mobility, HIP, shim6): a packet with one of these in front of TCP is
/// not read further, and a strict pod drops it.
#[inline(always)]
pub fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}

/// `::ffff:0:0/96` prefix word as it sits in `bpf_sock_addr.user_ip6[2]` (network order).
pub const V4_MAPPED_WORD: u32 = u32::to_be(0x0000_ffff);

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), each word in
/// network byte order as the kernel stores it.
#[inline(always)]
pub fn v4_from_mapped(ip6: [u32; 4]) -> Option<u32> {
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD { Some(ip6[3]) } else { None }
}

/// `::1`, words in network byte order.
#[inline(always)]
pub fn is_loopback6(ip6: [u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::to_be(1)
}

/// The IPv4-mapped form of `ip4` (network order), words in network order.
#[inline(always)]
pub const fn mapped_from_v4(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are #[repr(C)], Copy, contain only integers and have explicit padding.
    unsafe impl aya::Pod for super::PodPolicy {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey4 {}
    unsafe impl aya::Pod for super::MeshConfig {}
    unsafe impl aya::Pod for super::AgentId {}
    unsafe impl aya::Pod for super::MeshDest {}
    unsafe impl aya::Pod for super::SockTuple4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }
    fn port(p: u16) -> u16 {
        p.to_be()
    }
    const POLICY: PodPolicy = PodPolicy {
        proxy_ip4: u32::from_ne_bytes([10, 244, 1, 1]),
        proxy_port: 15001u16.to_be(),
        flags: 0,
        probe_ports: [0; MAX_PROBE_PORTS],
    };

    #[test]
    fn ordinary_destination_is_redirected() {
        assert_eq!(decide_v4(&POLICY, ip([10, 244, 1, 20]), port(8080), false, false, true), Verdict::Redirect);
    }

    #[test]
    fn loopback_and_unspecified_are_never_redirected() {
        for a in [[127, 0, 0, 1], [127, 1, 2, 3], [0, 0, 0, 0]] {
            assert_eq!(
                decide_v4(&POLICY, ip(a), port(80), false, false, true),
                Verdict::Skip(Stat::SkipLoopback),
                "{a:?}"
            );
        }
    }

    #[test]
    fn proxy_itself_is_not_redirected_but_other_ports_on_node_are() {
        assert_eq!(
            decide_v4(&POLICY, POLICY.proxy_ip4, POLICY.proxy_port, false, false, true),
            Verdict::Skip(Stat::SkipProxySelf)
        );
        assert_eq!(decide_v4(&POLICY, POLICY.proxy_ip4, port(9100), false, false, true), Verdict::Redirect);
    }

    #[test]
    fn bypass_lists_win() {
        let dst = ip([10, 96, 0, 10]);
        assert_eq!(decide_v4(&POLICY, dst, port(53), true, false, true), Verdict::Skip(Stat::SkipBypassPort));
        assert_eq!(decide_v4(&POLICY, dst, port(443), false, true, true), Verdict::Skip(Stat::SkipBypassCidr));
    }

    #[test]
    fn only_mesh_destinations_are_captured_and_never_link_local() {
        let dst = ip([10, 244, 2, 7]);
        assert_eq!(decide_v4(&POLICY, dst, port(5432), false, false, false), Verdict::Skip(Stat::SkipOutsideMesh));
        assert_eq!(decide_v4(&POLICY, dst, port(5432), false, false, true), Verdict::Redirect);
        let imds = ip([169, 254, 169, 254]);
        assert_eq!(decide_v4(&POLICY, imds, port(80), false, false, true), Verdict::Skip(Stat::SkipOutsideMesh));
        // Bypasses are counted as such before the mesh check.
        assert_eq!(decide_v4(&POLICY, dst, port(53), true, false, false), Verdict::Skip(Stat::SkipBypassPort));
    }

    #[test]
    fn strict_mode_admits_the_agents_connections_loopback_and_probes_only() {
        assert!(agent_alive(10, 10 + AGENT_HEARTBEAT_TIMEOUT_NS));
        assert!(!agent_alive(10, 11 + AGENT_HEARTBEAT_TIMEOUT_NS), "stale");
        assert!(!agent_alive(0, 5), "stopped without a successor");
        assert!(agent_alive(10, 5), "a clock read before the heartbeat is not stale");
        let strict = PodPolicy { flags: POD_FLAG_STRICT, probe_ports: [port(8081), 0, 0, 0], ..POLICY };
        let node = POLICY.proxy_ip4;
        let other = ip([10, 244, 1, 30]);
        assert!(strict_allows(&strict, node, port(8080), true), "the agent's own connection");
        assert!(strict_allows(&strict, other, port(8080), true), "the agent's own, from any address");
        assert!(!strict_allows(&strict, node, port(8080), false), "another process on the node");
        assert!(strict_allows(&strict, node, port(8081), false), "the kubelet's probe port, from the node");
        assert!(!strict_allows(&strict, other, port(8081), false), "the probe port, from elsewhere");
        assert!(!strict_allows(&strict, node, 0, false), "an unset probe slot is no port");
        assert!(strict_allows(&strict, ip([127, 0, 0, 1]), port(8080), false));
        assert!(!strict_allows(&strict, other, port(8080), false));
        assert!(strict_allows(&POLICY, other, port(8080), false), "permissive admits everyone");
    }

    #[test]
    fn ipv6_extension_headers_are_known() {
        for h in [0u8, 43, 44, 50, 51, 60, 135, 139, 140] {
            assert!(is_ipv6_extension(h), "{h}");
        }
        for h in [6u8, 17, 58, 59] {
            assert!(!is_ipv6_extension(h), "{h}");
        }
    }

    #[test]
    fn a_packets_tuple_is_the_sending_sockets_key() {
        // The agent's socket 10.244.1.1:40000 -> 10.244.1.20:8080, as sockops records it (local
        // port in host order, remote port in the upper half of the field), and as its SYN reads.
        let from_sockops =
            SockTuple4::from_ctx(ip([10, 244, 1, 1]), ip([10, 244, 1, 20]), 40000, (port(8080) as u32) << 16);
        let from_syn = SockTuple4::from_packet(ip([10, 244, 1, 1]), ip([10, 244, 1, 20]), port(40000), port(8080));
        assert_eq!(from_sockops, from_syn);
    }

    #[test]
    fn v4_mapped_round_trip() {
        let a = ip([10, 0, 0, 7]);
        let m = mapped_from_v4(a);
        assert_eq!(v4_from_mapped(m), Some(a));
        // The bytes really are ::ffff:10.0.0.7.
        let mut bytes = [0u8; 16];
        for (i, w) in m.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7]);
        assert_eq!(v4_from_mapped([0, 0, 0, u32::to_be(1)]), None);
    }

    #[test]
    fn loopback6() {
        assert!(is_loopback6([0, 0, 0, u32::to_be(1)]));
        assert!(!is_loopback6(mapped_from_v4(ip([127, 0, 0, 1]))));
    }

    #[test]
    fn stat_table_is_complete_and_ordered() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as u32, i as u32);
        }
    }

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<PodPolicy>(), 16);
        assert_eq!(core::mem::size_of::<OrigDst>(), 16);
        assert_eq!(core::mem::size_of::<SockKey4>(), 8);
        assert_eq!(core::mem::size_of::<AgentId>(), 24);
        assert_eq!(core::mem::size_of::<MeshConfig>(), 64);
        assert_eq!(core::mem::size_of::<SockTuple4>(), 12);
        assert_eq!(core::mem::size_of::<MeshDest>(), 8);
    }

    #[test]
    fn tuples_from_both_port_conventions_and_their_peers() {
        let (a, b) = (ip([10, 244, 1, 20]), ip([10, 244, 1, 1]));
        // remote port 15001 in network order, shifted into the upper half (x86 kernels).
        let shifted = (u32::from(15001u16.to_be())) << 16;
        let t = SockTuple4::from_ctx(a, b, 40000, shifted);
        assert_eq!(t.local_port, port(40000));
        assert_eq!(t.remote_port, port(15001));
        assert_eq!(SockTuple4::from_ctx(a, b, 40000, u32::from(15001u16.to_be())), t, "unshifted field");
        // The other end's own view of the connection is the peer key.
        let other = SockTuple4::from_ctx(b, a, 15001, u32::from(40000u16.to_be()) << 16);
        assert_eq!(t.peer(), other);
        assert_eq!(other.peer(), t);
    }

    #[test]
    fn only_proxy_legs_off_loopback_are_accelerated() {
        let proxy = POLICY.proxy_ip4;
        let pod = ip([10, 244, 1, 20]);
        let t = |l, r| SockTuple4 { local_ip4: l, remote_ip4: r, local_port: 1, remote_port: 2 };
        assert!(accel_candidate(&t(pod, proxy), proxy));
        assert!(accel_candidate(&t(proxy, pod), proxy));
        assert!(!accel_candidate(&t(pod, ip([10, 244, 1, 30])), proxy), "pod to pod without the proxy");
        assert!(!accel_candidate(&t(ip([127, 0, 0, 1]), proxy), proxy));
        assert!(!accel_candidate(&t(pod, proxy), 0), "no proxy address configured");
    }
}
