//! The MongoDB store backend (`[storage] backend = "mongodb"`): the offline mailbox in a
//! MongoDB database shared by any number of Pigeon processes.
//!
//! Collections (created idempotently at start-up; index names are never relied on):
//! - `messages`: one document per stored message. Unique index `{recipient: 1, seq: 1}`
//!   (fetch and ack are range scans on it); `{sender: 1}` for quota recounts and
//!   `{accepted_at: 1}` for the expiry sweep. Messages stored by versions before the
//!   sweep carry `expire_at` and a TTL index (`expireAfterSeconds: 0`) still removes
//!   them; new messages carry `bytes` (what they count against quotas) instead.
//! - `counters`: `{_id: recipient, seq, pending}`. One `find_one_and_update` with `$inc`
//!   and upsert allocates the recipient's next seq *and* reserves a mailbox slot
//!   atomically on the server, so sequences stay unique across processes. The filter
//!   `pending < mailbox_max` makes a full mailbox fail the upsert with a duplicate `_id`
//!   (code 11000): no seq is burned by a full mailbox. `pending` can drift above the truth
//!   (a crash between an ack's delete and its decrement, TTL expiry); when it says "full"
//!   and has not moved for a minute, the real count is taken and the counter repaired.
//! - `client_ids`: `{_id: "<len>:<sender>:<client_id>", seq, …, expire_at}` with a TTL
//!   index, the dedupe memory. It is a collection of its own, not a unique index on
//!   `messages`, because a retry must still be recognised after the first copy was
//!   acknowledged and deleted (the dedupe window outlives the message).
//! - `users`: `{_id: username, hash}`, the accounts (argon2 PHC strings).
//! - `account_changes`: `{_id: seq, user, expire_at}`, the account change feed (a TTL
//!   index drops entries after a day); `account_seq` `{_id: "changes", seq}` hands out
//!   its seqs with `$inc`. A reader re-reads a window below its cursor, since a seq
//!   allocated earlier may be inserted after a later one.
//! - `usage`: `{_id: sender, messages, bytes, last_at}`, what each sender has waiting
//!   (the quotas), and with `store_max_bytes` set `{_id: ""}`, the store's total. A
//!   conditional `$inc` with upsert reserves before the insert (like `counters`), so
//!   concurrent senders and processes cannot overshoot; acks and the expiry sweep give it
//!   back. A refused reservation on a row untouched for `REPAIR_AFTER_MS` recounts it
//!   from `messages` first (a crash between a delete and its release leaves it high).
//! - Expiry (`offline_ttl_secs`): a background task deletes messages older than the TTL
//!   (by `accepted_at`), their blobs, and gives back their mailbox slots and quota.
//!   Messages stored before this carry `expire_at` and the TTL index still removes them.
//! - `blob_chunks` and `blob_files`: blob bytes, in GridFS's layout (255 KiB BSON binary
//!   chunks `{_id: "<key>:<n>", key, n, data}`, then one `blob_files` entry `{_id: key,
//!   size, chunks}` written last, so an unfinished blob is invisible), so no blob meets
//!   the 16 MiB document limit. Not GridFS's own `fs.*` collections: the MongoDB-wire test
//!   server this project is tested against cannot create collection names with a dot.
//!   `blob_info` `{_id: key, info, at, acked_at}` holds a blob's `BlobInfo` (as JSON
//!   text: who may download it); acknowledging its message then sets `acked_at` (Unix
//!   ms) and `blob_sweep_acked` deletes it once its
//!   download links expired; without `info` the ack deletes the bytes. Chunks and file
//!   entries carry `at`
//!   (Unix ms); at start a background sweep deletes blobs no message refers to once
//!   nothing was written to them for an hour (crash leftovers; younger ones may be
//!   another node's upload in progress).
//!
//! Every write uses the configured write concern (journaled), so a sender is told
//! "stored" only after the server acknowledged the write at that level. No multi-document
//! transactions are used; the order of writes is chosen so a failure never loses a
//! message that a sender was told is stored (see `MongoStore::enqueue`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use bson::{doc, Document};
use futures_util::TryStreamExt;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{
    Acknowledgment, ClientOptions, DatabaseOptions, IndexOptions, ReturnDocument, WriteConcern,
};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::{Deserialize, Deserializer, Serialize};

use bson::spec::BinarySubtype;
use bson::Binary;

use super::{
    AccountChange, BlobInfo, BlobRead, BlobWrite, Enqueued, NewMessage, Store, StoreError,
    StoreLimits, Usage,
};
use crate::config::StorageConfig;
use crate::message::{Body, StoredMessage};

/// How long the driver looks for a usable server before an operation fails.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a TCP connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write may wait for its write concern before it is reported as failed.
const WRITE_CONCERN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on the whole start-up (parse, DNS for `mongodb+srv`, ping, indexes).
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// A full-looking counter untouched for this long is checked against the real count
/// (no insert can still be in flight: they give up after the timeouts above).
const REPAIR_AFTER_MS: i64 = 60_000;
/// MongoDB's duplicate key error code.
const DUPLICATE_KEY: i32 = 11000;
/// `create` on a collection that already exists.
const NAMESPACE_EXISTS: i32 = 48;

/// A message as stored in `messages`.
#[derive(Debug, Serialize, Deserialize)]
struct MessageDoc {
    recipient: String,
    #[serde(deserialize_with = "de_i64")]
    seq: i64,
    sender: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
    /// `Body::kind`: 0 text, 1 JSON.
    #[serde(deserialize_with = "de_i64")]
    kind: i64,
    body: String,
    /// Unix milliseconds.
    #[serde(deserialize_with = "de_i64")]
    accepted_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expire_at: Option<bson::DateTime>,
    /// What the message counts against quotas (`Body::stored_bytes`); 0 in messages from
    /// before quotas.
    #[serde(default, deserialize_with = "de_i64")]
    bytes: i64,
}

/// A recipient's row in `counters`.
#[derive(Debug, Deserialize)]
struct CounterDoc {
    /// The last seq handed out (never decreases).
    #[serde(deserialize_with = "de_i64")]
    seq: i64,
    /// Reserved mailbox slots: stored messages plus inserts in flight.
    #[serde(deserialize_with = "de_i64")]
    pending: i64,
    /// Unix milliseconds of the last allocation.
    #[serde(default, deserialize_with = "de_i64")]
    last_at: i64,
}

