//! End to end, Kubernetes mode: a real agent with a real `kube::Client` watching the in-repo fake
//! API server (on the node's loopback), meshing real simulated pods whose cgroups are laid out as
//! the kubelet does.
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};
use sim::{Node, Pod, Server, eventually, fake_api::FakeApi, privileged};

const T: Duration = Duration::from_secs(30);
/// The bound for a change to reach the datapath, plus the polling granularity.
const WITHIN_A_SECOND: Duration = Duration::from_millis(1100);

fn ns_json(name: &str, meshed: bool) -> Value {
    let annotations = if meshed { json!({"switchyard.io/mesh": "enabled"}) } else { json!({}) };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": annotations}})
}

fn pod_json(p: &Pod, uid: &str, node: &str, opt_out: bool) -> Value {
    let annotations = if opt_out { json!({"switchyard.io/mesh": "disabled"}) } else { json!({}) };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "uid": uid, "annotations": annotations,
                     "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {"nodeName": node, "serviceAccountName": p.service_account,
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "podIP": p.ip.to_string(), "qosClass": "Burstable"}
    })
}

fn uid(name: &str) -> String {
    format!("5f0c6a2e-0000-4000-8000-{:0>12}", name.bytes().map(|b| format!("{b:02x}")).collect::<String>())
        .chars()
        .take(36)
        .collect()
}

struct Setup {
    node: Node,
    api: FakeApi,
    client: Pod,
    server: Pod,
    _echo: Server,
}

/// A node in Kubernetes mode: the fake API server in its namespace, a client (Burstable, systemd
/// layout) and a server (Guaranteed, cgroupfs layout) in namespace `shop`.
fn setup(meshed: bool) -> Result<Setup> {
    let mut node = Node::new("node")?;
    let api = FakeApi::start(&node.netns)?;
    let kubeconfig = node.dir.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    node.kubeconfig = Some(kubeconfig);
    let (cu, su) = (uid("client"), uid("server"));
    let client = node.add_pod_at(
        "client",
        "shop",
        None,
        &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", cu.replace('-', "_")),
    )?;
    let server = node.add_pod_at("server", "shop", None, &format!("kubepods/pod{su}"))?;
    let echo = server.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?;
    api.apply("namespaces", ns_json("shop", meshed));
    api.apply("pods", pod_json(&client, &cu, "node", false));
    api.apply("pods", pod_json(&server, &su, "node", false));
    api.apply(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node"},
               "status": {"addresses": [{"type": "InternalIP", "address": node.gateway.to_string()}]}}),
    );
    node.start_agent(&[])?;
    Ok(Setup { node, api, client, server, _echo: echo })
}

