//! Authorization by identity, decided at the destination, with the semantics of Istio's
//! `AuthorizationPolicy` as ztunnel enforces its L4 part. A policy applies to some pods (the
//! whole mesh, a namespace, the pods its label selector picks, or in a workload file one pod)
//! and holds rules; a rule is a conjunction of clauses (`from`, `to`, each `when`), a clause a
//! disjunction of matches, a match a conjunction of fields, a field a disjunction of values.
//! Evaluation: a matching DENY policy denies; then, if ALLOW policies apply to the pod, one of
//! them must match; otherwise the connection is allowed. AUDIT policies are only logged.
//! Policies come from the Kubernetes API (`istio`: `security.istio.io` resources) or from the
//! workload file (`RuleSpec`).
use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::IpNet;
use serde::Deserialize;

use crate::identity::Identity;

pub mod istio;

/// A rule that cannot be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{0:?} is not spiffe://<td>/ns/<ns>/sa/<sa>, spiffe://<td>/ns/<ns>/* or spiffe://<td>/*")]
    Source(String),
    #[error("rule {0}: `from` lists no source")]
    NoSource(String),
    #[error("rule {rule}: {source}")]
    InRule { rule: String, source: Box<RuleError> },
}

/// The destination a policy is evaluated for: a pod and the port connected to.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// The source, as verified: its identity (from its certificate, or its pod on this node), and
/// its pod's address when that is known to be its (`None`: not verified).
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub identity: &'a Identity,
    pub ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Matches are logged; the decision is not changed.
    Audit,
}

/// A string as Istio matches it: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StrMatch {
    pub fn parse(s: &str) -> StrMatch {
        if s == "*" {
            StrMatch::Any
        } else if let Some(rest) = s.strip_prefix('*') {
            StrMatch::Suffix(rest.into())
        } else if let Some(rest) = s.strip_suffix('*') {
            StrMatch::Prefix(rest.into())
        } else {
            StrMatch::Exact(s.into())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => e == v,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Any => !v.is_empty(),
        }
    }
}

/// One `source`, `operation` or `when` entry: every field given must hold. `not_*` fields hold
/// when no value matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Match {
    /// Principals as Istio writes them: `<trust domain>/ns/<ns>/sa/<sa>`.
    pub principals: Vec<StrMatch>,
    pub not_principals: Vec<StrMatch>,
    pub namespaces: Vec<StrMatch>,
    pub not_namespaces: Vec<StrMatch>,
    /// `(namespace, service account)`.
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// `pos` (empty: anything) and none of `neg`.
fn field<T>(pos: &[T], neg: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&hit)) && !neg.iter().any(hit)
}

fn contains(nets: &[IpNet], ip: Ipv4Addr) -> bool {
    nets.iter().any(|n| n.contains(&std::net::IpAddr::V4(ip)))
}

impl Match {
    /// `deny`: the policy denies, so an address that cannot be verified matches address
    /// fields (deny more, never less); in an ALLOW policy it matches none.
    fn matches(&self, peer: Peer<'_>, dst: Destination<'_>, deny: bool) -> bool {
        let id = peer.identity;
        let principal = format!("{}/ns/{}/sa/{}", id.trust_domain, id.namespace, id.service_account);
        let sa = |(ns, sa): &(String, String)| *ns == id.namespace && *sa == id.service_account;
        let source_ip = match peer.ip {
            Some(ip) => field(&self.source_ips, &self.not_source_ips, |n| contains(std::slice::from_ref(n), ip)),
            None => (self.source_ips.is_empty() && self.not_source_ips.is_empty()) || deny,
        };
        field(&self.principals, &self.not_principals, |m| m.matches(&principal))
            && field(&self.namespaces, &self.not_namespaces, |m| m.matches(&id.namespace))
            && field(&self.service_accounts, &self.not_service_accounts, sa)
            && source_ip
            && field(&self.destination_ips, &self.not_destination_ips, |n| contains(std::slice::from_ref(n), dst.ip))
            && field(&self.destination_ports, &self.not_destination_ports, |p| *p == dst.port)
    }
}

/// A rule: every clause must hold; a clause holds when one of its matches does. A rule
/// without clauses matches everything (`rules: [{}]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyRule {
    pub clauses: Vec<Vec<Match>>,
}

impl PolicyRule {
    fn matches(&self, peer: Peer<'_>, dst: Destination<'_>, deny: bool) -> bool {
        self.clauses.iter().all(|c| c.iter().any(|m| m.matches(peer, dst, deny)))
    }
}

