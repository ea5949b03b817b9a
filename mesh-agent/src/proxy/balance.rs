//! Endpoint choice for Services: power of two choices over a peak-EWMA latency estimate times
//! the connections (or requests) in flight: Finagle's and Linkerd's balancer. At L4 the latency
//! is the connect time, for HTTP the time to the response headers; a failure counts with the
//! time it took, so a hung endpoint looks as slow as it is.
//!
//! Outlier detection (circuit breaking) lives here too: an endpoint with
//! `consecutive_failures` failures in a row (connect errors, resets, timeouts, 5xx) is ejected
//! for `base_ejection` × the number of times it has been ejected, unless that would eject more
//! than `max_ejection_percent` of its Service's endpoints. An ejected endpoint is not picked
//! while any other is left; when its time is up it is on probation: its next request decides,
//! a failure ejects it again at once (for longer), a success readmits it.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How fast an estimate forgets: the decay time constant.
const DECAY: Duration = Duration::from_secs(10);
/// Estimate for an endpoint never measured: optimistic, so new endpoints get traffic.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Endpoints tracked at most (a bound on memory; the least recently used are forgotten).
const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Stats {
    /// Peak EWMA of connect latency, nanoseconds.
    ewma_ns: f64,
    updated: Instant,
    in_flight: u32,
    consecutive_failures: u32,
    /// Ejected (not picked while others are left) until then.
    ejected_until: Option<Instant>,
    /// Times ejected (grows the next ejection; decays as the endpoint stays healthy).
    ejections: u32,
    /// Back from an ejection, not yet proven healthy.
    probation: bool,
}

impl Stats {
    fn new(now: Instant) -> Self {
        Stats {
            ewma_ns: DEFAULT_RTT.as_nanos() as f64,
            updated: now,
            in_flight: 0,
            consecutive_failures: 0,
            ejected_until: None,
            ejections: 0,
            probation: false,
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }

    /// The estimate decayed to `now`.
    fn decayed(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        let w = (-dt / DECAY.as_secs_f64()).exp();
        let floor = DEFAULT_RTT.as_nanos() as f64;
        floor + (self.ewma_ns - floor) * w
    }

    fn observe(&mut self, rtt_ns: f64, now: Instant) {
        let current = self.decayed(now);
        // Peak: a slow sample takes over at once; fast samples pull it down gradually.
        self.ewma_ns = if rtt_ns > current { rtt_ns } else { current * 0.7 + rtt_ns * 0.3 };
        self.updated = now;
    }

    fn cost(&self, now: Instant) -> f64 {
        self.decayed(now) * f64::from(self.in_flight + 1)
    }
}

#[derive(Default)]
pub struct Balancer {
    stats: Mutex<HashMap<SocketAddrV4, Stats>>,
    outlier: crate::config::Outlier,
    /// Ejections so far (`switchyard_endpoint_ejections_total`).
    pub ejections_total: prometheus_client::metrics::counter::Counter,
}

/// One endpoint as `/debug/services` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointView {
    pub endpoint: SocketAddrV4,
    pub latency_ms: f64,
    pub in_flight: u32,
    pub consecutive_failures: u32,
    /// Milliseconds of ejection left (absent: not ejected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    pub ejections: u32,
}

/// Counts a connection in flight to an endpoint until dropped.
pub struct InFlight {
    balancer: Arc<Balancer>,
    ep: SocketAddrV4,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(s) = self.balancer.stats.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.ep) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

impl Balancer {
    pub fn new(outlier: crate::config::Outlier) -> Self {
        Balancer { outlier, ..Default::default() }
    }