/// Waits until the agent balances `vip` over `n` endpoints.
fn wait_service(node: &Node, vip: &str, n: usize) -> Result<()> {
    eventually(Duration::from_secs(5), &format!("service {vip} with {n} endpoints"), || {
        let services = node.admin_json("/debug/services").ok()?;
        (services[vip]["endpoints"].as_array()?.len() == n).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", node.admin_json("/debug/services")))
}

fn redirected(node: &Node, pod: &str) -> Option<bool> {
    let pods = node.admin_json("/debug/pods").ok()?;
    pods.as_array()?.iter().find(|p| p["key"] == format!("shop/{pod}")).map(|p| p["redirected"] == true)
}

fn wait_meshed(node: &Node, pod: &str, want: bool, within: Duration) -> Result<()> {
    eventually(within, &format!("{pod} redirected={want}"), || (redirected(node, pod) == Some(want)).then_some(()))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", node.agent_log()))
}

/// Connects client → server and says whether the proxy carried it.
fn proxied(s: &Setup) -> Result<bool> {
    let before = s.node.proxied_total()?;
    let r = s.client.workload(&["client", "--connect", &format!("{}:8080", s.server.ip)], T)?;
    anyhow::ensure!(r["ok"] == 1, "connection failed: {r}");
    // The proxy records a connection when it ends, just after the client sees the echo.
    std::thread::sleep(Duration::from_millis(200));
    Ok(s.node.proxied_total()? > before)
}

#[test]
fn annotating_a_namespace_meshes_its_pods_within_a_second_and_removing_it_unmeshes() -> Result<()> {
    if !privileged("kube_annotate_namespace") {
        return Ok(());
    }
    let s = setup(false)?;
    eventually(Duration::from_secs(5), "pods known", || (redirected(&s.node, "client") == Some(false)).then_some(()))?;
    assert!(!proxied(&s)?, "not meshed yet: direct");
    // The agent watches this node's pods with a field selector, and everything else trimmed.
    let reqs = s.api.requests();
    assert!(reqs.iter().any(|r| r.contains("watch pods fieldSelector=spec.nodeName=node")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.contains("watch namespaces")), "{reqs:?}");

    s.api.apply("namespaces", ns_json("shop", true));
    wait_meshed(&s.node, "client", true, WITHIN_A_SECOND)?;
    wait_meshed(&s.node, "server", true, WITHIN_A_SECOND)?;
    assert!(proxied(&s)?, "meshed: through the proxy");

    // Pod opt-out, honoured at run time.
    s.api.apply("pods", pod_json(&s.client, &uid("client"), "node", true));
    wait_meshed(&s.node, "client", false, WITHIN_A_SECOND)?;
    assert!(!proxied(&s)?, "opted out: direct");
    s.api.apply("pods", pod_json(&s.client, &uid("client"), "node", false));
    wait_meshed(&s.node, "client", true, WITHIN_A_SECOND)?;

    s.api.apply("namespaces", ns_json("shop", false));
    wait_meshed(&s.node, "client", false, WITHIN_A_SECOND)?;
    wait_meshed(&s.node, "server", false, WITHIN_A_SECOND)?;
    assert!(!proxied(&s)?);
    Ok(())
}

#[test]
fn other_nodes_pods_are_known_not_meshed_here_and_late_cgroups_are_picked_up() -> Result<()> {
    if !privileged("kube_late_cgroup") {
        return Ok(());
    }
    let mut s = setup(true)?;
    wait_meshed(&s.node, "client", true, Duration::from_secs(5))?;
    // A pod of another node: known (for routing and identity), never meshed here.
    s.api.apply(
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "far", "namespace": "shop", "uid": uid("far")},
               "spec": {"nodeName": "other", "serviceAccountName": "far"},
               "status": {"phase": "Running", "podIP": "10.244.99.7"}}),
    );
    eventually(Duration::from_secs(2), "remote pod known", || {
        let pods = s.node.admin_json("/debug/pods").ok()?;
        let far = pods.as_array()?.iter().find(|p| p["key"] == "shop/far")?.clone();
        Some(far)
    })
    .map(|far| {
        assert_eq!(far["redirected"], false, "{far}");
        assert_eq!(far["node"], "other", "{far}");
    })?;

    // The Pod object first, its cgroup (the pod sandbox) only later.
    let late_uid = uid("late");
    let late_ip = std::net::Ipv4Addr::new(10, 244, s.node.subnet(), 12);
    let placeholder = Pod {
        name: "late".into(),
        node: "node".into(),
        namespace: "shop".into(),
        service_account: "late".into(),
        netns: String::new(),
        ip: late_ip,
        cgroup: Default::default(),
        annotation: None,
        workload: None,
        labels: Vec::new(),
        probe_ports: Vec::new(),
    };
    s.api.apply("pods", pod_json(&placeholder, &late_uid, "node", false));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(redirected(&s.node, "late"), Some(false), "no cgroup yet: not in the datapath");
    let late = s.node.add_pod_at("late", "shop", None, &format!("kubepods/besteffort/pod{late_uid}"))?;
    assert_eq!(late.ip, late_ip);
    wait_meshed(&s.node, "late", true, Duration::from_secs(2))?;
    let before = s.node.proxied_total()?;
    let r = late.workload(&["client", "--connect", &format!("{}:8080", s.server.ip)], T)?;
    assert_eq!(r["ok"], 1, "{r}");
    eventually(Duration::from_secs(2), "proxied", || (s.node.proxied_total().ok()? > before).then_some(()))?;
    Ok(())
}

