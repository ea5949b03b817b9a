//! The Helm chart and the plain manifest, offline: `helm lint`, `helm template`, schema
//! validation of everything rendered (kubernetes-validate, strict), the security and
//! scheduling properties the install promises, and the plain manifest kept in sync with the
//! chart. helm and the validator are installed under target/tools by `cargo xtask setup`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn chart() -> PathBuf {
    root().join("deploy/helm/switchyard")
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?} (installed by `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn helm(args: &[&str]) -> Result<String> {
    let helm = root().join("target/tools/bin/helm");
    ensure!(helm.exists(), "{} missing: run `cargo xtask setup`", helm.display());
    run(Command::new(helm).args(args))
}

fn template(extra: &[&str]) -> Result<String> {
    let c = chart();
    let mut args = vec!["template", "switchyard", c.to_str().unwrap(), "--namespace", "switchyard-system"];
    args.extend_from_slice(extra);
    helm(&args)
}

fn validate(yaml: &str, name: &str) -> Result<String> {
    let file = std::env::temp_dir().join(format!("switchyard-{name}-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml)?;
    let out = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.33.0"])
        .arg(&file)
        .env("PYTHONPATH", root().join("target/tools/py")));
    let _ = std::fs::remove_file(&file);
    out
}

fn docs(yaml: &str) -> Vec<Value> {
    yaml.split("\n---").filter_map(|d| serde_yaml_ng::from_str::<Value>(d).ok()).filter(|v| v.is_object()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// The rendered object of this kind and name.
fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// Every workload's pod spec, by kind and name.
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("DaemonSet" | "Deployment" | "StatefulSet" | "Job" | "Pod")))
        .map(|d| {
            (
                format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()),
                &d["spec"]["template"]["spec"],
            )
        })
        .collect()
}

/// The Secrets a pod spec mounts.
fn mounted_secrets(spec: &Value) -> Vec<String> {
    spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["secret"]["secretName"].as_str().map(String::from))
        .collect()
}

#[test]
fn chart_lints_renders_and_validates_against_the_kubernetes_schema() -> Result<()> {
    helm(&["lint", "--strict", chart().to_str().unwrap()])?;
    for (name, extra) in [
        ("default", vec![]),
        ("own-ca", vec!["--set", "ca.existingSecret=my-ca"]),
        ("agent-held-ca", vec!["--set", "ca.mode=agent"]),
        ("istiod", vec!["--set", "ca.mode=istiod"]),
        (
            "istio-csr",
            vec![
                "--set",
                "ca.mode=external",
                "--set",
                "ca.address=https://cert-manager-istio-csr.cert-manager.svc:443",
            ],
        ),
        ("tuned", vec!["--set", "mesh.workers=2", "--set", "mesh.bypass.ports={53,443}", "--set", "logFormat=json"]),
    ] {
        let yaml = template(&extra)?;
        let report = validate(&yaml, name)?;
        ensure!(!report.contains("ERROR") && !report.contains("failed"), "{name}: {report}");
        // One validated resource per rendered document.
        ensure!(report.matches("passed").count() == docs(&yaml).len(), "{name}: {report}");
    }
    // The optional ServiceMonitor renders (its CRD is not in the core schema).
    let yaml = template(&["--set", "metrics.serviceMonitor.enabled=true"])?;
    ensure!(docs(&yaml).iter().any(|d| d["kind"] == "ServiceMonitor"));
    Ok(())
}

#[test]
fn daemonset_is_least_privilege_on_every_node_and_never_short_of_agents() -> Result<()> {
    let d = docs(&template(&[])?);
    let ds = find(&d, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert!(
        spec["tolerations"].as_array().unwrap().iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none())
    );
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"])
    );
    // Probes ask this pod's own agent over its Unix socket (the admin port is shared with the
    // other agent during a surge), through the binary the image ships.
    let cfg_for_probes: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(find(&d, "ConfigMap")["data"]["agent.yaml"].as_str().unwrap()).unwrap();
    let socket = cfg_for_probes["adminSocket"].as_str().expect("adminSocket in the agent config");
    for (probe, what) in [("startupProbe", "healthz"), ("livenessProbe", "healthz"), ("readinessProbe", "readyz")] {
        assert!(c[probe].get("httpGet").is_none(), "{probe}: no httpGet");
        assert_eq!(
            c[probe]["exec"]["command"],
            serde_json::json!(["/usr/local/bin/mesh-agent", "probe", what, "--socket", socket]),
            "{probe}"
        );
    }
    let mounts = c["volumeMounts"].as_array().unwrap();
    let run = mounts.iter().find(|m| m["name"] == "run").expect("a mount for the socket");
    assert!(socket.starts_with(run["mountPath"].as_str().unwrap()), "{socket} on the run volume");
    assert!(spec["volumes"].as_array().unwrap().iter().any(|v| v["name"] == "run" && v["emptyDir"].is_object()));
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile"))?;
    assert!(dockerfile.contains("COPY --from=build /mesh-agent /usr/local/bin/mesh-agent"), "probe binary path");
    // A surge agent must be schedulable beside the running one: no host ports declared
    // (hostNetwork turns container ports into host ports), and the programs pinned so it can
    // take them over.
    assert!(c.get("ports").is_none_or(|p| p.is_null()), "no declared ports: {}", c["ports"]);
    let cfg: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(find(&d, "ConfigMap")["data"]["agent.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(cfg["bpfPinDir"].as_str(), Some("/sys/fs/bpf/switchyard"));
    // The debug views on the node's loopback only; metrics and health on the stats port, which
    // the metrics Service exposes.
    assert_eq!(cfg["adminListen"].as_str(), Some("127.0.0.1:15000"));
    assert_eq!(cfg["statsListen"].as_str(), Some("0.0.0.0:15020"));
    // The agent accepts the config the chart writes (unknown keys are errors).
    let text = find(&d, "ConfigMap")["data"]["agent.yaml"].as_str().unwrap().to_string();
    let parsed: Result<mesh_agent::config::FileConfig, _> = serde_yaml_ng::from_str(&text);
    assert!(parsed.is_ok(), "{text}: {:?}", parsed.err());
    let env: Vec<&str> = c["env"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(env.contains(&"NODE_NAME") && env.contains(&"HOST_IP"), "downward API: {env:?}");
    let paths: Vec<&str> =
        spec["volumes"].as_array().unwrap().iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
    assert_eq!(paths, vec!["/sys/fs/bpf", "/sys/fs/cgroup"]);
    // The agent reads the API, never writes it.
    let role = named(&d, "ClusterRole", "switchyard");
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(rule["verbs"], serde_json::json!(["get", "list", "watch"]), "{rule}");
    }
    let svc = named(&d, "Service", "switchyard-metrics");
    assert_eq!(svc["metadata"]["annotations"]["prometheus.io/scrape"], "true");
    assert_eq!(svc["spec"]["ports"][0]["port"], 15020);
    // The CA Secret is generated with a key the agent can load, and kept on uninstall.
    let secret = find(&d, "Secret");
    assert_eq!(secret["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    for k in ["ca.crt", "ca.key", "bundle.crt"] {
        assert!(secret["data"][k].as_str().is_some_and(|v| !v.is_empty()), "{k}");
    }
    // The config the agent will read is valid for the agent.
    let cm = find(&d, "ConfigMap");
    let agent_yaml = cm["data"]["agent.yaml"].as_str().unwrap();
    let file: mesh_agent::config::FileConfig = serde_yaml_ng::from_str(agent_yaml).context("agent.yaml")?;
    assert_eq!(file.kubernetes, Some(true));
    assert_eq!(file.tcp_idle_timeout_secs, Some(3600));
    assert_eq!((file.connect_timeout_ms, file.drain_grace_ms), (Some(5000), Some(5000)));
    assert!(
        spec["terminationGracePeriodSeconds"].as_u64().unwrap() * 1000 > file.drain_grace_ms.unwrap(),
        "the kubelet waits longer than the drain"
    );
    assert_eq!((file.otlp_endpoint, file.trace_sample_rate), (None, Some(1.0)), "no trace export by default");
    // Tracing on: the endpoint reaches the agent's config.
    let d = docs(&template(&["--set", "mesh.otlpEndpoint=http://otel-collector.observability:4318"])?);
    let agent_yaml = find(&d, "ConfigMap")["data"]["agent.yaml"].as_str().unwrap().to_string();
    let file: mesh_agent::config::FileConfig = serde_yaml_ng::from_str(&agent_yaml).context("agent.yaml")?;
    assert_eq!(file.otlp_endpoint.as_deref(), Some("http://otel-collector.observability:4318"));
    Ok(())
}

/// Issue 14: in the default install no agent can read the CA key; only the signer mounts it, and
/// it may only review tokens, watch pods and publish its one ConfigMap.
#[test]
fn only_the_signer_mounts_the_ca_key_and_agents_ask_it_with_a_bound_token() -> Result<()> {
    let d = docs(&template(&[])?);
    let secret = named(&d, "Secret", "switchyard-ca");
    assert!(secret["data"]["ca.key"].as_str().is_some_and(|k| !k.is_empty()));
    let with_key: Vec<String> = pod_specs(&d)
        .into_iter()
        .filter(|(_, spec)| mounted_secrets(spec).contains(&"switchyard-ca".to_string()))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(with_key, ["Deployment/switchyard-signer"], "only the signer mounts the CA Secret");
    let ds = find(&d, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert!(mounted_secrets(spec).is_empty(), "the agents mount no Secret at all");
    let volumes = spec["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "ca-token").expect("a projected token");
    let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sat["audience"], "istio-ca", "one token works with istiod too");
    assert!(sat["expirationSeconds"].as_u64().unwrap() <= 86400, "short-lived");
    let root = volumes.iter().find(|v| v["name"] == "ca-root").expect("the published root");
    assert_eq!(root["configMap"]["name"], "switchyard-ca-root");
    // The agent's config: a CA client, no CA files; and it is valid for the agent.
    let text = named(&d, "ConfigMap", "switchyard")["data"]["agent.yaml"].as_str().unwrap();
    let file: mesh_agent::config::FileConfig = serde_yaml_ng::from_str(text).context("agent.yaml")?;
    assert!(file.ca.is_none(), "{text}");
    let client = file.ca_client.expect("caClient");
    assert_eq!(client.address, "https://switchyard-signer.switchyard-system.svc:15012");
    let mounts = ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].as_array().unwrap();
    let mounted = |name: &str| mounts.iter().find(|m| m["name"] == name).and_then(|m| m["mountPath"].as_str()).unwrap();
    assert!(client.token_file.starts_with(mounted("ca-token")), "{client:?}");
    assert!(client.root_cert.starts_with(mounted("ca-root")), "{client:?}");
    // The signer: two replicas, non-root, its serving names those the agents dial, trusting
    // exactly the agents' ServiceAccount as node agents.
    let signer = named(&d, "Deployment", "switchyard-signer");
    assert_eq!(signer["spec"]["replicas"], 2);
    let c = &signer["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(&args[..2], ["identity", "serve"]);
    for want in [
        "--trusted-node-account=switchyard-system/switchyard",
        "--serving-name=switchyard-signer.switchyard-system.svc",
        "--root-configmap=switchyard-system/switchyard-ca-root",
        "--audience=istio-ca",
    ] {
        assert!(args.contains(&want), "{want} in {args:?}");
    }
    assert_eq!(named(&d, "Service", "switchyard-signer")["spec"]["ports"][0]["port"], 15012);
    // Its RBAC: review tokens, watch pods, write one ConfigMap. Nothing else.
    let cr = named(&d, "ClusterRole", "switchyard-signer");
    assert_eq!(
        cr["rules"],
        serde_json::json!([
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        ])
    );
    let role = named(&d, "Role", "switchyard-signer");
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(rule["resources"], serde_json::json!(["configmaps"]), "{rule}");
    }
    // The agents' own role is unchanged: read-only.
    for rule in named(&d, "ClusterRole", "switchyard")["rules"].as_array().unwrap() {
        assert_eq!(rule["verbs"], serde_json::json!(["get", "list", "watch"]), "{rule}");
    }
    // Pointed at istiod or istio-csr instead: no signer, no CA Secret mounted anywhere.
    for extra in [
        vec!["--set", "ca.mode=istiod"],
        vec!["--set", "ca.mode=external", "--set", "ca.address=https://cert-manager-istio-csr.cert-manager.svc:443"],
    ] {
        let d = docs(&template(&extra)?);
        assert!(!d.iter().any(|o| o["kind"] == "Deployment"), "{extra:?}: no signer");
        assert!(pod_specs(&d).iter().all(|(_, s)| mounted_secrets(s).is_empty()), "{extra:?}");
        let text = named(&d, "ConfigMap", "switchyard")["data"]["agent.yaml"].as_str().unwrap();
        let file: mesh_agent::config::FileConfig = serde_yaml_ng::from_str(text)?;
        let want = if extra[1] == "ca.mode=istiod" {
            "https://istiod.istio-system.svc:15012"
        } else {
            "https://cert-manager-istio-csr.cert-manager.svc:443"
        };
        assert_eq!(file.ca_client.unwrap().address, want);
        let ds = find(&d, "DaemonSet");
        let vols = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        assert!(vols.iter().any(|v| v["configMap"]["name"] == "istio-ca-root-cert"), "Istio's published root");
    }
    // A mode the chart does not know is an error, not a silent default.
    assert!(template(&["--set", "ca.mode=nonsense"]).is_err());
    assert!(template(&["--set", "ca.mode=external"]).is_err(), "external needs an address");
    Ok(())
}

/// Issue 14: an installed release moves from agent-held keys (ca.mode=agent) to the signer with
/// `helm upgrade`: the same CA Secret (so the same root: old agents and new ones verify each
/// other, and no identity changes), a surge rollout (a new agent starts beside the old one,
/// obtains its pods' certificates, then takes over), and the signer's bundle from that Secret.
#[test]
fn moving_from_agent_held_keys_to_the_signer_keeps_the_root_and_rolls_without_a_gap() -> Result<()> {
    let old = docs(&template(&["--set", "ca.mode=agent", "--set", "ca.existingSecret=switchyard-ca"])?);
    let new = docs(&template(&["--set", "ca.existingSecret=switchyard-ca"])?);
    let old_ds = find(&old, "DaemonSet");
    assert_eq!(mounted_secrets(&old_ds["spec"]["template"]["spec"]), ["switchyard-ca"]);
    let old_cfg: mesh_agent::config::FileConfig =
        serde_yaml_ng::from_str(named(&old, "ConfigMap", "switchyard")["data"]["agent.yaml"].as_str().unwrap())?;
    assert!(old_cfg.ca.is_some() && old_cfg.ca_client.is_none());
    // The signer signs with the very Secret the old agents used, and publishes its bundle.
    let signer = named(&new, "Deployment", "switchyard-signer");
    assert_eq!(mounted_secrets(&signer["spec"]["template"]["spec"]), ["switchyard-ca"]);
    // The agents roll one node at a time with a surge, never fewer agents than nodes; the
    // config change rolls them (checksum annotation differs).
    let new_ds = find(&new, "DaemonSet");
    assert_eq!(new_ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(new_ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    let checksum = |ds: &Value| ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"].clone();
    assert_ne!(checksum(old_ds), checksum(new_ds));
    // Same identities either way: same trust domain.
    let new_cfg: mesh_agent::config::FileConfig =
        serde_yaml_ng::from_str(named(&new, "ConfigMap", "switchyard")["data"]["agent.yaml"].as_str().unwrap())?;
    assert_eq!(old_cfg.trust_domain, new_cfg.trust_domain);
    // A generated CA is looked up and kept (never regenerated by the upgrade).
    let ca_secret = std::fs::read_to_string(chart().join("templates/ca-secret.yaml"))?;
    assert!(ca_secret.contains("lookup \"v1\" \"Secret\"") && ca_secret.contains("helm.sh/resource-policy: keep"));
    Ok(())
}

/// deploy/manifests/switchyard.yaml is the chart rendered with an external CA Secret (a static
/// file must not carry a generated key). `SWITCHYARD_UPDATE_MANIFESTS=1` rewrites it.
#[test]
fn plain_manifest_is_the_rendered_chart() -> Result<()> {
    let rendered = template(&["--set", "ca.existingSecret=switchyard-ca"])?;
    let manifest = format!(
        "# Switchyard for `kubectl apply -f`: the Helm chart deploy/helm/switchyard rendered with default\n\
         # values and an external CA Secret. Generated; tests/tests/deploy.rs keeps it in sync.\n\
         # Before applying: kubectl create namespace switchyard-system\n\
         #   mesh-agent ca init --dir ca && kubectl -n switchyard-system create secret generic switchyard-ca \\\n\
         #     --from-file=ca.crt=ca/ca.crt --from-file=ca.key=ca/ca.key --from-file=bundle.crt=ca/bundle.crt\n\
         {rendered}"
    );
    let path = root().join("deploy/manifests/switchyard.yaml");
    if std::env::var_os("SWITCHYARD_UPDATE_MANIFESTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, &manifest)?;
    }
    let on_disk = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    ensure!(
        on_disk == manifest,
        "{} is out of date with the chart: run SWITCHYARD_UPDATE_MANIFESTS=1 cargo test -p switchyard-tests --test deploy",
        path.display()
    );
    ensure!(!docs(&on_disk).iter().any(|d| d["kind"] == "Secret"), "no key material in a static file");
    Ok(())
}