    /// Picks among `endpoints` minus `exclude`, ejected endpoints only if nothing else is
    /// left: the cheaper of two distinct random candidates.
    pub fn pick(&self, endpoints: &[SocketAddrV4], exclude: &[SocketAddrV4]) -> Option<SocketAddrV4> {
        let now = Instant::now();
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let open: Vec<SocketAddrV4> = endpoints.iter().copied().filter(|e| !exclude.contains(e)).collect();
        let healthy: Vec<SocketAddrV4> =
            open.iter().copied().filter(|e| !stats.get(e).is_some_and(|s| s.ejected(now))).collect();
        let candidates = if healthy.is_empty() { open } else { healthy };
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let cost = |e: &SocketAddrV4| stats.get(e).map_or(Stats::new(now).cost(now), |s| s.cost(now));
                Some(if cost(&candidates[b]) < cost(&candidates[a]) { candidates[b] } else { candidates[a] })
            }
        }
    }

    /// The endpoints of one Service as the balancer sees them.
    pub fn view(&self, endpoints: &[SocketAddrV4]) -> Vec<EndpointView> {
        let now = Instant::now();
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        endpoints
            .iter()
            .map(|e| {
                let s = stats.get(e).copied().unwrap_or_else(|| Stats::new(now));
                EndpointView {
                    endpoint: *e,
                    latency_ms: s.decayed(now) / 1e6,
                    in_flight: s.in_flight,
                    consecutive_failures: s.consecutive_failures,
                    ejected_for_ms: s
                        .ejected_until
                        .filter(|t| *t > now)
                        .map(|t| t.duration_since(now).as_millis() as u64),
                    ejections: s.ejections,
                }
            })
            .collect()
    }

    fn with(&self, ep: SocketAddrV4, f: impl FnOnce(&mut Stats, Instant)) {
        let now = Instant::now();
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if stats.len() >= MAX_TRACKED
            && !stats.contains_key(&ep)
            && let Some(oldest) = stats.iter().min_by_key(|(_, s)| s.updated).map(|(k, _)| *k)
        {
            stats.remove(&oldest);
        }
        f(stats.entry(ep).or_insert_with(|| Stats::new(now)), now);
    }

    /// A connection attempt to `ep` starts.
    pub fn start(self: &Arc<Self>, ep: SocketAddrV4) -> InFlight {
        self.with(ep, |s, _| s.in_flight += 1);
        InFlight { balancer: self.clone(), ep }
    }

    /// A success (connected, or a response that is not a failure) after `took`.
    pub fn connected(&self, ep: SocketAddrV4, took: Duration) {
        let base = self.outlier.base_ejection;
        self.with(ep, |s, now| {
            s.observe(took.as_nanos() as f64, now);
            s.consecutive_failures = 0;
            s.probation = false;
            // Healthy for a while after its last ejection: the next one starts shorter again.
            if s.ejections > 0 && s.ejected_until.is_some_and(|t| now > t + base) {
                s.ejections -= 1;
                s.ejected_until = Some(now);
            }
        });
    }

    /// A failure of `ep`, one of `endpoints` (its Service's), after `took`. Returns true when
    /// this failure ejected it.
    pub fn failed(&self, ep: SocketAddrV4, endpoints: &[SocketAddrV4], took: Duration) -> bool {
        let now = Instant::now();
        let o = self.outlier;
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let ejected_now =
            endpoints.iter().filter(|e| **e != ep && stats.get(e).is_some_and(|s| s.ejected(now))).count();
        // At most this many of the Service's endpoints out at once; never the last one.
        let allowed = if endpoints.len() < 2 {
            0
        } else {
            (endpoints.len() * o.max_ejection_percent as usize / 100).clamp(1, endpoints.len() - 1)
        };
        drop(stats);
        let mut ejected = false;
        self.with(ep, |s, now| {
            s.observe(took.as_nanos() as f64, now);
            s.consecutive_failures += 1;
            let due = s.probation || s.consecutive_failures >= o.consecutive_failures;
            if due && !s.ejected(now) && ejected_now < allowed {
                s.ejections = (s.ejections + 1).min(30);
                s.ejected_until = Some(now + o.base_ejection * s.ejections);
                s.consecutive_failures = 0;
                s.probation = true;
                ejected = true;
            }
        });
        if ejected {
            self.ejections_total.inc();
            let until = self.view(&[ep])[0].ejected_for_ms.unwrap_or(0);
            tracing::warn!(endpoint = %ep, ejected_for_ms = until, "endpoint ejected after consecutive failures");
        }
        ejected
    }
}

