//! The offline mailbox: the `Store` trait every backend implements, and the types it
//! speaks. A message to a recipient without a live session here is written before it is
//! routed (write-ahead); one to a recipient whose session owns its mailbox (`LiveSeqs`,
//! `delivery::live`) is written only if still unacknowledged when the write-behind comes.
//! What the store and the live sessions hold together is what users have not
//! acknowledged yet.
//!
//! Contract every backend keeps (the conformance tests in `tests/store_conformance.rs`
//! check it against each backend):
//! - `enqueue` allocates the recipient's next sequence number (1, 2, 3 … per recipient,
//!   strictly increasing, never reused, also across restarts and across server processes
//!   sharing one database) and makes the message durable before it returns.
//! - `(sender, client_id)` is unique within the dedupe window: a second `enqueue` with the
//!   same pair returns `Enqueued::Duplicate` with the first copy's seq when it is the same
//!   message (`NewMessage::fingerprint`: recipient and body), and `StoreError::IdConflict`
//!   (storing nothing) when it is not.
//! - `enqueue` refuses with `StoreError::MailboxFull` when the recipient already holds
//!   `mailbox_max` unacknowledged messages.
//! - `fetch` returns messages in increasing seq order; `ack` deletes every message of the
//!   recipient with `seq <= upto`.
//! - Quotas (`StoreLimits`): `enqueue` refuses, storing nothing, with
//!   `StoreError::NoSuchUser` when recipients need an account and the recipient has none,
//!   `StoreError::QuotaExceeded` when the sender's waiting messages or bytes
//!   (`NewMessage::stored_bytes`) would pass its quota, and `StoreError::StoreFull` when
//!   all mailboxes together would pass `store_bytes`. Acknowledged and expired messages
//!   give their share back. The check and the reservation are one atomic step in the
//!   store, so concurrent senders (and processes sharing the store) cannot overshoot.
//! - With `offline_ttl_secs > 0`, messages older than that are deleted (with their
//!   blobs) by the backend in the background.
//! - A blob with a `BlobInfo` (who may download it) outlives its message's ack: the ack
//!   marks it `acked_at`, and `blob_sweep_acked` deletes it once its download links have
//!   expired. A blob without one is deleted with its message.
//!
//! Accounts (`[auth] mode = "password"`) live in the store too: a user name (canonical,
//! `names::canonical_username`) and its argon2 PHC hash string, never a password. Every
//! backend implements the whole trait (blobs, accounts, quotas): only derived methods
//! (`enqueue_many`, `ack`, `user_exists`, `check_writable`) have defaults.
//!
//! Account changes are visible to every process sharing the store: `set_password_hash`
//! and `delete_user` append the user to a change feed (`account_changes`, numbered in
//! increasing order, kept a day), which servers poll to end the user's live sessions
//! (`revoke`). Deleting an account deletes its mailbox (messages and blob bytes) and its
//! dedupe memory as a sender, so a later account under the same name starts empty; the
//! mailbox's seq counter stays, so seqs are still never reused.

pub mod blob_files;
pub mod mongo;
pub mod private_files;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Config, StorageConfig};
use crate::message::{Body, StoredMessage};

/// What the store itself enforces on `enqueue` (0: no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Unacknowledged messages one recipient may hold (`[limits] mailbox_max`).
    pub mailbox_max: u64,
    /// Messages one sender may have waiting (`[limits] sender_quota_messages`).
    pub sender_messages: u64,
    /// Bytes one sender may have waiting (`[limits] sender_quota_bytes`).
    pub sender_bytes: u64,
    /// Bytes all mailboxes may hold together (`[limits] store_max_bytes`).
    pub store_bytes: u64,
    /// Password mode: a recipient without an account gets `NoSuchUser`.
    pub recipients_need_account: bool,
}

impl StoreLimits {
    /// Only the mailbox cap (tools and tests that open the store directly).
    pub fn mailbox_only(mailbox_max: u64) -> StoreLimits {
        StoreLimits {
            mailbox_max,
            sender_messages: 0,
            sender_bytes: 0,
            store_bytes: 0,
            recipients_need_account: false,
        }
    }

    /// The limits a server runs with.
    pub fn from_config(c: &Config) -> StoreLimits {
        StoreLimits {
            mailbox_max: c.limits.mailbox_max,
            sender_messages: c.limits.sender_quota_messages,
            sender_bytes: c.limits.sender_quota_bytes,
            store_bytes: c.limits.store_max_bytes,
            recipients_need_account: c.auth.password_mode(),
        }
    }

    /// Whether usage must be accounted at all.
    pub fn quotas(&self) -> bool {
        self.sender_messages > 0 || self.sender_bytes > 0 || self.store_bytes > 0
    }

