//! The online registry: which user has a live session, and how to reach it. Owns the
//! single-session rule: registering a user who is already online returns the session it
//! replaced, which the caller then stops (take-over).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::message::StoredMessage;
use crate::protocol::Fate;
use crate::session::handle::{Outgoing, SessionHandle, SessionShared};

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
