//! End to end, identity without the CA key on the nodes: two nodes whose agents ask the signer
//! (`mesh-agent identity serve`, on a third node with the fake API server) for their pods'
//! certificates over Istio's CA API, authenticated by ServiceAccount tokens the fake API server
//! issued and reviews.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use mesh_agent::identity::{
    Identity,
    caclient::{CaClient, CaClientConfig},
    csr,
    issuer::{CertIssuer as _, IssueError},
};
use serde_json::{Value, json};
use sim::{Cluster, Pod, Server, Signer, eventually, fake_api::FakeApi, privileged};

const T: Duration = Duration::from_secs(30);
const AUDIENCE: &str = "istio-ca";

struct Setup {
    c: Cluster,
    api: FakeApi,
    signer: Signer,
    client: Pod,
    server: Pod,
    /// Meshed, on node-a with the client, echo on 8080.
    neighbour: Pod,
    /// The agents' arguments, for restarts.
    agent_args: Vec<Vec<String>>,
    _servers: Vec<Server>,
}

fn uid(name: &str) -> String {
    format!("uid-{name}")
}

fn pod_json(ns: &str, name: &str, node: &str, sa: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid(name)},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
        "status": {"phase": "Running"}
    })
}

fn agent_pod(node: &str) -> String {
    format!("mesh-agent-{node}")
}

/// node-a runs `client`, node-b `server` (echo on 8080), both meshed in `shop`; node `ca` runs
/// the fake API server and the signer. Each agent has a token of the `switchyard/mesh-agent`
/// ServiceAccount bound to its own (API-only) pod, and no CA key.
fn setup(agent_args: &[&str]) -> Result<Setup> {
    setup_pinned(agent_args, false)
}

/// The same; with `pin`, node-a's agent pins its programs (so a second one can take over).
fn setup_pinned(agent_args: &[&str], pin: bool) -> Result<Setup> {
    let mut c = Cluster::new()?;
    c.add_node("node-a")?;
    c.add_node("node-b")?;
    if pin {
        c.node("node-a").pin_programs()?;
    }
    let ca = c.add_node("ca")?;
    c.set_namespace("shop", true, None);
    let client = c.node("node-a").add_pod("client", "shop", None)?;
    let server = c.node("node-b").add_pod("server", "shop", None)?;
    let neighbour = c.node("node-a").add_pod("neighbour", "shop", None)?;
    let servers = vec![
        server.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?,
        neighbour.serve(&["echo-server", "--listen", "0.0.0.0:8080"])?,
    ];
    let api = FakeApi::start(&c.nodes[ca].netns)?;
    let kubeconfig = c.nodes[ca].dir.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    for p in [&client, &server, &neighbour] {
        api.apply("pods", pod_json(&p.namespace, &p.name, &p.node, &p.service_account));
    }
    for n in ["node-a", "node-b"] {
        api.apply("pods", pod_json("switchyard", &agent_pod(n), n, "mesh-agent"));
    }
    let signer = Signer::start(
        &c.nodes[ca],
        &c.ca_dir,
        &kubeconfig,
        &["--trusted-node-account=switchyard/mesh-agent", "--root-configmap=switchyard/switchyard-ca-root"],
    )?;
    c.write_workloads()?;
    let bundle = c.ca_dir.join("bundle.crt").to_string_lossy().into_owned();
    let address = format!("https://{}", signer.addr);
    let mut all_args = Vec::new();
    for n in ["node-a", "node-b"] {
        let pod = agent_pod(n);
        let token = api.token("switchyard", "mesh-agent", Some((&pod, &uid(&pod))), &[AUDIENCE], 3600);
        let node = c.node(n);
        let token_file = node.dir.join("token").to_string_lossy().into_owned();
        std::fs::write(&token_file, token)?;
        let mut args = vec!["--ca-address", &address, "--ca-root-cert", &bundle, "--ca-token-file", &token_file];
        args.extend_from_slice(agent_args);
        node.start_agent(&args)?;
        all_args.push(args.iter().map(|a| a.to_string()).collect());
    }
    Ok(Setup { c, api, signer, client, server, neighbour, agent_args: all_args, _servers: servers })
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

fn shop(sa: &str) -> Identity {
    Identity::new("cluster.local", "shop", sa)
}

/// Asks the signer for `id` as the caller `token` names, with a CSR from `csr_for` (the same
/// identity unless a test says otherwise), from inside the signer's node.
fn ask(s: &Setup, token: &str, id: &Identity, csr_for: &Identity) -> Result<Result<Vec<String>, IssueError>> {
    let dir = tempfile_dir(&s.c.dir)?;
    let token_file = dir.join(format!("token-{}", fastrand::u32(..)));
    std::fs::write(&token_file, token)?;
    let config = CaClientConfig {
        address: format!("https://{}", s.signer.addr),
        root_cert: s.c.ca_dir.join("bundle.crt"),
        token_file,
        cluster_id: "Kubernetes".into(),
    };
    let client = CaClient::new(config, Duration::from_secs(5))?;
    let csr = csr::generate(csr_for)?;
    let netns = s.c.nodes[2].netns.clone();
    let id = id.clone();
    sim::in_netns(&netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let chain = rt.block_on(client.sign(&id, &csr.csr_pem, Duration::from_secs(600)));
        Ok(chain.map(|c| c.iter().map(|der| first_uri(der)).collect()))
    })?
}