#[test]
fn meshed_pods_stay_meshed_while_the_api_server_is_down_or_answers_410() -> Result<()> {
    if !privileged("kube_api_restart") {
        return Ok(());
    }
    let mut s = setup(true)?;
    wait_meshed(&s.node, "client", true, Duration::from_secs(5))?;

    // API server killed: nothing changes in the datapath, traffic still meshed.
    s.api.stop();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(redirected(&s.node, "client"), Some(true));
    assert!(proxied(&s)?, "still meshed while the API server is away");
    assert!(s.node.agent_log().contains("watch failed"), "the outage is logged");

    // Back, with a change made meanwhile: picked up after the watches reconnect.
    s.api.apply("pods", pod_json(&s.client, &uid("client"), "node", true));
    s.api.restart()?;
    wait_meshed(&s.node, "client", false, Duration::from_secs(15))?;

    // History compacted: resuming watches get 410 Gone, relist, and still see new changes.
    s.api.compact();
    s.api.apply("pods", pod_json(&s.client, &uid("client"), "node", false));
    wait_meshed(&s.node, "client", true, Duration::from_secs(15))?;
    assert_eq!(redirected(&s.node, "server"), Some(true), "the server never left the mesh");
    assert!(proxied(&s)?);
    Ok(())
}

#[test]
fn malformed_objects_are_logged_and_skipped_never_crash_the_agent() -> Result<()> {
    if !privileged("kube_malformed") {
        return Ok(());
    }
    let s = setup(true)?;
    wait_meshed(&s.node, "client", true, Duration::from_secs(5))?;
    for bad in [
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b1", "namespace": "shop"},
               "spec": "oops", "status": {"podIP": "10.244.64.50"}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b2", "namespace": "shop", "uid": "u2"},
               "spec": {"nodeName": "node", "hostNetwork": "yes"}, "status": {"podIP": "10.244.64.51"}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b3", "namespace": "shop", "uid": "u3"},
               "spec": {"nodeName": "node"}, "status": {"podIP": "not.an.ip"}}),
    ] {
        s.api.apply("pods", bad);
    }
    s.api.apply(
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "weird", "annotations": {"switchyard.io/mtls-mode": "sometimes"}}}),
    );
    // A good change after the bad ones still arrives.
    s.api.apply("pods", pod_json(&s.client, &uid("client"), "node", true));
    wait_meshed(&s.node, "client", false, Duration::from_secs(5))?;
    let log = s.node.agent_log();
    assert!(log.matches("skipping malformed object").count() >= 4, "{log}");
    assert!(log.contains("shop/b1") && log.contains("not.an.ip") && log.contains("sometimes"), "{log}");
    assert_eq!(redirected(&s.node, "server"), Some(true));
    assert!(s.node.agent_pid().is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()));
    assert!(!s.node.admin_text("/healthz")?.trim().is_empty());
    Ok(())
}

#[test]
fn a_service_cluster_ip_is_balanced_over_its_ready_endpoints_by_the_proxy() -> Result<()> {
    if !privileged("kube_service_balancing") {
        return Ok(());
    }
    let mut s = setup(true)?;
    let u2 = uid("server2");
    let server2 = s.node.add_pod_at("server2", "shop", None, &format!("kubepods/burstable/pod{u2}"))?;
    let _echo2 = server2.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?;
    s.api.apply("pods", pod_json(&server2, &u2, "node", false));
    s.api.apply(
        "services",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "tcp-echo", "port": 80, "targetPort": 8080}]}}),
    );
    // Two ready endpoints and one not ready (nothing listens there: using it would fail).
    s.api.apply(
        "endpointslices",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "echo-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "echo"}},
               "addressType": "IPv4", "ports": [{"name": "tcp-echo", "port": 8080, "protocol": "TCP"}],
               "endpoints": [
                   {"addresses": [s.server.ip.to_string()], "conditions": {"ready": true}},
                   {"addresses": [server2.ip.to_string()], "conditions": {"ready": true}},
                   {"addresses": ["10.244.65.99"], "conditions": {"ready": false}}]}),
    );
    wait_meshed(&s.node, "server2", true, Duration::from_secs(5))?;
    wait_service(&s.node, "10.96.0.10:80", 2)?;
    // No kube-proxy here: the ClusterIP exists only in the agent's table.
    let before = s.node.proxied_total()?;
    let r = s.client.workload(&["client", "--connect", "10.96.0.10:80", "--count", "10"], T)?;
    assert_eq!(r["ok"], 10, "{r}");
    eventually(Duration::from_secs(3), "all recorded", || (s.node.proxied_total().ok()? >= before + 10).then_some(()))?;
    let conns = s.node.admin_json("/debug/connections")?;
    let recent: Vec<&Value> =
        conns["recent"].as_array().unwrap().iter().filter(|c| c["original_dst"] == "10.96.0.10:80").collect();
    assert_eq!(recent.len(), 10, "{conns}");
    let to = |pod: &str| recent.iter().filter(|c| c["destination_pod"] == pod).count();
    assert_eq!(to("shop/server") + to("shop/server2"), 10, "only ready endpoints: {conns}");
    assert!(recent.iter().all(|c| c["error"].is_null() && c["retries"] == 0), "{conns}");
    Ok(())
}

