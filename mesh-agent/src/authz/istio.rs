//! Istio's `security.istio.io` resources, read as ztunnel enforces them (L4):
//! `AuthorizationPolicy` into [`Rule`]s, `PeerAuthentication` into per-pod strict mTLS.
//!
//! Where Istio cannot check a field at L4 (methods, paths, hosts, request principals, remote
//! IP blocks, L7 `when` keys) an ALLOW rule with it never matches, and a DENY rule matches on
//! what is left of it (an entry left empty matches everything): deny more, never less. A value
//! that cannot be read (a port that is not a number, a malformed CIDR) counts the same way.
//! Every such case is reported with the policy, as are the policies not applied at all
//! (`targetRef`s: for waypoints and gateways) and not enforced (`CUSTOM`).
use std::collections::BTreeMap;

use serde_json::Value;

use super::{Action, Match, PolicyRule, Rule, Scope, StrMatch};

/// Istio's root namespace by default: policies there apply to the whole mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// What became of a policy, for `mesh-agent authz`, the log and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Enforced (possibly with warnings).
    Enforced,
    /// For waypoints or gateways (`targetRef`/`targetRefs`): not applied here.
    Ignored,
    /// Not enforced: CUSTOM (external authorization) needs a waypoint.
    NotEnforced,
    /// Could not be read: enforced as a DENY of everything for the pods it targets.
    Malformed,
}

/// A policy as read, with what became of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// `namespace/name`.
    pub policy: String,
    pub status: Status,
    pub warnings: Vec<String>,
}

/// An AuthorizationPolicy, translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// `None` when the policy is not applied (see the report).
    pub rule: Option<Rule>,
    pub report: Report,
}

/// Why an object could not be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("{field}: {value} is not {expected}")]
    Invalid { field: String, value: String, expected: &'static str },
}

fn invalid(field: impl Into<String>, value: impl std::fmt::Display, expected: &'static str) -> PolicyError {
    PolicyError::Invalid { field: field.into(), value: value.to_string(), expected }
}

fn meta<'a>(v: &'a Value, key: &'static str) -> Result<&'a str, PolicyError> {
    v.get("metadata")
        .and_then(|m| m.get(key))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(PolicyError::Missing(if key == "name" { "metadata.name" } else { "metadata.namespace" }))
}

/// `spec.selector.matchLabels` (`None`: no selector).
fn selector(spec: &Value) -> Result<Option<BTreeMap<String, String>>, PolicyError> {
    let Some(sel) = spec.get("selector").filter(|s| !s.is_null()) else { return Ok(None) };
    let mut out = BTreeMap::new();
    if let Some(labels) = sel.get("matchLabels").filter(|l| !l.is_null()) {
        let labels = labels.as_object().ok_or_else(|| invalid("spec.selector.matchLabels", labels, "a map"))?;
        for (k, v) in labels {
            let v = v.as_str().ok_or_else(|| invalid(format!("spec.selector.matchLabels.{k}"), v, "a string"))?;
            out.insert(k.clone(), v.to_string());
        }
    }
    Ok(Some(out))
}

fn strings<'a>(v: &'a Value, key: &str, at: &str) -> Result<Vec<&'a str>, PolicyError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_str().ok_or_else(|| invalid(format!("{at}.{key}"), x, "a string"))).collect()
        }
        Some(other) => Err(invalid(format!("{at}.{key}"), other, "a list of strings")),
    }
}

const L7_SOURCE: [&str; 4] = ["requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"];
const L7_OPERATION: [&str; 6] = ["hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"];

/// Builds one entry's match; `unreadable` collects what could not be checked at L4 (L7
/// fields, values that do not parse).
struct Entry<'a> {
    at: String,
    unreadable: &'a mut Vec<String>,
}