fn tempfile_dir(base: &Path) -> Result<std::path::PathBuf> {
    let d = base.join("tokens");
    std::fs::create_dir_all(&d).context("mkdir tokens")?;
    Ok(d)
}

/// The SPIFFE ID a DER certificate names, or "" (the root names none).
fn first_uri(der: &[u8]) -> String {
    mesh_agent::tls::peer_identity(&der.to_vec().into()).map(|id| id.to_string()).unwrap_or_default()
}

fn refused_code(r: Result<Vec<String>, IssueError>) -> String {
    match r {
        Ok(chain) => format!("issued {chain:?}"),
        Err(IssueError::Refused { code, .. }) => code.to_string(),
        Err(e) => format!("other error: {e}"),
    }
}

#[test]
fn agents_without_the_ca_key_get_their_pods_certificates_from_the_signer_and_traffic_is_mutual_tls() -> Result<()> {
    if !privileged("signer_issues") {
        return Ok(());
    }
    let s = setup(&[])?;
    let to = format!("{}:8080", s.server.ip);
    let r = s.client.workload(&["client", "--connect", &to, "--count", "20"], T)?;
    assert_eq!(r["ok"], 20, "{r}\n{}\n{}", s.c.nodes[0].agent_warnings(), s.signer.log_text());
    for (i, node) in s.c.nodes[..2].iter().enumerate() {
        let certs = node.admin_json("/debug/certs")?;
        let ids: Vec<&str> = certs.as_array().unwrap().iter().filter_map(|c| c["identity"].as_str()).collect();
        let want: &[&str] = if i == 0 {
            &["spiffe://cluster.local/ns/shop/sa/client", "spiffe://cluster.local/ns/shop/sa/neighbour"]
        } else {
            &["spiffe://cluster.local/ns/shop/sa/server"]
        };
        assert_eq!(ids, want, "each node holds its own pods' identities only");
        let log = node.agent_log();
        assert!(log.contains("no CA key on this node"), "{log}");
        assert!(log.contains("certificates of the node's pods obtained"), "before the datapath: {log}");
    }
    let m = s.c.nodes[0].admin_text("/metrics")?;
    assert!(metric(&m, "switchyard_hbone_client_handshakes_total") >= 1.0, "{m}");
    assert!(metric(&m, "switchyard_certificates_issued_total") >= 1.0);
    let sm = s.signer.metrics()?;
    assert!(metric(&sm, "switchyard_signer_certificates_issued_total") >= 2.0, "{sm}");
    assert!(s.api.requests().iter().any(|r| r == "create tokenreviews"));
    // The trust bundle, published for the agents to mount.
    let cm = s.api.get("configmaps", "switchyard/switchyard-ca-root").context("the root ConfigMap")?;
    let bundle = std::fs::read_to_string(s.c.ca_dir.join("bundle.crt"))?;
    assert_eq!(cm["data"]["root-cert.pem"], bundle.as_str());
    Ok(())
}

