//! Bidirectional copy with an idle timeout: a proxied TCP connection on which no byte has moved
//! either way for the timeout is closed (Istio's and Envoy's TCP idle timeout; default one hour).
//! Activity is a timestamp stored on each successful read or write, checked by a watchdog a few
//! times per timeout: nothing per byte beyond one relaxed atomic store.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Milliseconds since `epoch` of the last byte moved.
struct Clock {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Clock {
    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

struct Activity<'a, S> {
    inner: &'a mut S,
    clock: Arc<Clock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `tokio::io::copy_bidirectional_with_sizes`, ended with an error of kind `TimedOut` when no
/// byte has moved for `idle` (`None`: never).
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    buf: usize,
    idle: Option<Duration>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let Some(idle) = idle else { return tokio::io::copy_bidirectional_with_sizes(a, b, buf, buf).await };
    let clock = Arc::new(Clock { epoch: Instant::now(), last_ms: AtomicU64::new(0) });
    let mut wa = Activity { inner: a, clock: clock.clone() };
    let mut wb = Activity { inner: b, clock: clock.clone() };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut wa, &mut wb, buf, buf);
    let watchdog = async {
        let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        loop {
            tokio::time::sleep(tick).await;
            if clock.idle() >= idle {
                return;
            }
        }
    };
    tokio::select! {
        r = copy => r,
        _ = watchdog => Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}: closed"))),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_an_active_one_is_not() {
        let idle = Duration::from_millis(200);
        // Idle: nothing moves, the copy ends with TimedOut.
        let (mut a, _a_peer) = duplex(64);
        let (mut b, _b_peer) = duplex(64);
        let started = Instant::now();
        let e = copy_bidirectional(&mut a, &mut b, 64, Some(idle)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= idle);

        // Active: a byte every 50 ms for 4 timeouts keeps it open; it ends when both sides close.
        let (mut a, mut a_peer) = duplex(64);
        let (mut b, mut b_peer) = duplex(64);
        let writer = tokio::spawn(async move {
            for _ in 0..16 {
                a_peer.write_all(b"x").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            a_peer.shutdown().await.unwrap();
            let mut rest = Vec::new();
            a_peer.read_to_end(&mut rest).await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b_peer.read_to_end(&mut got).await.unwrap();
            b_peer.shutdown().await.unwrap();
            got.len()
        });
        let (sent, _) = copy_bidirectional(&mut a, &mut b, 64, Some(idle)).await.expect("not cut while active");
        assert_eq!(sent, 16);
        assert_eq!(reader.await.unwrap(), 16);
        writer.await.unwrap();
    }
}
