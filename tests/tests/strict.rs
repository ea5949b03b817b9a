//! Strict mode holds on a real node: a strict pod admits the agent's own connections (also with
//! the agent in a PID namespace of its own, as in a container), its loopback and the kubelet's
//! probe ports, and nothing else: not another process on the node, not a plaintext client, not
//! IPv6, and not while no agent runs.
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use sim::{ClientReport, Node, Pod, Server, eventually, privileged};

const T: Duration = Duration::from_secs(30);
/// A dropped SYN is retried by the client's kernel; the client gives up after this.
const QUICK: [&str; 2] = ["--timeout-ms", "1500"];
const PROBE_PORT: u16 = 8081;

struct Setup {
    node: Node,
    /// Meshed, permissive.
    client: Pod,
    /// Meshed, strict, serving 8080 and the probe port.
    db: Pod,
    /// Meshed, permissive, serving 8080.
    web: Pod,
    /// Not meshed.
    legacy: Pod,
    _servers: Vec<Server>,
}

/// A node with a strict pod `db` (probe port 8081), a permissive meshed pod `web`, a meshed
/// client and an unmeshed one; the agent started with `agent_args`, after `prepare(node)`.
fn setup(prepare: impl FnOnce(&mut Node) -> Result<()>, agent_args: &[&str]) -> Result<Setup> {
    let mut node = Node::new("node")?;
    prepare(&mut node)?;
    node.set_namespace_meshed("shop", true);
    node.set_namespace_meshed("vault", true);
    node.mtls_modes.push(("vault".into(), "strict".into()));
    node.set_namespace_meshed("legacy", false);
    let client = node.add_pod("client", "shop", None)?;
    let db = node.add_pod("db", "vault", None)?;
    let web = node.add_pod("web", "shop", None)?;
    let legacy = node.add_pod("legacy", "legacy", None)?;
    node.set_probe_ports("db", &[PROBE_PORT]);
    // Dual-stack listeners: the IPv6 test reaches them on their IPv6 addresses too.
    let servers = vec![
        db.serve(&["echo-server", "--listen", "[::]:8080"])?,
        db.serve(&["echo-server", "--listen", &format!("[::]:{PROBE_PORT}")])?,
        web.serve(&["echo-server", "--listen", "[::]:8080"])?,
    ];
    node.start_agent(agent_args)?;
    node.wait_meshed()?;
    Ok(Setup { node, client, db, web, legacy, _servers: servers })
}

fn strict_dropped(node: &Node) -> Result<u64> {
    Ok(node.kernel_events()?["strict_dropped"].as_u64().unwrap_or(0))
}

fn events(node: &Node) -> Result<Value> {
    node.kernel_events()
}

fn refused(r: &ClientReport) -> bool {
    r.ok == 0 && r.failed >= 1
}

#[test]
fn strict_pods_admit_the_agents_connections_and_probes_only_with_the_agent_in_its_own_pid_namespace() -> Result<()> {
    if !privileged("strict_admits_the_agent_only") {
        return Ok(());
    }
    // The agent as a container runs it: PID 1 of a PID namespace of its own, so its getpid()
    // is not the PID the kernel sees. (--kill-child: SIGTERM reaches the agent when the
    // harness stops unshare.)
    let s = setup(
        |node| {
            node.agent_command.wrapper =
                ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"].map(String::from).to_vec();
            Ok(())
        },
        &[],
    )?;
    let db = format!("{}:8080", s.db.ip);
    let probe = format!("{}:{PROBE_PORT}", s.db.ip);

    // Through the agent: its connection to db is registered before its SYN, so db admits it.
    let before = s.node.proxied_total()?;
    let r = s.client.client(&db, &["--bytes", "10000"], T)?;
    assert_eq!(r.ok, 1, "a meshed client reaches the strict pod through the agent: {r}");
    assert_eq!(r.bytes_verified, 10000, "{r}");
    assert_eq!(s.node.proxied_total()? - before, 1, "it went through the proxy");
    let ev = events(&s.node)?;
    assert!(ev["agent_connections"].as_u64().unwrap_or(0) >= 1, "the agent's connection was registered: {ev}");
    assert!(ev["skip_agent"].as_u64().unwrap_or(0) >= 1, "the agent was recognised in its PID namespace: {ev}");

    // Another process on the node, from the node's own address: dropped.
    let d0 = strict_dropped(&s.node)?;
    let r = s.node.host_client(&db, &QUICK, T)?;
    assert!(refused(&r), "a host process must not reach a strict pod: {r}");
    assert!(strict_dropped(&s.node)? > d0, "its SYN was dropped in the kernel");
    // ... except on the pod's probe port: the kubelet's probes.
    let r = s.node.host_client(&probe, &QUICK, T)?;
    assert_eq!(r.ok, 1, "the kubelet probes the probe port from the node: {r}");

    // A plaintext client: neither the service port nor the probe port.
    let d1 = strict_dropped(&s.node)?;
    assert!(refused(&s.legacy.client(&db, &QUICK, T)?), "plaintext to a strict pod");
    assert!(refused(&s.legacy.client(&probe, &QUICK, T)?), "the probe port is the node's only");
    assert!(strict_dropped(&s.node)? >= d1 + 2);
    // A permissive pod still admits all of them.
    let web = format!("{}:8080", s.web.ip);
    assert_eq!(s.legacy.client(&web, &QUICK, T)?.ok, 1);
    assert_eq!(s.node.host_client(&web, &QUICK, T)?.ok, 1);
    // The agent's connections are forgotten when they close.
    eventually(Duration::from_secs(5), "agent connections released", || {
        (s.node.admin_json("/debug/datapath").ok()?["maps"]["agent_connections"] == 0).then_some(())
    })?;
    Ok(())
}

