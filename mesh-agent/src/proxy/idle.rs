//! The one bidirectional copy of every proxied connection (outbound TCP, inbound HBONE streams):
//! both half-closes propagated on their own, the bytes each way counted (also when the copy
//! ends in an error), an idle timeout (a connection on which no byte has moved either way for
//! the timeout is closed: Istio's and Envoy's TCP idle timeout, default one hour) and a
//! cancel handle (a policy change that no longer allows the connection).
//! Activity is a flag set on each successful read or write (one relaxed store, no clock read:
//! reading the clock per read and write was ~300 instructions per request), which a watchdog
//! takes a few times per timeout; the connection is closed once the flag has stayed down for
//! the timeout (so between the timeout and a quarter more after the last byte).
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Set when a byte moves; taken by the watchdog.
#[derive(Default)]
struct Moved(AtomicBool);

impl Moved {
    fn touch(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// Closes one proxied connection from elsewhere (a policy change that no longer allows it).
/// Cheaper than a `CancellationToken` where it matters: the copy polls it on every wake-up of
/// the connection's task; a poll here is an atomic load and a waker comparison (a token's poll
/// takes a mutex: measured at ~300 instructions per request on the same-node path).
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelState>);

#[derive(Default)]
struct CancelState {
    cancelled: std::sync::atomic::AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cancel").field(&self.is_cancelled()).finish()
    }
}

impl Cancel {
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::Release);
        self.0.waker.wake();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Acquire)
    }

    /// Ready once cancelled. The waker is registered again only when the task's waker changes,
    /// so a poll is normally one atomic load and a pointer comparison.
    pub async fn cancelled(&self) {
        let mut registered: Option<std::task::Waker> = None;
        std::future::poll_fn(|cx| {
            if self.is_cancelled() {
                return Poll::Ready(());
            }
            if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            self.0.waker.register(cx.waker());
            registered = Some(cx.waker().clone());
            // Cancelled between the check and the registration: seen now.
            if self.is_cancelled() { Poll::Ready(()) } else { Poll::Pending }
        })
        .await
    }
}

/// Entries that live as long as their handles: what must reach every open connection later
/// (the agent's stop, a policy re-check) keeps one per connection here.
pub struct Live<T> {
    inner: std::sync::Mutex<(u64, std::collections::HashMap<u64, T>)>,
}

impl<T> Default for Live<T> {
    fn default() -> Self {
        Live { inner: Default::default() }
    }
}

/// Dropping it removes its entry.
pub struct LiveHandle<T> {
    live: Arc<Live<T>>,
    id: u64,
}

impl<T> Drop for LiveHandle<T> {
    fn drop(&mut self) {
        self.live.lock().1.remove(&self.id);
    }
}

impl<T> Live<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, std::collections::HashMap<u64, T>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(self: &Arc<Self>, entry: T) -> LiveHandle<T> {
        let mut inner = self.lock();
        let id = inner.0;
        inner.0 += 1;
        inner.1.insert(id, entry);
        LiveHandle { live: self.clone(), id }
    }

    /// Calls `f` on every entry, with the set locked (entries neither come nor go meanwhile).
    pub fn for_each(&self, mut f: impl FnMut(&T)) {
        self.lock().1.values().for_each(&mut f);
    }

    pub fn len(&self) -> usize {
        self.lock().1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The agent's stop, handed to each long-lived connection as a [`Cancel`] of its own. A
/// `CancellationToken` polled on every wake-up of a connection's task takes two mutexes (the
/// token's node, then its waiter list); a `Cancel` is an atomic load and a waker comparison.
#[derive(Default)]
pub struct Stops {
    open: Arc<Live<Cancel>>,
    stopped: AtomicBool,
}

/// One connection's stop; dropping it forgets the connection.
pub struct StopHandle {
    _entry: LiveHandle<Cancel>,
    pub cancel: Cancel,
}

impl Stops {
    /// Stops every connection's handle once `stop` is cancelled.
    pub fn new(stop: &tokio_util::sync::CancellationToken) -> Arc<Stops> {
        let stops = Arc::new(Stops::default());
        let (s, stop) = (stops.clone(), stop.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            s.stop_all();
        });
        stops
    }

    /// A handle for one more connection (already cancelled once the stop has come).
    pub fn handle(&self) -> StopHandle {
        let cancel = Cancel::default();
        let entry = self.open.insert(cancel.clone());
        // After the insert: either `stop_all` sees the entry, or this sees its flag.
        if self.stopped.load(Ordering::SeqCst) {
            cancel.cancel();
        }
        StopHandle { _entry: entry, cancel }
    }

    fn stop_all(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.open.for_each(Cancel::cancel);
    }
}

