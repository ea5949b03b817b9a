//! Authorization by identity, decided at the destination: rules match source SPIFFE IDs
//! (exact, a whole namespace, or a whole trust domain) for a destination namespace, optionally
//! one workload and some ports. Semantics follow Istio's AuthorizationPolicy: any matching
//! `deny` rule denies; if `allow` rules select the destination, one of them must match;
//! otherwise the connection is allowed (default allow within the mesh).
use serde::Deserialize;

use crate::identity::Identity;

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

/// The destination a rule is evaluated for: a pod, by namespace and name, and a port.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// Which sources a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Source {
    /// `spiffe://td/ns/x/sa/y`
    Exact(Identity),
    /// `spiffe://td/ns/x/*`
    Namespace { trust_domain: String, namespace: String },
    /// `spiffe://td/*`
    TrustDomain(String),
}

impl Source {
    pub fn parse(s: &str) -> Result<Self, RuleError> {
        let err = || RuleError::Source(s.into());
        if let Some(td) = s.strip_prefix("spiffe://").and_then(|r| r.strip_suffix("/*")) {
            if let Some((td, ns)) = td.split_once("/ns/") {
                if td.is_empty() || ns.is_empty() || ns.contains('/') || td.contains('/') {
                    return Err(err());
                }
                return Ok(Source::Namespace { trust_domain: td.into(), namespace: ns.into() });
            }
            if td.is_empty() || td.contains('/') {
                return Err(err());
            }
            return Ok(Source::TrustDomain(td.into()));
        }
        Identity::parse(s).map(Source::Exact).map_err(|_| err())
    }

    pub fn matches(&self, id: &Identity) -> bool {
        match self {
            Source::Exact(e) => e == id,
            Source::Namespace { trust_domain, namespace } => {
                &id.trust_domain == trust_domain && &id.namespace == namespace
            }
            Source::TrustDomain(td) => &id.trust_domain == td,
        }
    }
}

/// As written in the workload file.
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

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub name: String,
    pub namespace: String,
    pub workload: Option<String>,
    pub ports: Vec<u16>,
    pub action: Action,
    pub from: Vec<Source>,
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
            .map(|f| Source::parse(f))
            .collect::<Result<_, _>>()
            .map_err(|e| RuleError::InRule { rule: s.name.clone(), source: Box::new(e) })?;
        Ok(Rule { name: s.name, namespace: s.namespace, workload: s.workload, ports: s.ports, action: s.action, from })
    }
}

impl Rule {
    fn selects(&self, dst: Destination<'_>) -> bool {
        self.namespace == dst.namespace
            && self.workload.as_ref().is_none_or(|w| *w == dst.name)
            && (self.ports.is_empty() || self.ports.contains(&dst.port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by this deny rule.
    Denied(String),
    /// Allow rules select the destination and none matched the source.
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

pub fn evaluate(rules: &[Rule], src: &Identity, dst: Destination<'_>) -> Decision {
    let selecting = || rules.iter().filter(|r| r.selects(dst));
    if let Some(r) = selecting().find(|r| r.action == Action::Deny && r.from.iter().any(|f| f.matches(src))) {
        return Decision::Denied(r.name.clone());
    }
    let mut allows = selecting().filter(|r| r.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|r| r.from.iter().any(|f| f.matches(src))) { Decision::Allow } else { Decision::NotAllowed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst<'a>(namespace: &'a str, name: &'a str) -> impl Fn(u16) -> Destination<'a> {
        move |port| Destination { namespace, name, port }
    }

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

    #[test]
    fn default_allow_deny_wins_allow_lists_restrict() {
        let backend = dst("shop", "backend");
        assert_eq!(evaluate(&[], &id("x", "y"), backend(80)), Decision::Allow);

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
        assert_eq!(evaluate(&rules, &id("legacy", "a"), backend(8080)), Decision::Denied("no-legacy".into()));
        assert_eq!(evaluate(&rules, &id("shop", "frontend"), backend(8080)), Decision::Allow);
        assert_eq!(evaluate(&rules, &id("shop", "batch"), backend(8080)), Decision::NotAllowed);
        // The allow rule only selects port 8080 and pod backend.
        assert_eq!(evaluate(&rules, &id("shop", "batch"), backend(9090)), Decision::Allow);
        assert_eq!(evaluate(&rules, &id("shop", "batch"), dst("shop", "web")(8080)), Decision::Allow);
        // Trust-domain-wide source.
        let td = vec![rule("td", "shop", None, &[], Action::Allow, &["spiffe://cluster.local/*"])];
        assert_eq!(evaluate(&td, &id("any", "one"), backend(1)), Decision::Allow);
        assert_eq!(evaluate(&td, &Identity::new("other.td", "a", "b"), backend(1)), Decision::NotAllowed);
    }

    #[test]
    fn bad_sources_are_rejected() {
        for bad in ["spiffe://cluster.local/ns/*", "spiffe:///*", "*", "spiffe://td/ns/a/sa/*/x", "spiffe://td/ns//*"] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }
}
