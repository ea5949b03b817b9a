//! The steps every accept loop of the agent shares (outbound, HBONE, admin, the signer): wait
//! for a free connection slot and for the next connection, until the stop. A failed accept
//! (`EMFILE` and friends) is logged and retried after a pause instead of spinning.
use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection `accept` yields, or `None` once `stop` is cancelled. `on_error` runs
/// for each failed accept (to count it) before the pause.
pub async fn next<T, F, Fut>(
    stop: &CancellationToken,
    what: &'static str,
    mut accept: F,
    on_error: impl Fn(),
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    warn!(listener = what, error = %e, "accept failed");
                    on_error();
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// One of `slots` (a cap on connections served at once), waiting for one to be released, or
/// `None` once `stop` is cancelled.
pub async fn slot(slots: &Arc<Semaphore>, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        _ = stop.cancelled() => None,
        p = slots.clone().acquire_owned() => p.ok(),
    }
}