/// What a copy moved, and how it ended.
#[derive(Debug)]
pub struct Copied {
    /// Bytes read from `a` (and sent on to `b`).
    pub a_to_b: u64,
    pub b_to_a: u64,
    /// `None`: both sides finished. `TimedOut`: idle; `Interrupted`: cancelled.
    pub error: Option<io::Error>,
}

/// The most one read takes; also the size of each worker thread's scratch buffer.
const MAX_READ: usize = 256 * 1024;

thread_local! {
    /// Where every copy on this thread reads into. Data goes straight on from here; only what
    /// the writer does not take at once is copied into the connection's own buffer. So an idle
    /// connection holds no copy buffer at all (a fixed one per direction cost 2 x 16 KiB each),
    /// and bulk transfers read in big chunks without every connection owning big buffers.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; MAX_READ].into_boxed_slice());
}

/// One direction of a copy.
struct Half {
    /// Read but not yet written (only when the writer pushed back).
    pending: Vec<u8>,
    written: usize,
    /// Bytes read from this side so far (what the copy reports; reads grow with it).
    moved: u64,
    first_read: usize,
    read_done: bool,
    shut_down: bool,
    need_flush: bool,
}

impl Half {
    fn new(first_read: usize) -> Half {
        Half {
            pending: Vec::new(),
            written: 0,
            moved: 0,
            first_read: first_read.clamp(1024, MAX_READ),
            read_done: false,
            shut_down: false,
            need_flush: false,
        }
    }

