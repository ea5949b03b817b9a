//! End to end: resilience in the node proxy, with fault-injecting servers (`sim-http`) in
//! real pods behind Services, and a real agent with its eBPF redirect.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;
use sim::{LoadReport, Node, Pod, Server, ServiceSpec, eventually, http_get, privileged, service};

const T: Duration = Duration::from_secs(60);
const WEB: &str = "10.96.0.10:80";

struct Setup {
    node: Node,
    client: Pod,
    servers: Vec<Pod>,
    procs: Vec<Option<Server>>,
}

/// A node with a meshed client and one `sim-http serve` pod per entry of `servers` (name,
/// extra args), listening on 8080; `services(ips)` gives the workload file's services.
fn setup(
    servers: &[(&str, &[&str])],
    services: impl Fn(&[Ipv4Addr]) -> Vec<ServiceSpec>,
    agent_args: &[&str],
) -> Result<Setup> {
    let mut node = Node::new("node")?;
    node.set_namespace_meshed("shop", true);
    let client = node.add_pod("client", "shop", None)?;
    let mut pods = Vec::new();
    let mut procs = Vec::new();
    for (name, args) in servers {
        let pod = node.add_pod(name, "shop", None)?;
        procs.push(Some(serve(&pod, args)?));
        pods.push(pod);
    }
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    node.services = services(&ips);
    node.start_agent(agent_args)?;
    node.wait_meshed()?;
    Ok(Setup { node, client, servers: pods, procs })
}

fn serve(pod: &Pod, args: &[&str]) -> Result<Server> {
    let mut a = vec!["serve", "--listen", "0.0.0.0:8080", "--name", pod.name.as_str()];
    a.extend_from_slice(args);
    pod.serve_tool("sim-http", &a)
}

fn web(ips: &[Ipv4Addr], annotations: &[(&str, &str)]) -> ServiceSpec {
    service("web", "shop", WEB.parse().unwrap(), "http", 8080, ips, annotations)
}

/// `sim-http load` from the client pod.
fn load(pod: &Pod, url: &str, args: &[&str]) -> Result<LoadReport> {
    pod.load(url, args, T)
}

/// Requests a server pod received, by method (its own `/__stats`, asked directly).
fn received(pod: &Pod) -> Result<BTreeMap<String, u64>> {
    let (status, body) = http_get(&pod.netns, SocketAddr::from((pod.ip, 8080)), "/__stats")?;
    anyhow::ensure!(status == 200, "stats of {}: {status} {body}", pod.name);
    serde_json::from_str(&body).with_context(|| format!("stats {body:?}"))
}

fn endpoint_state(node: &Node, vip: &str, ep: SocketAddr) -> Result<Value> {
    let s = node.admin_json("/debug/services")?;
    s[vip]["endpoint_state"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["endpoint"] == ep.to_string()).cloned())
        .ok_or_else(|| anyhow!("{ep} not in {vip}: {s}"))
}

/// A metric of the agent's `/metrics`, summed over the label sets that include `want`.
fn counter(node: &Node, name: &str, want: &[(&str, &str)]) -> Result<f64> {
    Ok(sim::metric(&node.admin_text("/metrics")?, name, want))
}

fn ep(pod: &Pod) -> SocketAddr {
    SocketAddr::from((pod.ip, 8080))
}