/// The pods a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Scope {
    /// Every pod of the mesh (a policy without selector in the root namespace).
    Mesh,
    /// Every pod of the policy's namespace.
    Namespace,
    /// Pods with all these labels: in the policy's namespace, or anywhere for a policy in the
    /// root namespace (`mesh_wide`).
    Selector { labels: BTreeMap<String, String>, mesh_wide: bool },
    /// One pod of the policy's namespace, by name (workload files).
    Pod(String),
}

/// One policy (an `AuthorizationPolicy`, or a rule of a workload file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    /// `namespace/name` of an AuthorizationPolicy, the name of a workload file's rule.
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    /// Only connections to these ports (workload files; empty: all).
    pub ports: Vec<u16>,
    pub action: Action,
    /// Any rule matching is a match; none (`spec: {}`) never matches.
    pub rules: Vec<PolicyRule>,
}

impl Rule {
    /// Whether the policy is for this pod, whatever the port.
    pub fn selects(&self, dst: Destination<'_>) -> bool {
        let in_ns = self.namespace == dst.namespace;
        match &self.scope {
            Scope::Mesh => true,
            Scope::Namespace => in_ns,
            Scope::Selector { labels, mesh_wide } => {
                (in_ns || *mesh_wide) && labels.iter().all(|(k, v)| dst.labels.get(k) == Some(v))
            }
            Scope::Pod(name) => in_ns && name == dst.name,
        }
    }

    /// Whether the policy is for this connection (the pod, and the ports a workload file's
    /// rule narrows it to).
    pub fn applies(&self, dst: Destination<'_>) -> bool {
        self.selects(dst) && (self.ports.is_empty() || self.ports.contains(&dst.port))
    }

    fn matches(&self, peer: Peer<'_>, dst: Destination<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(peer, dst, self.action == Action::Deny))
    }
}

/// As written in a workload file: `from` lists SPIFFE IDs (exact), a namespace
/// (`spiffe://<td>/ns/<ns>/*`) or a trust domain (`spiffe://<td>/*`); `ports` narrow which
/// connections the rule applies to.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    /// Destination namespace.
    pub namespace: String,
    /// Destination pod name; all pods of the namespace when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Destination ports; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    pub action: Action,
    pub from: Vec<String>,
}

/// A workload file's source, as a match on principals.
fn source_match(s: &str) -> Result<Match, RuleError> {
    let err = || RuleError::Source(s.into());
    let principal = |m: StrMatch| Match { principals: vec![m], ..Default::default() };
    if let Some(td) = s.strip_prefix("spiffe://").and_then(|r| r.strip_suffix("/*")) {
        if let Some((td, ns)) = td.split_once("/ns/") {
            if td.is_empty() || ns.is_empty() || ns.contains('/') || td.contains('/') {
                return Err(err());
            }
            return Ok(principal(StrMatch::Prefix(format!("{td}/ns/{ns}/sa/"))));
        }
        if td.is_empty() || td.contains('/') {
            return Err(err());
        }
        return Ok(principal(StrMatch::Prefix(format!("{td}/"))));
    }
    let id = Identity::parse(s).map_err(|_| err())?;
    Ok(principal(StrMatch::Exact(format!("{}/ns/{}/sa/{}", id.trust_domain, id.namespace, id.service_account))))
}