#[test]
fn the_signer_refuses_other_nodes_pods_bad_tokens_and_csrs_naming_another_identity() -> Result<()> {
    if !privileged("signer_refuses") {
        return Ok(());
    }
    let s = setup(&[])?;
    let agent_a = agent_pod("node-a");
    let token_a = s.api.token("switchyard", "mesh-agent", Some((&agent_a, &uid(&agent_a))), &[AUDIENCE], 3600);
    // Its own node's pod: issued, for exactly that identity.
    let chain = ask(&s, &token_a, &shop("client"), &shop("client"))?.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(chain[0], "spiffe://cluster.local/ns/shop/sa/client");
    // A pod on the other node: denied.
    assert_eq!(refused_code(ask(&s, &token_a, &shop("server"), &shop("server"))?), "permission_denied");
    // A token of the agent's account not bound to a pod: its node is unknown.
    let unbound = s.api.token("switchyard", "mesh-agent", None, &[AUDIENCE], 3600);
    assert_eq!(refused_code(ask(&s, &unbound, &shop("client"), &shop("client"))?), "permission_denied");
    // Forged, expired, for another audience: not authenticated.
    let forged = FakeApi::forged_token("switchyard", "mesh-agent", Some((&agent_a, &uid(&agent_a))), &[AUDIENCE]);
    assert_eq!(refused_code(ask(&s, &forged, &shop("client"), &shop("client"))?), "unauthenticated");
    let expired = s.api.token("switchyard", "mesh-agent", Some((&agent_a, &uid(&agent_a))), &[AUDIENCE], -10);
    assert_eq!(refused_code(ask(&s, &expired, &shop("client"), &shop("client"))?), "unauthenticated");
    let other_aud = s.api.token("switchyard", "mesh-agent", Some((&agent_a, &uid(&agent_a))), &["vault"], 3600);
    assert_eq!(refused_code(ask(&s, &other_aud, &shop("client"), &shop("client"))?), "unauthenticated");
    // A CSR whose SAN is not the identity asked for.
    assert_eq!(refused_code(ask(&s, &token_a, &shop("client"), &shop("server"))?), "invalid_argument");
    // A workload's own token: its own identity, nothing else.
    let own = s.api.token("shop", "client", Some(("client", &uid("client"))), &[AUDIENCE], 3600);
    assert!(ask(&s, &own, &shop("client"), &shop("client"))?.is_ok());
    assert_eq!(refused_code(ask(&s, &own, &shop("server"), &shop("server"))?), "permission_denied");
    // Counted by reason, and logged with caller and identity.
    let m = s.signer.metrics()?;
    for (reason, at_least) in [
        ("not_on_callers_node", 1.0),
        ("token_not_bound_to_pod", 1.0),
        // Forged (the API server does not authenticate it) and expired (refused before asking).
        ("token_rejected", 2.0),
        // For another audience: refused before asking.
        ("token_audience", 1.0),
        ("csr_san_mismatch", 1.0),
        ("not_a_node_agent", 1.0),
    ] {
        let n = metric(&m, &format!("switchyard_signer_requests_refused_total{{reason=\"{reason}\"}}"));
        assert!(n >= at_least, "{reason}: {n}\n{m}");
    }
    let log = s.signer.log_text();
    assert!(
        log.contains("caller=switchyard/mesh-agent")
            && log.contains("identity=spiffe://cluster.local/ns/shop/sa/server")
            && log.contains("not_on_callers_node"),
        "{log}"
    );
    Ok(())
}

