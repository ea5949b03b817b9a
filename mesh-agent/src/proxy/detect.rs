//! Protocol detection on a redirected connection: HTTP/1.x, HTTP/2 with prior knowledge (which
//! is how gRPC starts), or anything else (opaque TCP).
//!
//! The client's first bytes are *peeked*, never consumed, so whatever is decided the bytes
//! reach the destination unchanged. Port hints decide first (a Service port's `appProtocol` or
//! name, the configured HTTP and opaque port lists); without a hint the proxy waits at most the
//! sniff timeout for the first bytes. A protocol where the server speaks first (SMTP, MySQL)
//! sends nothing, so it is opaque after that one wait; on a hinted opaque port it waits not at
//! all. An HTTP/1.1 `Upgrade: h2c` request is HTTP/1 here: it is forwarded as such and the
//! upgraded connection passes through as bytes.
use std::time::Duration;

use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tcp => "tcp",
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] =
    &[b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"TRACE ", b"PATCH "];

/// What the first bytes say so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Is(Protocol),
    NeedMore,
}

pub(crate) fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Verdict::Is(Protocol::Http2) } else { Verdict::NeedMore };
    }
    for m in METHODS {
        let n = buf.len().min(m.len());
        if buf[..n] == m[..n] {
            if n < m.len() {
                return Verdict::NeedMore;
            }
            // The request line must end in HTTP/1.x; wait for it within a bound.
            let line_end = buf.windows(2).position(|w| w == b"\r\n");
            return match line_end {
                Some(end) if buf[..end].ends_with(b" HTTP/1.1") || buf[..end].ends_with(b" HTTP/1.0") => {
                    Verdict::Is(Protocol::Http1)
                }
                Some(_) => Verdict::Is(Protocol::Tcp),
                None if buf.len() >= PEEK => Verdict::Is(Protocol::Tcp),
                None => Verdict::NeedMore,
            };
        }
    }
    Verdict::Is(Protocol::Tcp)
}

/// Bytes looked at, at most: a request line longer than this is not worth proxying as HTTP.
pub(crate) const PEEK: usize = 8 * 1024;
/// The first look: enough for any method and most request lines. The buffer is allocated only
/// once the client has sent something, and grows to [`PEEK`] only for a longer request line.
const FIRST_PEEK: usize = 256;
/// The longest wait for a client's first bytes on an HTTP-hinted port; past it the connection
/// is opaque TCP (a silent client holds no detection state for longer).
pub const HINTED_WAIT_MAX: Duration = Duration::from_secs(10);

/// The hint, if any, for a connection to `port` (a Service port's hint first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Http,
    Opaque,
    None,
}

/// How long detection waits on an HTTP-hinted port: the configured wait, at most
/// [`HINTED_WAIT_MAX`].
pub fn hinted_wait(configured: Duration) -> Duration {
    configured.min(HINTED_WAIT_MAX)
}

/// Decides what `stream` carries. `Hint::Opaque` returns at once; `Hint::Http` waits for the
/// first bytes up to `hinted_wait` (at most [`HINTED_WAIT_MAX`]); no hint waits up to
/// `sniff_timeout`.
pub async fn detect(stream: &TcpStream, hint: Hint, sniff_timeout: Duration, hinted_wait: Duration) -> Protocol {
    let wait = match hint {
        Hint::Opaque => return Protocol::Tcp,
        Hint::Http => self::hinted_wait(hinted_wait),
        Hint::None => sniff_timeout,
    };
    let deadline = tokio::time::Instant::now() + wait;
    // Nothing is allocated while the client is silent.
    match tokio::time::timeout_at(deadline, stream.readable()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => return Protocol::Tcp,
    }
    let mut buf = vec![0u8; FIRST_PEEK];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            // Error or timeout: let the copy path see (and report) what the socket does.
            Ok(Err(_)) | Err(_) => return Protocol::Tcp,
        };
        if n == 0 {
            return Protocol::Tcp; // closed before saying anything
        }
        if let Verdict::Is(p) = classify(&buf[..n]) {
            return p;
        }
        if n == buf.len() && buf.len() < PEEK {
            // A long request line: look further, at once.
            buf.resize(PEEK, 0);
            continue;
        }
        // peek returns at once while data is queued: wait a little for more instead of spinning.
        if n == seen && tokio::time::Instant::now() >= deadline {
            return Protocol::Tcp;
        }
        seen = n;
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(1))).await.is_err() {
            return Protocol::Tcp;
        }
    }
}

/// Protocol detection and HTTP settings of the outbound proxy.
#[derive(Debug, Clone)]
pub struct DetectConfig {
    pub sniff_timeout: Duration,
    pub http_ports: Vec<u16>,
    pub opaque_ports: Vec<u16>,
    pub retry_body_limit: usize,
    /// Bytes of request bodies kept for retries on the whole node at once; past it, requests
    /// are streamed (not retried once sent), never refused.
    pub retry_body_budget: usize,
    /// Propagate W3C trace context on HTTP requests (create it when absent).
    pub trace_context: bool,
    /// Share (0..1) of the traces the proxy starts that are marked sampled.
    pub trace_sample_rate: f64,
    /// OTLP export of the proxy's request spans (`None`: off).
    pub spans: Option<crate::otlp::Spans>,
    pub access_log: crate::config::AccessLog,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            sniff_timeout: crate::config::DEFAULT_SNIFF_TIMEOUT,
            http_ports: vec![],
            opaque_ports: crate::config::DEFAULT_OPAQUE_PORTS.to_vec(),
            retry_body_limit: crate::config::DEFAULT_RETRY_BODY_LIMIT,
            retry_body_budget: crate::config::DEFAULT_RETRY_BODY_BUDGET,
            trace_context: true,
            trace_sample_rate: 1.0,
            spans: None,
            access_log: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{io::AsyncWriteExt as _, net::TcpListener};

    use super::*;

    #[test]
    fn classifies_first_bytes() {
        use Protocol::*;
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Verdict::Is(Http1));
        assert_eq!(classify(b"POST /a HTTP/1.0\r\n"), Verdict::Is(Http1));
        assert_eq!(classify(H2_PREFACE), Verdict::Is(Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(b"GET /long/path"), Verdict::NeedMore);
        assert_eq!(classify(b"GET / SMTP\r\n"), Verdict::Is(Tcp));
        assert_eq!(classify(b"EHLO me\r\n"), Verdict::Is(Tcp));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Verdict::Is(Tcp), "a TLS ClientHello");
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Verdict::Is(Tcp), "methods are case-sensitive");
        let mut long = b"GET /".to_vec();
        long.resize(PEEK, b'a');
        assert_eq!(classify(&long), Verdict::Is(Tcp));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn a_silent_client_is_tcp_after_the_sniff_timeout_and_bytes_are_not_consumed() {
        let (_c, s) = pair().await;
        let t = Instant::now();
        let p = detect(&s, Hint::None, Duration::from_millis(50), Duration::from_secs(10)).await;
        assert_eq!(p, Protocol::Tcp);
        assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
        assert_eq!(detect(&s, Hint::Opaque, Duration::from_secs(5), Duration::from_secs(5)).await, Protocol::Tcp);

        let (mut c, s) = pair().await;
        let w = tokio::spawn(async move {
            c.write_all(b"GET /x HT").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
            c
        });
        assert_eq!(detect(&s, Hint::None, Duration::from_secs(2), Duration::from_secs(2)).await, Protocol::Http1);
        let _c = w.await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.peek(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"GET /x HTTP/1.1"), "still there for the proxy to read");
    }
}
