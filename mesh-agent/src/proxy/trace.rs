//! W3C trace context (`traceparent`) for HTTP requests through the proxy: a request that
//! carries a valid `traceparent` keeps its trace id and gets the proxy's own span id as parent
//! (the proxy is a hop of the trace); a request without one, or with an invalid one (which the
//! spec says to restart), gets a new trace. `tracestate` passes untouched.
use hyper::header::{HeaderMap, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent`: version 00, trace id, parent id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

impl TraceParent {
    pub fn parse(s: &str) -> Option<TraceParent> {
        let mut f = s.trim().split('-');
        let (version, trace, parent, flags) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let hex =
            |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        // Version ff is invalid; a future version may append fields, version 00 may not.
        if !hex(version, 2) || version == "ff" || (version == "00" && f.next().is_some()) {
            return None;
        }
        if !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
            return None;
        }
        let tp = TraceParent {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            parent_id: u64::from_str_radix(parent, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (tp.trace_id != 0 && tp.parent_id != 0).then_some(tp)
    }

    pub fn header(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.parent_id, self.flags))
            .expect("hex digits and dashes are a valid header value")
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

/// The trace context of one request through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// What the proxy sent upstream: its own span id is the parent id.
    pub sent: TraceParent,
    /// The client's span (the parent id it sent), when it sent a valid `traceparent`.
    pub client_span: Option<u64>,
}

impl Hop {
    pub fn sampled(&self) -> bool {
        self.sent.flags & 1 == 1
    }
}

/// Sets the request's `traceparent` for the hop to the upstream. A trace the proxy starts is
/// marked sampled for a `sample_rate` share (0..1) of requests; one it continues keeps the
/// client's decision.
pub fn continue_or_start(headers: &mut HeaderMap, sample_rate: f64) -> Hop {
    let incoming = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
    let hop = match incoming {
        Some(t) => Hop { sent: TraceParent { parent_id: nonzero_u64(), ..t }, client_span: Some(t.parent_id) },
        None => Hop {
            sent: TraceParent {
                trace_id: (u128::from(nonzero_u64()) << 64) | u128::from(fastrand::u64(..)),
                parent_id: nonzero_u64(),
                flags: u8::from(crate::otlp::sample(sample_rate)),
            },
            client_span: None,
        },
    };
    headers.insert(TRACEPARENT, hop.sent.header());
    hop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_parent_keeps_its_trace_and_an_invalid_one_restarts() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        h.insert("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        let hop = continue_or_start(&mut h, 0.0);
        assert_eq!(hop.client_span, Some(0x00f067aa0ba902b7));
        assert!(hop.sampled(), "the client's decision is kept");
        let tp = hop.sent;
        assert_eq!(tp.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_ne!(tp.parent_id, 0x00f067aa0ba902b7, "the proxy's own span is the new parent");
        assert_eq!(tp.flags, 1);
        assert_eq!(TraceParent::parse(h[TRACEPARENT].to_str().unwrap()), Some(tp));
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            let tp = continue_or_start(&mut h, 1.0).sent;
            assert_ne!(tp.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736, "restarted: {bad}");
        }
        let mut none = HeaderMap::new();
        let hop = continue_or_start(&mut none, 1.0);
        let tp = hop.sent;
        assert!(TraceParent::parse(none[TRACEPARENT].to_str().unwrap()) == Some(tp) && tp.trace_id != 0);
        assert!(hop.sampled() && hop.client_span.is_none());
        assert!(!continue_or_start(&mut HeaderMap::new(), 0.0).sampled(), "rate 0: started traces not sampled");
    }
}