#[test]
fn connects_to_dead_service_endpoints_are_retried_on_live_ones() -> Result<()> {
    if !privileged("kube_service_retries") {
        return Ok(());
    }
    let mut s = setup(true)?;
    // Three ready endpoints; two of them have nothing listening (their process died): a
    // connect there is refused.
    let mut dead = Vec::new();
    for name in ["dead1", "dead2"] {
        let u = uid(name);
        let p = s.node.add_pod_at(name, "shop", None, &format!("kubepods/burstable/pod{u}"))?;
        s.api.apply("pods", pod_json(&p, &u, "node", false));
        dead.push(p);
    }
    s.api.apply(
        "services",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "tcp-echo", "port": 80}]}}),
    );
    let addrs: Vec<String> = [&s.server, &dead[0], &dead[1]].iter().map(|p| p.ip.to_string()).collect();
    s.api.apply(
        "endpointslices",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "echo-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "echo"}},
               "addressType": "IPv4", "ports": [{"name": "tcp-echo", "port": 8080}],
               "endpoints": addrs.iter().map(|a| json!({"addresses": [a]})).collect::<Vec<_>>()}),
    );
    wait_meshed(&s.node, "dead2", true, Duration::from_secs(5))?;
    wait_service(&s.node, "10.96.0.20:80", 3)?;
    let r = s.client.workload(&["client", "--connect", "10.96.0.20:80", "--count", "30"], T)?;
    assert_eq!(r["ok"], 30, "every connection reaches the live endpoint: {r}");
    eventually(Duration::from_secs(3), "all recorded", || {
        let conns = s.node.admin_json("/debug/connections").ok()?;
        let n = conns["recent"].as_array()?.iter().filter(|c| c["original_dst"] == "10.96.0.20:80").count();
        (n == 30).then_some(conns)
    })
    .map(|conns| {
        let recent: Vec<&Value> =
            conns["recent"].as_array().unwrap().iter().filter(|c| c["original_dst"] == "10.96.0.20:80").collect();
        assert!(recent.iter().all(|c| c["destination_pod"] == "shop/server" && c["error"].is_null()), "{conns}");
        let retries: u64 = recent.iter().map(|c| c["retries"].as_u64().unwrap_or(0)).sum();
        assert!(retries >= 1, "dead endpoints were tried and retried: {conns}");
        assert!(recent.iter().all(|c| c["retries"].as_u64().unwrap_or(0) <= 2), "bounded: {conns}");
    })?;
    assert!(s.node.agent_log().contains("retrying on another endpoint"));
    Ok(())
}

