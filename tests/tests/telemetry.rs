//! End to end: Istio's standard metrics, access logs and W3C trace context, against known
//! traffic through a real agent.
use std::time::Duration;

use anyhow::Result;
use sim::{Node, eventually, metric, privileged, service};

const T: Duration = Duration::from_secs(60);

/// Sum of the samples of `name` whose labels include all of `want` (Prometheus/OpenMetrics text).
/// A mesh CA for `node` (`mesh-agent ca init` in its directory); its path, for `--ca-dir`.
fn mesh_ca(node: &Node) -> Result<String> {
    let ca = node.dir.join("ca");
    let out =
        std::process::Command::new(sim::bin_path("mesh-agent")?).args(["ca", "init", "--dir"]).arg(&ca).output()?;
    anyhow::ensure!(out.status.success(), "ca init: {}", String::from_utf8_lossy(&out.stderr));
    Ok(ca.to_string_lossy().into_owned())
}

#[test]
fn known_traffic_moves_istio_standard_metrics_by_exactly_that_much_and_trace_context_passes() -> Result<()> {
    if !privileged("known_traffic_moves_istio_standard_metrics") {
        return Ok(());
    }
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    let client = node.add_pod("client", "shop", None)?;
    let web = node.add_pod("web-0", "shop", None)?;
    let echo = node.add_pod("echo", "shop", None)?;
    // web-0 belongs to the workload "web" (as a Deployment's pod would): metrics say "web".
    node.set_workload("web-0", "web");
    // Its labels name its app and version, as Istio and Kiali read them.
    node.set_label("web-0", "app", "web");
    node.set_label("web-0", "version", "v2");
    let _w = web.serve_tool("sim-http", &["serve", "--listen", "0.0.0.0:8080", "--name", "web-0"])?;
    let _e = echo.serve(&["echo-server", "--listen", "0.0.0.0:9090"])?;
    node.services = vec![service("web", "shop", "10.96.0.10:80".parse()?, "http", 8080, &[web.ip], &[])];
    // With a CA, so the certificate metrics exist too.
    let ca = mesh_ca(&node)?;
    node.start_agent(&["--log-format", "json", "--ca-dir", &ca])?;
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
        ("destination_workload", "web"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/web-0"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "shop"),
        ("request_protocol", "http"),
        // Same-node delivery is not mutual TLS, and the label says so.
        ("connection_security_policy", "none"),
        // Istio's canonical names: from web-0's labels; the client has none (its workload's
        // name, revision "latest", app and version unknown).
        ("destination_canonical_service", "web"),
        ("destination_canonical_revision", "v2"),
        ("destination_app", "web"),
        ("destination_version", "v2"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "latest"),
        ("source_app", "unknown"),
        ("source_cluster", "Kubernetes"),
        ("destination_cluster", "Kubernetes"),
        ("response_flags", "-"),
        ("grpc_response_status", ""),
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
    // ... flagged as retries exhausted, as Envoy would.
    let flagged = eventually(Duration::from_secs(3), "the 503 counted", || {
        let m = node.admin_text("/metrics").ok()?;
        (metric(&m, "istio_requests_total", &[("response_code", "503"), ("response_flags", "URX")]) == 1.0).then_some(m)
    });
    assert!(flagged.is_ok(), "the retried 503 carries response_flags URX");

    // Switchyard's own metrics moved with it: 13 requests (7 + 3 + 2 traced + 1), 2 retries.
    let last = node.admin_text("/metrics")?;
    let own = |name: &str| metric(&last, name, &[]) - metric(&before, name, &[]);
    assert_eq!(own("switchyard_http_requests_total"), 13.0, "{last}");
    assert_eq!(own("switchyard_http_retries_total"), 2.0);
    assert_eq!(own("switchyard_http_retry_budget_exhausted_total"), 0.0);
    assert_eq!(own("switchyard_http_upstream_failures_total"), 3.0, "three 503s reported to outlier detection");
    assert_eq!(metric(&last, "switchyard_endpoint_ejections_total", &[]), 0.0, "a lone endpoint is never ejected");
    assert!(metric(&last, "switchyard_process_resident_memory_bytes", &[]) > 1e6);
    assert!(metric(&last, "switchyard_process_open_fds", &[]) > 5.0);
    assert!(metric(&last, "switchyard_process_cpu_seconds_total", &[]) > 0.0);
    let expiry = metric(
        &last,
        "switchyard_certificate_expiry_seconds",
        &[("identity", "spiffe://cluster.local/ns/shop/sa/client")],
    );
    assert!(expiry > 3600.0, "the client's certificate is valid for hours: {expiry}");
    // eBPF status per program and map usage against capacity.
    for program in
        ["mesh_connect4", "mesh_connect6", "mesh_sockops", "mesh_getpeername4", "mesh_getpeername6", "mesh_ingress"]
    {
        assert_eq!(metric(&last, "switchyard_ebpf_program_attached", &[("program", program)]), 1.0, "{program}");
    }
    let accel = if sim::sockmap_mode() == Some("on") { 1.0 } else { 0.0 };
    assert_eq!(metric(&last, "switchyard_ebpf_program_attached", &[("program", "mesh_sk_msg")]), accel);
    assert_eq!(metric(&last, "switchyard_ebpf_attached", &[]), 1.0);
    assert_eq!(metric(&last, "switchyard_ebpf_map_entries", &[("map", "meshed_cgroups")]), 3.0, "three meshed pods");
    assert_eq!(metric(&last, "switchyard_ebpf_map_capacity", &[("map", "meshed_cgroups")]), 16384.0);
    assert_eq!(metric(&last, "switchyard_ebpf_map_capacity", &[("map", "sock_orig")]), 65536.0);
    assert!(last.contains("switchyard_build_info{version=\""), "build info exported");
    // Five HTTP clients (one kept-alive connection each) and four TCP connections.
    assert!(metric(&last, "switchyard_ebpf_events_total", &[("event", "redirected")]) >= 9.0);
    // ... all from the client pod; the servers made none (their series exist, at zero).
    let per_pod = |m: &str, pod: &str| {
        metric(m, "switchyard_pod_redirected_connections_total", &[("namespace", "shop"), ("pod", pod)])
    };
    assert_eq!(per_pod(&last, "client") - per_pod(&before, "client"), 9.0, "{last}");
    assert!(last.contains("switchyard_pod_redirected_connections_total{namespace=\"shop\",pod=\"web-0\"} 0"));

    // `/metrics` negotiates: OpenMetrics for a scraper that asks (Prometheus does), the
    // Prometheus text format otherwise; the same samples either way.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (_, om_head, om) =
        sim::http_get_with(&node.netns, node.admin_addr(), "/metrics", &[("Accept", prometheus_accept)])?;
    let (_, text_head, text) = sim::http_get_with(&node.netns, node.admin_addr(), "/metrics", &[])?;
    assert!(
        om_head.to_ascii_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{om_head}"
    );
    assert!(text_head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{text_head}");
    assert!(om.contains("# TYPE istio_requests counter\n") && om.ends_with("# EOF\n"));
    assert!(text.contains("# TYPE istio_requests_total counter\n") && !text.contains("# EOF"), "{text}");
    assert_eq!(metric(&om, "istio_requests_total", &with("200")), metric(&text, "istio_requests_total", &with("200")),);

    // Every metric the shipped Grafana dashboard queries is exported by the agent.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/switchyard-node.json"),
    )?)?;
    let mut queried = std::collections::BTreeSet::new();
    // Panel queries and the template variables' queries (the agent picker).
    let mut exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap()))
        .collect();
    exprs.extend(
        dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| (v["type"] == "query").then(|| v["query"].as_str()).flatten()),
    );
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("istio_") || word.starts_with("switchyard_") {
                queried.insert(word.to_string());
            }
        }
    }
    assert!(queried.contains("switchyard_build_info"), "the agent picker's query is checked too");
    assert!(queried.len() >= 15, "{queried:?}");
    for name in &queried {
        // A sample, or the family's TYPE line (a labelled family with no sample yet, e.g. no
        // denial so far, is declared all the same).
        let base =
            ["_total", "_bucket", "_sum", "_count"].iter().fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
        let exported = last.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                || l.starts_with(&format!("{name} "))
                || l.starts_with(&format!("# TYPE {base} "))
        });
        assert!(exported, "the dashboard queries {name}, which the agent does not export");
    }
    eprintln!("Grafana dashboard: all {} metrics it queries are exported", queried.len());

    // The operator CLI prints what the admin endpoint knows (run in the node's namespace, as
    // `kubectl exec` into the agent would).
    let cli = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &node.netns])
            .arg(sim::bin_path("mesh-agent")?)
            .args(args)
            .output()?;
        anyhow::ensure!(out.status.success(), "mesh-agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    let status: serde_json::Value = serde_json::from_str(&cli(&["status", "-o", "json"])?)?;
    assert_eq!((status["ready"].as_bool(), status["pods_meshed"].as_u64()), (Some(true), Some(3)), "{status}");
    assert!(status["certificates"].as_array().is_some_and(|c| c.len() == 3), "{status}");
    let table = cli(&["workloads"])?;
    for pod in ["shop/client", "shop/web-0", "shop/echo"] {
        let id = format!("spiffe://cluster.local/ns/shop/sa/{}", pod.trim_start_matches("shop/"));
        assert!(
            table.lines().any(|l| l.starts_with(pod) && l.contains("true") && l.contains(&id) && l.contains(" h ")),
            "{pod}: redirected, identity and certificate expiry in\n{table}"
        );
    }
    let wl: serde_json::Value = serde_json::from_str(&cli(&["workloads", "-o", "json"])?)?;
    assert!(
        wl.as_array().is_some_and(|a| a.iter().any(|p| p["pod"] == "shop/client" && p["fail_mode"] == "open")),
        "{wl}"
    );
    let conns: serde_json::Value = serde_json::from_str(&cli(&["connections", "-o", "json", "--recent", "100"])?)?;
    let recent = conns["recent"].as_array().unwrap();
    assert!(recent.iter().any(|c| c["protocol"] == "http1" && c["original_dst"] == "10.96.0.10:80"), "{conns}");
    assert!(recent.iter().filter(|c| c["original_dst"] == format!("{}:9090", echo.ip).as_str()).count() == 4);
    let status_text = cli(&["status"])?;
    eprintln!("mesh-agent status:\n{status_text}");
    assert!(status_text.lines().any(|l| l.starts_with("service") && l.contains("shop/web")), "{status_text}");
    assert!(status_text.contains("resilience"), "{status_text}");

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
                ("dst_workload", "shop/web".into()),
                ("src_workload", "shop/client".into()),
                ("dst_identity", "spiffe://cluster.local/ns/shop/sa/web-0".into()),
                ("security", "none".into()),
                ("protocol", "http".into()),
                ("method", "GET".into()),
                ("status", status.into()),
                ("retries", 0.into()),
                ("retry_reasons", "".into()),
                ("error", "-".into()),
                // "status 200\n": the body's size, known once it has been sent.
                ("request_bytes", 0.into()),
                ("response_bytes", 11.into()),
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

/// Access-log switches, in the human (text) format: `errors` logs only failed connections,
/// a sample rate of 0 still logs every failure, `off` logs nothing; the lines name the
/// connection's pods, destination, bytes and error.
#[test]
fn access_log_modes_errors_sampled_and_off_in_the_human_format() -> Result<()> {
    if !privileged("access_log_modes") {
        return Ok(());
    }
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    let client = node.add_pod("client", "shop", None)?;
    let echo = node.add_pod("echo", "shop", None)?;
    let _e = echo.serve(&["echo-server", "--listen", "0.0.0.0:9090"])?;
    let (good, bad) = (format!("{}:9090", echo.ip), format!("{}:9091", echo.ip));
    let access_lines = |node: &Node| -> Vec<String> {
        node.agent_log().lines().filter(|l| l.contains(" access: ")).map(str::to_string).collect()
    };
    let mut seen = 0;
    for (args, want_lines) in [
        (&["--access-log", "errors"][..], 2),
        (&["--access-log", "all", "--access-log-sample-rate", "0"][..], 2),
        (&["--access-log", "off"][..], 0),
    ] {
        node.start_agent(args)?;
        eventually(Duration::from_secs(5), "pods meshed", || {
            let pods = node.admin_json("/debug/pods").ok()?;
            (pods.as_array()?.iter().filter(|p| p["redirected"] == true).count() == 2).then_some(())
        })?;
        let before = node.proxied_total()?;
        let ok = client.workload(&["client", "--connect", &good, "--bytes", "100", "--count", "3"], T)?;
        assert_eq!(ok["ok"], 3, "{ok}");
        let refused = client.workload(&["client", "--connect", &bad, "--count", "2"], T)?;
        assert_eq!(refused["ok"], 0, "{refused}");
        eventually(Duration::from_secs(5), "all five closed", || {
            (node.proxied_total().ok()? - before >= 5).then_some(())
        })?;
        assert!(node.stop_agent(Duration::from_secs(10))?, "clean exit");
        let lines = access_lines(&node);
        let new = &lines[seen..];
        seen = lines.len();
        assert_eq!(new.len(), want_lines, "{args:?}: {new:#?}");
        for l in new {
            assert!(!l.contains('\u{1b}'), "no terminal colours in a log file: {l:?}");
            for want in [
                "outbound connection",
                "kind=\"tcp\"",
                "src=\"shop/client\"",
                &format!("dst={bad}"),
                "dst_pod=\"shop/echo\"",
                "sent=0",
                "error=\"connecting to",
            ] {
                assert!(l.contains(want), "{want} in {l}");
            }
        }
    }
    Ok(())
}

/// The node dashboard in a real headless browser (Debian's chromium) against an agent carrying
/// known traffic: the page's tables and chart show it. Screenshot saved as a test artifact
/// (`target/test-artifacts/dashboard.png`).
#[test]
fn the_node_dashboard_shows_the_traffic_in_a_real_browser() -> Result<()> {
    if !privileged("the_node_dashboard_shows_the_traffic") {
        return Ok(());
    }
    let chromium =
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| std::path::Path::new(p).exists());
    let Some(chromium) = chromium else {
        anyhow::bail!("chromium is not installed (`cargo xtask setup` installs it)");
    };
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    let client = node.add_pod("client", "shop", None)?;
    let web = node.add_pod("web-0", "shop", None)?;
    let echo = node.add_pod("echo", "shop", None)?;
    let _w = web.serve_tool("sim-http", &["serve", "--listen", "0.0.0.0:8080", "--name", "web-0"])?;
    let _e = echo.serve(&["echo-server", "--listen", "0.0.0.0:9090"])?;
    node.services = vec![service("web", "shop", "10.96.0.10:80".parse()?, "http", 8080, &[web.ip], &[])];
    // With a CA: the pods table shows each identity's certificate expiry.
    let ca = mesh_ca(&node)?;
    node.start_agent(&["--ca-dir", &ca])?;
    eventually(Duration::from_secs(5), "pods meshed", || {
        let pods = node.admin_json("/debug/pods").ok()?;
        (pods.as_array()?.iter().filter(|p| p["redirected"] == true).count() == 3).then_some(())
    })?;
    let r = client.http(&["load", "--url", "http://10.96.0.10/status/200", "--requests", "40"], T)?;
    assert_eq!(r["statuses"]["200"], 40, "{r}");
    let r = client.http(&["load", "--url", "http://10.96.0.10/status/500", "--requests", "2"], T)?;
    assert_eq!(r["statuses"]["500"], 2, "{r}");
    let t = client.workload(&["client", "--connect", &format!("{}:9090", echo.ip), "--count", "6"], T)?;
    assert_eq!(t["ok"], 6, "{t}");
    // Traffic while the page is open, so the rate chart has something to draw.
    let c = client.clone();
    let steady = std::thread::spawn(move || {
        c.http(&["load", "--url", "http://10.96.0.10/status/200", "--duration-ms", "8000", "--interval-ms", "20"], T)
    });

    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let shot = artifacts
        .join(format!("dashboard{}.png", sim::sockmap_mode().map(|m| format!("-accel-{m}")).unwrap_or_default()));
    let _ = std::fs::remove_file(&shot);
    let browser = |extra: &[String]| -> Result<String> {
        let profile = node.dir.join("chromium-profile");
        let out = sim::output_timeout(
            {
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", &node.netns, chromium])
                    .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
                    .arg(format!("--user-data-dir={}", profile.display()))
                    // Let the page poll a few times (virtual time runs as fast as it can).
                    .arg("--virtual-time-budget=7000")
                    .args(extra)
                    .arg("http://127.0.0.1:15000/");
                cmd
            },
            Duration::from_secs(90),
        )?;
        anyhow::ensure!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let dom = browser(&["--dump-dom".to_string()])?;
    browser(&[format!("--screenshot={}", shot.display()), "--window-size=1400,1300".to_string()])?;
    steady.join().map_err(|_| anyhow::anyhow!("load panicked"))??;

    // The tables show the traffic the test made.
    let row = |table: &str, key: &str| -> Option<String> {
        let t = &dom[dom.find(&format!("id=\"{table}\""))?..];
        let t = &t[..t.find("</table>")?];
        t.split("<tr>").find(|r| r.contains(&format!(">{key}<"))).map(str::to_string)
    };
    let cells = |r: &str| -> Vec<String> {
        r.split("<td")
            .skip(1)
            .map(|c| c.split_once('>').map(|x| x.1).unwrap_or("").split("</td>").next().unwrap_or("").to_string())
            .collect()
    };
    let svc =
        row("svc-table", "shop/web").ok_or_else(|| anyhow::anyhow!("no shop/web row in the services table:\n{dom}"))?;
    let svc = cells(&svc);
    eprintln!("services row: {svc:?}");
    let requests: u64 = svc[1].parse()?;
    assert!(requests >= 42, "40 + 2 requests at least (more from the steady load): {svc:?}");
    assert_eq!(svc[2], "2", "the two 500s: {svc:?}");
    // Numbers in cells, whatever markup colours them.
    let value = |c: &str| -> f64 {
        let mut text = String::new();
        let mut in_tag = false;
        for ch in c.chars() {
            match ch {
                '<' => in_tag = true,
                '>' => in_tag = false,
                _ if !in_tag => text.push(ch),
                _ => {}
            }
        }
        text.trim().parse().unwrap_or(f64::NAN)
    };
    let pod = cells(&row("pod-table", "shop/client").ok_or_else(|| anyhow::anyhow!("no client row:\n{dom}"))?);
    eprintln!("pod row: {pod:?}");
    assert_eq!(pod[1], "spiffe://cluster.local/ns/shop/sa/client");
    assert!(pod[2].ends_with(" h"), "its certificate expires in hours: {pod:?}");
    assert_eq!((pod[3].as_str(), pod[4].as_str(), pod[5].as_str()), ("permissive", "namespace", "open"), "{pod:?}");
    assert!(pod[6].contains("yes"), "redirected: {pod:?}");
    // The steady load (a request every 20 ms) shows as a rate and a latency for the pod.
    assert!(value(&pod[7]) > 1.0, "requests/s sent by the client: {pod:?}");
    assert!(value(&pod[9]) > 0.0 && value(&pod[10]) >= value(&pod[9]), "p50 and p99: {pod:?}");
    assert!(value(&pod[11]) >= 6.0, "connections out: {pod:?}");
    // Peer workloads: the requests to web-0 with rate and latency, the TCP connections to echo.
    let peer = |dst: &str| {
        dom.split("<tr>")
            .find(|r| r.contains(">shop/client<") && r.contains(&format!(">{dst}<")))
            .map(cells)
            .ok_or_else(|| anyhow::anyhow!("no client → {dst} row:\n{dom}"))
    };
    let to_web = peer("shop/web-0")?;
    eprintln!("peer row to web: {to_web:?}");
    assert!(value(&to_web[3]) > 1.0 && value(&to_web[5]) > 0.0, "request rate and p50: {to_web:?}");
    assert!(to_web[8].contains("KiB"), "the HTTP connections' bytes: {to_web:?}");
    let to_echo = peer("shop/echo")?;
    eprintln!("peer row to echo: {to_echo:?}");
    assert_eq!(to_echo[7], "6", "six TCP connections to echo: {to_echo:?}");
    assert!(to_echo[8].ends_with(" B") || to_echo[8].contains("KiB"), "bytes: {to_echo:?}");
    // Denials and handshake failures by reason are listed (none here: all zero).
    let reasons = &dom[dom.find("id=\"reason-table\"").ok_or_else(|| anyhow::anyhow!("no reason table"))?..];
    assert!(reasons[..reasons.find("</table>").unwrap()].contains(">deny_rule<"), "denial reasons listed");
    // The rate chart drew lines from several polls, and the request rate was above zero
    // (a point above the baseline at y = 88).
    let points = dom
        .split("id=\"line-rps\"")
        .nth(1)
        .and_then(|s| s.split("points=\"").nth(1))
        .and_then(|s| s.split('"').next())
        .unwrap_or("");
    let ys: Vec<f64> =
        points.split(' ').filter_map(|p| p.split_once(',')).filter_map(|(_, y)| y.parse().ok()).collect();
    assert!(ys.len() >= 2, "chart points {points:?}");
    assert!(ys.iter().any(|y| *y < 80.0), "the request rate is drawn above zero: {points:?}");
    assert!(dom.contains("class=\"ok\">ready<"), "health shown");
    // eBPF: each program's state, and map usage against capacity.
    let ebpf = &dom[dom.find("id=\"ebpf-table\"").ok_or_else(|| anyhow::anyhow!("no eBPF table"))?..];
    let ebpf = &ebpf[..ebpf.find("</table>").unwrap()];
    assert!(ebpf.contains(">program mesh_connect4<") && ebpf.contains(">attached<"), "{ebpf}");
    assert!(ebpf.contains(">3 / 16384 (0.0 %)<"), "three meshed pods of 16384: {ebpf}");
    let png = std::fs::read(&shot)?;
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "screenshot saved: {} bytes", png.len());
    eprintln!("dashboard screenshot: {}", shot.display());
    Ok(())
}