impl Entry<'_> {
    fn str_matches(&mut self, v: &Value, key: &str) -> Result<Vec<StrMatch>, PolicyError> {
        Ok(strings(v, key, &self.at)?.into_iter().map(StrMatch::parse).collect())
    }

    fn nets(&mut self, v: &Value, key: &str) -> Result<Vec<ipnet::IpNet>, PolicyError> {
        let mut out = Vec::new();
        for s in strings(v, key, &self.at)? {
            match s.parse::<ipnet::IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
                Ok(n) => out.push(n),
                Err(_) => self.unreadable.push(format!("{}.{key}: {s:?} is not an address or CIDR", self.at)),
            }
        }
        Ok(out)
    }

    fn ports(&mut self, v: &Value, key: &str) -> Result<Vec<u16>, PolicyError> {
        let mut out = Vec::new();
        for s in strings(v, key, &self.at)? {
            match s.parse::<u16>() {
                Ok(p) if p > 0 => out.push(p),
                _ => self.unreadable.push(format!("{}.{key}: {s:?} is not a port number", self.at)),
            }
        }
        Ok(out)
    }

    fn service_accounts(
        &mut self,
        v: &Value,
        key: &str,
        policy_ns: &str,
    ) -> Result<Vec<(String, String)>, PolicyError> {
        Ok(strings(v, key, &self.at)?
            .into_iter()
            .map(|s| match s.split_once('/') {
                Some((ns, sa)) => (ns.to_string(), sa.to_string()),
                None => (policy_ns.to_string(), s.to_string()),
            })
            .collect())
    }

    fn l7(&mut self, v: &Value, keys: &[&str]) {
        for k in keys {
            if v.get(*k).is_some_and(|x| !x.is_null()) {
                self.unreadable.push(format!("{}.{k} is checked at L7 only", self.at));
            }
        }
    }

    fn source(&mut self, s: &Value, policy_ns: &str) -> Result<Match, PolicyError> {
        self.l7(s, &L7_SOURCE);
        Ok(Match {
            principals: self.str_matches(s, "principals")?,
            not_principals: self.str_matches(s, "notPrincipals")?,
            namespaces: self.str_matches(s, "namespaces")?,
            not_namespaces: self.str_matches(s, "notNamespaces")?,
            service_accounts: self.service_accounts(s, "serviceAccounts", policy_ns)?,
            not_service_accounts: self.service_accounts(s, "notServiceAccounts", policy_ns)?,
            source_ips: self.nets(s, "ipBlocks")?,
            not_source_ips: self.nets(s, "notIpBlocks")?,
            ..Default::default()
        })
    }

    fn operation(&mut self, o: &Value) -> Result<Match, PolicyError> {
        self.l7(o, &L7_OPERATION);
        Ok(Match {
            destination_ports: self.ports(o, "ports")?,
            not_destination_ports: self.ports(o, "notPorts")?,
            ..Default::default()
        })
    }

    /// One `when` condition: the L4 keys as ztunnel maps them.
    fn condition(&mut self, c: &Value) -> Result<Match, PolicyError> {
        let key = c.get("key").and_then(Value::as_str).ok_or(PolicyError::Missing("when[].key"))?;
        let mut m = Match::default();
        let (yes, no) = ("values", "notValues");
        match key {
            "source.ip" => (m.source_ips, m.not_source_ips) = (self.nets(c, yes)?, self.nets(c, no)?),
            "source.namespace" => {
                (m.namespaces, m.not_namespaces) = (self.str_matches(c, yes)?, self.str_matches(c, no)?)
            }
            "source.principal" => {
                (m.principals, m.not_principals) = (self.str_matches(c, yes)?, self.str_matches(c, no)?)
            }
            "destination.ip" => (m.destination_ips, m.not_destination_ips) = (self.nets(c, yes)?, self.nets(c, no)?),
            "destination.port" => {
                (m.destination_ports, m.not_destination_ports) = (self.ports(c, yes)?, self.ports(c, no)?)
            }
            other => self.unreadable.push(format!("{}: key {other:?} is checked at L7 only", self.at)),
        }
        Ok(m)
    }
}

fn list<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a [Value], PolicyError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(invalid(format!("{at}.{key}"), other, "a list")),
    }
}