#[test]
fn an_endpoint_killed_mid_run_costs_no_idempotent_request_is_ejected_and_comes_back() -> Result<()> {
    if !privileged("an_endpoint_killed_mid_run") {
        return Ok(());
    }
    let mut s = setup(
        &[("web-0", &[]), ("web-1", &[]), ("web-2", &[])],
        |ips| vec![web(ips, &[])],
        &["--outlier-base-ejection-ms", "1500"],
    )?;
    let ejections0 = counter(&s.node, "switchyard_endpoint_ejections_total", &[])?;
    let client = s.client.clone();
    let run = std::thread::spawn(move || {
        load(&client, "http://10.96.0.10/", &["--duration-ms", "4000", "--concurrency", "4", "--interval-ms", "2"])
    });
    std::thread::sleep(Duration::from_millis(1000));
    let victim = s.servers[2].clone();
    s.procs[2] = None; // killed
    // Ejected: its count of ejections is what says so (a poll can miss an ejection period under
    // a loaded CI, where the state flips back to probation after 1.5 s). Looked for as long as
    // the load runs (no traffic, no failures to count), and the last state seen is reported.
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    let state = loop {
        let done = run.is_finished() || Instant::now() > deadline;
        match endpoint_state(&s.node, WEB, ep(&victim)) {
            Ok(st) if st["ejections"].as_u64() >= Some(1) => break Some(st),
            Ok(st) => last = Some(st),
            Err(e) => last = Some(Value::String(format!("{e:#}"))),
        }
        if done {
            break None;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let r = run.join().map_err(|_| anyhow!("load panicked"))??;
    let Some(state) = state else {
        bail!(
            "the killed endpoint was not ejected while the load ran: last state {last:?}, load {r}, \
             services {:?}",
            s.node.admin_json("/debug/services").ok()
        );
    };
    eprintln!("load while killing {}: {r}\nendpoint state: {state}", victim.name);
    let total = r.total;
    assert!(total >= 200, "a real run: {r}");
    assert_eq!(Some(r.ok), Some(total), "every GET succeeded: {r}");
    assert!(r.served("web-2") > 0, "it served before it died: {r}");
    // Once the load has stopped (no more ejections), the metric counts every ejection the
    // endpoints recorded (the victim may have been ejected again after its first period).
    let ejections = counter(&s.node, "switchyard_endpoint_ejections_total", &[])? - ejections0;
    let victim_now = endpoint_state(&s.node, WEB, ep(&victim))?["ejections"].as_f64().unwrap_or(0.0);
    assert!(
        ejections >= 1.0 && ejections >= victim_now,
        "the metric counts the ejections: {ejections} vs {victim_now}"
    );

    // Back: after its ejection it is on probation, then readmitted by a success.
    s.procs[2] = Some(serve(&victim, &[])?);
    let back = eventually(Duration::from_secs(20), "the endpoint readmitted", || {
        let r = load(&s.client, "http://10.96.0.10/", &["--requests", "60", "--concurrency", "2"]).ok()?;
        (r.served("web-2") > 0 && r.ok == r.total).then_some(r)
    })?;
    eprintln!("after recovery: {back}");
    let st = endpoint_state(&s.node, WEB, ep(&victim))?;
    assert!(st.get("ejected_for_ms").is_none() && st["ejections"].as_u64() >= Some(1), "{st}");
    Ok(())
}

#[test]
fn an_endpoint_failing_30_percent_costs_no_get_posts_are_not_retried_and_the_budget_caps_retries() -> Result<()> {
    if !privileged("an_endpoint_failing_30_percent") {
        return Ok(());
    }
    let s = setup(
        &[("web-0", &["--fail-rate", "0.3"]), ("web-1", &[]), ("web-2", &[]), ("broken", &["--fail-rate", "1"])],
        |ips| {
            vec![
                web(&ips[..3], &[]),
                service("broken", "shop", "10.96.0.11:80".parse().unwrap(), "http", 8080, &ips[3..], &[]),
                service("single", "shop", "10.96.0.12:80".parse().unwrap(), "http", 8080, &ips[..1], &[]),
            ]
        },
        // Five failures in a row at 30 % happen now and then (about 1 run in 20 within the
        // faulty endpoint's first 30 requests); a short ejection brings it back within the run
        // instead of taking it out for the default 10 s, longer than the whole load.
        &["--outlier-base-ejection-ms", "100"],
    )?;
    let gets = load(&s.client, "http://10.96.0.10/", &["--requests", "2000", "--concurrency", "4"])?;
    eprintln!("GETs: {gets}");
    let total = gets.total;
    assert_eq!(total, 2000);
    assert!(gets.ok * 1000 >= total * 999, "at least 99.9 % of GETs succeed: {gets}");
    let faulty = received(&s.servers[0])?;
    // It had traffic (less than a third: outlier detection ejects it now and then, briefly).
    assert!(faulty["GET"] > 30, "the faulty endpoint had traffic: {faulty:?}");

    // POSTs are never retried: against web-0 alone (a Service's only endpoint is never
    // ejected, so the outcome does not depend on whether the GETs got web-0 ejected).
    let posts = load(
        &s.client,
        "http://10.96.0.12/",
        &["--requests", "600", "--concurrency", "4", "--method", "POST", "--body-bytes", "100"],
    )?;
    eprintln!("POSTs: {posts}");
    assert_eq!(received(&s.servers[0])?["POST"], 600, "every POST reached the endpoint exactly once: not retried");
    let failed = posts.status(503);
    assert!((60..=360).contains(&failed), "about 30 % of POSTs get the endpoint's 503: {posts}");
    assert_eq!(failed + posts.status(200), 600, "{posts}");

    // Every request to "broken" fails; with 2 retries each that would be 3x the load. The
    // budget (20 % of requests + 10/s over 10 s) caps it.
    let n = 1000;
    let (retries0, exhausted0) = (
        counter(&s.node, "switchyard_http_retries_total", &[])?,
        counter(&s.node, "switchyard_http_retry_budget_exhausted_total", &[])?,
    );
    let r = load(&s.client, "http://10.96.0.11/", &["--requests", &n.to_string(), "--concurrency", "4"])?;
    let upstream = received(&s.servers[3])?["GET"];
    // Each retry is one more request upstream, and the metrics say so exactly; requests that
    // wanted a retry the budget refused are counted too.
    let retries = counter(&s.node, "switchyard_http_retries_total", &[])? - retries0;
    let exhausted = counter(&s.node, "switchyard_http_retry_budget_exhausted_total", &[])? - exhausted0;
    eprintln!("broken: {retries} retries, budget exhausted {exhausted} times");
    // (A retry of a request never written, when a kept-alive connection closed under it,
    // makes no upstream request: allow a couple of those.)
    let extra_upstream = (upstream - n) as f64;
    assert!(
        (extra_upstream..=extra_upstream + 2.0).contains(&retries),
        "retries {retries} vs {extra_upstream} extra upstream"
    );
    assert!(exhausted >= 1.0, "the budget ran out and that was counted");
    let extra = upstream as f64 / n as f64 - 1.0;
    eprintln!("broken: {r}; upstream requests {upstream} for {n} = {:.1} % extra load", extra * 100.0);
    assert_eq!(r.status(503), n, "{r}");
    assert!(upstream > n, "some retries were made");
    assert!(upstream <= n + n / 5 + 100 + 8, "retries capped by the budget: {upstream} upstream for {n}");
    Ok(())
}

#[test]
fn a_hung_endpoint_times_out_at_the_configured_timeout_and_its_breaker_opens() -> Result<()> {
    if !privileged("a_hung_endpoint_times_out") {
        return Ok(());
    }
    let s = setup(
        &[("hung", &["--hang"]), ("slow", &["--delay-ms", "20"])],
        |ips| vec![web(ips, &[("switchyard.io/timeout", "300ms")])],
        &[],
    )?;
    let (t0, e0) = (
        counter(&s.node, "switchyard_http_request_timeouts_total", &[])?,
        counter(&s.node, "switchyard_endpoint_ejections_total", &[])?,
    );
    let r = load(&s.client, "http://10.96.0.10/", &["--duration-ms", "3000", "--concurrency", "8"])?;
    eprintln!("hung + slow: {r}");
    let timeouts = r.status(504);
    assert_eq!(
        counter(&s.node, "switchyard_http_request_timeouts_total", &[])? - t0,
        timeouts as f64,
        "timeouts counted"
    );
    assert_eq!(counter(&s.node, "switchyard_endpoint_ejections_total", &[])? - e0, 1.0, "the ejection counted");
    assert!(timeouts >= 1, "some requests reached the hung endpoint and timed out: {r}");
    assert_eq!(r.reason("request-timeout"), timeouts);
    let max = r.max_ms;
    assert!((300.0..1500.0).contains(&max), "the slowest request is the timeout, not a hang: {max} ms");
    let st = endpoint_state(&s.node, WEB, ep(&s.servers[0]))?;
    eprintln!("hung endpoint: {st}");
    assert!(st.get("ejected_for_ms").is_some() && st["ejections"] == 1, "the breaker opened: {st}");
    // Ejected after 5 timeouts in a row (plus those already in flight): the rest went to the
    // other endpoint.
    assert!(timeouts <= 5 + 8, "{timeouts} timeouts");
    assert!(r.ok > 50 * timeouts, "{r}");
    Ok(())
}

/// The per-try timeout (`switchyard.io/per-try-timeout`): with a hung endpoint among healthy
/// ones, a try past 200 ms is cancelled, counted against the hung endpoint and retried on
/// another within the 2 s overall timeout, so every GET is answered 200 (with only the overall
/// timeout, the hung attempt is never retried and some GETs get 504).
#[test]
fn a_per_try_timeout_moves_requests_off_a_hung_endpoint_and_every_get_is_answered() -> Result<()> {
    if !privileged("a_per_try_timeout_moves_requests") {
        return Ok(());
    }
    let s = setup(
        &[("hung", &["--hang"]), ("web-1", &[]), ("web-2", &[])],
        |ips| vec![web(ips, &[("switchyard.io/timeout", "2s"), ("switchyard.io/per-try-timeout", "200ms")])],
        &[],
    )?;
    let p0 = counter(&s.node, "switchyard_http_per_try_timeouts_total", &[])?;
    let r = load(&s.client, "http://10.96.0.10/", &["--requests", "200", "--concurrency", "4"])?;
    eprintln!("hung + 2 healthy, per-try 200ms: {r}");
    assert_eq!(r.status(200), 200, "every GET answered 200: {r}");
    let per_try = counter(&s.node, "switchyard_http_per_try_timeouts_total", &[])? - p0;
    assert!(per_try >= 1.0, "some tries reached the hung endpoint and were cut: {per_try}");
    let hung = received(&s.servers[0]).unwrap_or_default().values().sum::<u64>();
    eprintln!("per-try timeouts {per_try}; requests the hung endpoint received {hung}");
    assert!(per_try as u64 <= hung, "each cut try was a request the hung endpoint had");
    let max = r.max_ms;
    assert!(max < 2000.0, "no request waited out the overall timeout: {max} ms");
    Ok(())
}

#[test]
fn requests_past_the_connection_limit_fail_fast_with_the_documented_503() -> Result<()> {
    if !privileged("requests_past_the_connection_limit") {
        return Ok(());
    }
    let s = setup(
        &[("web-0", &["--delay-ms", "1500"])],
        |ips| {
            vec![
                web(ips, &[("switchyard.io/max-connections", "2")]),
                service(
                    "queued",
                    "shop",
                    "10.96.0.15:80".parse().unwrap(),
                    "http",
                    8080,
                    ips,
                    &[("switchyard.io/max-connections", "1"), ("switchyard.io/max-pending-requests", "2")],
                ),
            ]
        },
        &[],
    )?;
    let hits0 = counter(&s.node, "switchyard_http_limit_hits_total", &[])?;
    let r = load(&s.client, "http://10.96.0.10/", &["--requests", "6", "--concurrency", "6"])?;
    eprintln!("6 at once against a limit of 2: {r}");
    assert_eq!(counter(&s.node, "switchyard_http_limit_hits_total", &[])? - hits0, 4.0, "limit hits counted");
    assert_eq!(r.status(200), 2, "{r}");
    assert_eq!(r.status(503), 4, "{r}");
    assert_eq!(r.reason("connection-limit"), 4, "{r}");
    assert!(r.p50_ms < 1000.0, "the 503s came at once, not after the slow ones: {r}");
    assert_eq!(received(&s.servers[0])?["GET"], 2, "rejected requests never reached the endpoint");
    // With room to wait (max-pending-requests 2 behind max-connections 1): of four at once,
    // one runs, two wait their turn and succeed, the fourth fails fast.
    let r = load(&s.client, "http://10.96.0.15/", &["--requests", "4", "--concurrency", "4"])?;
    eprintln!("4 at once against a limit of 1 + 2 waiting: {r}");
    assert_eq!(r.status(200), 3, "{r}");
    assert_eq!(r.status(503), 1, "{r}");
    assert_eq!(r.reason("connection-limit"), 1, "{r}");
    assert!(r.max_ms >= 4000.0, "the waiting ones ran one after another: {r}");
    assert_eq!(received(&s.servers[0])?["GET"], 5, "the three admitted reached the endpoint");
    Ok(())
}

#[test]
fn server_first_protocols_wait_at_most_the_sniff_timeout_and_upgrades_and_h2_trailers_pass() -> Result<()> {
    if !privileged("server_first_protocols") {
        return Ok(());
    }
    let mut s = setup(
        &[("web-0", &[])],
        |ips| {
            vec![
                web(ips, &[]),
                service("mail", "shop", "10.96.0.12:2525".parse().unwrap(), "", 2525, ips, &[]),
                service("smtp", "shop", "10.96.0.12:25".parse().unwrap(), "", 2525, ips, &[]),
                service("grpc", "shop", "10.96.0.13:9090".parse().unwrap(), "", 8080, ips, &[]),
            ]
        },
        &["--protocol-sniff-timeout-ms", "2000"],
    )?;
    s.procs.push(Some(s.servers[0].serve_tool("sim-http", &["banner-server", "--listen", "0.0.0.0:2525"])?));

    // No hint on 2525: the proxy waits for the client's first bytes at most the sniff timeout.
    let b = s.client.http(&["banner", "--connect", "10.96.0.12:2525"], T)?;
    eprintln!("banner on an unhinted port: {b}");
    assert_eq!(b["banner"], "220 sim.example ESMTP ready");
    assert_eq!(b["reply"], "221 bye");
    let waited = b["banner_ms"].as_f64().unwrap();
    assert!((1900.0..4000.0).contains(&waited), "one sniff timeout, no more: {waited} ms");
    // Port 25 is a known server-first port: not sniffed at all.
    let b = s.client.http(&["banner", "--connect", "10.96.0.12:25"], T)?;
    eprintln!("banner on port 25: {b}");
    assert_eq!(b["reply"], "221 bye");
    assert!(b["banner_ms"].as_f64().unwrap() < 1000.0, "no sniff wait on an opaque port: {b}");

    // WebSocket-style upgrade through the HTTP path: headers intact, then raw bytes both ways.
    let u = s.client.http(&["upgrade", "--url", "http://10.96.0.10/ws"], T)?;
    eprintln!("upgrade: {u}");
    assert_eq!(u["status"], 101);
    assert_eq!(u["seen_key"], "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(u["echoed"], "frames pass through untouched");

    // gRPC-style HTTP/2 (prior knowledge, sniffed on an unnamed port) with trailers both ways.
    let g = s.client.http(&["grpc", "--url", "http://10.96.0.13:9090/pkg.Echo/Say"], T)?;
    eprintln!("grpc: {g}");
    assert_eq!(g["status"], 200);
    assert_eq!(g["version"], "HTTP/2.0");
    assert_eq!(g["trailers"]["grpc-status"], "0");
    assert_eq!(g["trailers"]["x-echo-client-checksum"], "abc123", "request trailers reached the server");
    assert_eq!(g["body"], "web-0 10\n");
    // Istio's request metrics name it gRPC, with the status from the trailers.
    let grpc_counted = eventually(Duration::from_secs(3), "the gRPC request counted", || {
        let m = s.node.admin_text("/metrics").ok()?;
        m.lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("request_protocol=\"grpc\"")
                    && l.contains("grpc_response_status=\"0\"")
                    && l.contains("destination_service_name=\"grpc\"")
            })
            .map(str::to_string)
    })?;
    assert!(grpc_counted.ends_with(" 1"), "{grpc_counted}");

    let conns = s.node.admin_json("/debug/connections")?;
    let protocols: Vec<(String, String)> = conns["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (c["original_dst"].as_str().unwrap_or("").to_string(), c["protocol"].as_str().unwrap_or("").to_string())
        })
        .collect();
    for want in [("10.96.0.12:2525", "tcp"), ("10.96.0.12:25", "tcp"), (WEB, "http1"), ("10.96.0.13:9090", "http2")] {
        assert!(protocols.iter().any(|(d, p)| d == want.0 && p == want.1), "{want:?} not in {protocols:?}");
    }
    Ok(())
}

