//! What the Service's policy decides for one request, before and between attempts: the retry
//! budget, which requests may be sent again, and the answers the proxy makes itself.
use std::{convert::Infallible, time::Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Response, StatusCode,
    header::{HeaderMap, HeaderValue},
};

use super::Body;

/// Header on every response the proxy makes itself, saying why.
pub const ERROR_HEADER: &str = "x-switchyard-error";

/// Retries allowed per second whatever the ratio (Linkerd's floor), over the budget window.
pub(super) const BUDGET_MIN_PER_SEC: u64 = 10;
pub(super) const BUDGET_WINDOW_SECS: u64 = 10;

/// A response the proxy makes itself: its status, its `x-switchyard-error` value and Envoy's
/// response flag. Carried in the response's extensions, so telemetry reads it from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyAnswer {
    /// `max-connections` requests in flight and `max-pending-requests` waiting.
    ConnectionLimit,
    /// `switchyard.io/timeout` passed (or the last try's `per-try-timeout`).
    RequestTimeout,
    /// No endpoint could be connected to.
    UpstreamUnavailable,
    /// The endpoint failed after the request was sent, before it answered.
    UpstreamReset,
    /// The Service has no ready endpoint (or no longer exists).
    NoEndpoints,
    /// Authorization policy refused the request's connection (here or at the peer node).
    Denied,
    /// The request body could not be read from the client.
    RequestBody,
}

impl ProxyAnswer {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyAnswer::ConnectionLimit | ProxyAnswer::UpstreamUnavailable | ProxyAnswer::NoEndpoints => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyAnswer::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyAnswer::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyAnswer::Denied => StatusCode::FORBIDDEN,
            ProxyAnswer::RequestBody => StatusCode::BAD_REQUEST,
        }
    }

    /// The `x-switchyard-error` value.
    pub fn header(self) -> &'static str {
        match self {
            ProxyAnswer::ConnectionLimit => "connection-limit",
            ProxyAnswer::RequestTimeout => "request-timeout",
            ProxyAnswer::UpstreamUnavailable => "upstream-unavailable",
            ProxyAnswer::UpstreamReset => "upstream-reset",
            ProxyAnswer::NoEndpoints => "no-endpoints",
            ProxyAnswer::Denied => "denied",
            ProxyAnswer::RequestBody => "request-body",
        }
    }

    /// Envoy's response flag.
    pub fn flag(self) -> &'static str {
        match self {
            ProxyAnswer::ConnectionLimit => "UO",
            ProxyAnswer::RequestTimeout => "UT",
            ProxyAnswer::UpstreamUnavailable => "UF",
            ProxyAnswer::UpstreamReset => "UC",
            ProxyAnswer::NoEndpoints => "UH",
            ProxyAnswer::Denied => "-",
            ProxyAnswer::RequestBody => "DPE",
        }
    }

    /// The response, with `detail` as its body.
    pub fn respond(self, detail: String) -> Response<Body> {
        let mut r =
            Response::new(Full::new(Bytes::from(detail + "\n")).map_err(|n: Infallible| match n {}).boxed_unsync());
        *r.status_mut() = self.status();
        r.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static(self.header()));
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r.extensions_mut().insert(self);
        r
    }
}

/// Envoy's response flags: what the proxy itself answered, or a 5xx after retries.
pub fn response_flags(answer: Option<ProxyAnswer>, retries: u32, status: StatusCode) -> &'static str {
    match answer {
        Some(a) => a.flag(),
        None if retries > 0 && status.is_server_error() => "URX",
        None => "-",
    }
}

/// Requests and retries per second over the last [`BUDGET_WINDOW_SECS`].
#[derive(Default)]
pub(super) struct Budget {
    /// (second, requests, retries)
    buckets: [(u64, u64, u64); BUDGET_WINDOW_SECS as usize],
}

impl Budget {
    fn bucket(&mut self, sec: u64) -> &mut (u64, u64, u64) {
        let b = &mut self.buckets[(sec % BUDGET_WINDOW_SECS) as usize];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }

    pub(super) fn deposit(&mut self, sec: u64) {
        self.bucket(sec).1 += 1;
    }

    pub(super) fn try_withdraw(&mut self, sec: u64, percent: u32) -> bool {
        let (requests, retries) =
            self.buckets.iter().filter(|b| b.0 + BUDGET_WINDOW_SECS > sec).fold((0, 0), |(a, b), x| (a + x.1, b + x.2));
        let allowed = BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS + requests * u64::from(percent) / 100;
        if retries < allowed {
            self.bucket(sec).2 += 1;
            true
        } else {
            false
        }
    }
}

pub(super) fn now_sec() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() + BUDGET_WINDOW_SECS
}

pub(super) fn idempotent(m: &hyper::Method) -> bool {
    use hyper::Method as M;
    [M::GET, M::HEAD, M::OPTIONS, M::PUT, M::DELETE, M::TRACE].contains(m)
}

pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(hyper::header::UPGRADE)
        && headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_share_of_requests_plus_a_floor() {
        let mut b = Budget::default();
        let sec = 100;
        for _ in 0..1000 {
            b.deposit(sec);
        }
        let allowed = (0..10_000).take_while(|_| b.try_withdraw(sec, 20)).count();
        assert_eq!(allowed, 200 + (BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS) as usize);
        assert!(!b.try_withdraw(sec + 5, 20), "still spent within the window");
        assert!(b.try_withdraw(sec + BUDGET_WINDOW_SECS, 20), "the window moved on");
        let mut none = Budget::default();
        assert_eq!((0..1000).take_while(|_| none.try_withdraw(7, 0)).count(), 100, "the floor alone");
    }

    #[test]
    fn idempotent_methods_and_upgrades() {
        assert!(idempotent(&hyper::Method::GET) && idempotent(&hyper::Method::DELETE));
        assert!(!idempotent(&hyper::Method::POST) && !idempotent(&hyper::Method::PATCH));
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert("connection", HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }

    #[test]
    fn every_answer_carries_its_status_header_and_flag_in_the_response() {
        use ProxyAnswer::*;
        for (a, status, header, flag) in [
            (ConnectionLimit, 503, "connection-limit", "UO"),
            (RequestTimeout, 504, "request-timeout", "UT"),
            (UpstreamUnavailable, 503, "upstream-unavailable", "UF"),
            (UpstreamReset, 502, "upstream-reset", "UC"),
            (NoEndpoints, 503, "no-endpoints", "UH"),
            (Denied, 403, "denied", "-"),
            (RequestBody, 400, "request-body", "DPE"),
        ] {
            let r = a.respond("why".into());
            assert_eq!(r.status().as_u16(), status, "{a:?}");
            assert_eq!(r.headers()[ERROR_HEADER], header);
            assert_eq!(r.extensions().get::<ProxyAnswer>(), Some(&a));
            assert_eq!(response_flags(Some(a), 0, r.status()), flag);
        }
        // Flags come from the answer, never from a header an upstream could have written.
        assert_eq!(response_flags(None, 0, StatusCode::SERVICE_UNAVAILABLE), "-");
        assert_eq!(response_flags(None, 2, StatusCode::SERVICE_UNAVAILABLE), "URX");
        assert_eq!(response_flags(None, 2, StatusCode::OK), "-");
    }
}
