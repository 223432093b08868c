//! The shutdown signal: one `watch` channel the server flips to `true` when it is asked
//! to stop (SIGTERM, Ctrl-C, a test's stop); every long-lived task (sessions, the cluster
//! listener, the revocation poller, the blob sweeper) waits on it beside its own work.

use tokio::sync::watch;

/// Completes once shutdown has been requested (or the server is gone).
pub async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the server is over either way.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
