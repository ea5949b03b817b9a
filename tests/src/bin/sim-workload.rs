//! The program that runs inside simulated pods: an echo server, a verifying client, and UDP
//! (DNS-style) peers. Plain std networking, like any application the mesh must not disturb.
//! Results go to stdout as one JSON line.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Barrier, Mutex},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How the program does socket I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Io {
    /// Non-blocking sockets, waiting in poll(2) on EAGAIN: how event-loop runtimes (Go, Java
    /// NIO, Node, tokio, nginx, curl) do it.
    Poll,
    /// Blocking reads and writes with SO_RCVTIMEO/SO_SNDTIMEO, as in classic threaded programs.
    /// Same-node acceleration breaks these on current kernels (see tests/tests/accel.rs).
    Blocking,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo server: echoes everything, then half-closes after the client does.
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value_t = Io::Poll)]
        io: Io,
    },
    /// Connects, sends a pattern, half-closes, reads the echo back and verifies it.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Connections at once; with --hold they are all open at the same moment.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long)]
        hold: bool,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Payload made of this text repeated (a marker to look for in packet captures).
        #[arg(long)]
        text: Option<String>,
        /// Keep making connections until this much time has passed (ignores --count).
        #[arg(long)]
        duration_ms: Option<u64>,
        #[arg(long, value_enum, default_value_t = Io::Poll)]
        io: Io,
    },
    /// Answers each connection with the peer address it sees (one line), then closes: what a
    /// server outside the mesh sees of its clients.
    WhoamiServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connects and reports what the server saw: `{"ok": 1, "seen_as": "ip:port", "local": ..}`.
    Whoami {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// UDP echo server.
    UdpServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Opens `count` connections and holds them open for `seconds` (for memory under many
    /// connections); prints how many were opened.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: u64,
    },
    /// Sends one datagram and waits for the echo (connected socket unless --sendto).
    UdpQuery {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        sendto: bool,
    },
}

fn main() {
    match Cli::parse().cmd {
        Cmd::EchoServer { listen, io } => echo_server(listen, io),
        Cmd::Client { connect, bytes, count, concurrency, hold, timeout_ms, text, duration_ms, io } => {
            let opts = Opts {
                bytes,
                count: if duration_ms.is_some() { usize::MAX } else { count },
                concurrency: concurrency.max(1),
                hold,
                timeout: Duration::from_millis(timeout_ms),
                text,
                until: duration_ms.map(|d| Instant::now() + Duration::from_millis(d)),
                io,
            };
            client(connect, opts)
        }
        Cmd::UdpServer { listen } => udp_server(listen),
        Cmd::WhoamiServer { listen } => whoami_server(listen),
        Cmd::Whoami { connect, timeout_ms } => whoami(connect, Duration::from_millis(timeout_ms)),
        Cmd::Hold { connect, count, seconds } => hold(connect, count, seconds),
        Cmd::UdpQuery { to, sendto } => udp_query(to, sendto),
    }
}

fn ready(addr: SocketAddr) {
    println!("{}", serde_json::json!({ "ready": addr.to_string() }));
    std::io::stdout().flush().unwrap();
}

/// Waits until `s` is ready for `events` (POLLIN/POLLOUT) or the deadline passes.
fn wait_ready(s: &TcpStream, events: i16, deadline: Instant) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"));
        }
        let mut p = libc::pollfd { fd: s.as_raw_fd(), events, revents: 0 };
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(std::io::Error::last_os_error());
        }
    }
}

/// A socket used in the chosen I/O style: non-blocking plus poll(2), or plain blocking.
struct Conn {
    s: TcpStream,
    io: Io,
    timeout: Duration,
}

impl Conn {
    fn new(s: TcpStream, io: Io, timeout: Duration) -> std::io::Result<Conn> {
        match io {
            Io::Poll => s.set_nonblocking(true)?,
            Io::Blocking => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
            }
        }
        Ok(Conn { s, io, timeout })
    }

    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(Conn { s: self.s.try_clone()?, io: self.io, timeout: self.timeout })
    }

    fn retry<T>(&mut self, events: i16, mut f: impl FnMut(&mut TcpStream) -> std::io::Result<T>) -> std::io::Result<T> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match f(&mut self.s) {
                Err(e) if self.io == Io::Poll && e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_ready(&self.s, events, deadline)?
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.retry(libc::POLLIN, |s| s.read(buf))
    }

    fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let n = self.retry(libc::POLLOUT, |s| s.write(buf))?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    fn read_to_end(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let mut buf = [0u8; 16384];
        loop {
            match self.read(&mut buf)? {
                0 => return Ok(()),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }
}

fn echo_server(listen: SocketAddr, io: Io) {
    let l = TcpListener::bind(listen).expect("bind");
    ready(l.local_addr().unwrap());
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        std::thread::spawn(move || {
            // Generous: an echo connection may sit idle while its client holds it open.
            let Ok(mut c) = Conn::new(s, io, Duration::from_secs(300)) else { return };
            let mut buf = [0u8; 16384];
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if c.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = c.s.shutdown(Shutdown::Write);
        });
    }
}

use sim::ClientReport as Report;