/// One rule: `from`, `to` and each `when` a clause. `Ok(None)`: an ALLOW rule that can never
/// match (it needs L7 attributes).
fn rule(
    r: &Value,
    at: &str,
    policy_ns: &str,
    action: Action,
    warnings: &mut Vec<String>,
) -> Result<Option<PolicyRule>, PolicyError> {
    let mut unreadable = Vec::new();
    let mut clauses = Vec::new();
    let from = list(r, "from", at)?;
    if !from.is_empty() {
        let mut c = Vec::new();
        for (i, f) in from.iter().enumerate() {
            let at = format!("{at}.from[{i}].source");
            let s = f.get("source").unwrap_or(&Value::Null);
            c.push(Entry { at, unreadable: &mut unreadable }.source(s, policy_ns)?);
        }
        clauses.push(c);
    }
    let to = list(r, "to", at)?;
    if !to.is_empty() {
        let mut c = Vec::new();
        for (i, t) in to.iter().enumerate() {
            let at = format!("{at}.to[{i}].operation");
            let o = t.get("operation").unwrap_or(&Value::Null);
            c.push(Entry { at, unreadable: &mut unreadable }.operation(o)?);
        }
        clauses.push(c);
    }
    for (i, w) in list(r, "when", at)?.iter().enumerate() {
        let at = format!("{at}.when[{i}]");
        clauses.push(vec![Entry { at, unreadable: &mut unreadable }.condition(w)?]);
    }
    let never = !unreadable.is_empty() && action == Action::Allow;
    for u in unreadable {
        warnings.push(match action {
            Action::Allow => format!("{u}: this ALLOW rule never matches"),
            _ => format!("{u}: ignored, the rule matches on the rest of it (denies more)"),
        });
    }
    Ok((!never).then_some(PolicyRule { clauses }))
}

/// Reads an AuthorizationPolicy (as the API serves it). `root` is Istio's root namespace.
/// One that cannot be read denies every connection to the pods it targets (its selector's, or
/// its whole namespace's when the selector cannot be read either), never allows: `Err` only
/// without a name and namespace.
pub fn authorization_policy(v: &Value, root: &str) -> Result<Translated, PolicyError> {
    let (name, ns) = (meta(v, "name")?, meta(v, "namespace")?);
    match read_policy(v, root, name, ns) {
        Ok(t) => Ok(t),
        Err(e) => {
            let spec = v.get("spec").unwrap_or(&Value::Null);
            let scope = match (selector(spec).ok().flatten(), ns == root) {
                (Some(labels), mesh_wide) => Scope::Selector { labels, mesh_wide },
                (None, true) => Scope::Mesh,
                (None, false) => Scope::Namespace,
            };
            let key = format!("{ns}/{name}");
            let rule = Rule {
                name: key.clone(),
                namespace: ns.to_string(),
                scope,
                ports: Vec::new(),
                action: Action::Deny,
                rules: vec![PolicyRule::default()],
            };
            let why = format!("malformed ({e}): denies every connection to the workloads it targets");
            Ok(Translated {
                rule: Some(rule),
                report: Report { policy: key, status: Status::Malformed, warnings: vec![why] },
            })
        }
    }
}

fn read_policy(v: &Value, root: &str, name: &str, ns: &str) -> Result<Translated, PolicyError> {
    let key = format!("{ns}/{name}");
    let spec = v.get("spec").filter(|s| !s.is_null()).unwrap_or(&Value::Null);
    let report = |status, warnings| Report { policy: key.clone(), status, warnings };
    if spec.get("targetRef").is_some_and(|t| !t.is_null()) || spec.get("targetRefs").is_some_and(|t| !t.is_null()) {
        let why = "targetRef(s): for waypoints and gateways, not applied by the node proxy".to_string();
        return Ok(Translated { rule: None, report: report(Status::Ignored, vec![why]) });
    }
    let action = match spec.get("action").and_then(Value::as_str) {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            let why = "action CUSTOM (external authorization) needs a waypoint: NOT ENFORCED".to_string();
            return Ok(Translated { rule: None, report: report(Status::NotEnforced, vec![why]) });
        }
        Some(other) => return Err(invalid("spec.action", other, "ALLOW, DENY, AUDIT or CUSTOM")),
    };
    let scope = match (selector(spec)?, ns == root) {
        (None, true) => Scope::Mesh,
        (None, false) => Scope::Namespace,
        (Some(labels), mesh_wide) => Scope::Selector { labels, mesh_wide },
    };
    let mut warnings = Vec::new();
    let mut rules = Vec::new();
    for (i, r) in list(spec, "rules", "spec")?.iter().enumerate() {
        rules.extend(rule(r, &format!("spec.rules[{i}]"), ns, action, &mut warnings)?);
    }
    let rule = Rule { name: key.clone(), namespace: ns.to_string(), scope, ports: Vec::new(), action, rules };
    Ok(Translated { rule: Some(rule), report: report(Status::Enforced, warnings) })
}

/// PeerAuthentication's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MtlsMode {
    Unset,
    Permissive,
    Strict,
    /// Treated as PERMISSIVE: the mesh never sends plaintext between meshed pods.
    Disable,
}