    /// Why one more message of `bytes` from a sender who has `usage` waiting, into a
    /// store holding `total` bytes, is refused, if it is.
    pub fn check(
        &self,
        sender: &str,
        usage: Usage,
        total: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        if self.sender_messages > 0 && usage.messages.saturating_add(1) > self.sender_messages {
            return Err(StoreError::QuotaExceeded {
                sender: sender.to_string(),
                key: "sender_quota_messages",
                limit: self.sender_messages,
            });
        }
        if self.sender_bytes > 0 && usage.bytes.saturating_add(bytes) > self.sender_bytes {
            return Err(StoreError::QuotaExceeded {
                sender: sender.to_string(),
                key: "sender_quota_bytes",
                limit: self.sender_bytes,
            });
        }
        if self.store_bytes > 0 && total.saturating_add(bytes) > self.store_bytes {
            return Err(StoreError::StoreFull {
                limit: self.store_bytes,
            });
        }
        Ok(())
    }
}

/// What one sender has waiting in mailboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub bytes: u64,
}

/// Who may download a stored blob, and how to label it (`GET /api/blobs/{key}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobInfo {
    pub sender: String,
    pub recipient: String,
    pub name: String,
    pub mime: String,
    pub size: u64,
    /// When its message was acknowledged (Unix ms): from then on the blob waits only for
    /// its download links to expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<i64>,
}

/// Receives a blob's bytes as they arrive; nothing is visible until `finish`.
#[async_trait]
pub trait BlobWrite: Send {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError>;
    /// The same, taking the chunk as it arrived: a backend that writes on another thread
    /// (the blob files) takes the received buffer itself instead of copying it.
    async fn write_bytes(&mut self, chunk: bytes::Bytes) -> Result<(), StoreError> {
        self.write(&chunk).await
    }
    /// Writes `chunk` at once, blocking the calling thread (a blob spool's blocking
    /// job, never a runtime worker); `None` when this backend only writes
    /// asynchronously (then `write_bytes` is used).
    fn write_now(&mut self, _chunk: &[u8]) -> Option<Result<(), StoreError>> {
        None
    }
    /// Makes the blob durable under its key.
    async fn finish(self: Box<Self>) -> Result<(), StoreError>;
    /// Drops a partial blob, leaving nothing behind.
    async fn discard(self: Box<Self>);
}

/// Reads a stored blob from the start.
#[async_trait]
pub trait BlobRead: Send {
    /// Fills `buf` with the next bytes; 0 at the end.
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, StoreError>;
}

/// A message as a sender submits it.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub sender: String,
    pub recipient: String,
    /// The sender's own id for the message; used to make retries idempotent.
    pub client_id: Option<String>,
    pub body: Body,
    /// Acceptance time, Unix milliseconds.
    pub accepted_at: i64,
}

impl NewMessage {
    /// What a retry must repeat for its `client_id` to count as the same message: a
    /// stable hash of recipient, kind and body (the same in every process and on every
    /// node). `None` for blobs, whose stored body names a fresh blob key on every upload.
    pub fn fingerprint(&self) -> Option<i64> {
        use sha2::{Digest, Sha256};
        if matches!(self.body, Body::Blob(_)) {
            return None;
        }
        let mut h = Sha256::new();
        h.update(self.recipient.as_bytes());
        h.update([0, self.body.kind() as u8, 0]);
        h.update(self.body.as_str().as_bytes());
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Some(i64::from_be_bytes(first))
    }
}

/// Whether a remembered `(sender, client_id)` with `stored` fingerprint makes `msg` a
/// retry (`Ok`) or a different message under a reused id (`IdConflict`). Entries written
/// before fingerprints existed (`None`) count as retries.
pub fn check_retry(msg: &NewMessage, stored: Option<i64>) -> Result<(), StoreError> {
    check_fingerprint(msg.client_id.as_deref(), msg.fingerprint(), stored)
}

/// `check_retry` for a message whose fingerprint is `new`.
pub fn check_fingerprint(
    id: Option<&str>,
    new: Option<i64>,
    stored: Option<i64>,
) -> Result<(), StoreError> {
    match (stored, new) {
        (Some(a), Some(b)) if a != b => Err(StoreError::IdConflict {
            id: id.unwrap_or_default().to_string(),
        }),
        _ => Ok(()),
    }
}

/// One entry of the account change feed: `user`'s password changed or the account was
/// deleted (which one, the current account tells).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountChange {
    /// Increasing over the store's life (never reused); may have gaps.
    pub seq: u64,
    pub user: String,
}

/// How long change feed entries are kept (readers are seconds behind at most).
pub const ACCOUNT_CHANGE_KEEP_MS: i64 = 24 * 60 * 60 * 1000;

