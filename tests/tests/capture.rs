//! The kernel captures only what the mesh serves: a meshed pod's connection to a meshed pod or
//! a Service goes through the proxy; one to anything else (an unmeshed server, the metadata
//! address, the outside world) stays on the pod's own path, with the pod's own source address,
//! unseen by the proxy; a namespace annotated `switchyard.io/capture: all` is proxied whatever
//! the destination, except link-local.
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use sim::{Node, Pod, Server, eventually, privileged, service};

const T: Duration = Duration::from_secs(30);

fn whoami(pod: &Pod, to: &str) -> Result<Value> {
    pod.workload(&["whoami", "--connect", to, "--timeout-ms", "3000"], T)
}

fn events(node: &Node) -> Result<Value> {
    node.kernel_events()
}

#[test]
fn only_mesh_destinations_are_captured_and_other_traffic_keeps_the_pods_address() -> Result<()> {
    if !privileged("capture_only_the_mesh") {
        return Ok(());
    }
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    node.set_namespace_meshed("wide", true);
    node.ns_annotations.push(("wide".into(), "switchyard.io/capture".into(), "all".into()));
    node.set_namespace_meshed("legacy", false);
    let client = node.add_pod("client", "shop", None)?;
    let wide = node.add_pod("wide-client", "wide", None)?;
    let server = node.add_pod("server", "shop", None)?;
    let outside = node.add_pod("outside", "legacy", None)?;
    let _servers: Vec<Server> = vec![
        server.serve(&["whoami-server", "--listen", "0.0.0.0:8080"])?,
        outside.serve(&["whoami-server", "--listen", "0.0.0.0:9000"])?,
    ];
    node.services = vec![service("web", "shop", "10.96.0.10:80".parse()?, "tcp-web", 8080, &[server.ip], &[])];
    node.start_agent(&[])?;
    node.wait_meshed()?;
    let dp = node.admin_json("/debug/datapath")?;
    // The meshed pods (client, wide-client, server) and the Service port.
    assert_eq!(dp["maps"]["mesh_destinations"], 4, "{dp}");

    let outside_addr = format!("{}:9000", outside.ip);
    // Outside the mesh: the proxy never sees it and the server sees the pod itself.
    let before = node.proxied_total()?;
    let r = whoami(&client, &outside_addr)?;
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(r["seen_as"], r["local"], "the server sees the pod's own address and port: {r}");
    assert!(r["seen_as"].as_str().unwrap().starts_with(&format!("{}:", client.ip)), "{r}");
    assert_eq!(node.proxied_total()?, before, "not proxied");
    let ev = events(&node)?;
    assert_eq!(ev["skip_outside_mesh"], 1, "{ev}");
    // Not in the mesh's telemetry either.
    let m = node.admin_text("/metrics")?;
    assert!(!m.contains("destination_workload=\"outside\""), "no istio_tcp_* series for it");

    // A meshed pod and a Service: through the proxy.
    let r = whoami(&client, &format!("{}:8080", server.ip))?;
    assert_eq!(r["ok"], 1, "{r}");
    let r = whoami(&client, "10.96.0.10:80")?;
    assert_eq!(r["ok"], 1, "{r}");
    eventually(Duration::from_secs(5), "both proxied", || (node.proxied_total().ok()? == before + 2).then_some(()))?;

    // capture: all: the same unmeshed server, proxied; the connection leaves from the node.
    let r = whoami(&wide, &outside_addr)?;
    assert_eq!(r["ok"], 1, "{r}");
    assert!(r["seen_as"].as_str().unwrap().starts_with(&format!("{}:", node.gateway)), "from the node: {r}");
    eventually(Duration::from_secs(5), "proxied", || (node.proxied_total().ok()? == before + 3).then_some(()))?;

    // Link-local (the cloud metadata service) is never proxied, not even for capture: all.
    let s0 = events(&node)?["skip_outside_mesh"].as_u64().unwrap_or(0);
    let _ = whoami(&wide, "169.254.169.254:80")?;
    assert_eq!(events(&node)?["skip_outside_mesh"].as_u64().unwrap_or(0), s0 + 1);
    assert_eq!(node.proxied_total()?, before + 3, "the metadata address is not proxied");

    // An unmeshed pod's own connections were never captured, and a pod leaving the mesh
    // leaves the capture map.
    node.set_namespace_meshed("wide", false);
    node.write_workloads()?;
    eventually(Duration::from_secs(5), "wide-client left the capture map", || {
        (node.admin_json("/debug/datapath").ok()?["maps"]["mesh_destinations"] == 3).then_some(())
    })?;
    Ok(())
}