/// A remembered `(sender, client_id)` in `client_ids`.
#[derive(Debug, Serialize, Deserialize)]
struct ClientIdDoc {
    #[serde(rename = "_id")]
    id: String,
    sender: String,
    client_id: String,
    recipient: String,
    #[serde(deserialize_with = "de_i64")]
    seq: i64,
    #[serde(deserialize_with = "de_i64")]
    accepted_at: i64,
    /// When the TTL monitor may remove it: acceptance + dedupe window.
    expire_at: bson::DateTime,
    /// `NewMessage::fingerprint` of the message (absent in entries from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<i64>,
}

/// Reads an integer stored as Int32, Int64 or an integral Double. Servers may hand back
/// small Int64 values as Int32, and other tools may have written doubles.
fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer (Int32, Int64 or integral Double)")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("{v} does not fit in an i64")))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            if v.fract() == 0.0 && v >= i64::MIN as f64 && v < i64::MAX as f64 {
                Ok(v as i64)
            } else {
                Err(E::custom(format!("{v} is not an integer")))
            }
        }
    }
    d.deserialize_any(V)
}

/// The MongoDB-backed mailbox. Cheap to share: the driver's `Client` pools connections.
pub struct MongoStore {
    db: Database,
    users: Collection<Document>,
    account_changes: Collection<Document>,
    account_seq: Collection<Document>,
    blob_chunks: Collection<Document>,
    blob_files: Collection<Document>,
    /// `{_id: key, info: <BlobInfo JSON>, at, acked_at?}`: who may download a blob.
    blob_info: Collection<Document>,
    messages: Collection<MessageDoc>,
    counters: Collection<Document>,
    client_ids: Collection<ClientIdDoc>,
    mailbox_max: u64,
    dedupe_window_ms: i64,
    usage: UsageBook,
    /// The expiry task, stopped with the store.
    sweeper: Option<tokio::task::AbortHandle>,
}

impl Drop for MongoStore {
    fn drop(&mut self) {
        if let Some(s) = &self.sweeper {
            s.abort();
        }
    }
}

impl MongoStore {
    /// Connects, checks the server answers (`ping`), and creates collections and indexes.
    /// Fails with `StoreError::Unavailable` naming the URI (credentials hidden) when the
    /// server cannot be reached within a few seconds.
    pub async fn open(cfg: &StorageConfig, mailbox_max: u64) -> Result<MongoStore, StoreError> {
        Self::open_with(cfg, StoreLimits::mailbox_only(mailbox_max)).await
    }

    pub async fn open_with(
        cfg: &StorageConfig,
        limits: StoreLimits,
    ) -> Result<MongoStore, StoreError> {
        let shown = redact_uri(&cfg.mongodb_uri);
        match tokio::time::timeout(OPEN_TIMEOUT, Self::open_inner(cfg, limits)).await {
            Ok(Ok(store)) => Ok(store),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "MongoDB at {shown} (database {:?}): {e}",
                cfg.mongodb_database
            ))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "MongoDB at {shown}: no answer within {}s",
                OPEN_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn open_inner(cfg: &StorageConfig, limits: StoreLimits) -> Result<MongoStore, String> {
        let mailbox_max = limits.mailbox_max;
        let mut options = ClientOptions::parse(&cfg.mongodb_uri)
            .await
            .map_err(|e| format!("invalid URI: {e}"))?;
        options.app_name.get_or_insert_with(|| "pigeon".into());
        options
            .server_selection_timeout
            .get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
        let client = Client::with_options(options).map_err(|e| e.to_string())?;
        let db = client.database_with_options(
            &cfg.mongodb_database,
            DatabaseOptions::builder()
                .write_concern(write_concern(&cfg.mongodb_write_concern)?)
                .build(),
        );
        db.run_command(doc! { "ping": 1 })
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        let mut store = MongoStore {
            usage: UsageBook {
                coll: db.collection("usage"),
                messages: db.collection("messages"),
                limits,
            },
            sweeper: None,
            users: db.collection("users"),
            account_changes: db.collection("account_changes"),
            account_seq: db.collection("account_seq"),
            blob_chunks: db.collection("blob_chunks"),
            blob_files: db.collection("blob_files"),
            blob_info: db.collection("blob_info"),
            messages: db.collection("messages"),
            counters: db.collection("counters"),
            client_ids: db.collection("client_ids"),
            db,
            mailbox_max,
            dedupe_window_ms: ms(cfg.dedupe_window_secs),
        };
        store
            .create_schema()
            .await
            .map_err(|e| format!("creating collections and indexes: {e}"))?;
        // In the background: it reads every blob message and chunk key.
        let sweep = BlobSweep {
            messages: store.messages.clone(),
            chunks: store.blob_chunks.clone(),
            files: store.blob_files.clone(),
            info: store.blob_info.clone(),
        };
        let ttl_ms = ms(cfg.offline_ttl_secs);
        if ttl_ms > 0 {
            let expiry = Expiry {
                messages: store.messages.clone(),
                counters: store.counters.clone(),
                usage: store.usage.clone(),
                blobs: (store.blob_chunks.clone(), store.blob_files.clone()),
                ttl_ms,
            };
            store.sweeper = Some(tokio::spawn(expiry.run()).abort_handle());
        }
        tokio::spawn(async move {
            match sweep.run(crate::now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(blobs = n, "removed unfinished or unreferenced blobs"),
                Err(e) => tracing::warn!(error = %e, "sweeping old blobs failed"),
            }
        });
        Ok(store)
    }

