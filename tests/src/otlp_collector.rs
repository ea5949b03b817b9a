//! A fake OpenTelemetry collector for tests: OTLP/HTTP with protobuf bodies (`POST
//! /v1/traces`), on 127.0.0.1 inside a network namespace, decoding every span it receives
//! with the OTLP protobuf definitions (`opentelemetry-proto`).
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value::Value},
};
use prost::Message as _;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind` number (3 = client).
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code (0 unset, 1 ok, 2 error) and message.
    pub status: (i32, String),
    pub resource: BTreeMap<String, String>,
    pub scope: String,
}

pub struct Collector {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    /// Export requests received, and how many were not valid protobuf.
    requests: Arc<Mutex<(u64, u64)>>,
    down: Arc<AtomicBool>,
}

impl Collector {
    /// Listens on 127.0.0.1 (ephemeral port) in `netns`.
    pub fn start(netns: &str) -> Result<Collector> {
        let listener = crate::in_netns(netns, || TcpListener::bind("127.0.0.1:0"))??;
        listener.set_nonblocking(true)?;
        let c = Collector {
            addr: listener.local_addr()?,
            spans: Default::default(),
            requests: Default::default(),
            down: Default::default(),
        };
        let (spans, requests, down) = (c.spans.clone(), c.requests.clone(), c.down.clone());
        std::thread::spawn(move || {
            while !down.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (spans, requests) = (spans.clone(), requests.clone());
                        std::thread::spawn(move || {
                            if let Err(e) = serve(s, &spans, &requests) {
                                eprintln!("fake collector: {e:#}");
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(c)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// (export requests, of which not decodable).
    pub fn requests(&self) -> (u64, u64) {
        *self.requests.lock().unwrap()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.down.store(true, Ordering::SeqCst);
    }
}

fn serve(s: TcpStream, spans: &Mutex<Vec<Span>>, requests: &Mutex<(u64, u64)>) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request_line = line.trim().to_string();
        let mut length = 0usize;
        let mut content_type = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().context("content-length")?,
                    "content-type" => content_type = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        r.read_exact(&mut body)?;
        let mut w = &s;
        if !request_line.starts_with("POST /v1/traces ") || content_type != "application/x-protobuf" {
            write!(w, "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?;
            bail!("unexpected request {request_line:?} ({content_type})");
        }
        let decoded = ExportTraceServiceRequest::decode(body.as_slice());
        {
            let mut n = requests.lock().unwrap();
            n.0 += 1;
            n.1 += u64::from(decoded.is_err());
        }
        let req = match decoded {
            Ok(r) => r,
            Err(e) => {
                write!(w, "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")?;
                bail!("not an ExportTraceServiceRequest: {e}");
            }
        };
        let mut got = Vec::new();
        for rs in req.resource_spans {
            let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
            for ss in rs.scope_spans {
                let scope = ss.scope.map(|s| s.name).unwrap_or_default();
                for sp in ss.spans {
                    got.push(Span {
                        trace_id: hex(&sp.trace_id),
                        span_id: hex(&sp.span_id),
                        parent_span_id: hex(&sp.parent_span_id),
                        name: sp.name,
                        kind: sp.kind,
                        start_ns: sp.start_time_unix_nano,
                        end_ns: sp.end_time_unix_nano,
                        attributes: attrs(&sp.attributes),
                        status: sp.status.map(|s| (s.code, s.message)).unwrap_or_default(),
                        resource: resource.clone(),
                        scope: scope.clone(),
                    });
                }
            }
        }
        spans.lock().unwrap().extend(got);
        // An empty ExportTraceServiceResponse.
        write!(w, "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")?;
        w.flush()?;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map(value).unwrap_or_default())).collect()
}

fn value(v: &AnyValue) -> String {
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}