    /// How much the next read may take: the configured size, 64 KiB once 1 MiB has moved,
    /// 256 KiB after 10 MiB (bulk transfers need few big reads; request/response never gets
    /// there). At most this much sits in `pending` when the writer pushes back.
    fn read_size(&self) -> usize {
        let grown = match self.moved {
            m if m >= 10 << 20 => MAX_READ,
            m if m >= 1 << 20 => 64 * 1024,
            _ => 0,
        };
        self.first_read.max(grown)
    }

    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w` down) or an error; every
    /// read or write that moves a byte touches `clock`.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        clock: &Moved,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.written < self.pending.len() {
                let n = ready!(w.as_mut().poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.need_flush = true;
                clock.touch();
            }
            if !self.pending.is_empty() {
                // Written out: the buffer goes, so a connection that has gone quiet holds none.
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                if !self.shut_down {
                    ready!(w.as_mut().poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
            let limit = self.read_size();
            let step = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut rb = ReadBuf::new(&mut scratch[..limit]);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
                let data = rb.filled();
                if data.is_empty() {
                    self.read_done = true;
                    return Poll::Ready(Ok(()));
                }
                self.moved += data.len() as u64;
                clock.touch();
                let mut off = 0;
                while off < data.len() {
                    match w.as_mut().poll_write(cx, &data[off..]) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Poll::Ready(Ok(n)) => {
                            off += n;
                            self.need_flush = true;
                            clock.touch();
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            // The writer pushed back: keep the rest until it takes it.
                            self.pending.extend_from_slice(&data[off..]);
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                Poll::Ready(Ok(()))
            });
            match step {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read now: what was written goes out before we wait.
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Both directions of a connection, until both have ended (or one fails).
async fn copy_both<A, B>(a: &mut A, b: &mut B, a_to_b: &mut Half, b_to_a: &mut Half, clock: &Moved) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_done, mut b_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !a_done {
            a_done = ready_ok(a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), clock))?;
        }
        if !b_done {
            b_done = ready_ok(b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), clock))?;
        }
        if a_done && b_done { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await
}

/// `Ready(Ok)` as `Ok(true)`, `Pending` as `Ok(false)`, an error as the error.
fn ready_ok(p: Poll<io::Result<()>>) -> Result<bool, io::Error> {
    match p {
        Poll::Ready(Ok(())) => Ok(true),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(false),
    }
}

/// Copies both ways (half-closes propagated on their own) with byte counts that survive an
/// error, ended with an error of kind `TimedOut` when no byte has moved for `idle` (`None`:
/// never) and of kind `Interrupted` when `cancel` (if any) is cancelled. `buf` is the size of
/// the first reads (they grow with the bytes moved, see [`Half::read_size`]).
pub async fn copy<A, B>(a: &mut A, b: &mut B, buf: usize, idle: Option<Duration>, cancel: Option<&Cancel>) -> Copied
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Moved::default();
    let (mut a_to_b, mut b_to_a) = (Half::new(buf), Half::new(buf));
    let watchdog = async {
        let Some(idle) = idle else { return std::future::pending().await };
        let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            if clock.take() {
                last = Instant::now();
            } else if last.elapsed() >= idle {
                return idle;
            }
        }
    };
    // Biased: the data first (nearly every wake-up is for it), and no random branch order
    // drawn per poll.
    let error = tokio::select! {
        biased;
        r = copy_both(a, b, &mut a_to_b, &mut b_to_a, &clock) => r.err(),
        idle = watchdog => Some(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}: closed"))),
        _ = async {
            match cancel {
                Some(c) => c.cancelled().await,
                None => std::future::pending().await,
            }
        } => Some(io::Error::new(io::ErrorKind::Interrupted, "closed by the proxy: no longer allowed")),
    };
    Copied { a_to_b: a_to_b.moved, b_to_a: b_to_a.moved, error }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    #[tokio::test]
    async fn every_byte_arrives_in_order_both_ways_through_a_writer_that_pushes_back() {
        // Tiny pipes: nearly every write is partial or pending, so the bytes left over wait in
        // the connection's own buffer; 12 MiB each way also crosses both read-size steps.
        let (mut client, mut a) = duplex(1000);
        let (mut b, mut server) = duplex(777);
        let n = 12 << 20;
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let copy = tokio::spawn(async move { copy(&mut a, &mut b, 16 * 1024, None, None).await });
        let (d1, d2) = (data.clone(), data.clone());
        let up = tokio::spawn(async move {
            client.write_all(&d1).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "the client's bytes arrive intact");
        server.write_all(&d2).await.unwrap();
        server.shutdown().await.unwrap();
        let back = up.await.unwrap();
        assert!(back == data, "the server's bytes arrive intact");
        let c = copy.await.unwrap();
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!((c.a_to_b, c.b_to_a), (n as u64, n as u64));
    }

    #[tokio::test]
    async fn the_stop_reaches_every_connection_and_later_ones_start_stopped() {
        let stop = tokio_util::sync::CancellationToken::new();
        let stops = Stops::new(&stop);
        let (a, b) = (stops.handle(), stops.handle());
        drop(b);
        assert_eq!(stops.open.len(), 1, "a dropped handle is forgotten");
        assert!(!a.cancel.is_cancelled());
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), a.cancel.cancelled()).await.expect("stopped");
        assert!(stops.handle().cancel.is_cancelled(), "a connection accepted after the stop is stopped");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_an_active_one_is_not() {
        let idle = Duration::from_millis(200);
        // Idle: nothing moves, the copy ends with TimedOut.
        let (mut a, _a_peer) = duplex(64);
        let (mut b, _b_peer) = duplex(64);
        let started = Instant::now();
        let e = copy(&mut a, &mut b, 64, Some(idle), None).await.error.expect("closed when idle");
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
        let c = copy(&mut a, &mut b, 64, Some(idle), None).await;
        assert!(c.error.is_none(), "not cut while active: {:?}", c.error);
        assert_eq!(c.a_to_b, 16);
        assert_eq!(reader.await.unwrap(), 16);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_cancel_wakes_a_waiter_and_one_made_before_is_seen_at_once() {
        let c = Cancel::default();
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.cancelled().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        c.cancel();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        tokio::time::timeout(Duration::from_millis(100), c.cancelled()).await.expect("already cancelled");
        assert!(c.is_cancelled());
    }

    #[tokio::test]
    async fn counts_survive_an_error_and_cancellation_ends_the_copy() {
        let (mut a, mut a_peer) = duplex(64);
        let (mut b, mut b_peer) = duplex(64);
        let cancel = Cancel::default();
        let c2 = cancel.clone();
        let driver = tokio::spawn(async move {
            a_peer.write_all(b"hello").await.unwrap();
            let mut got = [0u8; 5];
            b_peer.read_exact(&mut got).await.unwrap();
            b_peer.write_all(b"hi").await.unwrap();
            let mut back = [0u8; 2];
            a_peer.read_exact(&mut back).await.unwrap();
            c2.cancel();
            (a_peer, b_peer)
        });
        let c = copy(&mut a, &mut b, 64, None, Some(&cancel)).await;
        assert_eq!((c.a_to_b, c.b_to_a), (5, 2));
        assert_eq!(c.error.unwrap().kind(), io::ErrorKind::Interrupted);
        drop(driver.await.unwrap());
    }
}