#[test]
fn past_a_services_connection_limit_new_connections_fail_fast_and_bad_limits_keep_the_old_one() -> Result<()> {
    if !privileged("kube_service_limit") {
        return Ok(());
    }
    let s = setup(true)?;
    let service = |limit: &str| {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "echo", "namespace": "shop", "annotations": {"switchyard.io/max-connections": limit}},
               "spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "tcp-echo", "port": 80}]}})
    };
    s.api.apply("services", service("2"));
    s.api.apply(
        "endpointslices",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "echo-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "echo"}},
               "addressType": "IPv4", "ports": [{"name": "tcp-echo", "port": 8080}],
               "endpoints": [{"addresses": [s.server.ip.to_string()]}]}),
    );
    wait_meshed(&s.node, "client", true, Duration::from_secs(5))?;
    wait_service(&s.node, "10.96.0.30:80", 1)?;
    // A bad value is rejected with the reason; the limit of 2 stays.
    s.api.apply("services", service("lots"));
    eventually(Duration::from_secs(3), "bad limit logged", || {
        s.node.agent_log().contains("is not a positive number of connections").then_some(())
    })?;
    assert_eq!(s.node.admin_json("/debug/services")?["10.96.0.30:80"]["policy"]["max_connections"], 2);

    // Two connections held open: the limit.
    let holder = s.client.hold("10.96.0.30:80", 2, 20)?;
    eventually(Duration::from_secs(3), "two connections open through the proxy", || {
        let c = s.node.admin_json("/debug/connections").ok()?;
        (c["active"].as_array()?.iter().filter(|a| a["original_dst"] == "10.96.0.30:80").count() == 2).then_some(())
    })?;
    // The third fails at once with a reset, not a wait.
    let r = s.client.workload(&["client", "--connect", "10.96.0.30:80"], T)?;
    assert_eq!((r["ok"].as_u64(), r["failed"].as_u64()), (Some(0), Some(1)), "{r}");
    assert!(r["errors"].to_string().contains("reset"), "{r}");
    assert!(r["elapsed_ms"].as_u64().unwrap_or(u64::MAX) < 2_000, "fail fast: {r}");
    assert!(s.node.agent_log().contains("at its limit of 2 open connections"));
    drop(holder);
    // Slots are given back when connections close.
    eventually(Duration::from_secs(5), "a slot is free again", || {
        let r = s.client.workload(&["client", "--connect", "10.96.0.30:80"], T).ok()?;
        (r["ok"] == 1).then_some(())
    })?;
    Ok(())
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

