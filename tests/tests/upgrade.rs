//! End to end: agent upgrade with hand-over (pinned eBPF state, shared listeners) and what
//! pods get while no agent serves (fail-open / fail-closed per namespace). Real agents, real
//! eBPF, a bpffs of the node's own.
use std::time::Duration;

use anyhow::{Result, anyhow};
use serde_json::Value;
use sim::{Node, Pod, eventually, privileged, service};

const T: Duration = Duration::from_secs(60);

fn load(pod: &Pod, url: &str, args: &[&str]) -> Result<Value> {
    let mut a = vec!["load", "--url", url];
    a.extend_from_slice(args);
    pod.http(&a, T)
}

fn failed(r: &Value) -> u64 {
    r["total"].as_u64().unwrap_or(0) - r["ok"].as_u64().unwrap_or(0)
}

/// Item 6 with hand-over: a new agent starts beside the running one, takes its eBPF links
/// (BPF_LINK_UPDATE) and shares its listeners (SO_REUSEPORT), then the old one drains and
/// exits. A Service address only works through the proxy, so any gap would fail requests to it.
#[test]
fn an_upgrade_hands_over_without_failing_a_new_connection_and_services_stay_reachable() -> Result<()> {
    if !privileged("an_upgrade_hands_over") {
        return Ok(());
    }
    let mut node = Node::new("node")?;
    node.pin_programs()?;
    node.set_namespace_meshed("shop", true);
    // Strict: web-0 admits only the agents' own connections, so the old agent's deliveries
    // while it drains must still be recognised as an agent's after the new one took over.
    node.mtls_modes.push(("shop".into(), "strict".into()));
    let client = node.add_pod("client", "shop", None)?;
    let web = node.add_pod("web-0", "shop", None)?;
    let _srv = web.serve_tool("sim-http", &["serve", "--listen", "0.0.0.0:8080", "--name", "web-0"])?;
    node.services = vec![service("web", "shop", "10.96.0.10:80".parse()?, "http", 8080, &[web.ip], &[])];
    // Each agent has an admin socket of its own (the chart's exec probes use it): the admin
    // port is shared by both agents during the hand-over, the socket is not.
    let (old_sock, new_sock) = (node.dir.join("admin-old.sock"), node.dir.join("admin-new.sock"));
    let (old_sock_s, new_sock_s) = (old_sock.to_string_lossy().into_owned(), new_sock.to_string_lossy().into_owned());
    node.start_agent(&["--admin-socket", &old_sock_s])?;
    eventually(Duration::from_secs(5), "pods meshed", || {
        let pods = node.admin_json("/debug/pods").ok()?;
        (pods.as_array()?.iter().filter(|p| p["redirected"] == true).count() == 2).then_some(())
    })?;
    assert_eq!(probe(&old_sock, "readyz")?, (true, "ready".to_string()), "the running agent answers its probe");
    let programs_before = node.attached_programs()?;
    assert_eq!(programs_before.len(), 7);

    let pod_url = format!("http://{}:8080/", web.ip);
    assert!(node.admin_json("/debug/datapath")?["pinned"] == true);
    let run = |url: String, args: &'static [&'static str]| {
        let c = client.clone();
        std::thread::spawn(move || {
            let mut a = vec!["--duration-ms", "10000", "--interval-ms", "5"];
            a.extend_from_slice(args);
            load(&c, &url, &a)
        })
    };
    let svc_fresh = run("http://10.96.0.10/".into(), &["--concurrency", "2", "--new-connection"]);
    let pod_fresh = run(pod_url, &["--concurrency", "2", "--new-connection"]);
    let svc_kept = run("http://10.96.0.10/".into(), &["--concurrency", "4"]);
    // HTTP/2 (prior knowledge) kept-alive: the old agent says GOAWAY, clients move over.
    let svc_h2 = run("http://10.96.0.10/".into(), &["--concurrency", "2", "--h2"]);
    // HTTP to a pod IP is opaque TCP to the proxy: those connections cannot move.
    let pod_kept = run(format!("http://{}:8080/", web.ip), &["--concurrency", "4"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (ready, exited) = node.upgrade_agent(&["--admin-socket", &new_sock_s])?;
    let programs_after = node.attached_programs()?;
    let join = |h: std::thread::JoinHandle<Result<Value>>| h.join().map_err(|_| anyhow!("load panicked"))?;
    let (svc_fresh, pod_fresh, svc_kept, pod_kept, svc_h2) =
        (join(svc_fresh)?, join(pod_fresh)?, join(svc_kept)?, join(pod_kept)?, join(svc_h2)?);
    eprintln!(
        "upgrade: new agent ready {ready:?} after it started; old one exited {exited:?} after SIGTERM\n\
         Service, new connection per request: {svc_fresh}\npod IP, new connection per request: {pod_fresh}\n\
         Service, kept-alive connections: {svc_kept}\npod IP (opaque TCP), kept-alive connections: {pod_kept}\n\
         Service, HTTP/2 kept-alive connections: {svc_h2}"
    );
    let warnings = || -> String {
        node.agent_log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(80)
            .collect::<Vec<_>>()
            .join("\n")
    };
    if [&svc_fresh, &pod_fresh, &svc_kept, &svc_h2].iter().any(|r| failed(r) > 0) {
        eprintln!("agent warnings:\n{}", warnings());
    }
    // HTTP/2: the old agent's GOAWAY lets streams in flight finish and sends new ones to a new
    // connection (through the new agent): none fails.
    assert!(svc_h2["ok"].as_u64().unwrap() > 300, "{svc_h2}");
    assert_eq!(failed(&svc_h2), 0, "no HTTP/2 request failed: {svc_h2}");
    assert!(svc_h2["reconnects"].as_u64().unwrap() >= 1, "the clients were told to move (GOAWAY): {svc_h2}");
    for r in [&svc_fresh, &pod_fresh] {
        assert!(r["total"].as_u64().unwrap() > 300, "{r}");
        assert_eq!(failed(r), 0, "no request on a new connection failed: {r}");
    }
    assert!(svc_kept["ok"].as_u64().unwrap() > 500, "{svc_kept}");
    // Told `Connection: close` while the old agent drains, clients reconnect (to the new
    // one) between requests: no request is lost.
    assert_eq!(failed(&svc_kept), 0, "no request on a kept-alive connection failed: {svc_kept}");
    // Opaque TCP through the old agent runs until its drain grace (5 s) ends, then is cut:
    // at most one failed request per connection, and the clients reconnect to the new agent.
    assert!(failed(&pod_kept) <= 4, "{pod_kept}");
    assert!(exited >= Duration::from_secs(4), "the old agent drained its TCP connections: {exited:?}");
    // The links were switched to the new programs, not doubled.
    assert_eq!(programs_after.len(), 7, "{programs_after:?}");
    assert!(programs_after.iter().all(|p| !programs_before.contains(p)), "{programs_before:?} → {programs_after:?}");
    let dp = node.admin_json("/debug/datapath")?;
    assert_eq!((dp["pinned"].as_bool(), dp["superseded"].as_bool()), (Some(true), Some(false)), "{dp}");
    // Both agents log to one file; ANSI colours aside, the new one says it took all seven over.
    let log = node.agent_log().replace("\u{1b}[0m", "").replace("\u{1b}[2m", "").replace("\u{1b}[3m", "");
    assert!(log.contains("taken_over_from_previous_agent=7"), "{log}");
    assert!(log.contains("a newer agent has taken the eBPF programs and listeners over"), "{log}");
    // The new pod's probes reach the new agent; the old pod's reach nothing once its agent
    // is gone (its socket removed), though the shared admin port still answers.
    assert_eq!(probe(&new_sock, "readyz")?, (true, "ready".to_string()));
    assert_eq!(probe(&new_sock, "healthz")?, (true, "ok".to_string()));
    let (ok, out) = probe(&old_sock, "healthz")?;
    assert!(!ok && out.contains("cannot reach this agent's admin socket"), "{out}");
    assert_eq!(sim::http_get(&node.netns, node.admin_addr(), "/readyz")?.0, 200);
    Ok(())
}

/// `mesh-agent probe WHAT --socket PATH`, as the kubelet runs it: (exit 0, stdout or stderr).
fn probe(socket: &std::path::Path, what: &str) -> Result<(bool, String)> {
    let out = std::process::Command::new(sim::bin_path("mesh-agent")?)
        .args(["probe", what, "--socket"])
        .arg(socket)
        .output()?;
    let text = if out.status.success() { out.stdout } else { out.stderr };
    Ok((out.status.success(), String::from_utf8_lossy(&text).trim().to_string()))
}

fn connect(pod: &Pod, to: &str) -> Result<Value> {
    pod.workload(&["client", "--connect", to, "--timeout-ms", "2000"], T)
}

/// While no agent serves the node, a fail-open namespace's pods connect directly and a
/// fail-closed namespace's pods are refused: after a clean stop at once, after a crash within
/// the heartbeat timeout (2 s). The programs stay attached (pinned) for that.
#[test]
fn without_an_agent_fail_open_namespaces_connect_directly_and_fail_closed_ones_are_refused() -> Result<()> {
    if !privileged("without_an_agent_fail_open") {
        return Ok(());
    }
    let mut node = Node::new("node")?;
    node.pin_programs()?;
    node.set_namespace_meshed("open", true);
    node.set_namespace_meshed("closed", true);
    node.fail_closed.push("closed".into());
    let open = node.add_pod("open-client", "open", None)?;
    let closed = node.add_pod("closed-client", "closed", None)?;
    let server = node.add_pod("server", "open", None)?;
    let _echo = server.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?;
    let to = format!("{}:8080", server.ip);
    node.start_agent(&[])?;
    eventually(Duration::from_secs(5), "pods meshed", || {
        let pods = node.admin_json("/debug/pods").ok()?;
        (pods.as_array()?.iter().filter(|p| p["redirected"] == true).count() == 3).then_some(())
    })?;
    let both_through_the_proxy = |node: &Node| -> Result<()> {
        let before = node.proxied_total()?;
        assert_eq!(connect(&open, &to)?["ok"], 1);
        assert_eq!(connect(&closed, &to)?["ok"], 1);
        assert_eq!(node.proxied_total()? - before, 2, "both went through the proxy");
        Ok(())
    };
    both_through_the_proxy(&node)?;

    assert!(node.stop_agent(Duration::from_secs(10))?, "clean exit");
    assert_eq!(node.attached_programs()?.len(), 7, "the programs stay (pinned)");
    let o = connect(&open, &to)?;
    let c = connect(&closed, &to)?;
    eprintln!("agent stopped: fail-open pod {o}; fail-closed pod {c}");
    assert_eq!(o["ok"], 1, "fail-open: direct: {o}");
    assert_eq!(c["ok"], 0, "fail-closed: refused: {c}");
    assert!(c["errors"].to_string().contains("not permitted"), "refused by the connect hook (EPERM): {c}");

    node.start_agent(&[])?;
    both_through_the_proxy(&node)?;

    // A crash: until the heartbeat is 2 s stale the programs still redirect, to a listener that
    // is gone (connection refused); then each namespace gets its fail mode.
    node.kill_agent();
    let t = std::time::Instant::now();
    let (o, c) = eventually(Duration::from_secs(5), "the crash noticed", || {
        let o = connect(&open, &to).ok()?;
        let c = connect(&closed, &to).ok()?;
        (o["ok"] == 1 && c["errors"].to_string().contains("not permitted")).then_some((o, c))
    })?;
    let noticed = t.elapsed();
    eprintln!("agent killed: fail modes in force after {noticed:?}; fail-open pod {o}; fail-closed pod {c}");
    assert!(noticed < Duration::from_secs(4), "within the heartbeat timeout: {noticed:?}");
    let log_tail = node.agent_log();
    assert!(log_tail.contains("stopping without a successor"), "{log_tail}");
    Ok(())
}
