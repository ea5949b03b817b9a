//! HTTP and other protocol peers for simulated pods, with faults on demand: what the
//! resilience tests run behind a Service. Results go to stdout as one JSON line.
//!
//! * `serve`: HTTP/1.1 and HTTP/2 (prior knowledge) server answering with its name; faults:
//!   a share of requests answered with a status, hung requests, delays. Echoes request
//!   trailers back as response trailers (gRPC style), and answers an HTTP/1.1 upgrade with
//!   `101` and then echoes bytes. `GET /__stats` (never faulted) counts requests per method.
//! * `load`: a load generator reporting statuses, proxy error reasons, who served, latency.
//! * `upgrade`, `grpc`: one WebSocket-style upgrade / one HTTP/2 request with trailers.
//! * `banner-server`, `banner`: a server-speaks-first protocol (SMTP-like).
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, header::HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// Share of requests (0..1) answered with --fail-status.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        #[arg(long, default_value_t = 503)]
        fail_status: u16,
        /// Never answer (except /__stats).
        #[arg(long)]
        hang: bool,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    Load {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 100)]
        requests: u64,
        /// Run for this long instead of a number of requests.
        #[arg(long)]
        duration_ms: Option<u64>,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value = "GET")]
        method: String,
        /// HTTP/2 with prior knowledge.
        #[arg(long)]
        h2: bool,
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Pause between requests of one worker.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// A new connection for every request (HTTP/1.1 `Connection: close`).
        #[arg(long)]
        new_connection: bool,
        /// Extra request header `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    Upgrade {
        #[arg(long)]
        url: String,
    },
    Grpc {
        #[arg(long)]
        url: String,
    },
    BannerServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    Banner {
        #[arg(long)]
        connect: SocketAddr,
    },
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n: Infallible| match n {}).boxed()
}

fn print(v: serde_json::Value) {
    println!("{v}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    match Cli::parse().cmd {
        Cmd::Serve { listen, name, fail_rate, fail_status, hang, delay_ms } => {
            let cfg = Arc::new(ServeCfg { name, fail_rate, fail_status, hang, delay_ms, stats: Mutex::default() });
            serve(listen, cfg).await
        }
        Cmd::Load {
            url,
            requests,
            duration_ms,
            concurrency,
            method,
            h2,
            body_bytes,
            timeout_ms,
            interval_ms,
            new_connection,
            headers,
        } => {
            let opts = LoadOpts {
                url: url.parse().expect("a URL"),
                method: method.parse().expect("a method"),
                h2,
                body: Bytes::from(vec![b'x'; body_bytes]),
                timeout: Duration::from_millis(timeout_ms),
                interval: Duration::from_millis(interval_ms),
                new_connection,
                headers: headers
                    .iter()
                    .filter_map(|h| h.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect(),
            };
            load(Arc::new(opts), requests, duration_ms.map(Duration::from_millis), concurrency).await
        }
        Cmd::Upgrade { url } => upgrade(url.parse().expect("a URL")).await,
        Cmd::Grpc { url } => grpc(url.parse().expect("a URL")).await,
        Cmd::BannerServer { listen } => banner_server(listen).await,
        Cmd::Banner { connect } => banner(connect).await,
    }
}

struct ServeCfg {
    name: String,
    fail_rate: f64,
    fail_status: u16,
    hang: bool,
    delay_ms: u64,
    stats: Mutex<BTreeMap<String, u64>>,
}

async fn serve(listen: SocketAddr, cfg: Arc<ServeCfg>) {
    let l = TcpListener::bind(listen).await.expect("bind");
    print(serde_json::json!({ "ready": listen.to_string() }));
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let cfg = cfg.clone();
                async move { Ok::<_, Infallible>(handle(cfg, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn handle(cfg: Arc<ServeCfg>, mut req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == "/__stats" {
        let stats = cfg.stats.lock().unwrap().clone();
        return Response::new(full(serde_json::to_vec(&stats).unwrap()));
    }
    *cfg.stats.lock().unwrap().entry(req.method().to_string()).or_default() += 1;
    if cfg.hang {
        std::future::pending::<()>().await;
    }
    if cfg.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(cfg.delay_ms)).await;
    }
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let seen = req.headers().get("sec-websocket-key").cloned();
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("upgrade", HeaderValue::from_static("websocket"));
        r.headers_mut().insert("connection", HeaderValue::from_static("upgrade"));
        if let Some(k) = seen {
            r.headers_mut().insert("x-seen-key", k);
        }
        return r;
    }
    // GET /status/<code>: that status, whatever the faults.
    let fixed = req.uri().path().strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok());
    let seen_tp = req.headers().get("traceparent").cloned();
    if let Some(code) = fixed {
        let mut r = Response::new(full(format!("status {code}\n")));
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        r.headers_mut().insert("x-served-by", HeaderValue::from_str(&cfg.name).unwrap());
        if let Some(tp) = seen_tp {
            r.headers_mut().insert("x-seen-traceparent", tp);
        }
        return r;
    }
    if cfg.fail_rate > 0.0 && fastrand::f64() < cfg.fail_rate {
        let mut r = Response::new(full("injected failure\n"));
        *r.status_mut() = StatusCode::from_u16(cfg.fail_status).unwrap();
        r.headers_mut().insert("x-served-by", HeaderValue::from_str(&cfg.name).unwrap());
        return r;
    }
    let is_grpc = req.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let collected = req.into_body().collect().await;
    let (len, trailers) = match collected {
        Ok(c) => {
            let t = c.trailers().cloned();
            (c.to_bytes().len(), t)
        }
        Err(_) => (0, None),
    };
    let body = format!("{} {len}\n", cfg.name);
    let mut r = if is_grpc {
        let mut t = hyper::HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        if let Some(req_t) = trailers {
            for (k, v) in &req_t {
                t.insert(hyper::header::HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()).unwrap(), v.clone());
            }
        }
        let b =
            Full::new(Bytes::from(body)).map_err(|n: Infallible| match n {}).with_trailers(async move { Some(Ok(t)) });
        Response::new(b.boxed())
    } else {
        Response::new(full(body))
    };
    r.headers_mut().insert("x-served-by", HeaderValue::from_str(&cfg.name).unwrap());
    if let Some(tp) = seen_tp {
        r.headers_mut().insert("x-seen-traceparent", tp);
    }
    r
}

