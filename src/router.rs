//! The online registry: which user has a live session, and how to reach it. Owns the
//! single-session rule: registering a user who is already online returns the session it
//! replaced, which the caller then stops (take-over).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::message::{BlobMeta, StoredMessage};
use crate::protocol::{Dialect, Fate, KickReason};
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
    pub replaced_remote: Option<crate::cluster::KickWait>,
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
    stop: watch::Sender<Option<StopReason>>,
    done: watch::Sender<bool>,
}

impl SessionShared {
    pub fn new(blob_budget: usize) -> Arc<SessionShared> {
        Arc::new(SessionShared {
            lagging: AtomicBool::new(false),
            unacked: Default::default(),
            blob_budget: Arc::new(Semaphore::new(blob_budget)),
            dialect: std::sync::OnceLock::new(),
            unacked_senders: Default::default(),
            stop: watch::channel(None).0,
            done: watch::channel(false).0,
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
        self.done.send_replace(true);
    }

    /// Waits until `mark_done` (or until the session is gone).
    pub async fn wait_done(&self) {
        let mut rx = self.done.subscribe();
        // An error means the sender is gone, which also means done.
        let _ = rx.wait_for(|d| *d).await;
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

#[derive(Default)]
pub struct Router {
    sessions: DashMap<String, SessionHandle>,
    next_generation: AtomicU64,
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    /// A fresh, never reused session generation number.
    pub fn next_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Makes `handle` the user's live session; returns the session it replaced, if any.
    pub fn register(&self, user: &str, handle: SessionHandle) -> Option<SessionHandle> {
        self.sessions.insert(user.to_string(), handle)
    }

    /// Removes the user's entry only if it is still this generation's.
    pub fn unregister(&self, user: &str, generation: u64) {
        self.sessions
            .remove_if(user, |_, h| h.generation == generation);
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.sessions.contains_key(user)
    }

    pub fn online_count(&self) -> usize {
        self.sessions.len()
    }

    /// Hands a stored message to its recipient's live session without waiting. When the
    /// recipient is offline or its queue is full the message stays in the mailbox (a full
    /// queue marks the session lagging, so it re-reads the mailbox when it catches up).
    pub fn deliver(&self, msg: Arc<StoredMessage>) -> Fate {
        let Some(handle) = self.session(&msg.recipient) else {
            return Fate::Stored;
        };
        match handle.tx.try_send(Outgoing::Deliver(msg)) {
            Ok(()) => Fate::Delivered,
            Err(mpsc::error::TrySendError::Full(_)) => {
                handle.shared.lagging.store(true, Ordering::Release);
                Fate::Stored
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Fate::Stored,
        }
    }

    /// Every local user with their session generation.
    pub fn users(&self) -> Vec<(String, u64)> {
        self.sessions
            .iter()
            .map(|e| (e.key().clone(), e.value().generation))
            .collect()
    }

    /// `recipient` (whose session shares `shared`) acknowledged up to `upto`: tells each
    /// sender of a message covered, if it is online here. Receipts are best-effort and
    /// live only (never stored, not forwarded across cluster nodes).
    pub fn receipts(&self, recipient: &str, shared: &SessionShared, upto: u64) {
        let senders: Vec<String> = match shared.unacked_senders.lock() {
            Ok(mut map) => {
                let covered: Vec<String> = map
                    .iter()
                    .filter(|(_, (lowest, _))| *lowest <= upto)
                    .map(|(s, _)| s.clone())
                    .collect();
                map.retain(|_, (lowest, highest)| {
                    *lowest = (*lowest).max(upto + 1);
                    *highest > upto
                });
                covered
            }
            Err(_) => return,
        };
        if senders.is_empty() {
            return;
        }
        let from: Arc<str> = recipient.into();
        for sender in senders {
            if let Some(h) = self.session(&sender) {
                let _ = h.tx.try_send(Outgoing::Receipt {
                    from: from.clone(),
                    upto,
                });
            }
        }
    }

    /// The user's live session, if any.
    pub fn session(&self, user: &str) -> Option<SessionHandle> {
        self.sessions.get(user).map(|h| h.clone())
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