/// A PeerAuthentication, trimmed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    /// `metadata.creationTimestamp`: the oldest of a level wins, as in Istio.
    pub created: String,
    /// `portLevelMtls` was given: not supported (reported).
    pub port_level: bool,
}

pub fn peer_authentication(v: &Value) -> Result<PeerAuthentication, PolicyError> {
    let (name, ns) = (meta(v, "name")?, meta(v, "namespace")?);
    let spec = v.get("spec").filter(|s| !s.is_null()).unwrap_or(&Value::Null);
    let mode = match spec.get("mtls").and_then(|m| m.get("mode")).and_then(Value::as_str) {
        None | Some("UNSET") => MtlsMode::Unset,
        Some("PERMISSIVE") => MtlsMode::Permissive,
        Some("STRICT") => MtlsMode::Strict,
        Some("DISABLE") => MtlsMode::Disable,
        Some(other) => return Err(invalid("spec.mtls.mode", other, "UNSET, PERMISSIVE, STRICT or DISABLE")),
    };
    Ok(PeerAuthentication {
        namespace: ns.to_string(),
        name: name.to_string(),
        selector: selector(spec)?,
        mode,
        created: v
            .get("metadata")
            .and_then(|m| m.get("creationTimestamp"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        port_level: spec.get("portLevelMtls").is_some_and(|p| p.as_object().is_some_and(|o| !o.is_empty())),
    })
}

/// Whether PeerAuthentications make a pod (namespace `ns`, `labels`) strict, as Istio
/// resolves them: the mesh level (root namespace, no selector), then the namespace level (no
/// selector), then the workload level (a selector that picks the pod), each overriding the
/// one before unless UNSET; at each level the oldest policy wins.
pub fn strict(pas: &[PeerAuthentication], root: &str, ns: &str, labels: &BTreeMap<String, String>) -> bool {
    let oldest = |f: &dyn Fn(&PeerAuthentication) -> bool| {
        pas.iter().filter(|p| f(p)).min_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name))).map(|p| p.mode)
    };
    let mesh = oldest(&|p| p.namespace == root && p.selector.is_none());
    let namespace = oldest(&|p| p.namespace == ns && ns != root && p.selector.is_none());
    let workload = oldest(&|p| {
        p.namespace == ns
            && p.selector.as_ref().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    });
    let mut strict = false;
    for mode in [mesh, namespace, workload].into_iter().flatten() {
        match mode {
            MtlsMode::Unset => {}
            MtlsMode::Strict => strict = true,
            MtlsMode::Permissive | MtlsMode::Disable => strict = false,
        }
    }
    strict
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::*;
    use crate::{
        authz::{Decision, Destination, Peer, evaluate},
        identity::Identity,
    };

    fn policy(ns: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": ns}, "spec": spec})
    }

    fn tr(ns: &str, spec: Value) -> Translated {
        authorization_policy(&policy(ns, "p", spec), DEFAULT_ROOT_NAMESPACE).unwrap()
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        [("app".to_string(), app.to_string())].into()
    }

    /// Decides for a connection from `ns/sa` (at `src_ip`, if verified) to pod `shop/db-0`
    /// (app=db, 10.0.0.9) on `port`.
    fn decide(rules: &[Rule], ns: &str, sa: &str, src_ip: Option<[u8; 4]>, port: u16) -> Decision {
        let id = Identity::new("cluster.local", ns, sa);
        let l = labels("db");
        let dst = Destination { namespace: "shop", name: "db-0", labels: &l, ip: Ipv4Addr::new(10, 0, 0, 9), port };
        evaluate(rules, Peer { identity: &id, ip: src_ip.map(Ipv4Addr::from) }, dst)
    }

    fn rules(ps: Vec<Translated>) -> Vec<Rule> {
        ps.into_iter().filter_map(|t| t.rule).collect()
    }

    #[test]
    fn allow_by_principal_namespace_and_port_as_istio_writes_them() {
        let p = tr(
            "shop",
            json!({"selector": {"matchLabels": {"app": "db"}}, "action": "ALLOW", "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}},
                     {"source": {"namespaces": ["ops"]}}],
            "to": [{"operation": {"ports": ["5432"]}}]}]}),
        );
        assert_eq!((p.report.status.clone(), p.report.warnings.len()), (Status::Enforced, 0));
        let r = rules(vec![p]);
        assert_eq!(decide(&r, "shop", "web", None, 5432), Decision::Allow);
        assert_eq!(decide(&r, "ops", "anyone", None, 5432), Decision::Allow);
        assert_eq!(decide(&r, "shop", "web", None, 22), Decision::NotAllowed, "to.ports is part of the match");
        assert_eq!(decide(&r, "shop", "batch", None, 5432), Decision::NotAllowed);
    }

    #[test]
    fn deny_first_then_allow_spec_empty_denies_all_rules_empty_allows_all() {
        let deny =
            tr("shop", json!({"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["shop"]}}]}]}));
        let allow_all = tr("shop", json!({"rules": [{}]}));
        let r = rules(vec![deny, allow_all]);
        assert_eq!(decide(&r, "shop", "web", None, 1), Decision::Allow);
        assert_eq!(decide(&r, "ops", "x", None, 1), Decision::Denied("shop/p".into()));
        let deny_all = rules(vec![tr("shop", json!({}))]);
        assert_eq!(decide(&deny_all, "shop", "web", None, 1), Decision::NotAllowed, "spec: {{}} denies all");
        let deny_nothing = rules(vec![tr("shop", json!({"action": "DENY"}))]);
        assert_eq!(decide(&deny_nothing, "shop", "web", None, 1), Decision::Allow, "DENY without rules");
    }

    #[test]
    fn root_namespace_policies_apply_to_the_whole_mesh() {
        let mesh = tr(
            "istio-system",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}),
        );
        assert_eq!(mesh.rule.as_ref().unwrap().scope, Scope::Mesh);
        let other_ns =
            tr("ops", json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}));
        assert_eq!(
            decide(&rules(vec![other_ns]), "legacy", "a", None, 1),
            Decision::Allow,
            "another namespace's policy"
        );
        assert_eq!(decide(&rules(vec![mesh]), "legacy", "a", None, 1), Decision::Denied("istio-system/p".into()));
    }

    #[test]
    fn l7_fields_make_allow_rules_never_match_and_deny_rules_deny_more() {
        let allow = tr(
            "shop",
            json!({"rules": [{"from": [{"source": {"namespaces": ["shop"]}}],
                                                  "to": [{"operation": {"methods": ["GET"]}}]}]}),
        );
        assert_eq!(allow.report.status, Status::Enforced);
        assert!(allow.report.warnings[0].contains("methods") && allow.report.warnings[0].contains("never matches"));
        assert_eq!(decide(&rules(vec![allow]), "shop", "web", None, 80), Decision::NotAllowed);
        let deny = tr(
            "shop",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["ops"]}}],
                                                                     "to": [{"operation": {"paths": ["/admin"]}}],
                                                                     "when": [{"key": "request.headers[x]", "values": ["1"]}]}]}),
        );
        assert_eq!(deny.report.warnings.len(), 2);
        let r = rules(vec![deny]);
        assert_eq!(decide(&r, "ops", "x", None, 80), Decision::Denied("shop/p".into()), "every path of ops denied");
        assert_eq!(decide(&r, "shop", "x", None, 80), Decision::Allow, "the L4 part still selects");
        let bad_port = tr("shop", json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}));
        assert!(bad_port.report.warnings[0].contains("not a port number"));
        assert_eq!(decide(&rules(vec![bad_port]), "shop", "x", None, 80), Decision::NotAllowed);
    }

    #[test]
    fn when_conditions_and_ip_blocks_use_the_verified_source_address() {
        let allow = tr(
            "shop",
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}],
                                                  "when": [{"key": "destination.port", "values": ["5432"]},
                                                           {"key": "source.principal", "notValues": ["*/sa/batch"]}]}]}),
        );
        assert!(allow.report.warnings.is_empty(), "{:?}", allow.report.warnings);
        let r = rules(vec![allow]);
        assert_eq!(decide(&r, "shop", "web", Some([10, 244, 1, 7]), 5432), Decision::Allow);
        assert_eq!(decide(&r, "shop", "web", Some([10, 244, 2, 7]), 5432), Decision::NotAllowed);
        assert_eq!(decide(&r, "shop", "web", None, 5432), Decision::NotAllowed, "an address not verified");
        assert_eq!(decide(&r, "shop", "batch", Some([10, 244, 1, 7]), 5432), Decision::NotAllowed);
        assert_eq!(decide(&r, "shop", "web", Some([10, 244, 1, 7]), 80), Decision::NotAllowed);
        let deny =
            tr("shop", json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.9.0.0/16"]}}]}]}));
        assert_eq!(decide(&rules(vec![deny]), "shop", "web", None, 1), Decision::Denied("shop/p".into()));
    }

    #[test]
    fn waypoint_custom_and_audit_policies_are_reported_not_silently_applied() {
        let waypoint =
            tr("shop", json!({"targetRefs": [{"kind": "Service", "group": "", "name": "db"}], "rules": [{}]}));
        assert_eq!((waypoint.rule, waypoint.report.status), (None, Status::Ignored));
        let custom = tr("shop", json!({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}));
        assert_eq!((custom.rule, custom.report.status), (None, Status::NotEnforced));
        let audit = tr("shop", json!({"action": "AUDIT", "rules": [{}]}));
        let r = rules(vec![audit]);
        assert_eq!(decide(&r, "shop", "web", None, 1), Decision::Allow, "AUDIT never decides");
        let (l, id) = (labels("db"), Identity::new("cluster.local", "shop", "web"));
        let dst = Destination { namespace: "shop", name: "db-0", labels: &l, ip: Ipv4Addr::new(10, 0, 0, 9), port: 1 };
        assert_eq!(crate::authz::audits(&r, Peer { identity: &id, ip: None }, dst).collect::<Vec<_>>(), ["shop/p"]);
        let bad = authorization_policy(&policy("shop", "p", json!({"action": "MAYBE", "rules": [{}]})), "istio-system")
            .unwrap();
        assert_eq!(bad.report.status, Status::Malformed);
        assert!(bad.report.warnings[0].contains("spec.action"), "{:?}", bad.report);
        assert_eq!(
            decide(&rules(vec![bad]), "shop", "web", None, 1),
            Decision::Denied("shop/p".into()),
            "never allows"
        );
        let bad_port = tr(
            "shop",
            json!({"selector": {"matchLabels": {"app": "other"}}, "rules": [{"to": [{"operation": {"ports": 80}}]}]}),
        );
        assert_eq!(bad_port.report.status, Status::Malformed);
        assert_eq!(decide(&rules(vec![bad_port]), "shop", "web", None, 1), Decision::Allow, "only its targets");
        assert!(authorization_policy(&json!({"metadata": {"name": "p"}}), "istio-system").is_err(), "no namespace");
    }

    #[test]
    fn peer_authentication_resolves_mesh_then_namespace_then_workload_oldest_first() {
        let pa = |ns: &str, name: &str, created: &str, sel: Option<&str>, mode: &str| {
            let mut spec = json!({"mtls": {"mode": mode}});
            if let Some(app) = sel {
                spec["selector"] = json!({"matchLabels": {"app": app}});
            }
            peer_authentication(
                &json!({"metadata": {"name": name, "namespace": ns, "creationTimestamp": created}, "spec": spec}),
            )
            .unwrap()
        };
        let root = DEFAULT_ROOT_NAMESPACE;
        let (db, web) = (labels("db"), labels("web"));
        let mesh_strict = pa(root, "default", "2026-01-01T00:00:00Z", None, "STRICT");
        assert!(strict(std::slice::from_ref(&mesh_strict), root, "shop", &db));
        let ns_permissive = pa("shop", "default", "2026-01-02T00:00:00Z", None, "PERMISSIVE");
        let all = [mesh_strict.clone(), ns_permissive.clone()];
        assert!(!strict(&all, root, "shop", &db) && strict(&all, root, "ops", &db));
        let wl = pa("shop", "db", "2026-01-03T00:00:00Z", Some("db"), "STRICT");
        let all = [mesh_strict, ns_permissive, wl];
        assert!(strict(&all, root, "shop", &db) && !strict(&all, root, "shop", &web));
        // Two at one level: the oldest wins; DISABLE is PERMISSIVE; UNSET inherits.
        let older = pa("ops", "a", "2026-01-01T00:00:00Z", None, "DISABLE");
        let newer = pa("ops", "b", "2026-02-01T00:00:00Z", None, "STRICT");
        assert!(!strict(&[newer.clone(), older], root, "ops", &db));
        let unset = pa("ops", "c", "2026-01-01T00:00:00Z", Some("db"), "UNSET");
        assert!(strict(&[newer, unset], root, "ops", &db));
        assert!(
            peer_authentication(
                &json!({"metadata": {"name": "x", "namespace": "a"}, "spec": {"mtls": {"mode": "ON"}}})
            )
            .is_err()
        );
    }
}