/// Trace export: with `--otlp-endpoint`, the proxy's span of each sampled request reaches an
/// OTLP collector (a fake one in the test, decoding the protobuf) as a hop of the caller's
/// trace: the client's trace id, the client's span as parent, and as span id the parent id the
/// server saw, so the server's span is its child. Unsampled traces send nothing.
#[test]
fn the_proxys_request_spans_reach_an_otlp_collector_as_hops_of_the_callers_trace() -> Result<()> {
    if !privileged("the_proxys_request_spans_reach_an_otlp_collector") {
        return Ok(());
    }
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    let client = node.add_pod("client", "shop", None)?;
    let web = node.add_pod("web-0", "shop", None)?;
    let _w = web.serve_tool("sim-http", &["serve", "--listen", "0.0.0.0:8080", "--name", "web-0"])?;
    node.services = vec![service("web", "shop", "10.96.0.10:80".parse()?, "http", 8080, &[web.ip], &[])];
    let collector = sim::otlp_collector::Collector::start(&node.netns)?;
    node.start_agent(&["--otlp-endpoint", &collector.endpoint()])?;
    eventually(Duration::from_secs(5), "pods meshed", || {
        let pods = node.admin_json("/debug/pods").ok()?;
        (pods.as_array()?.iter().filter(|p| p["redirected"] == true).count() == 2).then_some(())
    })?;
    let load = |path: &str, traceparent: Option<&str>| -> Result<serde_json::Value> {
        let url = format!("http://10.96.0.10{path}");
        let mut args = vec!["load", "--url", &url, "--requests", "1"];
        let h;
        if let Some(tp) = traceparent {
            h = format!("traceparent: {tp}");
            args.extend(["--header", &h, "--header", "tracestate: congo=t61rcWkgMzE"]);
        }
        client.http(&args, T)
    };
    // A sampled trace from the client, an unsampled one, and a request without trace context
    // that fails (the only endpoint answers 503: retried twice, then the 503 reaches the client).
    let r1 = load("/status/200", Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))?;
    let r2 = load("/status/200", Some("00-11111111111111111111111111111111-2222222222222222-00"))?;
    let r3 = load("/status/503", None)?;
    assert_eq!(
        (&r1["statuses"]["200"], &r2["statuses"]["200"], &r3["statuses"]["503"]),
        (&1.into(), &1.into(), &1.into())
    );
    let seen = |r: &serde_json::Value| -> Vec<String> {
        r["seen_traceparents"][0].as_str().unwrap_or("").split('-').map(str::to_string).collect()
    };
    let (seen1, seen2, seen3) = (seen(&r1), seen(&r2), seen(&r3));
    assert_eq!(seen2[3], "00", "the client's sampling decision passes on: {r2}");

    let spans = eventually(Duration::from_secs(5), "two spans at the collector", || {
        let s = collector.spans();
        (s.len() >= 2).then_some(s)
    })?;
    // One more flush interval: nothing else arrives (the unsampled trace sends no span).
    std::thread::sleep(Duration::from_millis(1500));
    let spans_now = collector.spans();
    assert_eq!(spans_now.len(), 2, "{spans_now:#?}");
    assert_eq!(collector.requests().1, 0, "every export request is valid OTLP protobuf");
    eprintln!("spans received: {spans:#?}");

    let s1 = spans.iter().find(|s| s.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736").expect("the client's trace");
    assert_eq!(s1.parent_span_id, "00f067aa0ba902b7", "the client's span is the parent");
    assert_eq!(s1.span_id, seen1[2], "the server's parent is the proxy's span");
    assert_eq!(s1.name, "GET web.shop.svc.cluster.local");
    assert_eq!(s1.kind, 3, "SPAN_KIND_CLIENT");
    assert!(s1.end_ns >= s1.start_ns && s1.start_ns > 0);
    assert_eq!(s1.status.0, 0, "unset: not an error");
    assert_eq!(s1.scope, "switchyard-proxy");
    assert_eq!(s1.resource["service.name"], "switchyard");
    assert_eq!(s1.resource["k8s.node.name"], node.name);
    for (k, v) in [
        ("http.request.method", "GET"),
        ("url.path", "/status/200"),
        ("http.response.status_code", "200"),
        ("network.protocol.version", "1.1"),
        ("server.port", "80"),
        ("network.peer.address", &web.ip.to_string()),
        ("network.peer.port", "8080"),
        ("source.workload", "client"),
        ("source.principal", "spiffe://cluster.local/ns/shop/sa/client"),
        ("destination.workload", "web-0"),
        ("destination.principal", "spiffe://cluster.local/ns/shop/sa/web-0"),
        ("connection_security_policy", "none"),
        ("switchyard.retries", "0"),
    ] {
        assert_eq!(s1.attributes.get(k).map(String::as_str), Some(v), "{k} in {s1:#?}");
    }

    let s3 = spans.iter().find(|s| s.trace_id == seen3[1]).expect("the trace the proxy started");
    assert_eq!(s3.span_id, seen3[2]);
    assert!(s3.parent_span_id.is_empty(), "a root span: {s3:#?}");
    assert_eq!(s3.status, (2, "HTTP 503".to_string()), "an error span");
    assert_eq!(s3.attributes["http.response.status_code"], "503");
    assert_eq!(s3.attributes["switchyard.retries"], "2");
    assert_eq!(s3.attributes["switchyard.retry_reasons"], "status_503,status_503");

    let m = node.admin_text("/metrics")?;
    assert_eq!(metric(&m, "switchyard_trace_spans_total", &[("outcome", "exported")]), 2.0, "{m}");
    assert_eq!(metric(&m, "switchyard_trace_spans_total", &[("outcome", "dropped")]), 0.0);
    assert_eq!(metric(&m, "switchyard_trace_spans_total", &[("outcome", "failed")]), 0.0);
    Ok(())
}

