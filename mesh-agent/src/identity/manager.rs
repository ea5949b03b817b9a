//! Holds a certificate for every identity of the node's meshed pods, and only those. Each is
//! renewed at half its lifetime; if renewal fails, the still-valid certificate is kept and
//! renewal retried with backoff.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    Identity,
    issuer::{CertIssuer, IssueError, Issued},
};

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

pub struct CertManager {
    issuer: Arc<dyn CertIssuer>,
    lifetime: Duration,
    certs: RwLock<HashMap<Identity, Arc<WorkloadCert>>>,
    /// Renewal failures, for metrics.
    pub failures: prometheus_client::metrics::counter::Counter,
    pub issued: prometheus_client::metrics::counter::Counter,
}

impl CertManager {
    pub fn new(issuer: Arc<dyn CertIssuer>, lifetime: Duration) -> Self {
        CertManager {
            issuer,
            lifetime,
            certs: RwLock::default(),
            failures: Default::default(),
            issued: Default::default(),
        }
    }

    pub fn get(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let cert = self.certs.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()?;
        // Never hand out an expired certificate.
        (cert.not_after > SystemTime::now()).then_some(cert)
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

    fn build(&self, issued: Issued, generation: u64) -> Result<WorkloadCert, IssueError> {
        let key = rustls::crypto::ring::sign::any_supported_type(&issued.key).map_err(IssueError::Key)?;
        // Half the lifetime asked for, from now: `not_before` is backdated for clock skew and
        // must not pull renewal forward.
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

    /// Issues what is missing or due, drops what is no longer wanted. Returns the earliest
    /// time something needs doing again.
    pub fn sync(&self, wanted: &BTreeSet<Identity>) -> SystemTime {
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
        }
        for id in wanted {
            let current = self.certs.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
            if let Some(c) = &current
                && c.renew_at > now
            {
                next = next.min(c.renew_at);
                continue;
            }
            let generation = current.as_ref().map_or(1, |c| c.generation + 1);
            match self.issuer.issue(id, self.lifetime).and_then(|i| self.build(i, generation)) {
                Ok(cert) => {
                    self.issued.inc();
                    info!(identity = %id, generation, lifetime = ?self.lifetime, "certificate issued");
                    next = next.min(cert.renew_at);
                    self.certs.write().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), Arc::new(cert));
                }
                Err(e) => {
                    self.failures.inc();
                    let still_valid = current.as_ref().is_some_and(|c| c.not_after > now);
                    warn!(identity = %id, error = %e, still_valid, "certificate renewal failed; keeping the current one and retrying");
                    next = next.min(now + Duration::from_secs(1));
                }
            }
        }
        next
    }

    /// Keeps certificates in line with `wanted` until `stop`.
    pub async fn run(self: Arc<Self>, mut wanted: watch::Receiver<BTreeSet<Identity>>, stop: CancellationToken) {
        loop {
            let set = wanted.borrow_and_update().clone();
            let next = self.sync(&set);
            let wait = next.duration_since(SystemTime::now()).unwrap_or_default().max(Duration::from_millis(50));
            tokio::select! {
                _ = stop.cancelled() => return,
                r = wanted.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::identity::{ca, issuer::IssueError};

    /// Delegates to a real CA, but can be made to fail.
    struct Flaky {
        ca: ca::LocalCa,
        fail: AtomicBool,
    }

    impl CertIssuer for Flaky {
        fn issue(&self, id: &Identity, lifetime: Duration) -> Result<Issued, IssueError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(IssueError::Unavailable("test".into()));
            }
            self.ca.issue(id, lifetime)
        }
    }

    fn flaky() -> (tempfile::TempDir, Arc<Flaky>) {
        let dir = tempfile::tempdir().unwrap();
        let p = ca::init(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        let ca = ca::LocalCa::load(&p.cert, &p.key).unwrap();
        (dir, Arc::new(Flaky { ca, fail: AtomicBool::new(false) }))
    }

    #[test]
    fn issues_renews_at_half_life_keeps_on_failure_and_releases() {
        let (_d, issuer) = flaky();
        // Lifetime 0: expired at once, so never handed out.
        let m = CertManager::new(issuer.clone(), Duration::ZERO);
        let a = Identity::new("cluster.local", "shop", "a");
        let b = Identity::new("cluster.local", "shop", "b");
        let wanted: BTreeSet<_> = [a.clone(), b.clone()].into();
        m.sync(&wanted);
        assert_eq!(m.get(&a).map(|c| c.generation), None, "a zero-lifetime certificate is already expired");
        assert_eq!(m.status().len(), 2);

        let m = CertManager::new(issuer.clone(), Duration::from_secs(120));
        m.sync(&wanted);
        let first = m.get(&a).unwrap();
        assert_eq!(first.generation, 1);
        // renew_at = now + 60 s: not due yet.
        m.sync(&wanted);
        assert_eq!(m.get(&a).unwrap().generation, 1);
        let renew_in = first.renew_at.duration_since(SystemTime::now()).unwrap();
        assert!(renew_in > Duration::from_secs(55) && renew_in <= Duration::from_secs(60), "{renew_in:?}");

        issuer.fail.store(true, Ordering::SeqCst);
        let short = CertManager::new(issuer.clone(), Duration::from_secs(120));
        short.sync(&wanted);
        assert!(short.get(&a).is_none(), "nothing to keep yet");
        assert_eq!(short.failures.get(), 2);

        // Only wanted identities keep certificates.
        issuer.fail.store(false, Ordering::SeqCst);
        m.sync(&[b.clone()].into());
        assert!(m.get(&a).is_none());
        assert!(m.get(&b).is_some());
    }
}