/// The outcome of `enqueue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Newly stored under this seq.
    New { seq: u64 },
    /// `(sender, client_id)` was seen before: nothing new was stored.
    Duplicate { seq: u64 },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("mailbox of {recipient} is full ({limit} messages)")]
    MailboxFull { recipient: String, limit: u64 },
    #[error("message id {id} was already used for a different message (recipient or body)")]
    IdConflict { id: String },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Backend(String),
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("there is no account named {user}")]
    NoSuchUser { user: String },
    #[error(
        "{sender} has reached [limits] {key} = {limit}: wait until recipients read what is waiting"
    )]
    QuotaExceeded {
        sender: String,
        key: &'static str,
        limit: u64,
    },
    #[error("the store is full: [limits] store_max_bytes = {limit} reached")]
    StoreFull { limit: u64 },
    /// `recipient`'s seqs are handed out by its live session right now (`LiveSeqs::claim`):
    /// the caller hands the message to that session instead (`delivery` retries).
    #[error("the mailbox of {recipient} is owned by its live session")]
    Owned { recipient: String },
}

/// A message whose seq its recipient's live session handed out (`LiveSeqs`).
#[derive(Debug, Clone)]
pub struct LiveMessage {
    pub msg: Arc<StoredMessage>,
    /// `NewMessage::fingerprint` when it carries a client id (a retry is recognised).
    pub fingerprint: Option<i64>,
    /// Not routed yet: a sender quota or the store cap refuses it (storing nothing).
    /// Otherwise (the write-behind of a message already delivered) it is stored anyway
    /// and its sender reported in `PutOutcome::over_quota`.
    pub refusable: bool,
}

/// What `LiveSeqs::put` did: one answer per message, and the senders whose stored
/// messages now pass a quota (`""`: the store cap).
#[derive(Debug, Default)]
pub struct PutOutcome {
    pub answers: Vec<Result<Enqueued, StoreError>>,
    pub over_quota: Vec<String>,
}

/// The write-behind fast path (`delivery::live`): while a recipient has a live session on
/// this process, that session hands out its seqs from memory, from a block reserved here,
/// and its messages are written only if they are still unacknowledged when their batch
/// commits. Only backends with one writer process offer it (`Store::live_seqs`).
#[async_trait]
pub trait LiveSeqs: Send + Sync {
    /// Reserves the seqs after the recipient's last one up to `block` more (durably: a
    /// crash leaves a gap, never a reused seq) and marks the mailbox owned: until
    /// `release`, `enqueue` for it answers `StoreError::Owned`. Returns the last seq
    /// handed out before and how many messages the mailbox holds.
    async fn claim(&self, recipient: &str, block: u64) -> Result<(u64, u64), StoreError>;

    /// Moves the reservation of an owned mailbox up to `upto`. `base` names the claim
    /// (what `claim` returned): when the mailbox was claimed again since (a new session
    /// took over while this one was ending), `StoreError::Owned` and nothing changes.
    async fn reserve(&self, recipient: &str, base: u64, upto: u64) -> Result<(), StoreError>;

    /// Ends the ownership of the claim `base`: the last seq handed out was `last` (the
    /// reservation shrinks back to it, so a clean hand-back leaves no gap). The mailbox is
    /// no longer owned even when the write fails. When it was claimed again since, this
    /// does nothing: the new owner's claim stands (the old one's seqs stay a gap).
    async fn release(&self, recipient: &str, base: u64, last: u64);

    /// Stores messages with the seqs their sessions gave them, in one transaction: like
    /// `enqueue` (a retried client id is `Duplicate`, a reused one `IdConflict`, quotas
    /// for `refusable` ones) but without allocating a seq or checking the mailbox cap
    /// (the owner counts that). A `refusable` message whose seq the mailbox's current
    /// owner did not hand out (its session ended before the write) answers
    /// `StoreError::Owned`: the caller routes it again.
    async fn put(&self, msgs: Vec<LiveMessage>) -> PutOutcome;
}

