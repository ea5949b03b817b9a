//! `mesh-agent check`: does this kernel have what the agent needs? One line per requirement,
//! with what to do when it is missing.
use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

pub fn run() -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |name, ok, detail: String| out.push(Check { name, ok, detail });

    let caps = effective_caps();
    let has = |bit: u32| caps.is_some_and(|c| c & (1u64 << bit) != 0);
    // CAP_BPF (39) + CAP_NET_ADMIN (12) suffice on 5.8+; CAP_SYS_ADMIN (21) covers both.
    let caps_ok = has(21) || (has(39) && has(12));
    push(
        "privileges",
        caps_ok,
        if caps_ok {
            "CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN) present".into()
        } else {
            "missing CAP_BPF+CAP_NET_ADMIN or CAP_SYS_ADMIN: run as root or grant them in the DaemonSet securityContext"
                .into()
        },
    );

    let kv = aya::util::KernelVersion::current();
    let kv_ok = kv.as_ref().is_ok_and(|v| *v >= aya::util::KernelVersion::new(5, 8, 0));
    push(
        "kernel version",
        kv_ok,
        match kv {
            Ok(v) => {
                format!("{v:?}{}", if kv_ok { "" } else { ": need 5.8 or newer (cgroup getpeername hooks, bpf_link)" })
            }
            Err(e) => format!("cannot read the kernel version: {e}"),
        },
    );

    match crate::cgroup::cgroup2_mount() {
        Ok(m) => push("cgroup v2", true, format!("mounted at {}", m.display())),
        Err(e) => push("cgroup v2", false, e.to_string()),
    }

    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    push(
        "kernel BTF",
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux present".into()
        } else {
            "/sys/kernel/btf/vmlinux missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y".into()
        },
    );

    for (name, ty) in [
        ("program type cgroup_sock_addr", ProgramType::CgroupSockAddr),
        ("program type sock_ops", ProgramType::SockOps),
        ("program type cgroup_sock", ProgramType::CgroupSock),
    ] {
        match is_program_supported(ty) {
            Ok(true) => push(name, true, "supported".into()),
            Ok(false) => push(name, false, "not supported by this kernel (needs CONFIG_CGROUP_BPF=y)".into()),
            Err(e) => push(name, false, format!("cannot probe (BPF syscall denied?): {e}")),
        }
    }
    for (name, ty) in [
        ("map type hash", MapType::Hash),
        ("map type lpm_trie", MapType::LpmTrie),
        ("map type percpu_array", MapType::PerCpuArray),
    ] {
        match is_map_supported(ty) {
            Ok(true) => push(name, true, "supported".into()),
            Ok(false) => push(name, false, "not supported by this kernel".into()),
            Err(e) => push(name, false, format!("cannot probe (BPF syscall denied?): {e}")),
        }
    }

    // The definitive test: the kernel's verifier accepts the agent's own programs.
    match crate::datapath::verify_programs() {
        Ok(()) => push("verifier", true, "all Switchyard programs load".into()),
        Err(e) => push("verifier", false, e.to_string()),
    }
    // Optional: without it the agent runs, only without same-node acceleration.
    match crate::datapath::probe_accel() {
        Ok(()) => push("same-node acceleration", true, "sockhash and sk_msg load and attach".into()),
        Err(e) => {
            push("same-node acceleration", true, format!("unavailable (optional; the agent runs without it): {e}"))
        }
    }
    out
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}
