//! Endpoint choice for Services: power of two choices over a peak-EWMA latency estimate times
//! the connections in flight (Finagle's and Linkerd's balancer, at L4: the latency is the
//! connect time). A failed connect counts as a slow one, so a dead endpoint stops being picked
//! at once and is tried again as the penalty decays.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How fast an estimate forgets: the decay time constant.
const DECAY: Duration = Duration::from_secs(10);
/// What a failed connect counts as.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);
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
}

impl Stats {
    fn new(now: Instant) -> Self {
        Stats { ewma_ns: DEFAULT_RTT.as_nanos() as f64, updated: now, in_flight: 0 }
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
    /// Picks among `endpoints` minus `exclude`: the cheaper of two distinct random candidates.
    pub fn pick(&self, endpoints: &[SocketAddrV4], exclude: &[SocketAddrV4]) -> Option<SocketAddrV4> {
        let candidates: Vec<SocketAddrV4> = endpoints.iter().copied().filter(|e| !exclude.contains(e)).collect();
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let now = Instant::now();
                let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                let cost = |e: &SocketAddrV4| stats.get(e).map_or(Stats::new(now).cost(now), |s| s.cost(now));
                Some(if cost(&candidates[b]) < cost(&candidates[a]) { candidates[b] } else { candidates[a] })
            }
        }
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

    pub fn connected(&self, ep: SocketAddrV4, took: Duration) {
        self.with(ep, |s, now| s.observe(took.as_nanos() as f64, now));
    }

    pub fn failed(&self, ep: SocketAddrV4) {
        self.with(ep, |s, now| s.observe(FAILURE_PENALTY.as_nanos() as f64, now));
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
    fn a_failed_endpoint_is_avoided_and_fast_ones_preferred() {
        let b = Arc::new(Balancer::default());
        let eps = [ep(1), ep(2), ep(3)];
        b.failed(ep(2));
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
    fn backoff_grows_is_capped_and_jittered() {
        for attempt in 1..10 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_millis(100), "{d:?}");
            assert!(d >= Duration::from_millis(5), "{d:?}");
        }
        assert!(backoff(1) < Duration::from_millis(11));
    }
}