/// Issue 15, the admin surface: the debug views and the dashboard (which list the cluster's
/// pods) are on the node's loopback only; the stats port serves metrics and health, nothing
/// else, to pods and the network; a flood of silent connections to it is capped and cut by
/// the header timeout, and does not starve the loopback admin port.
#[test]
fn the_admin_surface_is_the_nodes_and_the_stats_port_serves_metrics_and_health_only() -> Result<()> {
    if !privileged("admin_surface") {
        return Ok(());
    }
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    let meshed = node.add_pod("client", "shop", None)?;
    let plain = node.add_pod("plain", "legacy", None)?;
    node.start_agent(&[])?;
    node.wait_meshed()?;
    let stats = std::net::SocketAddr::from((node.gateway, sim::STATS_PORT));
    let admin_on_node_ip = std::net::SocketAddr::from((node.gateway, sim::ADMIN_PORT));
    // On the node's loopback: everything.
    let (code, pods) = sim::http_get(&node.netns, node.admin_addr(), "/debug/pods")?;
    assert_eq!(code, 200);
    assert!(pods.contains("\"shop/client\""), "{pods}");
    assert_eq!(sim::http_get(&node.netns, node.admin_addr(), "/")?.0, 200, "the dashboard");
    // From pods, meshed or not: metrics and health on the stats port; no debug view anywhere.
    for pod in [&meshed, &plain] {
        for path in ["/metrics", "/healthz", "/readyz"] {
            assert_eq!(sim::http_get(&pod.netns, stats, path)?.0, 200, "{} {path}", pod.name);
        }
        for path in ["/debug/pods", "/debug/connections", "/debug/certs", "/", "/debug/summary"] {
            let (code, body) = sim::http_get(&pod.netns, stats, path)?;
            assert_eq!(code, 404, "{} {path}: {body}", pod.name);
            assert!(!body.contains("shop/client"), "{body}");
        }
        assert!(
            sim::http_get(&pod.netns, admin_on_node_ip, "/debug/pods").is_err(),
            "{}: admin port reachable",
            pod.name
        );
    }
    // A flood: more silent connections than the cap, held open.
    let flood: Vec<std::net::TcpStream> = sim::in_netns(&plain.netns, || {
        (0..mesh_agent::admin::MAX_CONNECTIONS * 2).filter_map(|_| std::net::TcpStream::connect(stats).ok()).collect()
    })?;
    assert!(flood.len() > mesh_agent::admin::MAX_CONNECTIONS, "{}", flood.len());
    // The admin port on loopback is another listener: served at once.
    assert_eq!(sim::http_get(&node.netns, node.admin_addr(), "/healthz")?.0, 200);
    // The silent connections are cut by the header timeout (5 s), and the stats port serves
    // again.
    eventually(Duration::from_secs(30), "stats port serving after the flood", || {
        matches!(sim::http_get(&node.netns, stats, "/healthz"), Ok((200, _))).then_some(())
    })?;
    let closed = flood
        .iter()
        .filter(|s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
            let mut b = [0u8; 1];
            matches!(std::io::Read::read(&mut &**s, &mut b), Ok(0) | Err(_))
        })
        .count();
    assert_eq!(closed, flood.len(), "every silent connection was closed by the agent");
    Ok(())
}
