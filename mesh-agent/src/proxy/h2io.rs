//! HBONE streams on the `h2` crate directly, as ztunnel drives them (`src/proxy/h2.rs`).
//!
//! hyper's upgraded HTTP/2 `CONNECT` copies every write into a fresh buffer and hands it over a
//! channel to a task it spawns per stream, which then waits for flow-control capacity and
//! passes the bytes to h2: one allocation, one copy and one cross-task wake-up per write, and
//! one more task per open stream (bench/README.md, "what hyper does with an HBONE stream").
//! [`H2Stream`] writes straight into h2's `SendStream` as capacity is granted and reads from
//! its `RecvStream`, giving the window back as the bytes are taken; the connection itself is
//! driven by one task per connection ([`drive_client`]) or by the server's accept loop, each
//! with the keep-alive PING of [`keepalive`].
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One HBONE stream (a tunnelled TCP connection) as a byte stream. Writes are sent as DATA as
/// fast as the peer's windows allow; shutdown is an empty DATA frame with END_STREAM (TCP's
/// half-close); a reset is an error (`NO_ERROR` and `CANCEL` on the read side end the stream,
/// as a FIN would).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    buf: Bytes,
    /// END_STREAM sent.
    shut: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream { send, recv, buf: Bytes::new(), shut: false }
    }

    /// The error a write sees once the stream cannot take data: why the peer reset it, if it
    /// did, else `fallback` (`None`: wait for a reset).
    fn write_error(&mut self, cx: &mut Context<'_>, fallback: Option<io::Error>) -> Poll<io::Error> {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED)) => {
                Poll::Ready(io::ErrorKind::BrokenPipe.into())
            }
            Poll::Ready(Ok(reason)) => {
                Poll::Ready(io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason)))
            }
            Poll::Ready(Err(e)) => Poll::Ready(h2_to_io(e)),
            Poll::Pending => fallback.map_or(Poll::Pending, Poll::Ready),
        }
    }
}

/// An h2 error as an I/O error: a lost connection is `ConnectionReset` (or the underlying I/O
/// error), anything else `Other` with h2's description.
pub fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
    }
    let kind = if e.is_reset() || e.is_go_away() { io::ErrorKind::ConnectionReset } else { io::ErrorKind::Other };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            this.buf = loop {
                match ready!(this.recv.poll_data(cx)) {
                    None => return Poll::Ready(Ok(())),
                    // An empty DATA frame without END_STREAM says nothing.
                    Some(Ok(b)) if b.is_empty() && !this.recv.is_end_stream() => continue,
                    Some(Ok(b)) => break b,
                    Some(Err(e)) => {
                        return Poll::Ready(match e.reason() {
                            Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                            Some(Reason::STREAM_CLOSED) => Err(io::Error::new(io::ErrorKind::BrokenPipe, e)),
                            _ => Err(h2_to_io(e)),
                        });
                    }
                }
            };
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        // The window is given back as the bytes leave h2: the peer may send what we took.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.send.reserve_capacity(buf.len());
        // `poll_capacity` answers only when capacity was assigned since it last answered (at
        // most what was reserved: all of it is used at once, so none is left unannounced).
        match this.send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(n))) => {
                let n = n.min(buf.len());
                // One copy into a buffer of its own, as hyper's upgrade made too, but handed to
                // h2 here: no channel, no task of its own per stream.
                match this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(e) => this.write_error(cx, Some(h2_to_io(e))).map(Err),
                }
            }
            Poll::Ready(Some(Err(e))) => this.write_error(cx, Some(h2_to_io(e))).map(Err),
            // The stream can no longer send: broken pipe now, unless it was reset.
            Poll::Ready(None) => this.write_error(cx, Some(io::ErrorKind::BrokenPipe.into())).map(Err),
            // No window yet; a reset while we wait is the answer.
            Poll::Pending => this.write_error(cx, None).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what h2 buffered as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.shut {
            return Poll::Ready(Ok(()));
        }
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.shut = true;
                Poll::Ready(Ok(()))
            }
            Err(e) => this.write_error(cx, Some(h2_to_io(e))).map(Err),
        }
    }
}

/// Keep-alive: a PING every `every`; `Err` when one is not answered within `timeout` (the peer
/// or the path is dead: the connection is dropped) or the connection is gone. `ping` is the
/// connection's `ping_pong()` (`None`, already taken: never ends).
pub async fn keepalive(ping: Option<PingPong>, every: Duration, timeout: Duration) -> Result<(), &'static str> {
    let Some(mut ping) = ping else { return std::future::pending().await };
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(timeout, ping.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return Err("connection closed"),
            Err(_) => return Err("no PING answer"),
        }
    }
}

/// Drives a client connection until it ends, or until a PING goes unanswered, and then
/// returns why.
pub async fn drive_client<T>(mut conn: h2::client::Connection<T, Bytes>, every: Duration, timeout: Duration) -> String
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The keep-alive holds a handle of its own; the connection is polled by this task only.
    let alive = keepalive(conn.ping_pong(), every, timeout);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        biased;
        r = conn.as_mut() => match r {
            Ok(()) => "closed".to_string(),
            Err(e) => e.to_string(),
        },
        Err(why) = alive => why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A client and a server over an in-memory pipe: one CONNECT stream each way as
    /// [`H2Stream`]s.
    async fn pair() -> (H2Stream, H2Stream) {
        let (c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new().max_frame_size(1 << 20).handshake::<_, Bytes>(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            assert_eq!(req.method(), http::Method::CONNECT);
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Stream::new(send, req.into_body())
        });
        let (send, conn) = h2::client::Builder::new().max_frame_size(1 << 20).handshake::<_, Bytes>(c).await.unwrap();
        tokio::spawn(drive_client(conn, Duration::from_secs(10), Duration::from_secs(20)));
        let mut send = send.ready().await.unwrap();
        let req = http::Request::builder().method(http::Method::CONNECT).uri("10.0.0.1:80").body(()).unwrap();
        let (resp, stream) = send.send_request(req, false).unwrap();
        let server = server.await.unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        (H2Stream::new(stream, resp.into_body()), server)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_beyond_the_windows_and_half_close_is_end_of_stream() {
        let (mut client, mut server) = pair().await;
        // More than the default 64 KiB stream window: capacity must be given back as read.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got == big, "bytes arrive intact and in order");
        // The other direction still works after the client's half-close.
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"pong");
    }

    #[tokio::test]
    async fn a_reset_stream_is_an_error_for_the_writer() {
        let (mut client, server) = pair().await;
        let H2Stream { mut send, .. } = server;
        send.send_reset(Reason::REFUSED_STREAM);
        let big = vec![0u8; 1 << 20];
        let mut failed = false;
        for _ in 0..64 {
            if client.write_all(&big).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "writes fail once the peer reset the stream");
    }
}
