//! End to end: Istio's standard metrics, access logs and W3C trace context, against known
//! traffic through a real agent.
use std::time::Duration;

use anyhow::Result;
use sim::{Node, eventually, privileged, service_yaml};

const T: Duration = Duration::from_secs(60);

/// Sum of the samples of `name` whose labels include all of `want` (Prometheus/OpenMetrics text).
fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (n == name && want.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[test]
fn known_traffic_moves_istio_standard_metrics_by_exactly_that_much_and_trace_context_passes() -> Result<()> {
    if !privileged("known_traffic_moves_istio_standard_metrics") {
        return Ok(());
    }
    let mut node = Node::new("node", 160)?;
    node.set_namespace_meshed("shop", true);
    let client = node.add_pod("client", "shop", None)?;
    let web = node.add_pod("web-0", "shop", None)?;
    let echo = node.add_pod("echo", "shop", None)?;
    let _w = web.serve_tool("sim-http", &["serve", "--listen", "0.0.0.0:8080", "--name", "web-0"])?;
    let _e = echo.serve(&["echo-server", "--listen", "0.0.0.0:9090"])?;
    node.services = service_yaml("web", "shop", "10.96.0.10:80".parse()?, "http", 8080, &[web.ip], &[]);
    node.start_agent(&["--log-format", "json"])?;
    eventually(Duration::from_secs(5), "pods meshed", || {
        let pods = node.admin_json("/debug/pods").ok()?;
        (pods.as_array()?.iter().filter(|p| p["redirected"] == true).count() == 3).then_some(())
    })?;
    let before = node.admin_text("/metrics")?;

    // N HTTP requests with known codes and sizes ("status 200\n" is 11 bytes), M TCP connections
    // of known sizes.
    let r = client.http(&["load", "--url", "http://10.96.0.10/status/200", "--requests", "7"], T)?;
    assert_eq!(r["statuses"]["200"], 7, "{r}");
    let r = client.http(&["load", "--url", "http://10.96.0.10/status/404", "--requests", "3"], T)?;
    assert_eq!(r["statuses"]["404"], 3, "{r}");
    let t = client
        .workload(&["client", "--connect", &format!("{}:9090", echo.ip), "--bytes", "1000", "--count", "4"], T)?;
    assert_eq!(t["ok"], 4, "{t}");

    let after = eventually(Duration::from_secs(5), "TCP connections closed in the metrics", || {
        let m = node.admin_text("/metrics").ok()?;
        (metric(&m, "istio_tcp_connections_closed_total", &[("destination_workload", "echo")]) >= 4.0).then_some(m)
    })?;
    let delta = |name: &str, want: &[(&str, &str)]| metric(&after, name, want) - metric(&before, name, want);

    let http: Vec<(&str, &str)> = vec![
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/client"),
        ("destination_workload", "web-0"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/web-0"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "shop"),
        ("request_protocol", "http"),
        // Same-node delivery is not mutual TLS, and the label says so.
        ("connection_security_policy", "none"),
    ];
    let with = |code: &'static str| {
        let mut l = http.clone();
        l.push(("response_code", code));
        l
    };
    assert_eq!(delta("istio_requests_total", &with("200")), 7.0, "{after}");
    assert_eq!(delta("istio_requests_total", &with("404")), 3.0);
    assert_eq!(delta("istio_request_duration_milliseconds_count", &with("200")), 7.0);
    assert_eq!(delta("istio_request_duration_milliseconds_count", &with("404")), 3.0);
    assert_eq!(delta("istio_response_bytes_sum", &with("200")), 77.0);
    assert_eq!(delta("istio_response_bytes_sum", &with("404")), 33.0);
    assert_eq!(delta("istio_response_bytes_count", &with("200")), 7.0);
    assert_eq!(delta("istio_request_bytes_sum", &with("200")), 0.0);
    assert_eq!(delta("istio_request_bytes_count", &with("404")), 3.0);
    // No TCP metrics for HTTP requests, no request metrics for TCP.
    assert_eq!(delta("istio_tcp_connections_opened_total", &[("destination_service_name", "web")]), 0.0);

    let tcp = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/client"),
        ("destination_workload", "echo"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/echo"),
        ("destination_service", "unknown"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(delta("istio_tcp_connections_opened_total", &tcp), 4.0, "{after}");
    assert_eq!(delta("istio_tcp_connections_closed_total", &tcp), 4.0);
    // Istio's directions: received = source to destination, sent = back to the source.
    assert_eq!(delta("istio_tcp_received_bytes_total", &tcp), 4000.0);
    assert_eq!(delta("istio_tcp_sent_bytes_total", &tcp), 4000.0);
    // Bounded cardinality: no port or connection id in any label.
    for l in after.lines().filter(|l| l.starts_with("istio_")) {
        assert!(!l.contains(":9090") && !l.contains(":8080") && !l.contains("10.96.0.10"), "{l}");
    }

    // W3C trace context: a client's trace id reaches the server with the proxy as the parent
    // span; a request without one gets one.
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = client.http(
        &[
            "load",
            "--url",
            "http://10.96.0.10/status/200",
            "--requests",
            "1",
            "--header",
            &format!("traceparent: {sent}"),
        ],
        T,
    )?;
    let seen = r["seen_traceparents"][0].as_str().unwrap_or("").to_string();
    eprintln!("traceparent sent {sent}, seen by the server {seen}");
    assert!(seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{r}");
    assert_ne!(seen, sent, "the proxy is a hop: its own parent id");
    let r = client.http(&["load", "--url", "http://10.96.0.10/status/200", "--requests", "1"], T)?;
    let created = r["seen_traceparents"][0].as_str().unwrap_or("").to_string();
    eprintln!("traceparent created by the proxy: {created}");
    let parts: Vec<&str> = created.split('-').collect();
    assert!(parts.len() == 4 && parts[0] == "00" && parts[1].len() == 32 && parts[2].len() == 16, "{r}");
    assert_ne!(parts[1], "0".repeat(32));

    // A retried request: the only endpoint answers 503, retried twice (default retries, 503 is
    // retryable), then the 503 reaches the client.
    let r = client.http(&["load", "--url", "http://10.96.0.10/status/503", "--requests", "1"], T)?;
    assert_eq!(r["statuses"]["503"], 1, "{r}");

    // Access-log lines for the same run, parsed back field by field.
    let lines = eventually(Duration::from_secs(5), "access-log lines written", || {
        let lines: Vec<serde_json::Value> = node
            .agent_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .map(|v| v["fields"].clone())
            .collect();
        (lines.iter().filter(|f| f["kind"] == "http").count() >= 13).then_some(lines)
    })?;
    let http_lines = |path: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|f| f["kind"] == "http" && f["path"] == path).collect()
    };
    let web_ep = format!("{}:8080", web.ip);
    for (path, n, status) in [("/status/200", 9, 200), ("/status/404", 3, 404)] {
        let l = http_lines(path);
        assert_eq!(l.len(), n, "{path}: {l:?}");
        for f in l {
            for (k, v) in [
                ("direction", serde_json::json!("outbound")),
                ("src", "shop/client".into()),
                ("src_identity", "spiffe://cluster.local/ns/shop/sa/client".into()),
                ("service", "shop/web".into()),
                ("vip", "10.96.0.10:80".into()),
                ("endpoint", web_ep.clone().into()),
                ("dst_pod", "shop/web-0".into()),
                ("dst_identity", "spiffe://cluster.local/ns/shop/sa/web-0".into()),
                ("security", "none".into()),
                ("protocol", "http".into()),
                ("method", "GET".into()),
                ("status", status.into()),
                ("retries", 0.into()),
                ("retry_reasons", "".into()),
                ("error", "-".into()),
            ] {
                assert_eq!(f[k], v, "{k} in {f}");
            }
            assert_eq!(f["trace_id"].as_str().map(str::len), Some(32), "{f}");
            assert!(f["duration_ms"].as_u64().is_some(), "{f}");
        }
    }
    let traced: Vec<_> =
        http_lines("/status/200").into_iter().filter(|f| f["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736").collect();
    assert_eq!(traced.len(), 1, "the client's trace id is in the access log");
    let retried = http_lines("/status/503");
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert_eq!(retried[0]["status"], 503);
    assert_eq!(retried[0]["retries"], 2, "{}", retried[0]);
    assert_eq!(retried[0]["retry_reasons"], "status_503,status_503");
    let tcp: Vec<_> =
        lines.iter().filter(|f| f["kind"] == "tcp" && f["dst"] == format!("{}:9090", echo.ip).as_str()).collect();
    assert_eq!(tcp.len(), 4, "{tcp:?}");
    for f in tcp {
        assert_eq!((f["sent"].as_u64(), f["received"].as_u64()), (Some(1000), Some(1000)), "{f}");
        assert_eq!(f["src"], "shop/client");
        assert_eq!(f["dst_pod"], "shop/echo");
        assert_eq!(f["error"], "-");
    }
    Ok(())
}