struct Opts {
    bytes: usize,
    count: usize,
    concurrency: usize,
    hold: bool,
    timeout: Duration,
    text: Option<String>,
    until: Option<Instant>,
    io: Io,
}

fn pattern(conn: usize, len: usize, text: Option<&str>) -> Vec<u8> {
    match text {
        Some(t) if !t.is_empty() => t.bytes().cycle().take(len).collect(),
        _ => (0..len).map(|i| ((i * 31 + conn * 7) % 251) as u8).collect(),
    }
}

fn one(
    addr: SocketAddr,
    conn: usize,
    bytes: usize,
    text: Option<&str>,
    timeout: Duration,
    barrier: Option<&Barrier>,
    io: Io,
) -> Result<(String, String), String> {
    let opened = (|| {
        let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?.to_string();
        let local = s.local_addr().map_err(|e| format!("getsockname: {e}"))?.to_string();
        Ok::<_, String>((s, peer, local))
    })();
    // Every holder reaches the barrier, also one whose connection already failed (a reset can
    // arrive before getpeername): otherwise the others would wait for it for ever.
    if let Some(b) = barrier {
        b.wait();
    }
    let (s, peer, local) = opened?;
    let mut s = Conn::new(s, io, timeout).map_err(|e| format!("socket options: {e}"))?;
    let data = pattern(conn, bytes, text);
    let writer = {
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let data = data.clone();
        std::thread::spawn(move || -> Result<(), String> {
            w.write_all(&data).map_err(|e| format!("write: {e}"))?;
            w.s.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))
        })
    };
    let mut got = Vec::with_capacity(bytes);
    s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
    writer.join().map_err(|_| "writer panicked".to_string())??;
    if got != data {
        return Err(format!("echo mismatch: sent {} bytes, got {}", data.len(), got.len()));
    }
    Ok((peer, local))
}

fn client(addr: SocketAddr, o: Opts) {
    let Opts { bytes, count, concurrency, hold, timeout, text, until, io } = o;
    let text = Arc::new(text);
    let start = Instant::now();
    let report = Arc::new(Mutex::new(Report::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let barrier = hold.then(|| Arc::new(Barrier::new(concurrency.min(count))));
    let workers: Vec<_> = (0..concurrency.min(count))
        .map(|_| {
            let (report, next, barrier, text) = (report.clone(), next.clone(), barrier.clone(), text.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count || until.is_some_and(|u| Instant::now() >= u) {
                        return;
                    }
                    let r = one(addr, i, bytes, text.as_deref(), timeout, barrier.as_deref(), io);
                    let mut rep = report.lock().unwrap();
                    match r {
                        Ok((peer, local)) => {
                            rep.ok += 1;
                            rep.bytes_verified += bytes as u64;
                            rep.peer.get_or_insert(peer);
                            rep.local.get_or_insert(local);
                        }
                        Err(e) => {
                            rep.failed += 1;
                            if rep.errors.len() < 5 {
                                rep.errors.push(e);
                            }
                        }
                    }
                    if barrier.is_some() {
                        return; // one connection per thread when holding
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let mut rep = Arc::try_unwrap(report).ok().unwrap().into_inner().unwrap();
    rep.elapsed_ms = start.elapsed().as_millis() as u64;
    println!("{}", serde_json::to_string(&rep).unwrap());
}

fn udp_server(listen: SocketAddr) {
    let s = UdpSocket::bind(listen).expect("bind");
    ready(s.local_addr().unwrap());
    let mut buf = [0u8; 1500];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}

fn udp_query(to: SocketAddr, sendto: bool) {
    let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
    let res = if sendto { s.send_to(q, to).map(|_| ()) } else { s.connect(to).and_then(|_| s.send(q).map(|_| ())) };
    let mut buf = [0u8; 1500];
    let out = res.and_then(|_| s.recv_from(&mut buf)).map(|(n, from)| (buf[..n] == q[..], from));
    let json = match out {
        Ok((ok, from)) => serde_json::json!({ "ok": ok, "from": from.to_string() }),
        Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
    };
    println!("{json}");
}

fn hold(addr: SocketAddr, count: usize, seconds: u64) {
    let mut conns = Vec::with_capacity(count);
    let mut error = None;
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => conns.push(s),
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    println!("{}", serde_json::json!({ "held": conns.len(), "error": error }));
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(seconds));
}

fn whoami_server(listen: SocketAddr) {
    let l = TcpListener::bind(listen).expect("bind");
    ready(l.local_addr().unwrap());
    for s in l.incoming().flatten() {
        let mut s = s;
        if let Ok(peer) = s.peer_addr() {
            let _ = writeln!(s, "{peer}");
        }
    }
}

fn whoami(to: SocketAddr, timeout: Duration) {
    let r = (|| -> std::io::Result<(String, String)> {
        let mut s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let local = s.local_addr()?.to_string();
        let mut line = String::new();
        s.read_to_string(&mut line)?;
        Ok((line.trim().to_string(), local))
    })();
    let v = match r {
        Ok((seen, local)) => serde_json::json!({"ok": 1, "seen_as": seen, "local": local}),
        Err(e) => serde_json::json!({"ok": 0, "error": e.to_string()}),
    };
    println!("{v}");
}