#[test]
fn ipv6_syns_to_a_strict_pod_are_dropped() -> Result<()> {
    if !privileged("strict_ipv6") {
        return Ok(());
    }
    let s = setup(|_| Ok(()), &[])?;
    let subnet = s.node.subnet();
    let v6 = |pod: &Pod, host: u8| -> Result<String> {
        let addr = format!("fd00:{subnet}::{host}");
        let out = std::process::Command::new("ip")
            .args(["-n", &pod.netns, "-6", "addr", "add", &format!("{addr}/64"), "dev", "eth0", "nodad"])
            .output()?;
        anyhow::ensure!(out.status.success(), "ip -6 addr add: {}", String::from_utf8_lossy(&out.stderr));
        Ok(addr)
    };
    let db = v6(&s.db, 20)?;
    let web = v6(&s.web, 30)?;
    v6(&s.legacy, 40)?;
    // IPv6 works between these pods: the permissive one answers.
    let r = eventually(Duration::from_secs(5), "IPv6 between pods", || {
        let r = s.legacy.client(&format!("[{web}]:8080"), &QUICK, T).ok()?;
        (r.ok == 1).then_some(r)
    })?;
    eprintln!("IPv6 to a permissive pod: {r}");
    let d0 = strict_dropped(&s.node)?;
    let r = s.legacy.client(&format!("[{db}]:8080"), &QUICK, T)?;
    assert!(refused(&r), "IPv6 plaintext to a strict pod: {r}");
    assert!(strict_dropped(&s.node)? > d0, "dropped in the kernel");
    // The strict pod's own IPv6 loopback still works.
    assert_eq!(s.db.client("[::1]:8080", &QUICK, T)?.ok, 1);
    Ok(())
}

#[test]
fn strict_pods_keep_dropping_plaintext_while_no_agent_runs() -> Result<()> {
    if !privileged("strict_without_agent") {
        return Ok(());
    }
    let s = setup(
        |node| {
            node.pin_programs()?;
            Ok(())
        },
        &[],
    )?;
    let mut node = s.node;
    let db = format!("{}:8080", s.db.ip);
    let web = format!("{}:8080", s.web.ip);
    assert!(refused(&s.legacy.client(&db, &QUICK, T)?));

    assert!(node.stop_agent(Duration::from_secs(10))?, "clean exit");
    assert_eq!(node.attached_programs()?.len(), 7, "the programs stay (pinned)");
    let r = s.legacy.client(&db, &QUICK, T)?;
    assert!(refused(&r), "stopped agent: strict still drops plaintext: {r}");
    assert!(refused(&node.host_client(&db, &QUICK, T)?), "and the node's other processes");
    // Fail-open is for outbound capture: the meshed client connects directly, to a permissive
    // pod; the strict pod admits no direct connection.
    assert_eq!(s.client.client(&web, &QUICK, T)?.ok, 1, "fail-open outbound");
    assert!(refused(&s.client.client(&db, &QUICK, T)?), "no plaintext way into a strict pod");
    assert_eq!(node.host_client(&format!("{}:{PROBE_PORT}", s.db.ip), &QUICK, T)?.ok, 1, "probes still pass");

    // A crash, past the heartbeat timeout: the same.
    node.start_agent(&[])?;
    node.wait_meshed()?;
    assert_eq!(s.client.client(&db, &QUICK, T)?.ok, 1, "through the new agent");
    node.kill_agent();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(refused(&s.legacy.client(&db, &QUICK, T)?), "crashed agent: strict still drops plaintext");
    assert!(refused(&s.client.client(&db, &QUICK, T)?), "crashed agent: no direct way in");
    // Back: through the agent again.
    node.start_agent(&[])?;
    node.wait_meshed()?;
    assert_eq!(s.client.client(&db, &QUICK, T)?.ok, 1);
    Ok(())
}