impl TryFrom<RuleSpec> for Rule {
    type Error = RuleError;
    fn try_from(s: RuleSpec) -> Result<Self, RuleError> {
        if s.from.is_empty() {
            return Err(RuleError::NoSource(s.name));
        }
        let from = s
            .from
            .iter()
            .map(|f| source_match(f))
            .collect::<Result<_, _>>()
            .map_err(|e| RuleError::InRule { rule: s.name.clone(), source: Box::new(e) })?;
        Ok(Rule {
            name: s.name,
            namespace: s.namespace,
            scope: s.workload.map_or(Scope::Namespace, Scope::Pod),
            ports: s.ports,
            action: s.action,
            rules: vec![PolicyRule { clauses: vec![from] }],
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by this deny policy.
    Denied(String),
    /// Allow policies apply to the destination and none matched the source.
    NotAllowed,
}

impl Decision {
    pub fn reason(&self) -> &'static str {
        match self {
            Decision::Allow => "allowed",
            Decision::Denied(_) => "deny_rule",
            Decision::NotAllowed => "no_allow_rule",
        }
    }
}

pub fn evaluate(rules: &[Rule], peer: Peer<'_>, dst: Destination<'_>) -> Decision {
    let applying = || rules.iter().filter(|r| r.applies(dst));
    if let Some(r) = applying().find(|r| r.action == Action::Deny && r.matches(peer, dst)) {
        return Decision::Denied(r.name.clone());
    }
    let mut allows = applying().filter(|r| r.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|r| r.matches(peer, dst)) { Decision::Allow } else { Decision::NotAllowed }
}

/// [`evaluate`] for a new connection: AUDIT policies that match are logged with the decision.
pub fn decide(rules: &[Rule], peer: Peer<'_>, dst: Destination<'_>) -> Decision {
    let d = evaluate(rules, peer, dst);
    for policy in audits(rules, peer, dst) {
        tracing::info!(
            policy,
            src = %peer.identity,
            dst = %format_args!("{}/{}", dst.namespace, dst.name),
            port = dst.port,
            decision = d.reason(),
            "connection matched an AUDIT authorization policy"
        );
    }
    d
}

/// The AUDIT policies that match: logged by [`decide`], whatever the decision.
pub fn audits<'a>(rules: &'a [Rule], peer: Peer<'a>, dst: Destination<'a>) -> impl Iterator<Item = &'a str> + 'a {
    rules
        .iter()
        .filter(move |r| r.action == Action::Audit && r.applies(dst) && r.matches(peer, dst))
        .map(|r| r.name.as_str())
}

/// Whether a pod must be reachable only through the mesh because of `rules`: an ALLOW policy
/// is for it, or a DENY on principals, namespaces or service accounts (identities a plaintext
/// connection does not have, so skipping the mesh would get past them).
pub fn needs_mesh_only(rules: &[Rule], dst: Destination<'_>) -> bool {
    let on_identity = |m: &Match| {
        !(m.principals.is_empty()
            && m.not_principals.is_empty()
            && m.namespaces.is_empty()
            && m.not_namespaces.is_empty()
            && m.service_accounts.is_empty()
            && m.not_service_accounts.is_empty())
    };
    rules.iter().filter(|r| r.selects(dst)).any(|r| match r.action {
        Action::Allow => true,
        Action::Deny => r.rules.iter().flat_map(|x| &x.clauses).flatten().any(on_identity),
        Action::Audit => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, ns: &str, wl: Option<&str>, ports: &[u16], action: Action, from: &[&str]) -> Rule {
        RuleSpec {
            name: name.into(),
            namespace: ns.into(),
            workload: wl.map(Into::into),
            ports: ports.into(),
            action,
            from: from.iter().map(|s| s.to_string()).collect(),
        }
        .try_into()
        .unwrap()
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    fn peer(id: &Identity) -> Peer<'_> {
        Peer { identity: id, ip: None }
    }

    fn no_labels() -> &'static BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        &EMPTY
    }

    fn dst<'a>(namespace: &'a str, name: &'a str) -> impl Fn(u16) -> Destination<'a> {
        move |port| Destination { namespace, name, labels: no_labels(), ip: Ipv4Addr::new(10, 0, 0, 9), port }
    }

    #[test]
    fn default_allow_deny_wins_allow_lists_restrict() {
        let backend = dst("shop", "backend");
        assert_eq!(evaluate(&[], peer(&id("x", "y")), backend(80)), Decision::Allow);

        let rules = vec![
            rule("no-legacy", "shop", None, &[], Action::Deny, &["spiffe://cluster.local/ns/legacy/*"]),
            rule(
                "front-only",
                "shop",
                Some("backend"),
                &[8080],
                Action::Allow,
                &["spiffe://cluster.local/ns/shop/sa/frontend"],
            ),
        ];
        let ev = |ns, sa, d| evaluate(&rules, peer(&id(ns, sa)), d);
        assert_eq!(ev("legacy", "a", backend(8080)), Decision::Denied("no-legacy".into()));
        assert_eq!(ev("shop", "frontend", backend(8080)), Decision::Allow);
        assert_eq!(ev("shop", "batch", backend(8080)), Decision::NotAllowed);
        // The allow rule only applies to port 8080 of pod backend.
        assert_eq!(ev("shop", "batch", backend(9090)), Decision::Allow);
        assert_eq!(ev("shop", "batch", dst("shop", "web")(8080)), Decision::Allow);
        // Trust-domain-wide source.
        let td = vec![rule("td", "shop", None, &[], Action::Allow, &["spiffe://cluster.local/*"])];
        assert_eq!(evaluate(&td, peer(&id("any", "one")), backend(1)), Decision::Allow);
        assert_eq!(evaluate(&td, peer(&Identity::new("other.td", "a", "b")), backend(1)), Decision::NotAllowed);
    }

    #[test]
    fn bad_sources_are_rejected() {
        for bad in ["spiffe://cluster.local/ns/*", "spiffe:///*", "*", "spiffe://td/ns/a/sa/*/x", "spiffe://td/ns//*"] {
            assert!(source_match(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn strings_match_exactly_by_prefix_suffix_or_presence() {
        assert!(StrMatch::parse("a/ns/b").matches("a/ns/b") && !StrMatch::parse("a/ns/b").matches("a/ns/bc"));
        assert!(StrMatch::parse("cluster.local/ns/shop/*").matches("cluster.local/ns/shop/sa/web"));
        assert!(StrMatch::parse("*/sa/web").matches("cluster.local/ns/shop/sa/web"));
        assert!(StrMatch::parse("*").matches("x") && !StrMatch::parse("*").matches(""));
    }

    /// A match with only `source_ips`: an address that cannot be verified matches it in a
    /// DENY policy and not in an ALLOW one.
    #[test]
    fn unverified_addresses_deny_more_and_allow_less() {
        let m = Match { source_ips: vec!["10.1.0.0/16".parse().unwrap()], ..Default::default() };
        let not = Match { not_source_ips: vec!["10.1.0.0/16".parse().unwrap()], ..Default::default() };
        let me = id("shop", "web");
        let d = dst("shop", "db")(5432);
        let at = |ip: Option<[u8; 4]>| Peer { identity: &me, ip: ip.map(Ipv4Addr::from) };
        assert!(m.matches(at(Some([10, 1, 2, 3])), d, false));
        assert!(!m.matches(at(Some([10, 2, 2, 3])), d, false));
        assert!(not.matches(at(Some([10, 2, 2, 3])), d, false));
        assert!(!m.matches(at(None), d, false) && !not.matches(at(None), d, false), "ALLOW: not verified, no match");
        assert!(m.matches(at(None), d, true) && not.matches(at(None), d, true), "DENY: not verified, a match");
    }

    #[test]
    fn clauses_are_anded_matches_ored_fields_anded() {
        let ns = |n: &str| Match { namespaces: vec![StrMatch::parse(n)], ..Default::default() };
        let port = |p: u16| Match { destination_ports: vec![p], ..Default::default() };
        let r = PolicyRule { clauses: vec![vec![ns("a"), ns("b")], vec![port(80)]] };
        let (a, c) = (id("a", "x"), id("c", "x"));
        let d = dst("shop", "db");
        assert!(r.matches(peer(&a), d(80), false));
        assert!(!r.matches(peer(&a), d(81), false), "both clauses must hold");
        assert!(!r.matches(peer(&c), d(80), false));
        let both = Match {
            namespaces: vec![StrMatch::parse("a")],
            not_principals: vec![StrMatch::parse("*/sa/x")],
            ..Default::default()
        };
        assert!(!both.matches(peer(&a), d(80), false), "fields of one match are anded");
        assert!(PolicyRule::default().matches(peer(&c), d(1), false), "no clause: everything");
        let sa = Match { service_accounts: vec![("a".into(), "x".into())], ..Default::default() };
        assert!(sa.matches(peer(&a), d(1), false) && !sa.matches(peer(&c), d(1), false));
    }

    #[test]
    fn selectors_pick_pods_by_labels_in_their_namespace_or_anywhere_from_the_root() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "db".to_string())].into();
        let d =
            Destination { namespace: "shop", name: "db-0", labels: &labels, ip: Ipv4Addr::new(10, 0, 0, 9), port: 1 };
        let sel = |ns: &str, mesh_wide, l: &[(&str, &str)]| Rule {
            name: "p".into(),
            namespace: ns.into(),
            scope: Scope::Selector {
                labels: l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                mesh_wide,
            },
            ports: vec![],
            action: Action::Deny,
            rules: vec![PolicyRule::default()],
        };
        assert!(sel("shop", false, &[("app", "db")]).applies(d));
        assert!(!sel("shop", false, &[("app", "web")]).applies(d));
        assert!(!sel("other", false, &[("app", "db")]).applies(d));
        assert!(sel("istio-system", true, &[("app", "db")]).applies(d));
        assert_eq!(evaluate(&[sel("shop", false, &[])], peer(&id("a", "b")), d), Decision::Denied("p".into()));
    }
}
