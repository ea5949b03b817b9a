//! End to end, HBONE as Istio's ztunnel speaks it (issue 17).
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use sim::{Cluster, privileged};

const T: Duration = Duration::from_secs(30);

#[test]
fn hbone_is_addressed_to_the_pod_and_the_pod_sees_its_real_peer() -> Result<()> {
    if !privileged("hbone_pod_addressed") {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.add_node("node-a")?;
    c.add_node("node-b")?;
    c.set_namespace("shop", true, None);
    let client = c.node("node-a").add_pod("client", "shop", None)?;
    let server = c.node("node-b").add_pod("server", "shop", None)?;
    let _srv = server.serve(&["whoami-server", "--listen", "0.0.0.0:8080"])?;
    c.start(&[])?;
    let r: Value = client.workload(&["whoami", "--connect", &format!("{}:8080", server.ip), "--timeout-ms", "3000"], T)?;
    eprintln!("whoami: {r}");
    eprintln!("A: {}", c.nodes[0].agent_log());
    eprintln!("B: {}", c.nodes[1].agent_log());
    Ok(())
}