#[test]
fn bad_service_config_is_rejected_with_the_reason_and_the_old_config_kept() -> Result<()> {
    if !privileged("bad_service_config") {
        return Ok(());
    }
    let mut s = setup(&[("web-0", &[])], |ips| vec![web(ips, &[("switchyard.io/timeout", "2s")])], &[])?;
    let ips = vec![s.servers[0].ip];
    for (k, v, why) in [
        ("switchyard.io/timeout", "soon", "is not a duration"),
        ("switchyard.io/retries", "lots", "is not a number of retries"),
        ("switchyard.io/retry-on", "404", "5xx status codes"),
        ("switchyard.io/max-connections", "0", "positive number"),
    ] {
        s.node.services = vec![web(&ips, &[(k, v)])];
        s.node.write_workloads()?;
        eventually(Duration::from_secs(5), "the bad value rejected in the log", || {
            let log = s.node.agent_log();
            log.lines().any(|l| l.contains("workload file rejected") && l.contains(k) && l.contains(why)).then_some(())
        })
        .map_err(|e| anyhow!("{e}:\n{}", s.node.agent_log()))?;
        let svc = &s.node.admin_json("/debug/services")?[WEB];
        assert_eq!(svc["policy"]["timeout"], 2000, "old policy kept after {k}: {v}: {svc}");
        let r = load(&s.client, "http://10.96.0.10/", &["--requests", "5"])?;
        assert_eq!(r.ok, 5, "still serving: {r}");
    }
    Ok(())
}

