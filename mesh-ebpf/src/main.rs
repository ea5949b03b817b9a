//! Switchyard's kernel side: the programs that send a meshed pod's TCP connections to the node
//! proxy and keep the application unaware of it.
//!
//! * `mesh_connect4` / `mesh_connect6` (`cgroup/connect4`, `cgroup/connect6`): a TCP connect from a
//!   task in a meshed pod cgroup to a destination the mesh serves (`MESH_DESTS`: meshed pods,
//!   Services it serves; everything in a capture-all namespace) is rewritten to the pod's proxy
//!   address; the original destination is recorded under the socket cookie. Every other
//!   destination stays on the pod's own path.
//! * `mesh_sockops` (`sockops`): when that connection is established, the record is copied under
//!   the client's own address and port, which is what the proxy sees on `accept()`; when the
//!   socket closes, both records are removed.
//! * `mesh_getpeername4` / `mesh_getpeername6`: `getpeername()` on a redirected socket answers with
//!   the original destination.
//!
//! * `mesh_ingress` (`cgroup_skb/ingress`): in `strict` namespaces, a TCP SYN (IPv4 or IPv6)
//!   to a meshed pod is dropped unless it is one of the agent's own connections (registered by
//!   sockops before their SYN leaves), from the pod's loopback, or a kubelet probe; whether or
//!   not an agent is running.
//! * `mesh_sock_release` (`cgroup/sock_release`): a socket freed without ever closing as a
//!   connection (its connect failed before the SYN) has its records reclaimed.
//! * Same-node acceleration (only when the agent turns it on): `mesh_sockops` also puts every
//!   established socket with the node proxy at one end into `ACCEL_SOCKS`, and `mesh_sk_msg`
//!   (`sk_msg`, attached to that map) hands each `sendmsg` straight to the receive queue of the
//!   socket at the other end, skipping the TCP/IP stack and the veth pair in between. Each
//!   direction of a connection picks its path once, at its first send, and keeps it
//!   (`ACCEL_PATH`), so bytes are never reordered by mixing paths.
//!
//! * `mesh_steer` (`tc` ingress, on every interface of the node's network namespace but
//!   loopback): a TCP packet to one of this node's meshed pods on port 15008 (HBONE, addressed
//!   to the pod as Istio's ztunnel does) is assigned to the agent's socket for it (the
//!   listener, or the connection it belongs to) with `bpf_sk_assign`; and a packet from a local
//!   meshed pod to a remote meshed pod that belongs to one of the agent's transparent sockets
//!   (a connection it made to the pod from the remote source pod's address) is assigned to that
//!   socket. Both are marked so that the agent's routing rule delivers them locally.
//!
//! The cgroup programs are attached once, to the node's cgroup; which pods are meshed is data
//! (`MESHED_CGROUPS`), so pods join and leave at run time without re-attaching anything.
//! Every path returns 1 (allow): a failure never blocks a connection, it only leaves it
//! un-redirected and counted. The refusals are deliberate: while no agent is alive (no
//! heartbeat in `MESH_CONFIG` for 2 s, or the last agent stopped), or when the redirect map is
//! full, a pod of a fail-closed namespace gets `EPERM` from `connect()` (every other pod
//! connects directly: fail-open applies to outbound capture only); and strict pods keep
//! dropping plaintext SYNs while no agent runs.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        EbpfContext,
        bindings::{
            BPF_ANY, BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
            BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_hdr_start_off::BPF_HDR_START_NET, bpf_pidns_info,
            bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, sk_action::SK_PASS,
        },
        helpers::{
            bpf_ktime_get_ns,
            generated::{
                bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_ns_current_pid_tgid,
                bpf_get_socket_cookie, bpf_sk_assign, bpf_sk_release, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
                bpf_skb_load_bytes_relative, bpf_skc_lookup_tcp,
            },
        },
        macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, classifier, map, sk_msg, sock_ops},
        maps::{Array, HashMap, LpmTrie, PerCpuArray, SockHash, lpm_trie::Key},
        programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, TcContext},
    };
    use aya_log_ebpf::warn;
    use mesh_common::{
        ACCEL_VIA_SOCKMAP, ACCEL_VIA_STACK, AgentId, HBONE_PORT, MAX_ACCEL_SOCKETS, MAX_AGENT_CONNS, MAX_BYPASS_CIDRS,
        MAX_BYPASS_PORTS, MAX_CGROUP_DEPTH, MAX_HBONE_PODS, MAX_MESH_DESTS, MAX_MESHED_CGROUPS, MAX_REDIRECTED_SOCKETS,
        MESH_FLAG_ACCEL, MeshConfig, MeshDest, ORIG_FLAG_V4_MAPPED, OrigDst, POD_FLAG_CAPTURE_ALL,
        POD_FLAG_FAIL_CLOSED, POD_FLAG_STRICT, PodPolicy, STEER_MARK, STEER_MARK_MASK, SockKey4, SockTuple4, Stat,
        Verdict, accel_candidate, agent_alive, decide_v4, is_ipv6_extension, is_loopback6, mapped_from_v4,
        strict_allows, v4_from_mapped,
    };

    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const IPPROTO_TCP: u32 = 6;
    /// `TCP_CLOSE` in `bpf_sock.state`.
    const TCP_STATE_CLOSE: u32 = 7;
    const ALLOW: i32 = 1;
    /// From a connect hook: the connect fails with EPERM.
    const REFUSE: i32 = 0;

    #[map]
    static MESHED_CGROUPS: HashMap<u64, PodPolicy> = HashMap::with_max_entries(MAX_MESHED_CGROUPS, 0);
    #[map]
    static SOCK_ORIG: HashMap<u64, OrigDst> = HashMap::with_max_entries(MAX_REDIRECTED_SOCKETS, 0);
    #[map]
    static ORIG_BY_CLIENT: HashMap<SockKey4, OrigDst> = HashMap::with_max_entries(MAX_REDIRECTED_SOCKETS, 0);
    #[map]
    static BYPASS_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_BYPASS_PORTS, 0);
    #[map]
    static BYPASS_CIDRS: LpmTrie<[u8; 4], u8> =
        LpmTrie::with_max_entries(MAX_BYPASS_CIDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
    #[map]
    static MESH_CONFIG: Array<MeshConfig> = Array::with_max_entries(1, 0);
    #[map]
    static MESH_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
    #[map]
    static ACCEL_SOCKS: SockHash<SockTuple4> = SockHash::with_max_entries(MAX_ACCEL_SOCKETS, 0);
    /// 0 = undecided (set when the socket joins `ACCEL_SOCKS`), then `ACCEL_VIA_*`.
    #[map]
    static ACCEL_PATH: HashMap<SockTuple4, u8> = HashMap::with_max_entries(MAX_ACCEL_SOCKETS, 0);
    #[map]
    static MESH_DESTS: HashMap<MeshDest, u8> = HashMap::with_max_entries(MAX_MESH_DESTS, 0);
    #[map]
    static AGENT_SOCKS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_AGENT_CONNS, 0);
    #[map]
    static AGENT_CONNS: HashMap<SockTuple4, u8> = HashMap::with_max_entries(MAX_AGENT_CONNS, 0);
    #[map]
    static HBONE_PODS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_HBONE_PODS, 0);

    #[inline(always)]
    fn count(stat: Stat) {
        if let Some(p) = MESH_STATS.get_ptr_mut(stat as u32) {
            // Per-CPU slot, and programs do not nest on one CPU: a plain add is exact.
            unsafe { *p += 1 };
        }
    }

    /// The policy of the meshed pod the current task belongs to, looked up by the task's own
    /// cgroup and then by each ancestor (containers sit below their pod's cgroup).
    #[inline(always)]
    fn current_pod() -> Option<(u64, PodPolicy)> {
        let id = unsafe { bpf_get_current_cgroup_id() };
        find_pod(id, |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
    }

    /// The meshed pod owning cgroup `id`: `id` itself or one of its ancestors (`ancestor(level)`
    /// gives the ancestor at that depth below the root, 0 past the cgroup's own depth).
    #[inline(always)]
    fn find_pod(id: u64, ancestor: impl Fn(i32) -> u64) -> Option<(u64, PodPolicy)> {
        if id == 0 {
            return None;
        }
        if let Some(p) = unsafe { MESHED_CGROUPS.get(&id) } {
            return Some((id, *p));
        }
        let mut level = 1;
        while level < MAX_CGROUP_DEPTH {
            let a = ancestor(level);
            if a == 0 || a == id {
                break;
            }
            if let Some(p) = unsafe { MESHED_CGROUPS.get(&a) } {
                return Some((a, *p));
            }
            level += 1;
        }
        None
    }

    /// Whether the calling task is `agent`'s: its thread-group id in the agent's PID
    /// namespace is the agent's (a task of another namespace gets an error, never a match).
    #[inline(always)]
    fn is(agent: &AgentId) -> bool {
        if agent.tgid == 0 {
            return false;
        }
        let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
        let r = unsafe {
            bpf_get_ns_current_pid_tgid(
                agent.pidns_dev,
                agent.pidns_ino,
                &mut info,
                core::mem::size_of::<bpf_pidns_info>() as u32,
            )
        };
        r == 0 && info.tgid == agent.tgid
    }

    /// Whether the calling task is the serving agent's, or (during a hand-over) the previous
    /// agent's.
    #[inline(always)]
    fn is_agent() -> bool {
        match MESH_CONFIG.get(0) {
            Some(c) => is(&c.agents[0]) || is(&c.agents[1]),
            None => false,
        }
    }

    /// The agent's connect: never redirected; its socket is remembered (by cookie) so that
    /// sockops registers the connection before the SYN leaves, for strict pods to admit.
    #[inline(always)]
    fn agent_connect(ctx: &SockAddrContext) {
        count(Stat::SkipAgent);
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if AGENT_SOCKS.insert(&cookie, &1, BPF_ANY as u64).is_err() {
            count(Stat::AgentConnsFull);
        }
    }

    /// Whether an agent is serving the node (its heartbeat is fresh).
    #[inline(always)]
    fn agent_up() -> bool {
        match MESH_CONFIG.get(0) {
            Some(c) => agent_alive(c.heartbeat_ns, unsafe { bpf_ktime_get_ns() }),
            None => false,
        }
    }

    /// Whether the mesh serves `ip4:port` (both network order): a meshed pod (any port) or a
    /// Service port it serves.
    #[inline(always)]
    fn mesh_dest(ip4: u32, port: u16) -> bool {
        unsafe {
            MESH_DESTS.get(&MeshDest::new(ip4, port)).is_some() || MESH_DESTS.get(&MeshDest::new(ip4, 0)).is_some()
        }
    }

    /// Shared by connect4 and connect6 (v4-mapped): `Ok(Some)` the rewrite target, `Ok(None)`
    /// leave the connect alone, `Err` refuse it (fail-closed pod, no agent).
    #[inline(always)]
    fn redirect_v4(ctx: &SockAddrContext, dst_ip4: u32, dst_port: u16, flags: u16) -> Result<Option<PodPolicy>, ()> {
        let Some((pod_cgroup, policy)) = current_pod() else { return Ok(None) };
        count(Stat::MeshedConnects);
        let bypass_port = unsafe { BYPASS_PORTS.get(&u16::from_be(dst_port)) }.is_some();
        let bypass_cidr = BYPASS_CIDRS.get(&Key::new(32, dst_ip4.to_ne_bytes())).is_some();
        let in_mesh = policy.flags & POD_FLAG_CAPTURE_ALL != 0 || mesh_dest(dst_ip4, dst_port);
        Ok(match decide_v4(&policy, dst_ip4, dst_port, bypass_port, bypass_cidr, in_mesh) {
            Verdict::Skip(reason) => {
                count(reason);
                None
            }
            Verdict::Redirect => {
                // Mesh traffic while no agent serves: a fail-closed pod is refused, every other
                // one connects directly.
                if !agent_up() {
                    if policy.flags & POD_FLAG_FAIL_CLOSED != 0 {
                        count(Stat::AgentDownRefused);
                        return Err(());
                    }
                    count(Stat::AgentDownDirect);
                    return Ok(None);
                }
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let orig = OrigDst { pod_cgroup, ip4: dst_ip4, port: dst_port, flags };
                if SOCK_ORIG.insert(&cookie, &orig, BPF_ANY as u64).is_err() {
                    if policy.flags & POD_FLAG_FAIL_CLOSED != 0 {
                        // A fail-closed pod's traffic never goes direct, not even on a full map.
                        count(Stat::MapFullRefused);
                        warn!(ctx, "switchyard: redirect map full, connection of a fail-closed pod refused");
                        return Err(());
                    }
                    count(Stat::MapFull);
                    warn!(ctx, "switchyard: redirect map full, connection not redirected");
                    return Ok(None);
                }
                count(Stat::Redirected);
                Some(policy)
            }
        })
    }

    #[cgroup_sock_addr(connect4)]
    pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
        let sa = unsafe { &mut *ctx.sock_addr };
        if sa.protocol != IPPROTO_TCP {
            return ALLOW; // UDP (DNS) and anything else: untouched
        }
        if is_agent() {
            agent_connect(&ctx);
            return ALLOW;
        }
        match redirect_v4(&ctx, sa.user_ip4, sa.user_port as u16, 0) {
            Ok(Some(p)) => {
                sa.user_ip4 = p.proxy_ip4;
                sa.user_port = p.proxy_port as u32;
            }
            Ok(None) => {}
            Err(()) => return REFUSE,
        }
        ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
        let sa = unsafe { &mut *ctx.sock_addr };
        if sa.protocol != IPPROTO_TCP {
            return ALLOW;
        }
        let ip6 = sa.user_ip6;
        if is_loopback6(ip6) {
            return ALLOW;
        }
        if is_agent() {
            agent_connect(&ctx);
            return ALLOW;
        }
        match v4_from_mapped(ip6) {
            Some(ip4) => match redirect_v4(&ctx, ip4, sa.user_port as u16, ORIG_FLAG_V4_MAPPED) {
                Ok(Some(p)) => {
                    let m = mapped_from_v4(p.proxy_ip4);
                    sa.user_ip6[0] = m[0];
                    sa.user_ip6[1] = m[1];
                    sa.user_ip6[2] = m[2];
                    sa.user_ip6[3] = m[3];
                    sa.user_port = p.proxy_port as u32;
                }
                Ok(None) => {}
                Err(()) => return REFUSE,
            },
            None => {
                if current_pod().is_some() {
                    count(Stat::SkipIpv6);
                }
            }
        }
        ALLOW
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(o) = unsafe { SOCK_ORIG.get(&cookie) } {
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = o.ip4;
            sa.user_port = o.port as u32;
            count(Stat::PeernameRestored);
        }
        ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(o) = unsafe { SOCK_ORIG.get(&cookie) } {
            let m = mapped_from_v4(o.ip4);
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip6[0] = m[0];
            sa.user_ip6[1] = m[1];
            sa.user_ip6[2] = m[2];
            sa.user_ip6[3] = m[3];
            sa.user_port = o.port as u32;
            count(Stat::PeernameRestored);
        }
        ALLOW
    }

    /// The client's own address as the proxy will see it (v4-mapped sockets included).
    ///
    /// Every context field is read unconditionally with a volatile load: otherwise LLVM merges
    /// the `local_ip4` and `local_ip6[3]` loads into one load at a computed offset, which the
    /// verifier rejects ("dereference of modified ctx ptr").
    #[inline(always)]
    fn local_key(ctx: &SockOpsContext) -> Option<SockKey4> {
        let ops = ctx.ops;
        let (family, ip4, ip6, port) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*ops).family),
                core::ptr::read_volatile(&raw const (*ops).local_ip4),
                [
                    core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                    core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                    core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                    core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
                ],
                core::ptr::read_volatile(&raw const (*ops).local_port),
            )
        };
        let ip4 = match family {
            AF_INET => ip4,
            AF_INET6 => v4_from_mapped(ip6)?,
            _ => return None,
        };
        // sockops hands local_port in host byte order.
        Some(SockKey4::new(ip4, (port as u16).to_be()))
    }

    /// The connection as this socket sees it (sockops fields, each read with a volatile load
    /// for the same reason as in [`local_key`]).
    #[inline(always)]
    fn sockops_tuple(ctx: &SockOpsContext) -> SockTuple4 {
        let ops = ctx.ops;
        unsafe {
            SockTuple4::from_ctx(
                core::ptr::read_volatile(&raw const (*ops).local_ip4),
                core::ptr::read_volatile(&raw const (*ops).remote_ip4),
                core::ptr::read_volatile(&raw const (*ops).local_port),
                core::ptr::read_volatile(&raw const (*ops).remote_port),
            )
        }
    }

    /// Same-node acceleration: an established socket with the proxy at one end joins
    /// `ACCEL_SOCKS`, with its path still undecided. Both records or neither: a socket outside
    /// the sockhash never runs `mesh_sk_msg` and simply stays on the TCP path.
    #[inline(always)]
    fn accel_track(ctx: &SockOpsContext) {
        let Some(cfg) = MESH_CONFIG.get(0) else { return };
        if cfg.flags & MESH_FLAG_ACCEL == 0 {
            return;
        }
        let mut t = sockops_tuple(ctx);
        if !accel_candidate(&t, cfg.proxy_ip4) {
            return;
        }
        if ACCEL_PATH.insert(&t, &0u8, BPF_ANY as u64).is_err() {
            count(Stat::AccelFull);
            return;
        }
        if ACCEL_SOCKS.update(&mut t, unsafe { &mut *ctx.ops }, BPF_ANY as u64).is_err() {
            let _ = ACCEL_PATH.remove(&t);
            count(Stat::AccelFull);
            return;
        }
        // Close callbacks remove the path record (the kernel drops the sockhash entry itself).
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        count(Stat::AccelSockets);
    }

    #[sock_ops]
    pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
            accel_track(&ctx);
            return 1;
        }
        if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB
        {
            return 1;
        }
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            accel_track(&ctx);
        }
        let closing = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE;
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if closing {
            let t = sockops_tuple(&ctx);
            let _ = ACCEL_PATH.remove(&t);
            if AGENT_SOCKS.remove(&cookie).is_ok() {
                let _ = AGENT_CONNS.remove(&t);
            }
        }
        if op == BPF_SOCK_OPS_TCP_CONNECT_CB && unsafe { AGENT_SOCKS.get(&cookie) }.is_some() {
            // The agent's connection, just before its SYN: strict pods admit exactly this
            // 4-tuple until the socket closes.
            if AGENT_CONNS.insert(&sockops_tuple(&ctx), &1, BPF_ANY as u64).is_err() {
                count(Stat::AgentConnsFull);
            } else {
                count(Stat::AgentConns);
            }
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            return 1;
        }
        let Some(orig) = (unsafe { SOCK_ORIG.get(&cookie) }).copied() else {
            return 1;
        };
        if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
            // Ask for state callbacks on this socket so its records go when it closes, however
            // it ends (refused, reset, closed).
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            count(Stat::Established);
            if let Some(key) = local_key(&ctx) {
                if ORIG_BY_CLIENT.insert(&key, &orig, BPF_ANY as u64).is_err() {
                    count(Stat::ClientMapFull);
                }
            }
        } else if closing {
            let _ = SOCK_ORIG.remove(&cookie);
            if let Some(key) = local_key(&ctx) {
                let _ = ORIG_BY_CLIENT.remove(&key);
            }
            count(Stat::Closed);
        }
        1
    }

    /// A TCP socket is released (its last descriptor closed). One still connected or closing
    /// reaches `TCP_CLOSE` later and sockops removes its records then; one already in
    /// `TCP_CLOSE` here never connected (its connect failed before the SYN, so sockops never
    /// asked for state callbacks on it): its records go now instead of staying for good.
    #[cgroup_sock(sock_release)]
    pub fn mesh_sock_release(ctx: SockContext) -> i32 {
        let sk = ctx.sock;
        let (protocol, state) = unsafe {
            (core::ptr::read_volatile(&raw const (*sk).protocol), core::ptr::read_volatile(&raw const (*sk).state))
        };
        if protocol != IPPROTO_TCP || state != TCP_STATE_CLOSE {
            return ALLOW;
        }
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCK_ORIG.remove(&cookie).is_ok() {
            count(Stat::Reclaimed);
        }
        let _ = AGENT_SOCKS.remove(&cookie);
        ALLOW
    }

    /// Same-node acceleration: runs on every `sendmsg` of a socket in `ACCEL_SOCKS`. The first
    /// send decides the path of this direction for the life of the connection: socket to
    /// socket if the peer is in the map by then, the TCP stack otherwise. Always passes: a
    /// message is never dropped here.
    #[sk_msg]
    pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
        let md = ctx.msg;
        let t = unsafe {
            SockTuple4::from_ctx(
                core::ptr::read_volatile(&raw const (*md).local_ip4),
                core::ptr::read_volatile(&raw const (*md).remote_ip4),
                core::ptr::read_volatile(&raw const (*md).local_port),
                core::ptr::read_volatile(&raw const (*md).remote_port),
            )
        };
        let Some(path) = ACCEL_PATH.get_ptr_mut(&t) else { return SK_PASS };
        let mut peer = t.peer();
        match unsafe { *path } {
            ACCEL_VIA_STACK => {}
            ACCEL_VIA_SOCKMAP => {
                // The peer leaves the map when it closes; then this send takes the stack and
                // meets the closed connection there, as it would without acceleration.
                if ACCEL_SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
                    count(Stat::AccelMessages);
                }
            }
            _ => {
                if ACCEL_SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
                    unsafe { *path = ACCEL_VIA_SOCKMAP };
                    count(Stat::AccelPaths);
                    count(Stat::AccelMessages);
                } else {
                    unsafe { *path = ACCEL_VIA_STACK };
                    count(Stat::AccelStackPaths);
                }
            }
        }
        SK_PASS
    }

    /// The policy of the meshed pod whose socket receives this packet.
    #[inline(always)]
    fn receiving_pod(ctx: &SkBuffContext) -> Option<PodPolicy> {
        let skb = ctx.skb.skb;
        let id = unsafe { bpf_skb_cgroup_id(skb) };
        find_pod(id, |level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }).map(|(_, p)| p)
    }

    #[cgroup_skb(ingress)]
    pub fn mesh_ingress(ctx: SkBuffContext) -> i32 {
        // 1 = pass, 0 = drop; any failure passes.
        if try_ingress(&ctx).unwrap_or(true) { 1 } else { 0 }
    }

    #[inline(always)]
    fn try_ingress(ctx: &SkBuffContext) -> Result<bool, i64> {
        // The packet starts at its IP header here. Cheap checks first: only a TCP SYN (without
        // ACK) costs a map lookup.
        let first: u8 = ctx.load(0)?;
        match first >> 4 {
            4 => ingress_v4(ctx, first),
            6 => ingress_v6(ctx),
            _ => Ok(true),
        }
    }

    /// Whether the packet goes to a strict pod.
    #[inline(always)]
    fn to_strict_pod(ctx: &SkBuffContext) -> Option<PodPolicy> {
        receiving_pod(ctx).filter(|p| p.flags & POD_FLAG_STRICT != 0)
    }

    #[inline(always)]
    fn ingress_v4(ctx: &SkBuffContext, ver_ihl: u8) -> Result<bool, i64> {
        if ctx.load::<u8>(9)? != IPPROTO_TCP as u8 {
            return Ok(true);
        }
        let ihl = ((ver_ihl & 0x0f) as usize) * 4;
        if ihl < 20 || ihl > 60 {
            return Ok(true);
        }
        let flags: u8 = ctx.load(ihl + 13)?;
        if flags & 0x02 == 0 || flags & 0x10 != 0 {
            return Ok(true);
        }
        let Some(policy) = to_strict_pod(ctx) else { return Ok(true) };
        let (src, dst): (u32, u32) = (ctx.load(12)?, ctx.load(16)?);
        let (sport, dport): (u16, u16) = (ctx.load(ihl)?, ctx.load(ihl + 2)?);
        let agent = unsafe { AGENT_CONNS.get(&SockTuple4::from_packet(src, dst, sport, dport)) }.is_some();
        // No agent alive: nothing is registered, so strict pods admit only loopback and probes.
        if strict_allows(&policy, src, dport, agent) {
            return Ok(true);
        }
        count(Stat::StrictDropped);
        Ok(false)
    }

    /// IPv6: the agent delivers over IPv4 only, so a strict pod admits an IPv6 SYN only from
    /// its own loopback; a packet with extension headers in front of its transport header is
    /// not read further and is dropped for a strict pod.
    #[inline(always)]
    fn ingress_v6(ctx: &SkBuffContext) -> Result<bool, i64> {
        let next: u8 = ctx.load(6)?;
        if next == IPPROTO_TCP as u8 {
            let flags: u8 = ctx.load(40 + 13)?;
            if flags & 0x02 == 0 || flags & 0x10 != 0 {
                return Ok(true);
            }
        } else if !is_ipv6_extension(next) {
            return Ok(true);
        }
        if to_strict_pod(ctx).is_none() {
            return Ok(true);
        }
        let src: [u32; 4] = [ctx.load(8)?, ctx.load(12)?, ctx.load(16)?, ctx.load(20)?];
        if next == IPPROTO_TCP as u8 && is_loopback6(src) {
            return Ok(true);
        }
        count(Stat::StrictDropped);
        Ok(false)
    }

    /// `tc` verdicts: leave the packet to the next program and the stack; or pass it now (it was
    /// assigned to a socket).
    const TC_NEXT: i32 = -1;
    const TC_PASS: i32 = 0;
    const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;

    /// Reads `T` at `offset` from the network header, on Ethernet and on L3 devices alike.
    #[inline(always)]
    fn net_load<T>(ctx: &TcContext, offset: u32) -> Result<T, i64> {
        let mut v = core::mem::MaybeUninit::<T>::uninit();
        let r = unsafe {
            bpf_skb_load_bytes_relative(
                ctx.skb.skb as *const _,
                offset,
                v.as_mut_ptr() as *mut _,
                core::mem::size_of::<T>() as u32,
                BPF_HDR_START_NET,
            )
        };
        if r < 0 { Err(r) } else { Ok(unsafe { v.assume_init() }) }
    }

    #[classifier]
    pub fn mesh_steer(ctx: TcContext) -> i32 {
        match try_steer(&ctx) {
            Ok(true) => TC_PASS,
            _ => TC_NEXT,
        }
    }

    /// `Ok(true)`: assigned to one of the agent's sockets and marked.
    #[inline(always)]
    fn try_steer(ctx: &TcContext) -> Result<bool, i64> {
        if ctx.skb.protocol() != ETH_P_IP_BE {
            return Ok(false);
        }
        let ver_ihl: u8 = net_load(ctx, 0)?;
        if ver_ihl >> 4 != 4 || net_load::<u8>(ctx, 9)? != IPPROTO_TCP as u8 {
            return Ok(false);
        }
        // Fragments other than the first carry no TCP header.
        if u16::from_be(net_load::<u16>(ctx, 6)?) & 0x1fff != 0 {
            return Ok(false);
        }
        let ihl = ((ver_ihl & 0x0f) as u32) * 4;
        if ihl < 20 {
            return Ok(false);
        }
        let (src, dst): (u32, u32) = (net_load(ctx, 12)?, net_load(ctx, 16)?);
        let (sport, dport): (u16, u16) = (net_load(ctx, ihl)?, net_load(ctx, ihl + 2)?);
        let to_local_pod = unsafe { HBONE_PODS.get(&dst) }.is_some();
        let hbone = to_local_pod && dport == HBONE_PORT.to_be();
        // A local pod's reply to a remote meshed pod: maybe to one of the agent's transparent
        // sockets. Only then is a socket looked up (every other packet costs map lookups only).
        let reply = !to_local_pod
            && unsafe { HBONE_PODS.get(&src) }.is_some()
            && unsafe { MESH_DESTS.get(&MeshDest::new(dst, 0)) }.is_some();
        if !hbone && !reply {
            return Ok(false);
        }
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        tuple.__bindgen_anon_1.ipv4 =
            bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 { saddr: src, daddr: dst, sport, dport };
        let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
        let ptr = ctx.skb.skb as *mut core::ffi::c_void;
        // The established socket of the 4-tuple, else (HBONE) the listener on the port.
        let sk = unsafe { bpf_skc_lookup_tcp(ptr, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0) };
        if sk.is_null() {
            if hbone {
                count(Stat::SteerNoListener);
            }
            return Ok(false);
        }
        let assigned = unsafe { bpf_sk_assign(ptr, sk as *mut _, 0) };
        unsafe { bpf_sk_release(sk as *mut _) };
        if assigned != 0 {
            return Ok(false);
        }
        // Whole-word accesses: the verifier refuses a narrower store to `mark`, which is what
        // the compiler would make of a masked update.
        unsafe {
            let mark = core::ptr::addr_of_mut!((*ctx.skb.skb).mark);
            core::ptr::write_volatile(mark, (core::ptr::read_volatile(mark) & !STEER_MARK_MASK) | STEER_MARK);
        }
        count(if hbone { Stat::SteeredHbone } else { Stat::SteeredReply });
        Ok(true)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
