//! End to end: real eBPF programs, real agent, real pods (network namespaces + cgroups).
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;
use sim::{ClientReport, Node, Pod, Server, eventually, privileged};

const T: Duration = Duration::from_secs(30);

/// A node with a meshed client, a server, and an un-meshed client.
struct Setup {
    node: Node,
    client: Pod,
    server: Pod,
    plain: Pod,
    _echo: Server,
    _udp: Server,
}

fn setup() -> Result<Setup> {
    setup_with(|_| vec![])
}

/// The agent started with `agent_args(plain pod)`.
fn setup_with(agent_args: impl FnOnce(&Pod) -> Vec<String>) -> Result<Setup> {
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    node.set_namespace_meshed("legacy", false);
    let client = node.add_pod("client", "shop", None)?;
    let server = node.add_pod("server", "shop", None)?;
    let plain = node.add_pod("plain", "legacy", None)?;
    let echo = server.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?;
    let udp = server.serve(&["udp-server", "--listen", "0.0.0.0:5353"])?;
    let args = agent_args(&plain);
    node.start_agent(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    // The meshed pods are in the datapath before the test starts.
    eventually(Duration::from_secs(5), "pods meshed", || {
        let pods = node.admin_json("/debug/pods").ok()?;
        let n = pods.as_array()?.iter().filter(|p| p["redirected"] == true).count();
        (n == 2).then_some(())
    })?;
    Ok(Setup { node, client, server, plain, _echo: echo, _udp: udp })
}

fn server_addr(s: &Setup) -> String {
    format!("{}:8080", s.server.ip)
}

fn client_run(pod: &Pod, to: &str, extra: &[&str]) -> Result<ClientReport> {
    pod.client(to, extra, T)
}

fn events(node: &Node) -> Result<Value> {
    node.kernel_events()
}

#[test]
fn meshed_pod_is_redirected_through_the_proxy_and_sees_the_original_peer() -> Result<()> {
    if !privileged("meshed_pod_is_redirected") {
        return Ok(());
    }
    let s = setup()?;
    let r = client_run(&s.client, &server_addr(&s), &["--bytes", "100000"])?;
    assert_eq!(r.ok, 1, "{r}");
    assert_eq!(r.bytes_verified, 100000);
    // The application sees the server, not the proxy.
    assert_eq!(r.peer.as_deref(), Some(&*server_addr(&s)), "getpeername must show the original destination: {r}");

    let conns = s.node.admin_json("/debug/connections")?;
    let recent = conns["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 1, "{conns}");
    let c = &recent[0];
    assert_eq!(c["original_dst"], server_addr(&s));
    assert_eq!(c["source_pod"], "shop/client");
    assert_eq!(c["destination_pod"], "shop/server");
    assert_eq!(c["client"].as_str(), r.local.as_deref(), "the proxy saw the client's own address");
    assert_eq!(c["bytes_sent"], 100000);
    assert_eq!(c["bytes_received"], 100000);
    let ev = events(&s.node)?;
    assert_eq!(ev["redirected"], 1, "{ev}");
    assert!(ev["peername_restored"].as_u64().unwrap() >= 1, "{ev}");

    // An IPv6 socket to the v4-mapped address is redirected the same way.
    let mapped = format!("[::ffff:{}]:8080", s.server.ip);
    let r = client_run(&s.client, &mapped, &[])?;
    assert_eq!(r.ok, 1, "{r}");
    assert_eq!(r.peer.as_deref(), Some(&*mapped), "{r}");
    assert_eq!(s.node.proxied_total()?, 2);

    // Loopback stays inside the pod.
    let _local = s.client.serve(&["echo-server", "--listen", "127.0.0.1:9000"])?;
    let r = client_run(&s.client, "127.0.0.1:9000", &[])?;
    assert_eq!(r.ok, 1, "{r}");
    assert_eq!(s.node.proxied_total()?, 2, "loopback must not go through the proxy");

    // Metrics are served and count it.
    let m = s.node.admin_text("/metrics")?;
    assert!(m.contains("switchyard_outbound_connections_opened_total 2"), "{m}");
    assert!(m.contains("switchyard_ebpf_events_total{event=\"redirected\"} 2"), "{m}");
    Ok(())
}

#[test]
fn unmeshed_pod_goes_direct() -> Result<()> {
    if !privileged("unmeshed_pod_goes_direct") {
        return Ok(());
    }
    let s = setup()?;
    let r = client_run(&s.plain, &server_addr(&s), &["--count", "5"])?;
    assert_eq!(r.ok, 5, "{r}");
    assert_eq!(r.peer.as_deref(), Some(&*server_addr(&s)));
    assert_eq!(s.node.proxied_total()?, 0, "the proxy must see nothing");
    assert_eq!(events(&s.node)?["meshed_connects"], 0);
    Ok(())
}

#[test]
fn pods_are_meshed_and_unmeshed_at_runtime_within_a_second() -> Result<()> {
    if !privileged("pods_are_meshed_and_unmeshed_at_runtime") {
        return Ok(());
    }
    let mut s = setup()?;
    let to = server_addr(&s);
    let proxied = |s: &Setup| -> Result<bool> {
        let before = s.node.proxied_total()?;
        let r = client_run(&s.client, &to, &[])?;
        anyhow::ensure!(r.ok == 1, "connection failed: {r}");
        // The proxy records a connection when it ends; give it a moment.
        std::thread::sleep(Duration::from_millis(20));
        Ok(s.node.proxied_total()? > before)
    };
    assert!(proxied(&s)?, "meshed at start");

    // Remove the namespace's annotation: the pod leaves the mesh without a restart.
    s.node.set_namespace_meshed("shop", false);
    let t0 = Instant::now();
    s.node.write_workloads()?;
    eventually(Duration::from_secs(1), "unmeshed", || (!proxied(&s).ok()?).then_some(()))?;
    let unmesh_after = t0.elapsed();

    // And back.
    s.node.set_namespace_meshed("shop", true);
    let t0 = Instant::now();
    s.node.write_workloads()?;
    eventually(Duration::from_secs(1), "meshed again", || proxied(&s).ok()?.then_some(()))?;
    let mesh_after = t0.elapsed();

    // A pod-level opt-out wins over the namespace.
    s.node.pods.iter_mut().find(|p| p.name == "client").unwrap().annotation = Some("disabled".into());
    s.node.write_workloads()?;
    eventually(Duration::from_secs(1), "pod opted out", || (!proxied(&s).ok()?).then_some(()))?;
    eprintln!("unmeshed after {unmesh_after:?}, meshed again after {mesh_after:?}");

    // A malformed edit is rejected and changes nothing.
    std::fs::write(s.node.workload_file(), "pods: [ {name: x")?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(!proxied(&s)?);
    assert!(s.node.agent_log().contains("workload file rejected"), "{}", s.node.agent_log());
    Ok(())
}

#[test]
fn ten_thousand_sequential_and_500_concurrent_connections_leave_nothing_behind() -> Result<()> {
    if !privileged("ten_thousand_connections") {
        return Ok(());
    }
    let s = setup()?;
    let to = server_addr(&s);
    // Warm up so lazily created fds (epoll, runtime) exist before the baseline.
    client_run(&s.client, &to, &["--count", "10"])?;
    let fds_before = s.node.agent_fds()?;

    let r = s.client.client(&to, &["--count", "10000", "--bytes", "512"], Duration::from_secs(300))?;
    assert_eq!(r.ok, 10000, "{r}");
    assert_eq!(r.bytes_verified, 10000 * 512);
    let r = s.client.client(
        &to,
        &["--count", "500", "--concurrency", "500", "--hold", "--bytes", "4096"],
        Duration::from_secs(120),
    )?;
    assert_eq!(r.ok, 500, "{r}");
    assert_eq!(r.bytes_verified, 500 * 4096);

    eventually(Duration::from_secs(10), "every connection recorded and every map entry removed", || {
        let dp = s.node.admin_json("/debug/datapath").ok()?;
        let maps = &dp["maps"];
        let done = s.node.proxied_total().ok()? == 10010 + 500;
        // The acceleration maps too, when the suite runs with acceleration on.
        let accel_empty = maps["accel_sockets"] == 0 && maps["accel_paths"] == 0;
        (done && maps["orig_by_client"] == 0 && maps["sock_orig"] == 0 && accel_empty).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}: {}", s.node.admin_json("/debug/datapath").unwrap_or_default()))?;
    let ev = events(&s.node)?;
    assert_eq!(ev["redirected"], 10510, "{ev}");
    assert_eq!(ev["map_full"], 0);
    assert_eq!(ev["accel_map_full"], 0);
    if sim::sockmap_mode() == Some("on") {
        // Two legs per connection, both ends of each in the map.
        assert_eq!(ev["accel_sockets"].as_u64(), Some(4 * 10510), "{ev}");
    }
    eventually(Duration::from_secs(10), "agent fds back to baseline", || {
        (s.node.agent_fds().ok()? <= fds_before).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}: before {fds_before}, now {:?}", s.node.agent_fds()))?;
    assert_eq!(s.node.admin_json("/debug/connections")?["active"].as_array().unwrap().len(), 0);
    Ok(())
}

#[test]
fn udp_from_a_meshed_pod_is_untouched() -> Result<()> {
    if !privileged("udp_untouched") {
        return Ok(());
    }
    let s = setup()?;
    let to = format!("{}:5353", s.server.ip);
    for mode in [&[][..], &["--sendto"][..]] {
        let mut args = vec!["udp-query", "--to", &to];
        args.extend_from_slice(mode);
        let r = s.client.workload(&args, T)?;
        assert_eq!(r["ok"], true, "{mode:?}: {r}");
        assert_eq!(r["from"], to.as_str(), "{mode:?}: {r}");
    }
    let ev = events(&s.node)?;
    assert_eq!(ev["meshed_connects"], 0, "UDP must not even be considered: {ev}");
    assert_eq!(s.node.proxied_total()?, 0);
    Ok(())
}

#[test]
fn stopped_agent_leaves_no_program_attached_and_traffic_goes_direct() -> Result<()> {
    if !privileged("stopped_agent") {
        return Ok(());
    }
    let mut s = setup()?;
    let to = server_addr(&s);
    assert_eq!(s.node.attached_programs()?.len(), 7, "seven programs attached while running");
    assert_eq!(client_run(&s.client, &to, &[])?.ok, 1);

    let clean = s.node.stop_agent(Duration::from_secs(10))?;
    assert!(clean, "agent must exit 0 on SIGTERM:\n{}", s.node.agent_log());
    assert!(s.node.agent_log().contains("agent stopped"), "{}", s.node.agent_log());
    assert_eq!(s.node.attached_programs()?, Vec::<u32>::new(), "no program may stay attached");

    // New connections go direct and complete (no hang: the client has a deadline).
    let r = client_run(&s.client, &to, &["--count", "20", "--timeout-ms", "3000"])?;
    assert_eq!(r.ok, 20, "{r}");
    assert_eq!(r.peer.as_deref(), Some(&*to));
    Ok(())
}

#[test]
fn killed_agent_detaches_too() -> Result<()> {
    if !privileged("killed_agent") {
        return Ok(());
    }
    let s = setup()?;
    let pid = s.node.agent_pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // bpf_links die with the process that owns them.
    eventually(Duration::from_secs(5), "programs detached after SIGKILL", || {
        s.node.attached_programs().ok()?.is_empty().then_some(())
    })?;
    let r = client_run(&s.client, &server_addr(&s), &["--timeout-ms", "3000"])?;
    assert_eq!(r.ok, 1, "{r}");
    Ok(())
}

#[test]
fn agent_refuses_the_cgroup2_root_and_bad_config() -> Result<()> {
    if !privileged("agent_refuses_bad_config") {
        return Ok(());
    }
    let agent = sim::bin_path("mesh-agent")?;
    let mount = sim::cgroup2_mount()?;
    let out = std::process::Command::new(&agent)
        .args(["run", "--node-name", "x", "--redirect-address", "10.0.0.1", "--cgroup-root"])
        .arg(&mount)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to attach to the cgroup2 root"), "{err}");
    assert_eq!(sim::attached_programs(&mount)?.len(), 0, "nothing may ever attach to the root");
    Ok(())
}

#[test]
fn bypass_ports_and_cidrs_go_direct() -> Result<()> {
    if !privileged("bypass_lists") {
        return Ok(());
    }
    // Bypass the un-meshed pod by CIDR, and port 9090 everywhere.
    let s = setup_with(|plain| {
        vec!["--bypass-port".into(), "9090".into(), "--bypass-cidr".into(), format!("{}/32", plain.ip)]
    })?;
    let _other_port = s.server.serve(&["echo-server", "--listen", "0.0.0.0:9090"])?;
    let _plain_srv = s.plain.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?;
    for to in [format!("{}:9090", s.server.ip), format!("{}:8080", s.plain.ip)] {
        let r = client_run(&s.client, &to, &[])?;
        assert_eq!(r.ok, 1, "{to}: {r}");
        assert_eq!(r.peer.as_deref(), Some(to.as_str()));
    }
    assert_eq!(s.node.proxied_total()?, 0, "bypassed destinations go direct");
    let ev = events(&s.node)?;
    assert_eq!(ev["skip_bypass_port"], 1, "{ev}");
    assert_eq!(ev["skip_bypass_cidr"], 1, "{ev}");
    // Everything else still goes through the proxy.
    assert_eq!(client_run(&s.client, &server_addr(&s), &[])?.ok, 1);
    assert_eq!(s.node.proxied_total()?, 1);
    Ok(())
}

#[test]
fn a_full_map_means_not_redirected_and_counted_never_a_failed_connect() -> Result<()> {
    if !privileged("full_map") {
        return Ok(());
    }
    // Room for 4 redirected connections at once; open 7 at the same moment.
    let s = setup_with(|_| vec!["--max-redirected-sockets".into(), "4".into()])?;
    let to = server_addr(&s);
    let r = client_run(&s.client, &to, &["--count", "7", "--concurrency", "7", "--hold", "--timeout-ms", "5000"])?;
    assert_eq!(r.ok, 7, "every connection succeeds, redirected or not: {r}");
    let ev = events(&s.node)?;
    assert_eq!(ev["redirected"], 4, "{ev}");
    assert_eq!(ev["map_full"], 3, "{ev}");
    eventually(Duration::from_secs(5), "proxy saw exactly the 4", || {
        (s.node.proxied_total().ok()? == 4).then_some(())
    })?;
    // Once those close, there is room again.
    eventually(Duration::from_secs(5), "map drained", || {
        (s.node.admin_json("/debug/datapath").ok()?["maps"]["sock_orig"] == 0).then_some(())
    })?;
    assert_eq!(client_run(&s.client, &to, &[])?.ok, 1);
    assert_eq!(events(&s.node)?["redirected"], 5);
    Ok(())
}

#[test]
fn idle_proxied_connections_are_closed_after_the_idle_timeout() -> Result<()> {
    if !privileged("idle_timeout") {
        return Ok(());
    }
    let s = setup_with(|_| vec!["--tcp-idle-timeout-secs".into(), "1".into()])?;
    // One connection opened and left silent.
    let holder = s.client.hold(&server_addr(&s), 1, 15)?;
    let closed = eventually(Duration::from_secs(6), "the idle connection closed by the proxy", || {
        let c = s.node.admin_json("/debug/connections").ok()?;
        let rec = c["recent"].as_array()?.iter().find(|r| r["original_dst"] == server_addr(&s))?.clone();
        (c["active"].as_array()?.is_empty()).then_some(rec)
    });
    drop(holder);
    let rec = closed?;
    assert!(rec["error"].as_str().is_some_and(|e| e.contains("idle timeout")), "{rec}");
    // New connections are unaffected (that activity keeps a connection open is unit-tested in
    // mesh-agent's proxy::idle).
    let r = client_run(&s.client, &server_addr(&s), &["--bytes", "1000"])?;
    assert_eq!(r.ok, 1, "{r}");
    Ok(())
}

#[test]
fn a_full_map_refuses_a_fail_closed_pods_connect_rather_than_sending_it_direct() -> Result<()> {
    if !privileged("full_map_fail_closed") {
        return Ok(());
    }
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    node.set_namespace_meshed("vault", true);
    node.fail_closed.push("vault".into());
    let open = node.add_pod("open", "shop", None)?;
    let closed = node.add_pod("closed", "vault", None)?;
    let server = node.add_pod("server", "shop", None)?;
    let _echo = server.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?;
    node.start_agent(&["--max-redirected-sockets", "2"])?;
    node.wait_meshed()?;
    let to = format!("{}:8080", server.ip);
    // Two held connections fill the map.
    let _held = open.hold(&to, 2, 30)?;
    let r = client_run(&open, &to, &[])?;
    assert_eq!(r.ok, 1, "a fail-open pod goes direct on a full map: {r}");
    let r = client_run(&closed, &to, &["--timeout-ms", "2000"])?;
    assert_eq!(r.ok, 0, "a fail-closed pod never goes direct: {r}");
    assert!(r.errors.iter().any(|e| e.contains("not permitted")), "refused by the connect hook (EPERM): {r}");
    let ev = events(&node)?;
    assert_eq!(ev["map_full_refused"], 1, "{ev}");
    assert!(ev["map_full"].as_u64().unwrap_or(0) >= 1, "{ev}");
    Ok(())
}

#[test]
fn a_redirected_connect_that_fails_before_its_syn_leaves_no_record() -> Result<()> {
    if !privileged("failed_connect_reclaimed") {
        return Ok(());
    }
    let s = setup()?;
    // The client pod can no longer route to the proxy address: each redirected connect fails
    // in its route lookup, after the connect hook recorded it and before any SYN.
    let gateway = s.node.gateway.to_string();
    let route = |op: &str| -> Result<()> {
        let out = std::process::Command::new("ip")
            .args(["-n", &s.client.netns, "route", op, "prohibit", &format!("{gateway}/32")])
            .output()?;
        anyhow::ensure!(out.status.success(), "ip route {op}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    route("add")?;
    let r = client_run(&s.client, &server_addr(&s), &["--count", "5", "--timeout-ms", "1000"])?;
    assert_eq!(r.ok, 0, "{r}");
    let ev = eventually(Duration::from_secs(5), "the failed connects' records reclaimed", || {
        let dp = s.node.admin_json("/debug/datapath").ok()?;
        (dp["maps"]["sock_orig"] == 0 && dp["events"]["reclaimed"] == 5).then_some(dp["events"].clone())
    })?;
    assert_eq!(ev["redirected"], 5, "{ev}");
    assert_eq!(ev["established"], 0, "{ev}");
    route("del")?;
    assert_eq!(client_run(&s.client, &server_addr(&s), &[])?.ok, 1);
    Ok(())
}