/// Istio's AuthorizationPolicy and PeerAuthentication, read from the API: a DENY by
/// principal for the pods a selector picks (same node, so the source is its pod), lifted when
/// deleted; an ALLOW that others do not match; CUSTOM reported, not enforced; STRICT
/// PeerAuthentication drops plaintext from a pod outside the mesh in the kernel. Before the
/// CRDs exist the agent says nothing is enforced.
#[test]
fn istio_authorization_policies_and_peer_authentication_are_enforced() -> Result<()> {
    if !privileged("kube_istio_policies") {
        return Ok(());
    }
    // Without Istio's CRDs: said, and nothing enforced.
    let mut s = setup(true)?;
    wait_meshed(&s.node, "server", true, Duration::from_secs(5))?;
    assert!(proxied(&s)?);
    eventually(T, "the agent says the CRDs are absent", || {
        s.node.agent_log().contains("Istio's security CRDs").then_some(())
    })?;
    s.node.stop_agent(T)?;

    // With them: the server pod labelled app=server, a pod outside the mesh in `legacy`.
    s.api.install_istio_crds();
    let mut server = pod_json(&s.server, &uid("server"), "node", false);
    server["metadata"]["labels"] = json!({"app": "server"});
    s.api.apply("pods", server);
    let lu = uid("legacy");
    let legacy = s.node.add_pod_at("legacy", "legacy", None, &format!("kubepods/besteffort/pod{lu}"))?;
    s.api.apply("namespaces", ns_json("legacy", false));
    s.api.apply("pods", pod_json(&legacy, &lu, "node", false));
    let client_principal = format!("cluster.local/ns/shop/sa/{}", s.client.service_account);
    s.api.apply(
        "authorizationpolicies",
        policy(
            "no-client",
            json!({"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                   "rules": [{"from": [{"source": {"principals": [client_principal]}}]}]}),
        ),
    );
    s.api.apply(
        "authorizationpolicies",
        policy("ext", json!({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]})),
    );
    s.node.start_agent(&[])?;
    wait_meshed(&s.node, "server", true, Duration::from_secs(5))?;
    let to_server = format!("{}:8080", s.server.ip);
    let r = s.client.client(&to_server, &["--timeout-ms", "1500"], T)?;
    assert_eq!(r.ok, 0, "denied by the DENY policy: {r:?}");
    let authz = s.node.admin_json("/debug/authz")?;
    let reports = authz["reports"].as_array().cloned().unwrap_or_default();
    assert!(reports.iter().any(|r| r["policy"] == "shop/ext" && r["status"] == "not_enforced"), "{authz}");
    let metrics = s.node.admin_text("/metrics")?;
    assert_eq!(sim::metric(&metrics, "switchyard_authorization_policies", &[("status", "not_enforced")]), 1.0);
    assert_eq!(sim::metric(&metrics, "switchyard_authorization_policies", &[("status", "enforced")]), 1.0);

    // A DENY on principals makes the pod reachable only through the mesh.
    let dropped = |n: &Node| n.kernel_events().map(|e| e["strict_dropped"].as_u64().unwrap_or(0));
    let before = dropped(&s.node)?;
    let r = legacy.client(&to_server, &["--timeout-ms", "1500"], T)?;
    assert_eq!(r.ok, 0, "plaintext around the policy: {r:?}");
    assert!(dropped(&s.node)? > before, "dropped in the kernel");

    // Deleted: allowed again (the open decision is re-evaluated on every change).
    s.api.delete("authorizationpolicies", "shop/no-client");
    eventually(Duration::from_secs(5), "allowed once the policy is gone", || {
        s.client.client(&to_server, &["--timeout-ms", "1500"], T).ok().filter(|r| r.ok == 1)
    })?;
    let r = legacy.client(&to_server, &["--timeout-ms", "1500"], T)?;
    assert_eq!(r.ok, 1, "no policy, no PeerAuthentication: permissive again: {r:?}");

    // PeerAuthentication STRICT for the namespace: plaintext dropped, the mesh still served.
    s.api.apply(
        "peerauthentications",
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    eventually(Duration::from_secs(5), "plaintext dropped under STRICT", || {
        legacy.client(&to_server, &["--timeout-ms", "1500"], T).ok().filter(|r| r.ok == 0)
    })?;
    assert!(proxied(&s)?, "meshed clients still served");
    Ok(())
}

/// Istio's semantics end to end, one policy set after another on one node: allow by principal
/// and port for the pod a selector picks (its neighbour untouched), deny by namespace, an
/// ALLOW that needs L7 attributes denies, a malformed policy denies, and a DENY that appears
/// closes an open connection within a second. `/debug/authz?pod=` decides as the proxy did;
/// denials are counted by policy.
#[test]
fn istio_policy_semantics_in_kubernetes_mode() -> Result<()> {
    if !privileged("kube_istio_semantics") {
        return Ok(());
    }
    let mut s = setup(true)?;
    s.node.stop_agent(T)?;
    s.api.install_istio_crds();
    let mut server = pod_json(&s.server, &uid("server"), "node", false);
    server["metadata"]["labels"] = json!({"app": "server"});
    s.api.apply("pods", server);
    let ou = uid("other");
    let other = s.node.add_pod_at("other", "shop", None, &format!("kubepods/besteffort/pod{ou}"))?;
    let mut other_json = pod_json(&other, &ou, "node", false);
    other_json["metadata"]["labels"] = json!({"app": "other"});
    s.api.apply("pods", other_json);
    let _other_echo = other.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?;
    let _server_9090 = s.server.serve(&["echo-server", "--listen", "0.0.0.0:9090"])?;
    let principal = |p: &Pod| format!("cluster.local/ns/shop/sa/{}", p.service_account);
    s.api.apply(
        "authorizationpolicies",
        policy(
            "server-from-client",
            json!({"selector": {"matchLabels": {"app": "server"}},
                   "rules": [{"from": [{"source": {"principals": [principal(&s.client)]}}],
                              "to": [{"operation": {"ports": ["8080"]}}]}]}),
        ),
    );
    s.node.start_agent(&[])?;
    wait_meshed(&s.node, "other", true, Duration::from_secs(5))?;
    let (to_server, to_9090, to_other) =
        (format!("{}:8080", s.server.ip), format!("{}:9090", s.server.ip), format!("{}:8080", other.ip));
    let quick = ["--timeout-ms", "1500"];
    let ok = |from: &Pod, to: &str| -> Result<bool> { Ok(from.client(to, &quick, T)?.ok == 1) };
    assert!(ok(&s.client, &to_server)?, "allowed by principal and port");
    assert!(!ok(&s.client, &to_9090)?, "another port of the same pod: no ALLOW matches");
    assert!(!ok(&other, &to_server)?, "another principal");
    assert!(ok(&s.client, &to_other)?, "the selector picks one of the two pods");
    let q =
        s.node.admin_json(&format!("/debug/authz?pod=shop/server&from=spiffe://{}&port=9090", principal(&s.client)))?;
    assert_eq!(
        (q["applies"][0].as_str(), q["decision"]["result"].as_str()),
        (Some("shop/server-from-client"), Some("no_allow_rule")),
        "{q}"
    );

    // An open connection, then a DENY by namespace for `other`: closed within a second.
    let mut hold = other.command(sim::bin_path("sim-workload")?);
    hold.args(["hold", "--connect", &to_other, "--count", "1", "--seconds", "30"]);
    let _holder = Server::spawn(hold)?;
    let closed = |n: &Node| {
        n.admin_text("/metrics").map(|m| sim::metric(&m, "switchyard_connections_closed_by_policy_total", &[]))
    };
    eventually(Duration::from_secs(5), "the held connection is open", || {
        let c = s.node.admin_json("/debug/connections").ok()?;
        (c["active"].as_array()?.iter().any(|o| o["original_dst"] == to_other.as_str())).then_some(())
    })?;
    let before = closed(&s.node)?;
    s.api.apply(
        "authorizationpolicies",
        policy(
            "no-shop-to-other",
            json!({"selector": {"matchLabels": {"app": "other"}}, "action": "DENY",
                   "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
        ),
    );
    let applied = std::time::Instant::now();
    eventually(Duration::from_secs(3), "the open connection closed by the new DENY", || {
        (closed(&s.node).ok()? > before).then_some(())
    })?;
    assert!(applied.elapsed() < Duration::from_millis(1500), "closed in {:?}", applied.elapsed());
    assert!(!ok(&s.client, &to_other)?, "denied by namespace");
    let m = s.node.admin_text("/metrics")?;
    assert!(
        sim::metric(&m, "switchyard_authorization_policy_denials_total", &[("policy", "shop/no-shop-to-other")]) >= 1.0,
        "{m}"
    );
    let summary = s.node.admin_json("/debug/summary")?;
    assert!(summary["denials_by_policy"]["shop/no-shop-to-other"].as_u64() >= Some(1), "the dashboard's: {summary}");
    s.api.delete("authorizationpolicies", "shop/no-shop-to-other");
    eventually(Duration::from_secs(5), "allowed again", || ok(&s.client, &to_other).ok().filter(|b| *b))?;

    // An ALLOW that needs L7 attributes never matches: the pod it selects is denied.
    let l7 = json!({"selector": {"matchLabels": {"app": "other"}},
                    "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]});
    s.api.apply("authorizationpolicies", policy("other-get-only", l7));
    eventually(Duration::from_secs(5), "an L7-only ALLOW denies", || ok(&s.client, &to_other).ok().filter(|b| !*b))?;
    s.api.delete("authorizationpolicies", "shop/other-get-only");
    eventually(Duration::from_secs(5), "allowed again", || ok(&s.client, &to_other).ok().filter(|b| *b))?;

    // A malformed policy denies its workloads, never allows; the others keep working.
    let bad = json!({"selector": {"matchLabels": {"app": "other"}}, "action": "MAYBE", "rules": [{}]});
    s.api.apply("authorizationpolicies", policy("broken", bad));
    eventually(Duration::from_secs(5), "a malformed policy denies", || ok(&s.client, &to_other).ok().filter(|b| !*b))?;
    assert!(ok(&s.client, &to_server)?, "other policies keep working");
    let authz = s.node.admin_json("/debug/authz")?;
    assert!(
        authz["reports"].as_array().unwrap().iter().any(|r| r["policy"] == "shop/broken" && r["status"] == "malformed"),
        "{authz}"
    );
    Ok(())
}