#[test]
fn certificates_rotate_every_few_seconds_through_the_signer_under_traffic_without_a_failure() -> Result<()> {
    if !privileged("signer_rotation") {
        return Ok(());
    }
    let s = setup(&["--cert-lifetime-secs", "4"])?;
    let to = format!("{}:8080", s.server.ip);
    let r = s.client.workload(
        &["client", "--connect", &to, "--duration-ms", "30000", "--concurrency", "4", "--bytes", "4096"],
        Duration::from_secs(90),
    )?;
    assert_eq!(r["failed"], 0, "{r}\n{}\n{}", s.c.nodes[0].agent_warnings(), s.c.nodes[1].agent_warnings());
    assert!(r["ok"].as_u64().unwrap() > 100, "{r}");
    for node in &s.c.nodes[..2] {
        let certs = node.admin_json("/debug/certs")?;
        let generation = certs[0]["generation"].as_u64().unwrap();
        assert!(generation >= 10, "{} renewed only {generation} times in 30 s: {certs}", node.name);
    }
    Ok(())
}

#[test]
fn the_signer_down_longer_than_a_renewal_period_fails_no_connection_and_renewal_resumes() -> Result<()> {
    if !privileged("signer_outage") {
        return Ok(());
    }
    // 20 s certificates, renewed every 10 s.
    let mut s = setup(&["--cert-lifetime-secs", "20"])?;
    let generation = |s: &Setup, node: usize| -> Result<u64> {
        Ok(s.c.nodes[node].admin_json("/debug/certs")?[0]["generation"].as_u64().unwrap_or(0))
    };
    // Right after both nodes renewed, so the certificates in use have their whole life ahead.
    let g0 = [generation(&s, 0)?, generation(&s, 1)?];
    eventually(Duration::from_secs(15), "a renewal on both nodes", || {
        (generation(&s, 0).ok()? > g0[0] && generation(&s, 1).ok()? > g0[1]).then_some(())
    })?;
    let renewed = generation(&s, 0)?;
    s.signer.stop();
    let to = format!("{}:8080", s.server.ip);
    // 14 s of traffic with the signer gone: longer than the renewal period.
    let r = s.client.workload(
        &["client", "--connect", &to, "--duration-ms", "14000", "--concurrency", "2", "--bytes", "1024"],
        Duration::from_secs(60),
    )?;
    assert_eq!(r["failed"], 0, "{r}\n{}", s.c.nodes[0].agent_warnings());
    assert_eq!(generation(&s, 0)?, renewed, "not renewed while the signer is down");
    assert!(
        s.c.nodes[0].agent_log().contains("reason=\"ca_unreachable\""),
        "renewal was tried and failed: {}",
        s.c.nodes[0].agent_warnings()
    );
    let m = s.c.nodes[0].admin_text("/metrics")?;
    assert!(metric(&m, "switchyard_certificate_renewal_failures_total{reason=\"ca_unreachable\"}") >= 1.0, "{m}");
    s.signer.restart()?;
    eventually(Duration::from_secs(8), "renewal resumed", || (generation(&s, 0).ok()? > renewed).then_some(()))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", s.c.nodes[0].agent_warnings()))?;
    let r = s.client.workload(&["client", "--connect", &to, "--count", "20"], T)?;
    assert_eq!(r["ok"], 20, "{r}\n{}\n{}", s.c.nodes[0].agent_warnings(), s.c.nodes[1].agent_warnings());
    Ok(())
}

