//! End to end: same-node acceleration (sockmap + sk_msg) with real programs and real pods.
//! The rest of the suite also runs with acceleration on (`cargo xtask test` runs it both ways);
//! this file checks that acceleration really engages when asked for, keeps every byte, and
//! leaves nothing behind, and pins down the kernel limitation that keeps it off by default.
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use sim::{Node, eventually, privileged};

const T: Duration = Duration::from_secs(60);
const MARKER: &str = "switchyard-accel-marker;";

fn occurrences(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn datapath(node: &Node) -> Result<Value> {
    node.admin_json("/debug/datapath")
}

/// A node with a meshed client and an echo server (`io`: the server's I/O style), agent
/// started with `accel` on or off.
fn setup(accel: bool, io: &str) -> Result<(Node, sim::Pod, sim::Pod, sim::Server)> {
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    let client = node.add_pod("client", "shop", None)?;
    let server = node.add_pod("server", "shop", None)?;
    let echo = server.serve(&["echo-server", "--listen", "0.0.0.0:8080", "--io", io])?;
    node.start_agent(&["--sockmap-acceleration", if accel { "on" } else { "off" }])?;
    eventually(Duration::from_secs(5), "pods meshed", || {
        let pods = node.admin_json("/debug/pods").ok()?;
        (pods.as_array()?.iter().filter(|p| p["redirected"] == true).count() == 2).then_some(())
    })?;
    Ok((node, client, server, echo))
}

#[test]
fn accelerated_same_node_traffic_skips_the_wire_keeps_every_byte_and_cleans_up() -> Result<()> {
    if !privileged("accelerated_same_node_traffic") {
        return Ok(());
    }
    let (node, client, server, _echo) = setup(true, "poll")?;
    let dp = datapath(&node)?;
    assert_eq!(dp["sockmap_acceleration"]["state"], "on", "{dp}");
    let metrics = node.admin_text("/metrics")?;
    assert!(metrics.contains("switchyard_sockmap_acceleration 1"), "{metrics}");

    let to = format!("{}:8080", server.ip);
    let capture = node.capture()?;
    // Many connections, several at once, each with a marked payload echoed back and verified.
    let r = client.workload(
        &["client", "--connect", &to, "--text", MARKER, "--bytes", "200000", "--count", "40", "--concurrency", "4"],
        T,
    )?;
    assert_eq!(r["ok"], 40, "{r}");
    assert_eq!(r["bytes_verified"], 40 * 200_000, "{r}");
    // One bulk stream well past every socket buffer.
    let r = client.workload(&["client", "--connect", &to, "--text", MARKER, "--bytes", "16000000"], T)?;
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(r["bytes_verified"], 16_000_000, "{r}");
    assert_eq!(r["peer"], to, "getpeername still shows the original destination: {r}");
    let pcap = capture.finish()?;

    let ev = datapath(&node)?["events"].clone();
    let n = |k: &str| ev[k].as_u64().unwrap_or(0);
    // 41 connections, two legs each (pod-proxy, proxy-pod), two sockets per leg.
    assert_eq!(n("accel_sockets"), 41 * 4, "every socket of every leg joined the map: {ev}");
    assert_eq!(n("accel_map_full"), 0, "{ev}");
    // Each socket that sends decides its path once; every decision is counted.
    let decided = n("accel_paths") + n("accel_stack_paths");
    assert_eq!(decided, 41 * 4, "one decision per sending socket: {ev}");
    assert!(n("accel_paths") >= 41 * 3, "most directions go socket to socket: {ev}");
    assert!(n("accel_messages") > 0, "{ev}");

    // What went socket to socket never crossed the bridge: only the directions that found no
    // peer at their first send (counted above) may show payload on the wire.
    let total_markers = (40 * 200_000 + 16_000_000) / MARKER.len() * 4; // 4 legs/directions per byte
    let on_wire = occurrences(&pcap, MARKER.as_bytes());
    if n("accel_stack_paths") == 0 {
        assert_eq!(on_wire, 0, "payload on the wire although every direction was accelerated");
    } else {
        assert!(on_wire < total_markers / 2, "{on_wire} of {total_markers} markers on the wire: {ev}");
    }

    // Closed sockets leave both maps; the proxy's connection accounting saw it all.
    eventually(Duration::from_secs(5), "acceleration maps empty", || {
        let maps = datapath(&node).ok()?["maps"].clone();
        (maps["accel_sockets"] == 0 && maps["accel_paths"] == 0).then_some(())
    })?;
    let conns = node.admin_json("/debug/connections")?;
    assert_eq!(conns["closed_total"], 41, "{conns}");
    Ok(())
}

#[test]
fn acceleration_off_keeps_the_maps_empty() -> Result<()> {
    if !privileged("acceleration_off_keeps_the_maps_empty") {
        return Ok(());
    }
    let (node, client, server, _echo) = setup(false, "poll")?;
    assert_eq!(datapath(&node)?["sockmap_acceleration"]["state"], "off");
    let r = client.workload(&["client", "--connect", &format!("{}:8080", server.ip)], T)?;
    assert_eq!(r["ok"], 1, "{r}");
    let ev = datapath(&node)?["events"].clone();
    assert_eq!(ev["accel_sockets"], 0, "{ev}");
    assert_eq!(ev["accel_messages"], 0, "{ev}");
    assert!(node.admin_text("/metrics")?.contains("switchyard_sockmap_acceleration 0"));
    Ok(())
}

/// Why acceleration is off by default: once a socket is in a sockmap, the kernel reads it with
/// `tcp_bpf_recvmsg`, which answers a *blocking* read with EAGAIN when the reader is woken by
/// anything but sockmap data (the peer's FIN, its own state change, bytes that came through the
/// stack) instead of waiting on or returning EOF (seen on 6.18). Event-loop programs retry
/// EAGAIN and are unaffected (the test above); classic blocking programs see errors. This test
/// fails the day a kernel fixes it, which is the day to reconsider the default.
#[test]
fn blocking_readers_get_spurious_eagain_under_acceleration_so_it_is_off_by_default() -> Result<()> {
    if !privileged("blocking_readers_get_spurious_eagain") {
        return Ok(());
    }
    let args = |to: &str| -> Vec<String> {
        ["client", "--connect", to, "--bytes", "20000", "--count", "20", "--io", "blocking"].map(String::from).to_vec()
    };
    let (node, client, server, _echo) = setup(true, "blocking")?;
    let to = format!("{}:8080", server.ip);
    let a = args(&to);
    let r = client.workload(&a.iter().map(String::as_str).collect::<Vec<_>>(), T)?;
    assert!(r["failed"].as_u64().unwrap_or(0) > 0, "blocking readers all succeeded under acceleration: {r}");
    let errors = r["errors"].to_string();
    assert!(errors.contains("Resource temporarily unavailable"), "{r}");
    assert!(r["elapsed_ms"].as_u64().unwrap_or(u64::MAX) < 5_000, "spurious, not a timeout: {r}");
    drop(node);

    // The same blocking programs without acceleration: every byte, no error.
    let (_node, client, server, _echo) = setup(false, "blocking")?;
    let a = args(&format!("{}:8080", server.ip));
    let r = client.workload(&a.iter().map(String::as_str).collect::<Vec<_>>(), T)?;
    assert_eq!(r["ok"], 20, "{r}");
    assert_eq!(r["bytes_verified"], 20 * 20_000, "{r}");
    Ok(())
}