struct LoadOpts {
    url: hyper::Uri,
    method: hyper::Method,
    h2: bool,
    body: Bytes,
    timeout: Duration,
    interval: Duration,
    new_connection: bool,
    headers: Vec<(String, String)>,
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<String, u64>,
    reasons: BTreeMap<String, u64>,
    served_by: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
    /// The `traceparent` the server saw, per request (`x-seen-traceparent`).
    seen_traceparents: Vec<String>,
    /// The first few errors with their time since the start of the run (ms), for diagnosis.
    error_times: Vec<(u64, String)>,
}

enum Client {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

async fn connect(opts: &LoadOpts) -> Result<Client, String> {
    let auth = opts.url.authority().ok_or("no authority")?;
    let addr = format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80));
    let s = TcpStream::connect(&addr).await.map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = s.set_nodelay(true);
    let io = TokioIo::new(s);
    if opts.h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Client::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn.with_upgrades());
        Ok(Client::H1(send))
    }
}

/// Idle kept-alive connections found closed and replaced before sending.
static RECONNECTS: AtomicU64 = AtomicU64::new(0);

async fn one(client: &mut Client, opts: &LoadOpts) -> Result<Response<Bytes>, String> {
    let mut req = Request::builder().method(opts.method.clone());
    req = if opts.h2 {
        req.uri(opts.url.clone())
    } else {
        req.uri(opts.url.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", opts.url.authority().unwrap().as_str())
    };
    if opts.new_connection && !opts.h2 {
        req = req.header("connection", "close");
    }
    for (k, v) in &opts.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(full(opts.body.clone())).unwrap();
    // A connection that was closed while idle is not a failed request: like any pooling client,
    // reconnect and send (counted as a reconnect).
    let ready = match client {
        Client::H1(s) => s.ready().await,
        Client::H2(s) => s.ready().await,
    };
    if ready.is_err() {
        RECONNECTS.fetch_add(1, Ordering::Relaxed);
        *client = connect(opts).await?;
    }
    let resp = match client {
        Client::H1(s) => {
            s.ready().await.map_err(|e| format!("ready: {e}"))?;
            s.send_request(req).await
        }
        Client::H2(s) => {
            s.ready().await.map_err(|e| format!("ready: {e}"))?;
            match s.try_send_request(req).await {
                Ok(r) => Ok(r),
                // A stream the server never processed (sent as its GOAWAY arrived; RFC 9113
                // §6.8: safe to retry) is retried on a new connection, as gRPC and other
                // HTTP/2 clients do; counted as a reconnect.
                Err(mut e) if e.message().is_some() || e.error().is_canceled() => {
                    let req = e.take_message().unwrap_or_else(|| {
                        let mut r = Request::builder().method(opts.method.clone()).uri(opts.url.clone());
                        for (k, v) in &opts.headers {
                            r = r.header(k.as_str(), v.as_str());
                        }
                        r.body(full(opts.body.clone())).unwrap()
                    });
                    RECONNECTS.fetch_add(1, Ordering::Relaxed);
                    *client = connect(opts).await?;
                    match client {
                        Client::H2(s) => {
                            s.ready().await.map_err(|e| format!("ready: {e}"))?;
                            s.send_request(req).await
                        }
                        Client::H1(_) => unreachable!("an HTTP/2 load stays HTTP/2"),
                    }
                }
                Err(e) => Err(e.into_error()),
            }
        }
    }
    .map_err(|e| format!("request: {e}"))?;
    let (parts, body) = resp.into_parts();
    let b = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok(Response::from_parts(parts, b))
}

async fn load(opts: Arc<LoadOpts>, requests: u64, duration: Option<Duration>, concurrency: usize) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let issued = Arc::new(AtomicU64::new(0));
    let until = duration.map(|d| Instant::now() + d);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (opts, tally, issued) = (opts.clone(), tally.clone(), issued.clone());
        workers.push(tokio::spawn(async move {
            let mut client: Option<Client> = None;
            loop {
                match until {
                    Some(u) if Instant::now() >= u => break,
                    None if issued.fetch_add(1, Ordering::Relaxed) >= requests => break,
                    _ => {}
                }
                let t = Instant::now();
                let r = tokio::time::timeout(opts.timeout, async {
                    if client.is_none() {
                        client = Some(connect(&opts).await?);
                    }
                    one(client.as_mut().unwrap(), &opts).await
                })
                .await
                .unwrap_or_else(|_| Err("timeout".into()));
                {
                    let mut tl = tally.lock().unwrap();
                    match r {
                        Ok(resp) => {
                            tl.latencies_us.push(t.elapsed().as_micros() as u64);
                            *tl.statuses.entry(resp.status().as_u16().to_string()).or_default() += 1;
                            if let Some(v) = resp.headers().get("x-seen-traceparent")
                                && tl.seen_traceparents.len() < 10
                            {
                                tl.seen_traceparents.push(v.to_str().unwrap_or("").to_string());
                            }
                            if let Some(v) = resp.headers().get("x-switchyard-error") {
                                *tl.reasons.entry(v.to_str().unwrap_or("?").to_string()).or_default() += 1;
                            }
                            if let Some(v) = resp.headers().get("x-served-by")
                                && resp.status().is_success()
                            {
                                *tl.served_by.entry(v.to_str().unwrap_or("?").to_string()).or_default() += 1;
                            }
                        }
                        Err(e) => {
                            client = None;
                            if tl.error_times.len() < 10 {
                                tl.error_times.push((started.elapsed().as_millis() as u64, e.clone()));
                            }
                            *tl.errors.entry(e).or_default() += 1;
                        }
                    }
                }
                if opts.new_connection {
                    client = None;
                } else if client.is_none() {
                    // After an error: do not spin.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if !opts.interval.is_zero() {
                    tokio::time::sleep(opts.interval).await;
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut tl = tally.lock().unwrap();
    tl.latencies_us.sort_unstable();
    let pct = |p: f64| {
        let v = &tl.latencies_us;
        if v.is_empty() { 0.0 } else { v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0 }
    };
    let total: u64 = tl.statuses.values().sum::<u64>() + tl.errors.values().sum::<u64>();
    let report = sim::LoadReport {
        total,
        ok: tl.statuses.iter().filter(|(k, _)| k.starts_with('2')).map(|(_, v)| v).sum::<u64>(),
        statuses: tl.statuses.clone(),
        reasons: tl.reasons.clone(),
        served_by: tl.served_by.clone(),
        errors: tl.errors.clone(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        elapsed_ms: started.elapsed().as_millis() as u64,
        reconnects: RECONNECTS.load(Ordering::Relaxed),
        seen_traceparents: tl.seen_traceparents.clone(),
        error_times_ms: tl.error_times.clone(),
    };
    print(serde_json::to_value(report).expect("a report serializes"));
}

async fn upgrade(url: hyper::Uri) {
    let opts = LoadOpts {
        url: url.clone(),
        method: hyper::Method::GET,
        h2: false,
        body: Bytes::new(),
        timeout: Duration::from_secs(5),
        interval: Duration::ZERO,
        new_connection: false,
        headers: vec![],
    };
    let Ok(Client::H1(mut send)) = connect(&opts).await else {
        return print(serde_json::json!({"error": "connect"}));
    };
    let req = Request::builder()
        .uri(url.path())
        .header("host", url.authority().unwrap().as_str())
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(full(""))
        .unwrap();
    let mut resp = match send.send_request(req).await {
        Ok(r) => r,
        Err(e) => return print(serde_json::json!({"error": e.to_string()})),
    };
    let status = resp.status().as_u16();
    let seen = resp.headers().get("x-seen-key").map(|v| v.to_str().unwrap_or("").to_string());
    let mut echoed = String::new();
    if status == 101
        && let Ok(up) = hyper::upgrade::on(&mut resp).await
    {
        let mut io = TokioIo::new(up);
        let msg = b"frames pass through untouched";
        io.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        if tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf)).await.is_ok_and(|r| r.is_ok()) {
            echoed = String::from_utf8_lossy(&buf).into_owned();
        }
    }
    print(serde_json::json!({"status": status, "seen_key": seen, "echoed": echoed}));
}

async fn grpc(url: hyper::Uri) {
    let opts = LoadOpts {
        url: url.clone(),
        method: hyper::Method::POST,
        h2: true,
        body: Bytes::new(),
        timeout: Duration::from_secs(5),
        interval: Duration::ZERO,
        new_connection: false,
        headers: vec![],
    };
    let Ok(Client::H2(mut send)) = connect(&opts).await else {
        return print(serde_json::json!({"error": "connect"}));
    };
    let mut t = hyper::HeaderMap::new();
    t.insert("client-checksum", HeaderValue::from_static("abc123"));
    let body = Full::new(Bytes::from_static(b"\0\0\0\0\x05hello"))
        .map_err(|n: Infallible| match n {})
        .with_trailers(async move { Some(Ok(t)) })
        .boxed();
    let req = Request::builder()
        .method("POST")
        .uri(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = match send.send_request(req).await {
        Ok(r) => r,
        Err(e) => return print(serde_json::json!({"error": e.to_string()})),
    };
    let status = resp.status().as_u16();
    let version = format!("{:?}", resp.version());
    let c = resp.into_body().collect().await;
    let (body, trailers) = match c {
        Ok(c) => {
            let t: BTreeMap<String, String> = c
                .trailers()
                .map(|t| t.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect())
                .unwrap_or_default();
            (String::from_utf8_lossy(&c.to_bytes()).into_owned(), t)
        }
        Err(e) => (format!("error: {e}"), BTreeMap::new()),
    };
    print(serde_json::json!({"status": status, "version": version, "body": body, "trailers": trailers}));
}

async fn banner_server(listen: SocketAddr) {
    let l = TcpListener::bind(listen).await.expect("bind");
    print(serde_json::json!({ "ready": listen.to_string() }));
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let _ = s.write_all(b"220 sim.example ESMTP ready\r\n").await;
            let mut buf = [0u8; 1024];
            if let Ok(n) = s.read(&mut buf).await
                && n > 0
            {
                let _ = s.write_all(b"221 bye\r\n").await;
            }
        });
    }
}

async fn banner(connect: SocketAddr) {
    let t = Instant::now();
    let mut s = match TcpStream::connect(connect).await {
        Ok(s) => s,
        Err(e) => return print(serde_json::json!({"error": e.to_string()})),
    };
    let mut buf = [0u8; 256];
    let n = match tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => return print(serde_json::json!({"error": "no banner"})),
    };
    let banner_ms = t.elapsed().as_secs_f64() * 1000.0;
    let banner = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    let _ = s.write_all(b"QUIT\r\n").await;
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.ok().and_then(|r| r.ok()).unwrap_or(0);
    let reply = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    print(serde_json::json!({"banner": banner, "banner_ms": banner_ms, "reply": reply}));
}
