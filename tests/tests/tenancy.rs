//! One tenant cannot take the node's mesh down: a pod that opens connections past its cap and
//! holds silent connections to the agent's stats and HBONE ports gets its own connections
//! reset, while other pods, on its node and on another, keep being served and the agent's
//! memory stays bounded.
use std::time::{Duration, Instant};

use anyhow::Result;
use sim::{Cluster, eventually, privileged};

const T: Duration = Duration::from_secs(60);
const CAP: usize = 100;

#[test]
fn a_pod_past_its_connection_cap_and_slowloris_on_the_agents_ports_do_not_stop_other_pods() -> Result<()> {
    if !privileged("one_tenant_cannot_take_the_node_down") {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.add_node("node-a")?;
    c.add_node("node-b")?;
    c.set_namespace("shop", true, None);
    let attacker = c.node("node-a").add_pod("attacker", "shop", None)?;
    let neighbour = c.node("node-a").add_pod("neighbour", "shop", None)?;
    let server = c.node("node-a").add_pod("server", "shop", None)?;
    let remote = c.node("node-b").add_pod("remote", "shop", None)?;
    let _echo = server.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?;
    c.start(&["--max-connections-per-pod", &CAP.to_string()])?;
    for n in &c.nodes {
        n.wait_meshed()?;
    }
    let to = format!("{}:8080", server.ip);
    let node_a = c.nodes[0].gateway;
    let agent = c.nodes[0].agent_pid().expect("node-a's agent runs");
    let rss_before = sim::rss_kib_of(agent).unwrap_or(0);

    // The attacker: its whole share held open through the proxy, then more.
    let _held = attacker.hold(&to, CAP, 40)?;
    // Connected is not yet accepted: wait until the proxy serves all of them.
    eventually(Duration::from_secs(10), "the attacker's connections all proxied", || {
        let conns = c.nodes[0].admin_json("/debug/connections").ok()?;
        let active = conns["active"].as_array()?.iter().filter(|a| a["source_pod"] == "shop/attacker").count();
        (active == CAP).then_some(())
    })?;
    let over = attacker.client(&to, &["--count", "50", "--concurrency", "50", "--hold", "--timeout-ms", "3000"], T)?;
    assert_eq!(over.ok, 0, "past its cap every new connection of the pod is reset: {over}");
    // ... and silent connections to the agent's stats port and HBONE port (slowloris).
    let _stats = attacker.hold(&format!("{node_a}:15020"), 200, 40)?;
    let _hbone = attacker.hold(&format!("{node_a}:15008"), 200, 40)?;

    // Other pods keep being served: on the same node, and across nodes (over HBONE, into the
    // node the attacker is on), several times over the next seconds.
    let until = Instant::now() + Duration::from_secs(6);
    let mut rounds = 0;
    let mut peak_rss = 0;
    while Instant::now() < until {
        let r = neighbour.client(&to, &["--count", "20", "--concurrency", "4", "--timeout-ms", "5000"], T)?;
        assert_eq!(r.ok, 20, "a neighbour on the attacker's node: {r}");
        let r = remote.client(&to, &["--count", "20", "--concurrency", "4", "--timeout-ms", "5000"], T)?;
        assert_eq!(r.ok, 20, "a pod on another node, into the attacker's node: {r}");
        peak_rss = peak_rss.max(sim::rss_kib_of(agent).unwrap_or(0));
        rounds += 1;
    }
    let refused = sim::metric(
        &c.nodes[0].admin_text("/metrics")?,
        "switchyard_outbound_errors_total",
        &[("reason", "pod_connection_limit")],
    );
    eprintln!(
        "{rounds} rounds of 40 connections served meanwhile; attacker refused {refused} times; agent RSS {rss_before} KiB before, peak {peak_rss} KiB"
    );
    assert!(refused >= 50.0, "the attacker's connections past its cap were counted: {refused}");
    assert!(peak_rss < 256 * 1024, "the agent's memory stays bounded under the attack: {peak_rss} KiB");
    // The stats port serves again once the silent connections are cut (5 s header timeout).
    let stats = std::net::SocketAddr::from((node_a, 15020));
    eventually(Duration::from_secs(15), "the stats port answers a pod again", || {
        let (code, _) = sim::http_get(&neighbour.netns, stats, "/healthz").ok()?;
        (code == 200).then_some(())
    })?;
    Ok(())
}