/// Delay before retry `attempt` (1, 2, ...): exponential from 5 ms, capped at 100 ms, with up to
/// half of it as random jitter so that clients retrying together spread out.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(5).saturating_mul(1 << attempt.min(5)).min(Duration::from_millis(100));
    base / 2 + base.mul_f64(fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new([10, 244, 1, n].into(), 8080)
    }

    #[test]
    fn a_slow_or_hung_endpoint_is_avoided_and_fast_ones_preferred() {
        let b = Arc::new(Balancer::default());
        let eps = [ep(1), ep(2), ep(3)];
        b.failed(ep(2), &eps, Duration::from_secs(1));
        b.connected(ep(1), Duration::from_micros(200));
        b.connected(ep(3), Duration::from_micros(300));
        for _ in 0..200 {
            // Any pair containing ep(2) prefers the other one.
            assert_ne!(b.pick(&eps, &[]), Some(ep(2)));
        }
        assert_eq!(b.pick(&eps, &[ep(1), ep(3)]), Some(ep(2)), "the only one left is still usable");
        assert_eq!(b.pick(&eps, &eps), None);
    }

    #[test]
    fn connections_in_flight_spread_the_load() {
        let b = Arc::new(Balancer::default());
        let eps = [ep(1), ep(2)];
        let _busy: Vec<InFlight> = (0..5).map(|_| b.start(ep(1))).collect();
        for _ in 0..50 {
            assert_eq!(b.pick(&eps, &[]), Some(ep(2)));
        }
        drop(_busy);
        let picks: Vec<_> = (0..200).map(|_| b.pick(&eps, &[]).unwrap()).collect();
        assert!(picks.contains(&ep(1)) && picks.contains(&ep(2)), "equal endpoints both get picked");
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_period_within_the_share() {
        let o = crate::config::Outlier {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(100),
            max_ejection_percent: 50,
        };
        let b = Arc::new(Balancer::new(o));
        let eps = [ep(1), ep(2), ep(3), ep(4)];
        let fail = |n: u8| b.failed(ep(n), &eps, Duration::from_micros(50));
        assert!(!fail(1) && !fail(1));
        b.connected(ep(1), Duration::from_micros(100));
        assert!(!fail(1) && !fail(1), "a success resets the count");
        assert!(fail(1), "third in a row ejects");
        for _ in 0..100 {
            assert_ne!(b.pick(&eps, &[]), Some(ep(1)));
        }
        assert_eq!(b.pick(&eps, &[ep(2), ep(3), ep(4)]), Some(ep(1)), "used when nothing else is left");
        // 50 % of 4: a second endpoint may go, a third may not.
        for _ in 0..3 {
            fail(2);
        }
        for _ in 0..10 {
            assert!(!fail(3), "never more than the share");
        }
        let v = b.view(&eps);
        assert!(v[0].ejected_for_ms.is_some() && v[1].ejected_for_ms.is_some() && v[2].ejected_for_ms.is_none());
        std::thread::sleep(Duration::from_millis(120));
        assert!(b.view(&eps)[0].ejected_for_ms.is_none(), "back after its period");
        assert!(fail(1), "on probation: one failure ejects again");
        let second = b.view(&eps)[0].ejected_for_ms.unwrap();
        assert!(second > 100, "the second ejection is longer: {second} ms");
        assert_eq!(b.ejections_total.get(), 3);
        // ep(2) came back too; a success readmits it for good.
        b.connected(ep(2), Duration::from_micros(100));
        assert!(!fail(2), "readmitted: one failure is not enough again");
        let single = [ep(9)];
        for _ in 0..10 {
            assert!(!b.failed(ep(9), &single, Duration::ZERO), "a Service's only endpoint is never ejected");
        }
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for attempt in 1..10 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_millis(100), "{d:?}");
            assert!(d >= Duration::from_millis(5), "{d:?}");
        }
        assert!(backoff(1) < Duration::from_millis(11));
    }
}