/// Connect timeout: two of a Service's three endpoints are blackholed (addresses on the pod
/// network that nobody answers: the SYN goes nowhere). A connect there gives up after the
/// configured timeout and is retried on another endpoint, for plain TCP and for HTTP alike.
#[test]
fn connects_to_blackholed_endpoints_time_out_and_are_retried_elsewhere() -> Result<()> {
    if !privileged("connects_to_blackholed_endpoints") {
        return Ok(());
    }
    let s = setup(
        &[("web-0", &[])],
        |ips| {
            // Two addresses in the node's own pod range that no pod has.
            let [a, b, c, _] = ips[0].octets();
            let holes = [Ipv4Addr::new(a, b, c, 200), Ipv4Addr::new(a, b, c, 201)];
            let eps: Vec<Ipv4Addr> = holes.iter().copied().chain(ips.iter().copied()).collect();
            vec![web(&eps, &[]), service("raw", "shop", "10.96.0.14:80".parse().unwrap(), "tcp", 8080, &eps, &[])]
        },
        &["--connect-timeout-ms", "300"],
    )?;
    let timeouts0 = counter(&s.node, "switchyard_outbound_errors_total", &[("reason", "connect_timeout")])?;
    // Plain TCP: a new connection per request.
    let tcp = load(&s.client, "http://10.96.0.14/", &["--requests", "12", "--new-connection"])?;
    eprintln!("TCP through a Service with two blackholed endpoints: {tcp}");
    assert_eq!(tcp.ok, 12, "{tcp}");
    let timeouts = counter(&s.node, "switchyard_outbound_errors_total", &[("reason", "connect_timeout")])? - timeouts0;
    assert!(timeouts >= 1.0, "a blackholed endpoint was tried and timed out");
    let conns = s.node.admin_json("/debug/connections")?;
    let raw: Vec<&Value> =
        conns["recent"].as_array().unwrap().iter().filter(|c| c["original_dst"] == "10.96.0.14:80").collect();
    assert_eq!(raw.len(), 12, "{conns}");
    assert!(raw.iter().all(|c| c["endpoint"] == ep(&s.servers[0]).to_string() && c["error"].is_null()), "{conns}");
    let retried = raw.iter().map(|c| c["retries"].as_u64().unwrap_or(0)).sum::<u64>();
    assert!(retried as f64 >= timeouts, "each timeout was retried: {retried} retries, {timeouts} timeouts");
    assert!(s.node.agent_log().contains("timed out after 300ms"), "the reason is logged");
    // HTTP: requests balanced per request, a connect timeout retried like a refused connect.
    let http = load(&s.client, "http://10.96.0.10/", &["--requests", "20", "--concurrency", "2"])?;
    eprintln!("HTTP through a Service with two blackholed endpoints: {http}");
    assert_eq!(http.ok, 20, "{http}");
    Ok(())
}