    /// Creates collections and indexes; a no-op when they already exist as specified.
    async fn create_schema(&self) -> Result<(), mongodb::error::Error> {
        let unique = IndexOptions::builder().unique(true).build();
        let ttl = IndexOptions::builder()
            .expire_after(Duration::from_secs(0))
            .build();
        self.messages
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "recipient": 1, "seq": 1 })
                    .options(unique)
                    .build(),
            )
            .await?;
        self.messages
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "expire_at": 1 })
                    .options(ttl.clone())
                    .build(),
            )
            .await?;
        self.client_ids
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "expire_at": 1 })
                    .options(ttl)
                    .build(),
            )
            .await?;
        self.blob_chunks
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "key": 1, "n": 1 })
                    .build(),
            )
            .await?;
        self.account_changes
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "expire_at": 1 })
                    .options(
                        IndexOptions::builder()
                            .expire_after(Duration::from_secs(0))
                            .build(),
                    )
                    .build(),
            )
            .await?;
        self.messages
            .create_index(IndexModel::builder().keys(doc! { "sender": 1 }).build())
            .await?;
        self.messages
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "accepted_at": 1 })
                    .build(),
            )
            .await?;
        for name in ["counters", "users", "blob_files", "account_seq", "usage"] {
            match self.db.create_collection(name).await {
                Ok(()) => {}
                Err(e) if error_code(&e) == Some(NAMESPACE_EXISTS) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The remembered seq of `(sender, client_id)`, if within the dedupe window. An
    /// expired entry the TTL monitor has not removed yet is removed here.
    async fn seen(
        &self,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<ClientIdDoc>, mongodb::error::Error> {
        let Some(found) = self.client_ids.find_one(doc! { "_id": key }).await? else {
            return Ok(None);
        };
        let cutoff = now_ms.saturating_sub(self.dedupe_window_ms);
        if found.accepted_at >= cutoff {
            return Ok(Some(found));
        }
        self.client_ids
            .delete_one(doc! { "_id": key, "accepted_at": { "$lt": cutoff } })
            .await?;
        Ok(None)
    }

    /// Allocates `recipient`'s next seq and reserves a mailbox slot, atomically.
    /// `Ok(None)`: the mailbox is full (nothing was allocated, no seq burned).
    async fn allocate(&self, recipient: &str) -> Result<Option<i64>, StoreError> {
        let counters = self.counters.clone_with_type::<CounterDoc>();
        for _ in 0..3 {
            let r = counters
                .find_one_and_update(
                    doc! { "_id": recipient, "pending": { "$lt": to_i64(self.mailbox_max) } },
                    doc! {
                        "$inc": { "seq": 1_i64, "pending": 1_i64 },
                        "$set": { "last_at": crate::now_ms() },
                    },
                )
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await;
            match r {
                Ok(Some(c)) => return Ok(Some(c.seq)),
                // The filter matched no counter, so the upsert tried to insert one with an
                // `_id` that exists: MongoDB answers E11000; some wire-compatible servers
                // answer "no document" without writing. Either way: full, or a race.
                Ok(None) => {}
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(unavailable(e)),
            }
            if !self
                .room_after_all(&counters, recipient)
                .await
                .map_err(unavailable)?
            {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// After a refused allocation: whether to try again. True when the counter did not
    /// exist yet (two first messages raced to create it), was acknowledged below the limit
    /// meanwhile, or was stale and has been repaired (see `REPAIR_AFTER`).
    async fn room_after_all(
        &self,
        counters: &Collection<CounterDoc>,
        recipient: &str,
    ) -> Result<bool, mongodb::error::Error> {
        let Some(c) = counters.find_one(doc! { "_id": recipient }).await? else {
            return Ok(true);
        };
        if (c.pending.max(0) as u64) < self.mailbox_max {
            return Ok(true);
        }
        // Only a counter untouched for a while may be corrected: a fresh one may have
        // reservations whose inserts are still in flight and not yet countable.
        if crate::now_ms().saturating_sub(c.last_at) < REPAIR_AFTER_MS {
            return Ok(false);
        }
        let real = self
            .messages
            .count_documents(doc! { "recipient": recipient })
            .await?;
        if real >= self.mailbox_max {
            return Ok(false);
        }
        // Conditional on nobody having allocated since we looked.
        let fixed = self
            .counters
            .update_one(
                doc! { "_id": recipient, "seq": c.seq, "pending": c.pending },
                doc! { "$set": { "pending": to_i64(real) } },
            )
            .await?;
        if fixed.modified_count > 0 {
            tracing::info!(
                recipient,
                counted = real,
                was = c.pending,
                "repaired a stale mailbox counter"
            );
        }
        Ok(true)
    }

    /// Appends `user` to the account change feed.
    async fn record_change(&self, user: &str) -> Result<(), StoreError> {
        let counter = self
            .account_seq
            .find_one_and_update(doc! { "_id": "changes" }, doc! { "$inc": { "seq": 1_i64 } })
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .map_err(unavailable)?;
        let seq = counter
            .as_ref()
            .and_then(|c| c.get("seq"))
            .and_then(bson::Bson::as_i64_lossy)
            .ok_or_else(|| StoreError::Backend("account change counter missing".into()))?;
        let expire_at =
            bson::DateTime::from_millis(crate::now_ms() + super::ACCOUNT_CHANGE_KEEP_MS);
        self.account_changes
            .insert_one(doc! { "_id": seq, "user": user, "expire_at": expire_at })
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes `recipient`'s messages that `filter` selects, gives back their mailbox
    /// slots and their senders' quota, and returns how many were deleted and the keys of
    /// their blobs (for the caller to retire or remove). The quota goes back only when
    /// the delete removed exactly what was counted: a concurrent delete of the same
    /// messages must not give it back twice (a row left high is recounted).
    async fn delete_messages(
        &self,
        recipient: &str,
        filter: Document,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut blob_filter = filter.clone();
        blob_filter.insert("kind", 2);
        let blobs: Vec<MessageDoc> = self
            .messages
            .find(blob_filter)
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let senders = self
            .usage
            .per_sender(filter.clone())
            .await
            .map_err(unavailable)?;
        let deleted = self
            .messages
            .delete_many(filter)
            .await
            .map_err(unavailable)?
            .deleted_count;
        self.release(recipient, deleted).await;
        if senders.iter().map(|s| s.1).sum::<i64>() == to_i64(deleted) {
            self.usage.release(&senders).await;
        }
        let keys = blobs
            .into_iter()
            .filter_map(|b| Body::Blob(b.body).blob_meta().map(|m| m.key))
            .collect();
        Ok((deleted, keys))
    }

    /// Gives back `n` reserved mailbox slots. Best effort: a failure only leaves the
    /// counter too high, which `room_after_all` corrects.
    async fn release(&self, recipient: &str, n: u64) {
        if n == 0 {
            return;
        }
        if let Err(e) = self
            .counters
            .update_one(
                doc! { "_id": recipient },
                doc! { "$inc": { "pending": -to_i64(n) } },
            )
            .await
        {
            tracing::warn!(recipient, error = %e, "releasing mailbox slots failed");
        }
    }
}

#[async_trait]
impl Store for MongoStore {
    /// Order of writes: (1) look the client id up, so a retry burns no seq; (2) allocate
    /// seq + mailbox slot; (3) insert the message; (4) remember the client id. A
    /// concurrent twin that loses the race at (4) deletes its own copy and answers
    /// `Duplicate`. Inserting the message before the client id means a failure between
    /// (3) and (4) can at worst let a later retry store a second copy; the reverse order
    /// could answer a retry "duplicate" for a message that was never stored.
    async fn enqueue(&self, msg: NewMessage) -> Result<Enqueued, StoreError> {
        let key = msg.client_id.as_deref().map(|c| client_key(&msg.sender, c));
        if let Some(key) = &key {
            if let Some(first) = self.seen(key, msg.accepted_at).await.map_err(unavailable)? {
                super::check_retry(&msg, first.fingerprint)?;
                return Ok(Enqueued::Duplicate {
                    seq: first.seq.max(0) as u64,
                });
            }
        }
        if self.usage.limits.recipients_need_account
            && self
                .users
                .find_one(doc! { "_id": &msg.recipient })
                .projection(doc! { "_id": 1 })
                .await
                .map_err(unavailable)?
                .is_none()
        {
            return Err(StoreError::NoSuchUser {
                user: msg.recipient,
            });
        }
        let bytes = to_i64(msg.body.stored_bytes());
        self.usage.reserve(&msg.sender, bytes).await?;
        let allocated = match self.allocate(&msg.recipient).await {
            Ok(a) => a,
            Err(e) => {
                self.usage.release(&[(msg.sender.clone(), 1, bytes)]).await;
                return Err(e);
            }
        };
        let Some(seq) = allocated else {
            self.usage.release(&[(msg.sender.clone(), 1, bytes)]).await;
            return Err(StoreError::MailboxFull {
                recipient: msg.recipient,
                limit: self.mailbox_max,
            });
        };
        let doc = MessageDoc {
            recipient: msg.recipient.clone(),
            seq,
            sender: msg.sender.clone(),
            client_id: msg.client_id.clone(),
            kind: msg.body.kind(),
            body: msg.body.as_str().to_string(),
            accepted_at: msg.accepted_at,
            expire_at: None,
            bytes,
        };
        if let Err(e) = self.messages.insert_one(&doc).await {
            // The seq stays burned (a gap readers tolerate); the slot is given back.
            self.release(&msg.recipient, 1).await;
            self.usage.release(&[(msg.sender.clone(), 1, bytes)]).await;
            return Err(unavailable(e));
        }
        let fingerprint = msg.fingerprint();
        let (Some(key), Some(client_id)) = (key, msg.client_id.clone()) else {
            return Ok(Enqueued::New { seq: seq as u64 });
        };
        let claim = ClientIdDoc {
            id: key.clone(),
            sender: msg.sender.clone(),
            client_id,
            recipient: msg.recipient.clone(),
            seq,
            accepted_at: msg.accepted_at,
            expire_at: bson::DateTime::from_millis(
                msg.accepted_at.saturating_add(self.dedupe_window_ms),
            ),
            fingerprint,
        };
        match self.client_ids.insert_one(&claim).await {
            Ok(_) => Ok(Enqueued::New { seq: seq as u64 }),
            Err(e) if is_duplicate_key(&e) => {
                // A concurrent send with the same id got there first: undo our copy.
                self.messages
                    .delete_one(doc! { "recipient": &msg.recipient, "seq": seq })
                    .await
                    .map_err(unavailable)?;
                self.release(&msg.recipient, 1).await;
                self.usage.release(&[(msg.sender.clone(), 1, bytes)]).await;
                match self.client_ids.find_one(doc! { "_id": &key }).await {
                    Ok(Some(first)) => {
                        super::check_retry(&msg, first.fingerprint)?;
                        Ok(Enqueued::Duplicate {
                            seq: first.seq.max(0) as u64,
                        })
                    }
                    Ok(None) => Err(StoreError::Unavailable(
                        "client id vanished while resolving a duplicate; retry".into(),
                    )),
                    Err(e) => Err(unavailable(e)),
                }
            }
            Err(e) => {
                // The message is durably stored; only its dedupe memory is missing.
                tracing::warn!(error = %e, seq, "storing the client id failed; a retry may be stored twice");
                Ok(Enqueued::New { seq: seq as u64 })
            }
        }
    }

    async fn fetch(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new()); // MongoDB reads limit 0 as "no limit"
        }
        let docs: Vec<MessageDoc> = self
            .messages
            .find(doc! { "recipient": recipient, "seq": { "$gt": to_i64(after) } })
            .sort(doc! { "seq": 1 })
            .limit(to_i64(limit as u64))
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        Ok(docs
            .into_iter()
            .map(|d| StoredMessage {
                seq: d.seq.max(0) as u64,
                sender: d.sender,
                recipient: d.recipient,
                client_id: d.client_id,
                body: Body::from_parts(d.kind, d.body),
                accepted_at: d.accepted_at,
            })
            .collect())
    }

    async fn ack_ranges(&self, recipient: &str, ranges: &[(u64, u64)]) -> Result<u64, StoreError> {
        if ranges.is_empty() {
            return Ok(0);
        }
        let in_ranges: Vec<Document> = ranges
            .iter()
            .map(|&(lo, hi)| doc! { "seq": { "$gte": to_i64(lo), "$lte": to_i64(hi) } })
            .collect();
        let filter = doc! { "recipient": recipient, "$or": in_ranges };
        let (deleted, blobs) = self.delete_messages(recipient, filter).await?;
        for key in blobs {
            self.blob_retire(&key).await;
        }
        Ok(deleted)
    }

    async fn pending(&self, recipient: &str) -> Result<u64, StoreError> {
        // Counted, not read from the counter: exact even after TTL expiry.
        self.messages
            .count_documents(doc! { "recipient": recipient })
            .await
            .map_err(unavailable)
    }

    fn backend(&self) -> &'static str {
        "mongodb"
    }

    async fn create_user(&self, user: &str, password_hash: &str) -> Result<(), StoreError> {
        match self
            .users
            .insert_one(doc! { "_id": user, "hash": password_hash })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Err(StoreError::UserExists(user.to_string())),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Order: the account (no new logins), the change feed entry (live sessions end),
    /// then the mailbox, its blobs and the client ids. A failure part-way is reported;
    /// running `pigeon user del` again cannot repeat it (the account is gone), so the
    /// mailbox removal is written to be the last and the cheapest step.
    async fn delete_user(&self, user: &str) -> Result<bool, StoreError> {
        let r = self
            .users
            .delete_one(doc! { "_id": user })
            .await
            .map_err(unavailable)?;
        if r.deleted_count == 0 {
            return Ok(false);
        }
        self.record_change(user).await?;
        let (_, blobs) = self
            .delete_messages(user, doc! { "recipient": user })
            .await?;
        for key in blobs {
            self.blob_remove(&key).await;
        }
        self.client_ids
            .delete_many(doc! { "sender": user })
            .await
            .map_err(unavailable)?;
        Ok(true)
    }

    async fn set_password_hash(&self, user: &str, password_hash: &str) -> Result<bool, StoreError> {
        let r = self
            .users
            .update_one(
                doc! { "_id": user },
                doc! { "$set": { "hash": password_hash } },
            )
            .await
            .map_err(unavailable)?;
        if r.matched_count == 0 {
            return Ok(false);
        }
        self.record_change(user).await?;
        Ok(true)
    }

    async fn account_changes(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AccountChange>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = self
            .account_changes
            .find(doc! { "_id": { "$gt": to_i64(after) } })
            .sort(doc! { "_id": 1 })
            .limit(to_i64(limit as u64))
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(AccountChange {
                    seq: d.get("_id")?.as_i64_lossy()?.max(0) as u64,
                    user: d.get_str("user").ok()?.to_string(),
                })
            })
            .collect())
    }

    async fn account_change_cursor(&self) -> Result<u64, StoreError> {
        let d = self
            .account_seq
            .find_one(doc! { "_id": "changes" })
            .await
            .map_err(unavailable)?;
        Ok(d.as_ref()
            .and_then(|d| d.get("seq"))
            .and_then(bson::Bson::as_i64_lossy)
            .unwrap_or(0)
            .max(0) as u64)
    }

    /// Read in full (names only) and filtered here: once, at start-up.
    async fn legacy_user_names(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut cursor = self
            .users
            .find(doc! {})
            .projection(doc! { "_id": 1 })
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            if let Ok(name) = d.get_str("_id") {
                if !crate::names::valid_username(name) {
                    out.push(name.to_string());
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    async fn password_hash(&self, user: &str) -> Result<Option<String>, StoreError> {
        let d = self
            .users
            .find_one(doc! { "_id": user })
            .await
            .map_err(unavailable)?;
        Ok(d.and_then(|d| d.get_str("hash").ok().map(str::to_string)))
    }

    async fn usage(&self, sender: &str) -> Result<(Usage, u64), StoreError> {
        let mine = self.usage.read(sender).await.map_err(unavailable)?;
        let total = self.usage.read("").await.map_err(unavailable)?;
        Ok((mine, total.bytes))
    }

    async fn blob_writer(&self, key: &str) -> Result<Box<dyn BlobWrite>, StoreError> {
        Ok(Box::new(ChunkWriter {
            key: key.to_string(),
            chunks: self.blob_chunks.clone(),
            files: self.blob_files.clone(),
            buf: Vec::with_capacity(BLOB_CHUNK),
            n: 0,
            size: 0,
        }))
    }

    async fn blob_reader(&self, key: &str) -> Result<Box<dyn BlobRead>, StoreError> {
        Ok(Box::new(self.chunk_reader(key).await?))
    }

    async fn blob_reader_at(
        &self,
        key: &str,
        offset: u64,
    ) -> Result<Box<dyn BlobRead>, StoreError> {
        // Chunks are BLOB_CHUNK bytes but the last: start at the one holding `offset`.
        let first = offset / BLOB_CHUNK as u64;
        let mut r = self.chunk_reader(key).await?;
        r.next = i64::try_from(first).unwrap_or(i64::MAX);
        let mut skip = (offset % BLOB_CHUNK as u64) as usize;
        let mut scratch = vec![0u8; skip];
        while skip > 0 {
            match r.read(&mut scratch[..skip]).await? {
                0 => break,
                n => skip -= n,
            }
        }
        Ok(Box::new(r))
    }

    async fn blob_set_info(&self, key: &str, info: &BlobInfo) -> Result<(), StoreError> {
        // As JSON text: one opaque field.
        let info = serde_json::to_string(info).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.blob_info
            .insert_one(doc! { "_id": key, "info": info, "at": crate::now_ms() })
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn blob_info(&self, key: &str) -> Result<Option<BlobInfo>, StoreError> {
        let file = self
            .blob_info
            .find_one(doc! { "_id": key })
            .await
            .map_err(unavailable)?;
        let Some(file) = file else { return Ok(None) };
        let mut info: Option<BlobInfo> = file
            .get_str("info")
            .ok()
            .and_then(|t| serde_json::from_str(t).ok());
        if let Some(i) = info.as_mut() {
            i.acked_at = file.get("acked_at").and_then(bson::Bson::as_i64_lossy);
        }
        Ok(info)
    }

    async fn blob_sweep_acked(&self, acked_before: i64) -> Result<usize, StoreError> {
        let keys: Vec<Document> = self
            .blob_info
            .find(doc! { "acked_at": { "$lt": acked_before } })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut removed = 0;
        for k in keys {
            if let Ok(key) = k.get_str("_id") {
                self.blob_remove(key).await;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn blob_remove(&self, key: &str) {
        // The file entry first: from then on the blob is gone, whatever happens to its chunks.
        let r = async {
            self.blob_files.delete_one(doc! { "_id": key }).await?;
            self.blob_chunks.delete_many(doc! { "key": key }).await?;
            self.blob_info.delete_one(doc! { "_id": key }).await
        };
        if let Err(e) = r.await {
            tracing::warn!(%key, error = %e, "cannot delete blob");
        }
    }
}

impl MongoStore {
    async fn chunk_reader(&self, key: &str) -> Result<ChunkReader, StoreError> {
        let file = self
            .blob_files
            .find_one(doc! { "_id": key })
            .await
            .map_err(unavailable)?
            .ok_or_else(|| StoreError::Backend(format!("no blob {key}")))?;
        let chunks = file
            .get("chunks")
            .and_then(bson::Bson::as_i64_lossy)
            .unwrap_or(0);
        Ok(ChunkReader {
            key: key.to_string(),
            chunks_total: chunks,
            coll: self.blob_chunks.clone(),
            next: 0,
            current: Vec::new(),
            pos: 0,
        })
    }

    /// Its message was acknowledged: a blob with `info` waits for `blob_sweep_acked`,
    /// one without is deleted now.
    async fn blob_retire(&self, key: &str) {
        let marked = self
            .blob_info
            .update_one(
                doc! { "_id": key },
                doc! { "$set": { "acked_at": crate::now_ms() } },
            )
            .await;
        match marked {
            Ok(r) if r.matched_count > 0 => {}
            _ => self.blob_remove(key).await,
        }
    }
}

/// The `usage` collection: reservations and releases of quota (see the module doc).
#[derive(Clone)]
struct UsageBook {
    coll: Collection<Document>,
    messages: Collection<MessageDoc>,
    limits: StoreLimits,
}

impl UsageBook {
    /// Whether the store-wide total is kept (only with a cap: it is one hot document).
    fn total(&self) -> bool {
        self.limits.store_bytes > 0
    }

    async fn read(&self, id: &str) -> Result<Usage, mongodb::error::Error> {
        let d = self.coll.find_one(doc! { "_id": id }).await?;
        let get = |k: &str| {
            d.as_ref()
                .and_then(|d| d.get(k))
                .and_then(bson::Bson::as_i64_lossy)
                .unwrap_or(0)
                .max(0) as u64
        };
        Ok(Usage {
            messages: get("messages"),
            bytes: get("bytes"),
        })
    }

    /// Reserves one message of `bytes` for `sender` (and the total), or refuses.
    async fn reserve(&self, sender: &str, bytes: i64) -> Result<(), StoreError> {
        let l = self.limits;
        // A single message beyond a cap: no row can take it.
        l.check(sender, Usage::default(), 0, bytes.max(0) as u64)?;
        let mut filter = doc! { "_id": sender };
        if l.sender_messages > 0 {
            filter.insert("messages", doc! { "$lt": to_i64(l.sender_messages) });
        }
        if l.sender_bytes > 0 {
            filter.insert("bytes", doc! { "$lte": to_i64(l.sender_bytes) - bytes });
        }
        self.take(sender, filter, bytes).await?;
        if self.total() {
            let filter = doc! { "_id": "", "bytes": { "$lte": to_i64(l.store_bytes) - bytes } };
            if let Err(e) = self.take("", filter, bytes).await {
                self.add(sender, -1, -bytes).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// One conditional `$inc` on row `id`; on refusal, the reason (after a repair when
    /// the row is stale).
    async fn take(&self, id: &str, filter: Document, bytes: i64) -> Result<(), StoreError> {
        for _ in 0..3 {
            let r = self
                .coll
                .update_one(
                    filter.clone(),
                    doc! {
                        "$inc": { "messages": 1_i64, "bytes": bytes },
                        "$set": { "last_at": crate::now_ms() },
                    },
                )
                .upsert(true)
                .await;
            match r {
                Ok(r) if r.matched_count > 0 || r.upserted_id.is_some() => return Ok(()),
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(unavailable(e)),
            }
            let row = self
                .coll
                .find_one(doc! { "_id": id })
                .await
                .map_err(unavailable)?;
            let Some(row) = row else { continue }; // two first reservations raced
            let last_at = row
                .get("last_at")
                .and_then(bson::Bson::as_i64_lossy)
                .unwrap_or(0);
            if crate::now_ms().saturating_sub(last_at) >= REPAIR_AFTER_MS
                && self.repair(id, &row).await.map_err(unavailable)?
            {
                continue;
            }
            let now = self.read(id).await.map_err(unavailable)?;
            return Err(match id {
                "" => StoreError::StoreFull {
                    limit: self.limits.store_bytes,
                },
                _ => self
                    .limits
                    .check(id, now, 0, bytes.max(0) as u64)
                    .err()
                    .unwrap_or(StoreError::QuotaExceeded {
                        sender: id.to_string(),
                        key: "sender_quota_messages",
                        limit: self.limits.sender_messages,
                    }),
            });
        }
        Err(StoreError::Unavailable(
            "usage row kept changing; retry".into(),
        ))
    }

    /// Recounts a stale row from `messages`; true when it changed.
    async fn repair(&self, id: &str, row: &Document) -> Result<bool, mongodb::error::Error> {
        let filter = match id {
            "" => doc! {},
            _ => doc! { "sender": id },
        };
        let counted = self.per_sender(filter).await?;
        let (messages, bytes) = counted
            .iter()
            .fold((0, 0), |(m, b), (_, cm, cb)| (m + cm, b + cb));
        let was = |k: &str| row.get(k).cloned().unwrap_or(bson::Bson::Null);
        let fixed = self
            .coll
            .update_one(
                doc! { "_id": id, "messages": was("messages"), "bytes": was("bytes") },
                doc! { "$set": { "messages": messages, "bytes": bytes, "last_at": crate::now_ms() } },
            )
            .await?;
        Ok(fixed.modified_count > 0)
    }

    /// Per sender, the messages and bytes `filter` selects.
    async fn per_sender(
        &self,
        filter: Document,
    ) -> Result<Vec<(String, i64, i64)>, mongodb::error::Error> {
        let mut cursor = self
            .messages
            .clone_with_type::<Document>()
            .find(filter)
            .projection(doc! { "sender": 1, "bytes": 1 })
            .await?;
        let mut by: HashMap<String, (i64, i64)> = HashMap::new();
        while let Some(d) = cursor.try_next().await? {
            let sender = d.get_str("sender").unwrap_or_default().to_string();
            let bytes = d
                .get("bytes")
                .and_then(bson::Bson::as_i64_lossy)
                .unwrap_or(0);
            let e = by.entry(sender).or_default();
            e.0 += 1;
            e.1 += bytes;
        }
        Ok(by.into_iter().map(|(s, (m, b))| (s, m, b)).collect())
    }

    async fn add(&self, id: &str, messages: i64, bytes: i64) {
        if let Err(e) = self
            .coll
            .update_one(
                doc! { "_id": id },
                doc! { "$inc": { "messages": messages, "bytes": bytes } },
            )
            .await
        {
            tracing::warn!(error = %e, "releasing quota failed");
        }
    }

    /// Gives back what `freed` (sender, messages, bytes) held. Best effort: a failure
    /// leaves a row high, which `repair` corrects.
    async fn release(&self, freed: &[(String, i64, i64)]) {
        let (mut messages, mut bytes) = (0, 0);
        for (sender, m, b) in freed {
            self.add(sender, -m, -b).await;
            messages += m;
            bytes += b;
        }
        if self.total() && messages > 0 {
            self.add("", -messages, -bytes).await;
        }
    }
}

/// The expiry task: deletes messages older than the TTL with their blobs, and gives
/// back their mailbox slots and quota.
struct Expiry {
    messages: Collection<MessageDoc>,
    counters: Collection<Document>,
    usage: UsageBook,
    blobs: (Collection<Document>, Collection<Document>),
    ttl_ms: i64,
}

impl Expiry {
    async fn run(self) {
        let every = Duration::from_millis((self.ttl_ms / 10).clamp(1_000, 60_000) as u64);
        loop {
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(messages = n, "deleted expired messages"),
                Err(e) => tracing::warn!(error = %e, "deleting expired messages failed"),
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn sweep(&self) -> Result<u64, mongodb::error::Error> {
        let filter = doc! { "accepted_at": { "$lt": crate::now_ms() - self.ttl_ms } };
        let mut cursor = self
            .messages
            .clone_with_type::<Document>()
            .find(filter.clone())
            .projection(doc! { "recipient": 1, "seq": 1, "sender": 1, "bytes": 1, "kind": 1 })
            .await?;
        let mut found = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            found.push(d);
        }
        let mut total = 0;
        for d in found {
            let (Ok(recipient), Some(seq)) = (
                d.get_str("recipient"),
                d.get("seq").and_then(bson::Bson::as_i64_lossy),
            ) else {
                continue;
            };
            // One by one: what another node's ack deleted meanwhile is not given back twice.
            let Some(m) = self
                .messages
                .find_one_and_delete(doc! { "recipient": recipient, "seq": seq })
                .await?
            else {
                continue;
            };
            total += 1;
            self.counters
                .update_one(
                    doc! { "_id": recipient },
                    doc! { "$inc": { "pending": -1_i64 } },
                )
                .await?;
            self.usage.release(&[(m.sender.clone(), 1, m.bytes)]).await;
            if let Some(meta) = Body::from_parts(m.kind, m.body).blob_meta() {
                self.blobs.1.delete_one(doc! { "_id": &meta.key }).await?;
                self.blobs.0.delete_many(doc! { "key": &meta.key }).await?;
            }
        }
        Ok(total)
    }
}

/// GridFS's chunk size.
const BLOB_CHUNK: usize = 255 * 1024;

/// Blob bytes untouched for this long are no upload in progress (the write timeout
/// drops a stalled sender long before); younger ones may be another node's upload.
const BLOB_ORPHAN_AGE_MS: i64 = 60 * 60 * 1000;

/// Deletes blob bytes nothing will read: chunks of uploads that never finished (a crash
/// mid-upload) and finished blobs no message refers to (a crash between the upload and
/// its message, or between an ack and the blob's removal), once `BLOB_ORPHAN_AGE_MS`
/// old. Entries from before the `at` field count as old.
struct BlobSweep {
    messages: Collection<MessageDoc>,
    chunks: Collection<Document>,
    files: Collection<Document>,
    info: Collection<Document>,
}

impl BlobSweep {
    /// Returns how many blobs it removed.
    async fn run(&self, now_ms: i64) -> Result<usize, mongodb::error::Error> {
        let cutoff = now_ms.saturating_sub(BLOB_ORPHAN_AGE_MS);
        let at = |d: &Document| d.get("at").and_then(bson::Bson::as_i64_lossy).unwrap_or(0);
        let mut referenced = HashSet::new();
        let mut blobs = self
            .messages
            .find(doc! { "kind": Body::Blob(String::new()).kind() })
            .await?;
        while let Some(m) = blobs.try_next().await? {
            if let Some(meta) = Body::Blob(m.body).blob_meta() {
                referenced.insert(meta.key);
            }
        }
        // Newest write per key, over chunks and file entries.
        let mut newest: HashMap<String, i64> = HashMap::new();
        let mut files = self.files.find(doc! {}).await?;
        while let Some(f) = files.try_next().await? {
            if let Ok(key) = f.get_str("_id") {
                newest.insert(key.to_string(), at(&f));
            }
        }
        // Acknowledged, waiting for their download links to expire: not orphans.
        let mut acked = self
            .info
            .find(doc! { "acked_at": { "$exists": true } })
            .projection(doc! { "_id": 1 })
            .await?;
        while let Some(i) = acked.try_next().await? {
            if let Ok(key) = i.get_str("_id") {
                referenced.insert(key.to_string());
            }
        }
        let mut chunks = self
            .chunks
            .find(doc! {})
            .projection(doc! { "key": 1, "at": 1 })
            .await?;
        while let Some(c) = chunks.try_next().await? {
            if let Ok(key) = c.get_str("key") {
                let last = newest.entry(key.to_string()).or_insert(0);
                *last = (*last).max(at(&c));
            }
        }
        let mut removed = 0;
        for (key, last) in newest {
            if referenced.contains(&key) || last >= cutoff {
                continue;
            }
            // The file entry first, as in `blob_remove`.
            self.files.delete_one(doc! { "_id": &key }).await?;
            self.chunks.delete_many(doc! { "key": &key }).await?;
            self.info.delete_one(doc! { "_id": &key }).await?;
            removed += 1;
        }
        Ok(removed)
    }
}

fn chunk_id(key: &str, n: i64) -> String {
    format!("{key}:{n:010}")
}

trait LossyI64 {
    fn as_i64_lossy(&self) -> Option<i64>;
}

impl LossyI64 for bson::Bson {
    /// Integers of either width (the test server narrows small Int64 to Int32).
    fn as_i64_lossy(&self) -> Option<i64> {
        match self {
            bson::Bson::Int32(v) => Some(i64::from(*v)),
            bson::Bson::Int64(v) => Some(*v),
            bson::Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
            _ => None,
        }
    }
}

/// A blob on its way in: full chunks are written as they fill, the file entry last.
struct ChunkWriter {
    key: String,
    chunks: Collection<Document>,
    files: Collection<Document>,
    buf: Vec<u8>,
    n: i64,
    size: i64,
}

impl ChunkWriter {
    async fn flush_chunk(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = Binary {
            subtype: BinarySubtype::Generic,
            bytes: std::mem::take(&mut self.buf),
        };
        let chunk = doc! {
            "_id": chunk_id(&self.key, self.n),
            "key": &self.key,
            "n": self.n,
            "data": data,
            "at": crate::now_ms(),
        };
        self.chunks.insert_one(chunk).await.map_err(unavailable)?;
        self.n += 1;
        self.buf = Vec::with_capacity(BLOB_CHUNK);
        Ok(())
    }
}

#[async_trait]
impl BlobWrite for ChunkWriter {
    async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        while !data.is_empty() {
            let take = (BLOB_CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.size += take as i64;
            if self.buf.len() == BLOB_CHUNK {
                self.flush_chunk().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<(), StoreError> {
        self.flush_chunk().await?;
        let file =
            doc! { "_id": &self.key, "size": self.size, "chunks": self.n, "at": crate::now_ms() };
        self.files.insert_one(file).await.map_err(unavailable)?;
        Ok(())
    }

    async fn discard(self: Box<Self>) {
        if let Err(e) = self.chunks.delete_many(doc! { "key": &self.key }).await {
            tracing::warn!(key = %self.key, error = %e, "cannot delete a partial blob");
        }
    }
}

/// Reads a finished blob one chunk at a time.
struct ChunkReader {
    key: String,
    chunks_total: i64,
    coll: Collection<Document>,
    next: i64,
    current: Vec<u8>,
    pos: usize,
}

#[async_trait]
impl BlobRead for ChunkReader {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, StoreError> {
        if self.pos == self.current.len() {
            if self.next >= self.chunks_total {
                return Ok(0);
            }
            let chunk = self
                .coll
                .find_one(doc! { "_id": chunk_id(&self.key, self.next) })
                .await
                .map_err(unavailable)?
                .ok_or_else(|| {
                    StoreError::Backend(format!("blob {} lost chunk {}", self.key, self.next))
                })?;
            self.current = chunk
                .get_binary_generic("data")
                .map_err(|e| {
                    StoreError::Backend(format!("blob {} chunk {}: {e}", self.key, self.next))
                })?
                .clone();
            self.pos = 0;
            self.next += 1;
        }
        let n = (self.current.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `"majority"` or a node count, always journaled.
fn write_concern(spec: &str) -> Result<WriteConcern, String> {
    let w = match spec {
        "majority" => Acknowledgment::Majority,
        n => match n.parse::<u32>() {
            Ok(n) if n >= 1 => Acknowledgment::Nodes(n),
            _ => {
                return Err(format!(
                    "mongodb_write_concern must be \"majority\" or a number >= 1, not {spec:?}"
                ))
            }
        },
    };
    Ok(WriteConcern::builder()
        .w(w)
        .journal(true)
        .w_timeout(WRITE_CONCERN_TIMEOUT)
        .build())
}

/// The `_id` of a client id entry; the length prefix keeps any sender/id pair distinct.
fn client_key(sender: &str, client_id: &str) -> String {
    format!("{}:{sender}:{client_id}", sender.len())
}

fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

/// Duplicate key, told by code (never by message text or index name).
fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    error_code(e) == Some(DUPLICATE_KEY)
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(format!("mongodb: {e}"))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn ms(secs: u64) -> i64 {
    to_i64(secs).saturating_mul(1000)
}

/// The URI without its password, for error messages and logs.
fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_deserialize_from_any_width() {
        #[derive(Deserialize)]
        struct N {
            #[serde(deserialize_with = "de_i64")]
            n: i64,
        }
        for b in [
            bson::Bson::Int32(7),
            bson::Bson::Int64(7),
            bson::Bson::Double(7.0),
        ] {
            let n: N = bson::from_document(doc! { "n": b }).unwrap();
            assert_eq!(n.n, 7);
        }
        assert!(bson::from_document::<N>(doc! { "n": 7.5 }).is_err());
        assert!(bson::from_document::<N>(doc! { "n": "7" }).is_err());
    }

    #[test]
    fn uri_credentials_are_hidden() {
        assert_eq!(
            redact_uri("mongodb://u:secret@db1:27017,db2/?replicaSet=rs0"),
            "mongodb://***@db1:27017,db2/?replicaSet=rs0"
        );
        assert_eq!(redact_uri("mongodb://h:1/x"), "mongodb://h:1/x");
    }

    #[test]
    fn client_keys_do_not_collide() {
        assert_ne!(client_key("a:b", "c"), client_key("a", "b:c"));
    }

    #[test]
    fn write_concerns() {
        let wc = write_concern("majority").unwrap();
        assert_eq!(wc.w, Some(Acknowledgment::Majority));
        assert_eq!(wc.journal, Some(true));
        assert_eq!(
            write_concern("1").unwrap().w,
            Some(Acknowledgment::Nodes(1))
        );
        assert!(write_concern("0").is_err());
        assert!(write_concern("most").is_err());
    }
}
