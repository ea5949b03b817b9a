//! Holds a certificate for every identity of the node's meshed pods, and only those. For each,
//! the key is made here and only a CSR goes to the issuer. Each is renewed at half its lifetime;
//! if renewal fails, the still-valid certificate is kept and renewal retried with backoff.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use futures::StreamExt as _;
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use rustls::{pki_types::CertificateDer, sign::CertifiedKey};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    Identity, csr,
    issuer::{CertIssuer, IssueError, Issued},
};

/// Certificates requested at once (a node's pods after a restart: tens to hundreds).
const CONCURRENT_REQUESTS: usize = 8;
/// The longest wait between retries of a failing renewal.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// The longest wait between retries for an identity with no valid certificate (its
/// connections are failing meanwhile).
const MAX_RETRY_MISSING: Duration = Duration::from_secs(5);

/// A certificate in use.
pub struct WorkloadCert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When it should be replaced: half-way through its life.
    pub renew_at: SystemTime,
    /// Monotonic per identity; lets pooled connections tell they use an older certificate.
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub not_after_unix: u64,
    pub expires_in_secs: i64,
    pub generation: u64,
}

/// Issuance telemetry.
#[derive(Clone)]
pub struct CertMetrics {
    pub issued: Counter,
    /// Failed issuances and renewals, by reason (`ca_unreachable`, `permission_denied`, ...).
    pub failures: crate::metrics::ByReason,
    /// Seconds from CSR to a usable certificate.
    pub latency: Histogram,
}

impl Default for CertMetrics {
    fn default() -> Self {
        let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        CertMetrics { issued: Counter::default(), failures: Default::default(), latency: Histogram::new(buckets) }
    }
}

impl CertMetrics {
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register("certificates_issued", "Workload certificates issued", self.issued.clone());
        self.failures.register(
            reg,
            "certificate_renewal_failures",
            "Workload certificate issuance or renewal failures, by reason (the current certificate is kept)",
        );
        reg.register_with_unit(
            "certificate_issuance_duration",
            "Time from CSR to a usable workload certificate",
            prometheus_client::registry::Unit::Seconds,
            self.latency.clone(),
        );
    }
}

/// `certificate_expiry_seconds{identity}`: seconds until each local workload certificate
/// expires, read at scrape time.
#[derive(Debug)]
pub struct ExpiryCollector(pub Arc<CertManager>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

impl prometheus_client::collector::Collector for ExpiryCollector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric as _;
        let mut family = enc.encode_descriptor(
            "certificate_expiry_seconds",
            "Seconds until each local workload certificate expires (renewed at half-life)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for s in self.0.status() {
            prometheus_client::metrics::gauge::ConstGauge::new(s.expires_in_secs)
                .encode(family.encode_family(&IdentityLabels { identity: s.identity })?)?;
        }
        Ok(())
    }
}

pub struct CertManager {
    issuer: Arc<dyn CertIssuer>,
    lifetime: Duration,
    certs: RwLock<HashMap<Identity, Arc<WorkloadCert>>>,
    /// Consecutive failures per identity, for the retry backoff.
    failing: Mutex<HashMap<Identity, u32>>,
    pub metrics: CertMetrics,
}

/// The wait before retry `n` (1-based) of a failing issuance: 1 s, doubling, at most 30 s.
fn retry_after(n: u32) -> Duration {
    Duration::from_secs(1).saturating_mul(1 << n.saturating_sub(1).min(5)).min(MAX_RETRY)
}

impl CertManager {
    pub fn new(issuer: Arc<dyn CertIssuer>, lifetime: Duration) -> Self {
        CertManager {
            issuer,
            lifetime,
            certs: RwLock::default(),
            failing: Mutex::default(),
            metrics: CertMetrics::default(),
        }
    }

    pub fn get(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let cert = self.certs.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()?;
        // Never hand out an expired certificate.
        (cert.not_after > SystemTime::now()).then_some(cert)
    }

    /// Which of `wanted` have no valid certificate.
    pub fn missing(&self, wanted: &BTreeSet<Identity>) -> Vec<Identity> {
        wanted.iter().filter(|id| self.get(id).is_none()).cloned().collect()
    }

    pub fn status(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        let mut v: Vec<_> = self
            .certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, c)| CertStatus {
                identity: id.to_string(),
                not_after_unix: c.not_after.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                expires_in_secs: match c.not_after.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                },
                generation: c.generation,
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// A certificate in use from an issuance.
    fn build(&self, issued: Issued, generation: u64) -> Result<WorkloadCert, IssueError> {
        let key = rustls::crypto::ring::sign::any_supported_type(&issued.key).map_err(IssueError::Key)?;
        // Half the lifetime from now: `not_before` is backdated for clock skew and must not
        // pull renewal forward.
        let now = SystemTime::now();
        let renew_at = now + issued.not_after.duration_since(now).unwrap_or_default() / 2;
        Ok(WorkloadCert {
            key: Arc::new(CertifiedKey::new(issued.chain, key)),
            not_before: issued.not_before,
            not_after: issued.not_after,
            renew_at,
            generation,
        })
    }

