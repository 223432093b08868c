//! What one session shares with the rest of the server: the frames its writer is fed
//! (`Outgoing`), the state the router, the acks and a replacing session see
//! (`SessionShared`), how to reach it (`SessionHandle`), why it is stopped
//! (`StopReason`), and the wait for a replaced session on another node (`KickWait`).
//! Data only; the session's life is in `session/mod.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::delivery::live::LiveMailbox;
use crate::message::{BlobMeta, StoredMessage};
use crate::protocol::{Dialect, KickReason};
use crate::ranges::SeqRanges;

/// Why a session is being stopped from outside its own loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The same user logged in elsewhere (close code 4000).
    Replaced,
    /// The server is shutting down (close code 1001).
    Shutdown,
    /// The session's own reader ended (client closed, protocol close): no notice to send.
    Closed,
    /// The account's password changed or the account was deleted since the session
    /// logged in (`revoke`): a `kicked` notice, then close code 4003.
    Revoked(KickReason),
}

/// What a session's writer task is fed, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// A message for this session's user (already in the store).
    Deliver(Arc<StoredMessage>),
    /// A text frame answering this session's own requests, already formatted.
    Reply(String),
    /// The session now knows its user: wait for the session it replaced (if any) to
    /// finish, then flush the mailbox, then deliver live traffic.
    Start(Box<Start>),
    /// Close the socket with this code and reason, then stop.
    Close(u16, &'static str),
    /// A blob is arriving live for this session's user; chunks follow.
    BlobStart { from: String, meta: Arc<BlobMeta> },
    /// Bytes of a live blob. The permit holds the recipient's relay budget until written.
    BlobChunk(Box<BlobChunk>),
    /// The user `from` acknowledged every message up to its seq `upto`, this session's
    /// user's among them (Pigeon JSON sessions are told with a `receipt` frame).
    Receipt { from: Arc<str>, upto: u64 },
    /// A live blob will not complete.
    BlobAbort { key: Arc<str>, reason: &'static str },
    /// A message the session held back for (one written before it is routed) was
    /// refused: read on from the mailbox.
    CatchUp,
}

/// What a session's writer needs to start delivering (boxed: rare and large, while
/// every slot of every session's queue is as big as the largest `Outgoing`).
#[derive(Debug)]
pub struct Start {
    pub user: String,
    pub dialect: Dialect,
    pub generation: u64,
    pub replaced: Option<Arc<SessionShared>>,
    /// A take-over of the user's session on another node (cluster mode), already
    /// requested: wait for it before the flush.
    pub replaced_remote: Option<KickWait>,
}

/// Bytes of a live blob, with the recipient's relay budget they hold until written.
#[derive(Debug)]
pub struct BlobChunk {
    pub key: Arc<str>,
    pub data: Bytes,
    pub permit: OwnedSemaphorePermit,
}

/// State one session shares with the router and with the sessions that replace it.
#[derive(Debug)]
pub struct SessionShared {
    /// Set when a delivery found the queue full: the writer re-reads the mailbox.
    pub lagging: AtomicBool,
    /// Seqs written to the client and not acknowledged yet: an ack deletes exactly these
    /// (never a seq the client was not sent).
    pub unacked: std::sync::Mutex<SeqRanges>,
    /// Senders of the messages this session wrote and its user has not acknowledged yet,
    /// with the lowest and highest such seq of each: who gets a receipt on the next ack.
    pub unacked_senders: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
    /// The session's dialect, set once it is known (before the session is registered), so
    /// a take-over notice is worded right even before the writer saw `Start`.
    pub dialect: std::sync::OnceLock<Dialect>,
    /// Bytes of live blob chunks that may be queued for this session's writer.
    pub blob_budget: Arc<Semaphore>,
    /// The user's mailbox while this session owns it (the live path, `delivery`).
    pub live: Arc<LiveMailbox>,
    stop: watch::Sender<Option<StopReason>>,
    /// `mark_done` was called; `done_wakers` wakes `wait_done` (a `Notify`, not a second
    /// `watch`: one waits rarely, and a `watch` costs every session ~330 bytes).
    done: AtomicBool,
    done_wakers: Notify,
}

impl SessionShared {
    pub fn new(blob_budget: usize) -> Arc<SessionShared> {
        Arc::new(SessionShared {
            lagging: AtomicBool::new(false),
            unacked: Default::default(),
            blob_budget: Arc::new(Semaphore::new(blob_budget)),
            dialect: std::sync::OnceLock::new(),
            unacked_senders: Default::default(),
            live: Arc::default(),
            stop: watch::channel(None).0,
            done: AtomicBool::new(false),
            done_wakers: Notify::new(),
        })
    }

    /// Takes the written seqs at or below `upto`, for an acknowledgement.
    pub fn take_acked(&self, upto: u64) -> Vec<(u64, u64)> {
        self.unacked
            .lock()
            .map(|mut u| u.take_upto(upto))
            .unwrap_or_default()
    }

    /// Puts back seqs whose acknowledgement could not be recorded.
    pub fn restore_unacked(&self, ranges: &[(u64, u64)]) {
        if let Ok(mut u) = self.unacked.lock() {
            for &(lo, hi) in ranges {
                for seq in lo..=hi {
                    u.insert(seq);
                }
            }
        }
    }

    /// Asks the session to stop; the first reason wins.
    pub fn stop(&self, reason: StopReason) {
        self.stop.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    pub fn stop_signal(&self) -> watch::Receiver<Option<StopReason>> {
        self.stop.subscribe()
    }

    /// Marks the session finished: its writer has stopped and its acks are recorded.
    pub fn mark_done(&self) {
        self.done.store(true, Ordering::Release);
        self.done_wakers.notify_waiters();
    }

    /// Waits until `mark_done`.
    pub async fn wait_done(&self) {
        loop {
            let woken = self.done_wakers.notified();
            tokio::pin!(woken);
            // Registered before the check: a `mark_done` in between still wakes it.
            woken.as_mut().enable();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }
}

/// How to reach one live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub generation: u64,
    /// `auth::credential_stamp` of the password hash the session logged in under
    /// (`None` in open mode): `revoke` compares it with the account's current hash.
    pub credential: Option<u64>,
    pub tx: mpsc::Sender<Outgoing>,
    pub shared: Arc<SessionShared>,
}

/// Take-overs waiting for a session on another node to finish, by (user, that
/// session's generation); the cluster listener wakes them.
pub type KickWaiters = DashMap<(String, u64), Arc<Notify>>;

/// A remote take-over in progress: wait for the replaced session to finish.
pub struct KickWait {
    waiting: Arc<KickWaiters>,
    key: (String, u64),
    notify: Option<Arc<Notify>>,
}

impl std::fmt::Debug for KickWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KickWait").field("key", &self.key).finish()
    }
}

impl KickWait {
    /// The wait for `key`, which the caller registered in `waiting` before asking the
    /// other node (so its answer cannot come first); `notify` is `None` when no node
    /// listened (nothing to wait for). Dropping it removes the registration.
    pub fn new(
        waiting: Arc<KickWaiters>,
        key: (String, u64),
        notify: Option<Arc<Notify>>,
    ) -> KickWait {
        KickWait {
            waiting,
            key,
            notify,
        }
    }

    pub async fn wait(self, timeout: Duration) {
        if let Some(n) = &self.notify {
            if tokio::time::timeout(timeout, n.notified()).await.is_err() {
                tracing::warn!(user = %self.key.0, "remote session did not finish in time");
            }
        }
    }
}

impl Drop for KickWait {
    fn drop(&mut self) {
        self.waiting.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    /// Every queued frame of every session costs this much: keep it small.
    #[test]
    fn outgoing_stays_small() {
        assert!(
            std::mem::size_of::<super::Outgoing>() <= 40,
            "{}",
            std::mem::size_of::<super::Outgoing>()
        );
    }
}