/// The offline mailbox. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Persists `msg` for its recipient and returns its seq (see the module contract).
    async fn enqueue(&self, msg: NewMessage) -> Result<Enqueued, StoreError>;

    /// Stores several messages in this order (a sender's pipelined sends); one answer
    /// each. Backends that can, do it in one round trip.
    async fn enqueue_many(&self, msgs: Vec<NewMessage>) -> Vec<Result<Enqueued, StoreError>> {
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            out.push(self.enqueue(m).await);
        }
        out
    }

    /// Up to `limit` messages for `recipient` with `seq > after`, in seq order.
    async fn fetch(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Deletes every message for `recipient` with `seq <= upto` (and the bytes of any
    /// blob among them); returns how many messages.
    async fn ack(&self, recipient: &str, upto: u64) -> Result<u64, StoreError> {
        self.ack_ranges(recipient, &[(0, upto)]).await
    }

    /// Deletes the recipient's messages whose seq lies in one of the inclusive `ranges`
    /// (and the bytes of any blob among them); returns how many. Sessions acknowledge
    /// this way: exactly the seqs they wrote, never one they skipped.
    async fn ack_ranges(&self, recipient: &str, ranges: &[(u64, u64)]) -> Result<u64, StoreError>;

    /// How many unacknowledged messages `recipient` holds.
    async fn pending(&self, recipient: &str) -> Result<u64, StoreError>;

    /// A short name for logs and metrics ("sqlite", "mongodb").
    fn backend(&self) -> &'static str;

    /// The write-behind fast path, for backends whose process is the only writer (SQLite).
    /// Backends shared by several processes (MongoDB) keep every seq in the store.
    fn live_seqs(&self) -> Option<&dyn LiveSeqs> {
        None
    }

    /// Whether the store can take writes right now (`/healthz`): an error when, say, the
    /// disk is full or the data directory read-only. Backends without a cheap check
    /// answer `Ok`.
    async fn check_writable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Starts storing a blob under `key` (a fresh, unique key).
    async fn blob_writer(&self, key: &str) -> Result<Box<dyn BlobWrite>, StoreError>;

    /// Deletes a finished blob that no message refers to (a duplicate, a failed enqueue).
    async fn blob_remove(&self, key: &str);

    /// Opens a finished blob.
    async fn blob_reader(&self, key: &str) -> Result<Box<dyn BlobRead>, StoreError>;

    /// Opens a finished blob at byte `offset`. Backends seek; this default reads and
    /// drops the bytes before it, a buffer at a time.
    async fn blob_reader_at(&self, key: &str, offset: u64)
        -> Result<Box<dyn BlobRead>, StoreError>;

    /// Records who may download a finished blob (before its message is enqueued).
    async fn blob_set_info(&self, key: &str, info: &BlobInfo) -> Result<(), StoreError>;

    /// Who may download a blob; `None` when it is gone (or has no info).
    async fn blob_info(&self, key: &str) -> Result<Option<BlobInfo>, StoreError>;

    /// Deletes the blobs whose message was acknowledged before `acked_before` (Unix ms);
    /// returns how many.
    async fn blob_sweep_acked(&self, acked_before: i64) -> Result<usize, StoreError>;
    /// Creates an account; `StoreError::UserExists` when the name is taken.
    async fn create_user(&self, user: &str, password_hash: &str) -> Result<(), StoreError>;

    /// Deletes an account by its exact stored name, with its mailbox (messages and blob
    /// bytes) and its remembered client ids, and records the change in the feed; false
    /// (and nothing deleted) when there was no such account.
    async fn delete_user(&self, user: &str) -> Result<bool, StoreError>;

    /// Replaces an account's password hash and records the change in the feed; false
    /// when there is no such account.
    async fn set_password_hash(&self, user: &str, password_hash: &str) -> Result<bool, StoreError>;

    /// Whether an account named `user` exists (password mode's recipient check).
    async fn user_exists(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self.password_hash(user).await?.is_some())
    }

    /// What `sender` has waiting in mailboxes and the bytes all mailboxes hold, as far
    /// as quotas are accounted (zeros when they are not).
    async fn usage(&self, sender: &str) -> Result<(Usage, u64), StoreError>;

    /// The account's password hash (a PHC string), or `None` when there is no account.
    async fn password_hash(&self, user: &str) -> Result<Option<String>, StoreError>;

    /// Up to `limit` account changes with `seq > after`, in seq order.
    async fn account_changes(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AccountChange>, StoreError>;

    /// The highest account change seq handed out so far (0 when none): where a reader
    /// that has no sessions to care about yet starts.
    async fn account_change_cursor(&self) -> Result<u64, StoreError>;

    /// Up to `limit` stored account names that are not canonical (written before names
    /// were canonicalized: `Alice`, `Zoë`); the server refuses to start while any exist.
    async fn legacy_user_names(&self, limit: usize) -> Result<Vec<String>, StoreError>;
}

/// Opens the backend the configuration names, with only a mailbox cap.
pub async fn open(cfg: &StorageConfig, mailbox_max: u64) -> Result<Arc<dyn Store>, StoreError> {
    open_with(cfg, StoreLimits::mailbox_only(mailbox_max)).await
}

/// Opens the backend the configuration names, enforcing `limits`.
pub async fn open_with(
    cfg: &StorageConfig,
    limits: StoreLimits,
) -> Result<Arc<dyn Store>, StoreError> {
    match cfg.backend.as_str() {
        "sqlite" => Ok(Arc::new(sqlite::SqliteStore::open_with(cfg, limits)?)),
        "mongodb" => Ok(Arc::new(mongo::MongoStore::open_with(cfg, limits).await?)),
        other => Err(StoreError::Backend(format!(
            "unknown storage backend {other:?} (expected \"sqlite\" or \"mongodb\")"
        ))),
    }
}