    /// One issuance: a new key, a CSR for it, the issuer's chain, checked.
    async fn issue(&self, id: &Identity) -> Result<Issued, IssueError> {
        let made = csr::generate(id)?;
        let chain = self.issuer.sign(id, &made.csr_pem, self.lifetime).await?;
        let (not_before, not_after) = check_leaf(&chain, id)?;
        Ok(Issued { chain: presented(chain), key: made.key, not_before, not_after })
    }

    /// Issues what is missing or due, drops what is no longer wanted. Returns the earliest
    /// time something needs doing again.
    pub async fn sync(&self, wanted: &BTreeSet<Identity>) -> SystemTime {
        let now = SystemTime::now();
        let mut next = now + Duration::from_secs(3600);
        {
            let mut certs = self.certs.write().unwrap_or_else(|p| p.into_inner());
            certs.retain(|id, _| {
                let keep = wanted.contains(id);
                if !keep {
                    info!(identity = %id, "certificate released: no pod with this identity on the node");
                }
                keep
            });
            self.failing.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| wanted.contains(id));
        }
        let mut due = Vec::new();
        for id in wanted {
            let current = self.certs.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
            match &current {
                Some(c) if c.renew_at > now => next = next.min(c.renew_at),
                _ => due.push((id.clone(), current)),
            }
        }
        let results: Vec<_> = futures::stream::iter(due)
            .map(|(id, current)| async move {
                let started = Instant::now();
                let r = self.issue(&id).await;
                (id, current, started.elapsed(), r)
            })
            .buffer_unordered(CONCURRENT_REQUESTS)
            .collect()
            .await;
        for (id, current, took, r) in results {
            let generation = current.as_ref().map_or(1, |c| c.generation + 1);
            match r.and_then(|i| self.build(i, generation)) {
                Ok(cert) => {
                    self.metrics.issued.inc();
                    self.metrics.latency.observe(took.as_secs_f64());
                    self.failing.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    info!(identity = %id, generation, lifetime = ?self.lifetime, took = ?took, "certificate issued");
                    next = next.min(cert.renew_at);
                    self.certs.write().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(cert));
                }
                Err(e) => {
                    self.metrics.failures.inc(e.reason());
                    let n = {
                        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
                        let n = failing.entry(id.clone()).or_default();
                        *n = n.saturating_add(1);
                        *n
                    };
                    let remaining = current.as_ref().and_then(|c| c.not_after.duration_since(now).ok());
                    let still_valid = remaining.is_some();
                    // Backing off, but never so far that the certificate in use expires before
                    // the next try.
                    let retry = match remaining {
                        Some(r) => retry_after(n).min(r / 4).max(Duration::from_millis(200)),
                        None => retry_after(n).min(MAX_RETRY_MISSING),
                    };
                    warn!(identity = %id, error = %e, reason = e.reason(), still_valid, retry_in = ?retry, "certificate issuance failed; keeping the current one and retrying");
                    next = next.min(now + retry);
                }
            }
        }
        next
    }

    /// Keeps certificates in line with `wanted` until `stop`.
    pub async fn run(self: Arc<Self>, mut wanted: watch::Receiver<BTreeSet<Identity>>, stop: CancellationToken) {
        loop {
            let set = wanted.borrow_and_update().clone();
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = self.sync(&set) => next,
            };
            let wait = next.duration_since(SystemTime::now()).unwrap_or_default().max(Duration::from_millis(50));
            tokio::select! {
                _ = stop.cancelled() => return,
                r = wanted.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The leaf's validity, once it is known to be for `id` exactly (as ztunnel checks what its CA
/// returns: a CA that signs something else must not make the agent present it).
fn check_leaf(chain: &[CertificateDer<'static>], id: &Identity) -> Result<(SystemTime, SystemTime), IssueError> {
    let leaf = chain.first().ok_or_else(|| IssueError::BadResponse("empty chain".into()))?;
    match super::peer_identity(leaf) {
        Ok(got) if got == *id => {}
        Ok(got) => return Err(IssueError::WrongIdentity { wanted: id.to_string(), got: got.to_string() }),
        Err(e) => return Err(IssueError::WrongIdentity { wanted: id.to_string(), got: e.to_string() }),
    }
    super::validity(leaf).ok_or_else(|| IssueError::BadResponse("the leaf certificate cannot be parsed".into()))
}

/// What the agent presents: the leaf and intermediates, not a self-issued root at the end.
fn presented(mut chain: Vec<CertificateDer<'static>>) -> Vec<CertificateDer<'static>> {
    if chain.len() > 1
        && let Some(last) = chain.last()
        && x509_parser::parse_x509_certificate(last).is_ok_and(|(_, c)| c.subject() == c.issuer())
    {
        chain.pop();
    }
    chain
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::identity::{ca, issuer::IssueError};

    /// Delegates to a real CA, but can be made to fail or to sign the wrong identity.
    struct Flaky {
        ca: ca::LocalCa,
        fail: AtomicBool,
        lie: AtomicBool,
        calls: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl CertIssuer for Flaky {
        async fn sign(
            &self,
            id: &Identity,
            csr: &str,
            lifetime: Duration,
        ) -> Result<Vec<CertificateDer<'static>>, IssueError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(IssueError::Unreachable { address: "test".into(), detail: "down".into() });
            }
            if self.lie.load(Ordering::SeqCst) {
                // A CA that signs another identity than asked for (with its own key: the
                // agent must not present it).
                let other = Identity::new("cluster.local", "kube-system", "admin");
                return Ok(self.ca.issue(&other, lifetime)?.chain);
            }
            self.ca.sign(id, csr, lifetime).await
        }
    }

    fn flaky() -> (tempfile::TempDir, Arc<Flaky>) {
        let dir = tempfile::tempdir().unwrap();
        let p = ca::init(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        let ca = ca::LocalCa::load(&p.cert, &p.key).unwrap();
        let f = Flaky { ca, fail: AtomicBool::new(false), lie: AtomicBool::new(false), calls: AtomicUsize::new(0) };
        (dir, Arc::new(f))
    }

    #[tokio::test]
    async fn issues_renews_at_half_life_keeps_on_failure_and_releases() {
        let (_d, issuer) = flaky();
        // Lifetime 0: expired at once, so never handed out.
        let m = CertManager::new(issuer.clone(), Duration::ZERO);
        let a = Identity::new("cluster.local", "shop", "a");
        let b = Identity::new("cluster.local", "shop", "b");
        let wanted: BTreeSet<_> = [a.clone(), b.clone()].into();
        m.sync(&wanted).await;
        assert_eq!(m.get(&a).map(|c| c.generation), None, "a zero-lifetime certificate is already expired");
        assert_eq!(m.status().len(), 2);
        assert_eq!(m.missing(&wanted), vec![a.clone(), b.clone()]);

        let m = CertManager::new(issuer.clone(), Duration::from_secs(120));
        m.sync(&wanted).await;
        let first = m.get(&a).unwrap();
        assert_eq!(first.generation, 1);
        assert!(m.missing(&wanted).is_empty());
        // The root is not presented: the leaf alone (the CA is the root).
        assert_eq!(first.key.cert.len(), 1);
        // renew_at = now + 60 s: not due yet.
        m.sync(&wanted).await;
        assert_eq!(m.get(&a).unwrap().generation, 1);
        let renew_in = first.renew_at.duration_since(SystemTime::now()).unwrap();
        assert!(renew_in > Duration::from_secs(55) && renew_in <= Duration::from_secs(60), "{renew_in:?}");

        issuer.fail.store(true, Ordering::SeqCst);
        let short = CertManager::new(issuer.clone(), Duration::from_secs(120));
        let next = short.sync(&wanted).await;
        assert!(short.get(&a).is_none(), "nothing to keep yet");
        assert_eq!(short.metrics.failures.get("ca_unreachable"), 2);
        // Retried in 1 s, then 2 s: backing off.
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        let next = short.sync(&wanted).await;
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(wait > Duration::from_millis(1500) && wait <= Duration::from_secs(2), "{wait:?}");

        // Only wanted identities keep certificates.
        issuer.fail.store(false, Ordering::SeqCst);
        m.sync(&[b.clone()].into()).await;
        assert!(m.get(&a).is_none());
        assert!(m.get(&b).is_some());
    }

    #[tokio::test]
    async fn a_certificate_for_another_identity_than_asked_is_refused() {
        let (_d, issuer) = flaky();
        issuer.lie.store(true, Ordering::SeqCst);
        let m = CertManager::new(issuer.clone(), Duration::from_secs(120));
        let a = Identity::new("cluster.local", "shop", "a");
        m.sync(&[a.clone()].into()).await;
        assert!(m.get(&a).is_none());
        assert_eq!(m.metrics.failures.get("wrong_identity"), 1);
    }

    #[tokio::test]
    async fn many_identities_are_issued_concurrently_and_each_once() {
        let (_d, issuer) = flaky();
        let m = CertManager::new(issuer.clone(), Duration::from_secs(120));
        let wanted: BTreeSet<_> = (0..40).map(|i| Identity::new("cluster.local", "shop", &format!("sa{i}"))).collect();
        m.sync(&wanted).await;
        assert!(m.missing(&wanted).is_empty());
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 40);
        assert_eq!(m.metrics.issued.get(), 40);
    }
}
