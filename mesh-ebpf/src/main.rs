//! Switchyard's kernel side: the programs that send a meshed pod's TCP connections to the node
//! proxy and keep the application unaware of it.
//!
//! * `mesh_connect4` / `mesh_connect6` (`cgroup/connect4`, `cgroup/connect6`): a TCP connect from a
//!   task in a meshed pod cgroup is rewritten to the pod's proxy address; the original
//!   destination is recorded under the socket cookie.
//! * `mesh_sockops` (`sockops`): when that connection is established, the record is copied under
//!   the client's own address and port, which is what the proxy sees on `accept()`; when the
//!   socket closes, both records are removed.
//! * `mesh_getpeername4` / `mesh_getpeername6`: `getpeername()` on a redirected socket answers with
//!   the original destination.
//!
//! * `mesh_ingress` (`cgroup_skb/ingress`): in `strict` namespaces, a TCP SYN to a meshed pod
//!   from anyone but the node proxy is dropped.
//! * Same-node acceleration (only when the agent turns it on): `mesh_sockops` also puts every
//!   established socket with the node proxy at one end into `ACCEL_SOCKS`, and `mesh_sk_msg`
//!   (`sk_msg`, attached to that map) hands each `sendmsg` straight to the receive queue of the
//!   socket at the other end, skipping the TCP/IP stack and the veth pair in between. Each
//!   direction of a connection picks its path once, at its first send, and keeps it
//!   (`ACCEL_PATH`), so bytes are never reordered by mixing paths.
//!
//! All programs are attached once, to the node's cgroup; which pods are meshed is data
//! (`MESHED_CGROUPS`), so pods join and leave at run time without re-attaching anything.
//! Every path returns 1 (allow): a failure never blocks a connection, it only leaves it
//! un-redirected and counted. The one refusal is deliberate: while no agent is alive (no
//! heartbeat in `MESH_CONFIG` for 2 s, or the last agent stopped), a pod of a fail-closed
//! namespace gets `EPERM` from `connect()`; every other pod connects directly, and strict mode
//! lets direct traffic in again.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        EbpfContext,
        bindings::{
            BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
            BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
            sk_action::SK_PASS,
        },
        helpers::{
            bpf_get_current_pid_tgid, bpf_ktime_get_ns,
            generated::{
                bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
                bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
            },
        },
        macros::{cgroup_skb, cgroup_sock_addr, map, sk_msg, sock_ops},
        maps::{Array, HashMap, LpmTrie, PerCpuArray, SockHash, lpm_trie::Key},
        programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
    };
    use aya_log_ebpf::warn;
    use mesh_common::{
        ACCEL_VIA_SOCKMAP, ACCEL_VIA_STACK, MAX_ACCEL_SOCKETS, MAX_BYPASS_CIDRS, MAX_BYPASS_PORTS, MAX_CGROUP_DEPTH,
        MAX_MESHED_CGROUPS, MAX_REDIRECTED_SOCKETS, MESH_FLAG_ACCEL, MeshConfig, ORIG_FLAG_V4_MAPPED, OrigDst,
        POD_FLAG_FAIL_CLOSED, PodPolicy, SockKey4, SockTuple4, Stat, Verdict, accel_candidate, agent_alive, decide_v4,
        is_loopback6, mapped_from_v4, strict_allows, v4_from_mapped,
    };

    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const IPPROTO_TCP: u32 = 6;
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

    #[inline(always)]
    fn is_agent() -> bool {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        match MESH_CONFIG.get(0) {
            Some(c) => c.agent_tgid != 0 && c.agent_tgid == tgid,
            None => false,
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

    /// Shared by connect4 and connect6 (v4-mapped): `Ok(Some)` the rewrite target, `Ok(None)`
    /// leave the connect alone, `Err` refuse it (fail-closed pod, no agent).
    #[inline(always)]
    fn redirect_v4(ctx: &SockAddrContext, dst_ip4: u32, dst_port: u16, flags: u16) -> Result<Option<PodPolicy>, ()> {
        let Some((pod_cgroup, policy)) = current_pod() else { return Ok(None) };
        if is_agent() {
            count(Stat::SkipAgent);
            return Ok(None);
        }
        count(Stat::MeshedConnects);
        if !agent_up() {
            if policy.flags & POD_FLAG_FAIL_CLOSED != 0 {
                count(Stat::AgentDownRefused);
                return Err(());
            }
            count(Stat::AgentDownDirect);
            return Ok(None);
        }
        let bypass_port = unsafe { BYPASS_PORTS.get(&u16::from_be(dst_port)) }.is_some();
        let bypass_cidr = BYPASS_CIDRS.get(&Key::new(32, dst_ip4.to_ne_bytes())).is_some();
        Ok(match decide_v4(&policy, dst_ip4, dst_port, bypass_port, bypass_cidr) {
            Verdict::Skip(reason) => {
                count(reason);
                None
            }
            Verdict::Redirect => {
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let orig = OrigDst { pod_cgroup, ip4: dst_ip4, port: dst_port, flags };
                if SOCK_ORIG.insert(&cookie, &orig, BPF_ANY as u64).is_err() {
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
        if closing {
            let _ = ACCEL_PATH.remove(&sockops_tuple(&ctx));
        }
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
        // The packet starts at its IPv4 header here. Cheap checks first: only a TCP SYN
        // (without ACK) costs a map lookup.
        let ver_ihl: u8 = ctx.load(0)?;
        if ver_ihl >> 4 != 4 || ctx.load::<u8>(9)? != IPPROTO_TCP as u8 {
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
        let Some(policy) = receiving_pod(ctx) else { return Ok(true) };
        let src: u32 = ctx.load(12)?;
        // No agent: clients connect directly, so strict mode must let them in (unless the
        // namespace fails closed).
        if strict_allows(&policy, src) || (!agent_up() && policy.flags & POD_FLAG_FAIL_CLOSED == 0) {
            return Ok(true);
        }
        count(Stat::StrictDropped);
        Ok(false)
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
