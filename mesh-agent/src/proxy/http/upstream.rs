//! Upstream HTTP connections of one downstream connection: one per endpoint used, of the
//! client's HTTP version, over the transport `proxy::upstream` opens (direct or HBONE), kept
//! for the next request to the same endpoint.
use std::net::SocketAddrV4;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::{Body, Downstream, Upstreams};
use crate::proxy::{
    detect::Protocol,
    route::{Route, Target},
    upstream::ConnectError,
};

pub(super) enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    pub(super) async fn send(
        &mut self,
        req: hyper::Request<Body>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, hyper::client::conn::TrySendError<hyper::Request<Body>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }
}

/// Why no upstream HTTP connection could be had.
#[derive(Debug, thiserror::Error)]
pub(super) enum SenderError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP handshake with {ep} failed: {source}")]
    Handshake { ep: SocketAddrV4, source: hyper::Error },
}

impl SenderError {
    pub(super) fn reason(&self) -> &'static str {
        match self {
            SenderError::Connect(e) => e.reason(),
            SenderError::Handshake { .. } => "handshake",
        }
    }
}

impl<U: Upstreams> Downstream<U> {
    /// A ready upstream connection to `t`: the kept one if it is still good, else a new one.
    pub(super) async fn sender(&self, route: &Route, t: &Target) -> Result<Sender, SenderError> {
        let kept = self.senders.lock().await.remove(&t.ep);
        match kept {
            Some(Sender::H2(s)) if s.is_ready() => return Ok(Sender::H2(s)),
            // Not a guard: waiting for readiness needs the sender mutably.
            Some(Sender::H1(mut s)) if !s.is_closed() => {
                let ready = s.ready().await.is_ok();
                if ready {
                    return Ok(Sender::H1(s));
                }
            }
            _ => {}
        }
        let io = self.up.open(route, t).await?;
        self.up.observe().conns.set_security(self.conn, t.path.security(), t.dst.as_ref().map(|i| i.to_string()));
        let io = TokioIo::new(io);
        let ep = t.ep;
        Ok(match self.protocol {
            Protocol::Http2 => {
                let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(|source| SenderError::Handshake { ep, source })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                Sender::H2(s)
            }
            _ => {
                let (s, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|source| SenderError::Handshake { ep, source })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "upstream HTTP/1 connection ended");
                    }
                });
                Sender::H1(s)
            }
        })
    }

    /// Keeps an upstream connection for the next request to `ep`.
    pub(super) async fn keep(&self, ep: SocketAddrV4, s: Sender) {
        if !s.is_closed() {
            self.senders.lock().await.insert(ep, s);
        }
    }
}