/// Item 6, as the agent restarts today: on SIGTERM it detaches its programs first (new
/// connections go direct: this namespace fails open), lets connections through it drain for
/// the grace period, and the new agent re-attaches once it is ready. Measured, and reported by
/// the test: failed requests on new connections (must be none) and on kept-alive connections
/// that went through the old agent (at most one per connection, when the drain ends).
#[test]
fn agent_restart_under_steady_load_never_fails_a_new_connection_in_a_fail_open_namespace() -> Result<()> {
    if !privileged("agent_restart_under_steady_load") {
        return Ok(());
    }
    let mut s = setup(&[("web-0", &[])], |ips| vec![web(ips, &[])], &[])?;
    let url = format!("http://{}:8080/", s.servers[0].ip);
    let (c1, c2, u1, u2) = (s.client.clone(), s.client.clone(), url.clone(), url.clone());
    let fresh = std::thread::spawn(move || {
        load(&c1, &u1, &["--duration-ms", "9000", "--concurrency", "2", "--interval-ms", "5", "--new-connection"])
    });
    let kept = std::thread::spawn(move || {
        load(&c2, &u2, &["--duration-ms", "9000", "--concurrency", "4", "--interval-ms", "5"])
    });
    std::thread::sleep(Duration::from_millis(1500));
    let before = s.node.proxied_total()?;
    assert!(before > 0, "traffic goes through the proxy before the restart");
    let t = std::time::Instant::now();
    assert!(s.node.stop_agent(Duration::from_secs(15))?, "clean exit");
    let stopped = t.elapsed();
    s.node.start_agent(&[])?;
    let gap = t.elapsed();
    let fresh = fresh.join().map_err(|_| anyhow!("load panicked"))??;
    let kept = kept.join().map_err(|_| anyhow!("load panicked"))??;
    let after = s.node.proxied_total()?;
    eprintln!(
        "restart: old agent exited after {stopped:?}, new one ready {gap:?} after SIGTERM\n\
         new connection per request: {fresh}\nkept-alive connections: {kept}\nproxied by the new agent: {after}"
    );
    let total = fresh.total;
    assert!(total > 100, "{fresh}");
    if Some(fresh.ok) != Some(total) {
        panic!("a new connection failed (SIGTERM ~1500 ms into the run): {fresh}\n{}", s.node.agent_log());
    }
    let kept_failed = kept.total - kept.ok;
    assert!(kept_failed <= 4, "at most one failure per kept-alive connection, when the drain ends: {kept}");
    assert!(after > 0, "the new agent proxies again");
    Ok(())
}