/// An agent restarted while the signer is unreachable (its keys lived in memory): it waits a
/// bounded time for certificates, then serves what needs none (same-node traffic), refuses
/// cross-node connections it cannot secure (never in plaintext), says in `/readyz` which
/// certificates are missing, and recovers by itself once the signer is back.
#[test]
fn an_agent_restarted_while_the_signer_is_down_serves_same_node_traffic_and_recovers() -> Result<()> {
    if !privileged("signer_down_restart") {
        return Ok(());
    }
    let mut s = setup(&[])?;
    s.signer.stop();
    let args = s.agent_args[0].clone();
    let node = &mut s.c.nodes[0];
    node.stop_agent(Duration::from_secs(10))?;
    node.start_agent_alive(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    eventually(Duration::from_secs(20), "the agent is serving without its certificates", || {
        node.agent_log().contains("starting without some certificates").then_some(())
    })?;
    eventually(Duration::from_secs(10), "agent ready apart from certificates", || {
        let (code, body) = sim::http_get(&node.netns, node.admin_addr(), "/readyz").ok()?;
        (code == 503 && body.contains("no certificate yet for")).then_some(body)
    })
    .map(|body| {
        assert!(body.contains("spiffe://cluster.local/ns/shop/sa/client"), "{body}");
    })?;
    // Same node: no certificate needed.
    let r = s.client.workload(&["client", "--connect", &format!("{}:8080", s.neighbour.ip), "--count", "5"], T)?;
    assert_eq!(r["ok"], 5, "{r}\n{}", s.c.nodes[0].agent_warnings());
    // Across nodes: refused, not sent in plaintext.
    let to = format!("{}:8080", s.server.ip);
    let r = s.client.workload(&["client", "--connect", &to, "--count", "3"], T)?;
    assert_eq!(r["ok"], 0, "{r}");
    assert!(
        s.c.nodes[0]
            .agent_log()
            .contains("no certificate for source identity spiffe://cluster.local/ns/shop/sa/client")
    );
    // The signer back: the agent recovers by itself.
    s.signer.restart()?;
    let node = &s.c.nodes[0];
    eventually(Duration::from_secs(15), "ready", || {
        matches!(sim::http_get(&node.netns, node.admin_addr(), "/readyz"), Ok((200, _))).then_some(())
    })?;
    let r = s.client.workload(&["client", "--connect", &to, "--count", "10"], T)?;
    assert_eq!(r["ok"], 10, "{r}\n{}", s.c.nodes[0].agent_warnings());
    Ok(())
}

/// Upgrades keep their promise with the signer: the new agent obtains its pods' certificates
/// from the signer before it takes the eBPF links over, so no new cross-node connection fails
/// during the hand-over.
#[test]
fn an_upgraded_agent_gets_its_certificates_before_taking_over_and_no_connection_fails() -> Result<()> {
    if !privileged("signer_upgrade") {
        return Ok(());
    }
    let mut s = setup_pinned(&[], true)?;
    let to = format!("{}:8080", s.server.ip);
    let client = s.client.clone();
    let load = std::thread::spawn(move || {
        client.workload(
            &["client", "--connect", &to, "--duration-ms", "8000", "--concurrency", "2", "--bytes", "1024"],
            Duration::from_secs(60),
        )
    });
    std::thread::sleep(Duration::from_millis(1500));
    let args = s.agent_args[0].clone();
    s.c.nodes[0].upgrade_agent(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let r = load.join().map_err(|_| anyhow::anyhow!("load panicked"))??;
    assert_eq!(r["failed"], 0, "{r}\n{}", s.c.nodes[0].agent_warnings());
    assert!(r["ok"].as_u64().unwrap() > 100, "{r}");
    // In the new agent's start: certificates first, then the take-over.
    let log = s.c.nodes[0].agent_log().replace("\u{1b}[0m", "").replace("\u{1b}[2m", "").replace("\u{1b}[3m", "");
    let took_over = log.find("taken_over_from_previous_agent=7").context("the new agent took the programs over")?;
    let obtained = log.rfind("certificates of the node's pods obtained").context("certificates obtained")?;
    assert!(obtained < took_over, "certificates before the take-over:\n{log}");
    assert!(log[..took_over].matches("certificates of the node's pods obtained").count() >= 2, "both agents' starts");
    let sm = s.signer.metrics()?;
    assert!(metric(&sm, "switchyard_signer_certificates_issued_total") >= 5.0, "the new agent asked the signer: {sm}");
    Ok(())
}
