//! The embedded default store: SQLite (bundled) in WAL mode, in `<data_dir>/pigeon.db`.
//!
//! One dedicated OS thread owns the connection. Requests arrive over a channel and are
//! executed in batches, one transaction per batch (group commit): under load many senders
//! share one commit. If any statement of a batch fails, the batch is rolled back and
//! replayed one request per transaction, so one failure never fails its neighbours and
//! no caller is told "stored" for a write that did not commit.
//!
//! Quotas: each message row carries the `bytes` it counts against quotas, and the
//! `usage` table keeps per sender the messages and bytes waiting (the row with the empty
//! name, which no user can have, holds the store's total). `enqueue` checks and updates
//! them in its write transaction; acks and the expiry sweep give their share back in
//! theirs, so the counts are exact across restarts and processes sharing the file.
//! With `offline_ttl_secs > 0` a timer thread asks the store thread to sweep expired
//! messages (and their blob files) every `sweep_every(ttl)`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::blob_files::BlobFiles;
use super::{
    AccountChange, BlobInfo, BlobRead, BlobWrite, Enqueued, LiveMessage, LiveSeqs, NewMessage,
    PutOutcome, Store, StoreError, StoreLimits, Usage,
};
use crate::config::StorageConfig;
use crate::message::{Body, StoredMessage};

/// Requests per transaction at most.
const MAX_BATCH: usize = 512;
/// Requests waiting for the store thread at most; callers wait beyond that.
const QUEUE: usize = 8192;
/// How often expired dedupe entries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The schema `SCHEMA` creates, kept in SQLite's `user_version`.
const SCHEMA_VERSION: i64 = 3;
/// The `usage` row that holds the store's total (no user name is empty).
const TOTAL: &str = "";

/// Messages live in a rowid table (bodies are appended, and only the small
/// `message_order` index entries are placed by key): with `WITHOUT ROWID`, every key
/// comparison against a row whose body spilled to overflow pages read those pages, which
/// made a large mailbox of 1 KiB messages slow down everybody's writes.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mailbox (
    recipient TEXT PRIMARY KEY,
    last_seq  INTEGER NOT NULL,
    pending   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message (
    recipient   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    sender      TEXT NOT NULL,
    client_id   TEXT,
    kind        INTEGER NOT NULL,
    body        TEXT NOT NULL,
    accepted_at INTEGER NOT NULL,
    bytes       INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS message_order ON message (recipient, seq);
CREATE TABLE IF NOT EXISTS client_id (
    sender      TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    accepted_at INTEGER NOT NULL,
    fingerprint INTEGER,
    PRIMARY KEY (sender, client_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS client_id_age ON client_id (accepted_at);
CREATE TABLE IF NOT EXISTS usage (
    sender   TEXT PRIMARY KEY,
    messages INTEGER NOT NULL,
    bytes    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account_changes (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    at   INTEGER NOT NULL
);
";

/// Version 0 (before `user_version` was set) kept messages `WITHOUT ROWID`: that table
/// is renamed before `SCHEMA` creates the current one, then copied over and dropped, in
/// one transaction with everything else.
const MIGRATE_0_TO_1_BEFORE: &str = "ALTER TABLE message RENAME TO message_v0;";
const MIGRATE_0_TO_1_AFTER: &str = "
INSERT INTO message (recipient, seq, sender, client_id, kind, body, accepted_at)
    SELECT recipient, seq, sender, client_id, kind, body, accepted_at FROM message_v0
    ORDER BY recipient, seq;
DROP TABLE message_v0;
";

/// Version 2 remembers each client id's message fingerprint (`id_conflict`); entries from
/// before have none and count as retries.
const MIGRATE_1_TO_2: &str = "ALTER TABLE client_id ADD COLUMN fingerprint INTEGER;";

/// Version 3 counts each message's bytes (text plus blob size) and keeps per-sender
/// usage; both are computed from the messages already stored.
const MIGRATE_2_TO_3_BEFORE: &str =
    "ALTER TABLE message ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;";
const MIGRATE_2_TO_3_AFTER: &str = "
UPDATE message SET bytes = length(CAST(body AS BLOB))
    + CASE WHEN kind = 2 THEN coalesce(json_extract(body, '$.size'), 0) ELSE 0 END;
DELETE FROM usage;
INSERT INTO usage (sender, messages, bytes)
    SELECT sender, count(*), sum(bytes) FROM message GROUP BY sender;
INSERT INTO usage (sender, messages, bytes)
    SELECT '', count(*), coalesce(sum(bytes), 0) FROM message;
";

/// How often expired messages are looked for: a tenth of the TTL, within 1 s..60 s.
fn sweep_every(ttl_ms: i64) -> Duration {
    Duration::from_millis((ttl_ms / 10).clamp(1_000, 60_000) as u64)
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Request {
    /// Several messages, stored in order in one transaction; one answer each.
    Enqueue(Vec<NewMessage>, Reply<Vec<Result<Enqueued, StoreError>>>),
    Fetch {
        recipient: String,
        after: u64,
        limit: usize,
        reply: Reply<Vec<StoredMessage>>,
    },
    Ack {
        recipient: String,
        /// Inclusive seq ranges to delete.
        ranges: Vec<(u64, u64)>,
        reply: Reply<u64>,
    },
    Pending {
        recipient: String,
        reply: Reply<u64>,
    },
    CreateUser {
        user: String,
        hash: String,
        reply: Reply<()>,
    },
    DeleteUser {
        user: String,
        reply: Reply<bool>,
    },
    SetHash {
        user: String,
        hash: String,
        reply: Reply<bool>,
    },
    GetHash {
        user: String,
        reply: Reply<Option<String>>,
    },
    AccountChanges {
        after: u64,
        limit: usize,
        reply: Reply<Vec<AccountChange>>,
    },
    ChangeCursor {
        reply: Reply<u64>,
    },
    LegacyUsers {
        limit: usize,
        reply: Reply<Vec<String>>,
    },
    Usage {
        sender: String,
        reply: Reply<(Usage, u64)>,
    },
    /// Delete expired messages (from the timer thread; nobody waits for an answer).
    Sweep,
    /// Messages with seqs their recipient's live session handed out (`LiveSeqs::put`).
    Put(Vec<LiveMessage>, Reply<PutOutcome>),
    /// The ownership requests of `LiveSeqs`; each runs in a transaction of its own, in
    /// order with the batches around it, so the owned set changes only after a commit.
    Claim {
        recipient: String,
        block: u64,
        reply: Reply<(u64, u64)>,
    },
    /// `base`: the claim they are for (a later claim wins over them).
    Reserve {
        recipient: String,
        base: u64,
        upto: u64,
        reply: Reply<()>,
    },
    Release {
        recipient: String,
        base: u64,
        last: u64,
        reply: Reply<()>,
    },
}

impl Request {
    fn is_ownership(&self) -> bool {
        matches!(
            self,
            Request::Claim { .. } | Request::Reserve { .. } | Request::Release { .. }
        )
    }
}

/// Handle to the store thread. Dropping the last handle stops the thread.
pub struct SqliteStore {
    tx: mpsc::Sender<Request>,
    blobs: BlobFiles,
    /// The data directory, where `check_writable` writes its probe.
    dir: PathBuf,
}

impl SqliteStore {
    pub fn open(cfg: &StorageConfig, mailbox_max: u64) -> Result<SqliteStore, StoreError> {
        Self::open_with(cfg, StoreLimits::mailbox_only(mailbox_max))
    }

    pub fn open_with(cfg: &StorageConfig, limits: StoreLimits) -> Result<SqliteStore, StoreError> {
        super::private_files::private_dir(&cfg.data_dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", cfg.data_dir.display()))
        })?;
        let path = cfg.data_dir.join("pigeon.db");
        for file in ["pigeon.db", "pigeon.db-wal", "pigeon.db-shm"] {
            let f = cfg.data_dir.join(file);
            let made = if file == "pigeon.db" {
                super::private_files::private_file(&f)
            } else {
                super::private_files::tighten(&f, 0o600)
            };
            made.map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", f.display()))
            })?;
        }
        let busy_timeout = Duration::from_millis(cfg.sqlite_busy_timeout_ms);
        let mut conn = open_connection(&path, &cfg.sqlite_synchronous, busy_timeout)?;
        prepare_schema(&mut conn, &path)?;
        let offline_ttl_ms = (cfg.offline_ttl_secs as i64).saturating_mul(1000);
        if offline_ttl_ms > 0 {
            // The sweep's range scan; only paid for while a TTL is set.
            conn.execute_batch("CREATE INDEX IF NOT EXISTS message_age ON message (accepted_at)")
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot index {}: {e}", path.display()))
                })?;
        }
        let blobs = BlobFiles::open(&cfg.data_dir, cfg.sqlite_synchronous == "full")?;
        let swept = blobs.sweep(&referenced_blobs(&conn)?);
        if swept > 0 {
            tracing::info!(
                files = swept,
                "removed unfinished or unreferenced blob files"
            );
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let worker = Worker {
            conn,
            blobs: blobs.clone(),
            limits,
            dedupe_window_ms: (cfg.dedupe_window_secs as i64).saturating_mul(1000),
            offline_ttl_ms,
            last_prune: Instant::now() - PRUNE_EVERY,
            owned: HashMap::new(),
        };
        // Checkpoints (copying the WAL into the database, with an fsync) run on a thread
        // of their own, so the store thread never stalls on them; SQLite's own
        // checkpoint at CHECKPOINT_SAFETY_PAGES stays as the bound if that thread lags.
        let checkpointer = open_connection(&path, &cfg.sqlite_synchronous, busy_timeout)?;
        let (alive, quit) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("pigeon-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpointer, &quit))
            .map_err(|e| StoreError::Unavailable(format!("cannot start checkpoint thread: {e}")))?;
        std::thread::Builder::new()
            .name("pigeon-sqlite".into())
            .spawn(move || {
                worker.run(rx);
                drop(alive); // stops the checkpointer
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start store thread: {e}")))?;
        if offline_ttl_ms > 0 {
            // A weak handle: the timer never keeps the store alive.
            let weak = tx.downgrade();
            let every = sweep_every(offline_ttl_ms);
            std::thread::Builder::new()
                .name("pigeon-expiry".into())
                .spawn(move || loop {
                    std::thread::sleep(every);
                    let Some(tx) = weak.upgrade() else { return };
                    if tx.blocking_send(Request::Sweep).is_err() {
                        return;
                    }
                })
                .map_err(|e| StoreError::Unavailable(format!("cannot start expiry thread: {e}")))?;
        }
        Ok(SqliteStore {
            tx,
            blobs,
            dir: cfg.data_dir.clone(),
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Unavailable("store thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("store thread stopped".into()))?
    }
}

fn open_connection(
    path: &PathBuf,
    synchronous: &str,
    busy_timeout: Duration,
) -> Result<Connection, StoreError> {
    let unavailable = |e: rusqlite::Error| {
        StoreError::Unavailable(format!("cannot open {}: {e}", path.display()))
    };
    // One thread owns the connection, so SQLite's own mutexes are pure overhead.
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(unavailable)?;
    conn.busy_timeout(busy_timeout).map_err(unavailable)?;
    switch_to_wal(&conn, busy_timeout).map_err(unavailable)?;
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(unavailable)?;
    conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_SAFETY_PAGES)
        .map_err(unavailable)?;
    Ok(conn)
}

/// Puts the database in WAL mode. The first switch of a fresh database takes an
/// exclusive lock, and SQLite answers a second process doing the same at that moment
/// with "database is locked" at once, without waiting in its busy handler (several
/// `pigeon user add` at once on a new data directory did): retry within `busy_timeout`.
fn switch_to_wal(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + busy_timeout;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Creates the tables, or brings an older database up to `SCHEMA_VERSION`, in one
/// transaction: a crash half-way leaves the old database as it was.
fn prepare_schema(conn: &mut Connection, path: &std::path::Path) -> Result<(), StoreError> {
    let failed = |e: rusqlite::Error| {
        StoreError::Unavailable(format!("cannot prepare {}: {e}", path.display()))
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(failed)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(failed)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Unavailable(format!(
            "{} has schema version {version}, newer than this Pigeon's {SCHEMA_VERSION}: \
             run a newer Pigeon, or point data_dir elsewhere",
            path.display()
        )));
    }
    let mut moving_messages = false;
    if version == 0 {
        let old_messages: Option<String> = tx
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'message'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(failed)?;
        if old_messages.is_some_and(|sql| sql.to_uppercase().contains("WITHOUT ROWID")) {
            tracing::info!(path = %path.display(), "moving messages to schema version 1");
            tx.execute_batch(MIGRATE_0_TO_1_BEFORE).map_err(failed)?;
            moving_messages = true;
        }
    }
    let old_client_ids = tx
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'client_id'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(failed)?
        > 0;
    if version < 2 && old_client_ids {
        tracing::info!(path = %path.display(), "adding message fingerprints (schema version 2)");
        tx.execute_batch(MIGRATE_1_TO_2).map_err(failed)?;
    }
    let message_without_bytes = !moving_messages
        && tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'message'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(failed)?
            > 0
        && tx
            .query_row(
                "SELECT count(*) FROM pragma_table_info('message') WHERE name = 'bytes'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(failed)?
            == 0;
    if message_without_bytes {
        tx.execute_batch(MIGRATE_2_TO_3_BEFORE).map_err(failed)?;
    }
    tx.execute_batch(SCHEMA).map_err(failed)?;
    if moving_messages {
        tx.execute_batch(MIGRATE_0_TO_1_AFTER).map_err(failed)?;
    }
    if version < 3 {
        tracing::info!(path = %path.display(), "counting stored bytes per sender (schema version 3)");
        tx.execute_batch(MIGRATE_2_TO_3_AFTER).map_err(failed)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(failed)?;
    tx.commit().map_err(failed)
}

/// Pages of WAL (4 KiB each) after which the committing thread checkpoints itself: only
/// reached when the checkpoint thread falls behind.
const CHECKPOINT_SAFETY_PAGES: i64 = 16_384;
/// How often the checkpoint thread copies the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Runs passive checkpoints (they never block the writer) until the store thread ends.
fn checkpoint_loop(conn: &Connection, quit: &std::sync::mpsc::Receiver<()>) {
    loop {
        let last = match quit.recv_timeout(CHECKPOINT_EVERY) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
            _ => true, // the store thread is gone: one last checkpoint
        };
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "background checkpoint did not run");
        }
        if last {
            return;
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn enqueue(&self, msg: NewMessage) -> Result<Enqueued, StoreError> {
        let mut answers = self
            .call(|reply| Request::Enqueue(vec![msg], reply))
            .await?;
        answers
            .pop()
            .unwrap_or_else(|| Err(StoreError::Backend("no answer".into())))
    }

    async fn enqueue_many(&self, msgs: Vec<NewMessage>) -> Vec<Result<Enqueued, StoreError>> {
        let n = msgs.len();
        match self.call(|reply| Request::Enqueue(msgs, reply)).await {
            Ok(answers) => answers,
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }

    async fn fetch(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let recipient = recipient.to_string();
        self.call(|reply| Request::Fetch {
            recipient,
            after,
            limit,
            reply,
        })
        .await
    }

    async fn ack_ranges(&self, recipient: &str, ranges: &[(u64, u64)]) -> Result<u64, StoreError> {
        if ranges.is_empty() {
            return Ok(0);
        }
        let recipient = recipient.to_string();
        let ranges = ranges.to_vec();
        self.call(|reply| Request::Ack {
            recipient,
            ranges,
            reply,
        })
        .await
    }

    async fn pending(&self, recipient: &str) -> Result<u64, StoreError> {
        let recipient = recipient.to_string();
        self.call(|reply| Request::Pending { recipient, reply })
            .await
    }

    fn live_seqs(&self) -> Option<&dyn LiveSeqs> {
        Some(self)
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    /// Writes, syncs and removes a 4 KiB probe file beside the database (a WAL page's
    /// worth): fails when the disk is full or the directory is read-only, as the next
    /// message would.
    async fn check_writable(&self) -> Result<(), StoreError> {
        let path = self.dir.join(".write-probe");
        let probe = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&probe)?;
            let done = f.write_all(&[0u8; 4096]).and_then(|()| f.sync_data());
            let _ = std::fs::remove_file(&probe);
            done
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        written.map_err(|e| {
            StoreError::Unavailable(format!("cannot write in {}: {e}", self.dir.display()))
        })
    }

    async fn blob_writer(&self, key: &str) -> Result<Box<dyn BlobWrite>, StoreError> {
        self.blobs.writer(key).await
    }

    async fn blob_reader(&self, key: &str) -> Result<Box<dyn BlobRead>, StoreError> {
        self.blobs.reader(key).await
    }

    async fn blob_remove(&self, key: &str) {
        let blobs = self.blobs.clone();
        let key = key.to_string();
        let _ = tokio::task::spawn_blocking(move || blobs.remove(&key)).await;
    }

    async fn blob_reader_at(
        &self,
        key: &str,
        offset: u64,
    ) -> Result<Box<dyn BlobRead>, StoreError> {
        self.blobs.reader_at(key, offset).await
    }

    async fn blob_set_info(&self, key: &str, info: &BlobInfo) -> Result<(), StoreError> {
        self.blobs.set_info(key, info).await
    }

    async fn blob_info(&self, key: &str) -> Result<Option<BlobInfo>, StoreError> {
        self.blobs.info(key).await
    }

    async fn blob_sweep_acked(&self, acked_before: i64) -> Result<usize, StoreError> {
        let blobs = self.blobs.clone();
        tokio::task::spawn_blocking(move || blobs.sweep_acked(acked_before))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    async fn create_user(&self, user: &str, password_hash: &str) -> Result<(), StoreError> {
        let (user, hash) = (user.to_string(), password_hash.to_string());
        self.call(|reply| Request::CreateUser { user, hash, reply })
            .await
    }

    async fn delete_user(&self, user: &str) -> Result<bool, StoreError> {
        let user = user.to_string();
        self.call(|reply| Request::DeleteUser { user, reply }).await
    }

    async fn set_password_hash(&self, user: &str, password_hash: &str) -> Result<bool, StoreError> {
        let (user, hash) = (user.to_string(), password_hash.to_string());
        self.call(|reply| Request::SetHash { user, hash, reply })
            .await
    }

    async fn password_hash(&self, user: &str) -> Result<Option<String>, StoreError> {
        let user = user.to_string();
        self.call(|reply| Request::GetHash { user, reply }).await
    }

    async fn account_changes(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AccountChange>, StoreError> {
        self.call(|reply| Request::AccountChanges {
            after,
            limit,
            reply,
        })
        .await
    }

    async fn account_change_cursor(&self) -> Result<u64, StoreError> {
        self.call(|reply| Request::ChangeCursor { reply }).await
    }

    async fn legacy_user_names(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        self.call(|reply| Request::LegacyUsers { limit, reply })
            .await
    }

    async fn usage(&self, sender: &str) -> Result<(Usage, u64), StoreError> {
        let sender = sender.to_string();
        self.call(|reply| Request::Usage { sender, reply }).await
    }
}

/// Keys of the blobs the mailbox still refers to.
#[async_trait]
impl LiveSeqs for SqliteStore {
    async fn claim(&self, recipient: &str, block: u64) -> Result<(u64, u64), StoreError> {
        let recipient = recipient.to_string();
        self.call(|reply| Request::Claim {
            recipient,
            block,
            reply,
        })
        .await
    }

    async fn reserve(&self, recipient: &str, base: u64, upto: u64) -> Result<(), StoreError> {
        let recipient = recipient.to_string();
        self.call(|reply| Request::Reserve {
            recipient,
            base,
            upto,
            reply,
        })
        .await
    }

    async fn release(&self, recipient: &str, base: u64, last: u64) {
        let recipient = recipient.to_string();
        let released = self
            .call(|reply| Request::Release {
                recipient: recipient.clone(),
                base,
                last,
                reply,
            })
            .await;
        if let Err(e) = released {
            // The reservation stays: the next seq leaves a gap, none is reused.
            tracing::warn!(user = %crate::escape::Escaped(&recipient), error = %e, "handing back the reserved seqs failed");
        }
    }

    async fn put(&self, msgs: Vec<LiveMessage>) -> PutOutcome {
        let n = msgs.len();
        match self.call(|reply| Request::Put(msgs, reply)).await {
            Ok(out) => out,
            Err(e) => PutOutcome {
                answers: (0..n).map(|_| Err(e.clone())).collect(),
                over_quota: Vec::new(),
            },
        }
    }
}

fn referenced_blobs(conn: &Connection) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT body FROM message WHERE kind = 2")
        .map_err(sql)?;
    let bodies = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)?;
    Ok(bodies
        .into_iter()
        .filter_map(|b| Body::Blob(b).blob_meta().map(|m| m.key))
        .collect())
}

struct Worker {
    conn: Connection,
    blobs: BlobFiles,
    limits: StoreLimits,
    dedupe_window_ms: i64,
    offline_ttl_ms: i64,
    last_prune: Instant,
    /// Mailboxes whose seqs a live session hands out (`LiveSeqs::claim`): `enqueue`
    /// refuses them with `StoreError::Owned`, and `put` a message not yet routed whose
    /// seq is not the current owner's (at most the last seq before its claim: handed out
    /// by a session that ended). In memory only: after a crash nobody owns.
    owned: HashMap<String, u64>,
}

/// A request's answer, held until its transaction commits.
enum Answer {
    Enqueue(Result<Vec<Result<Enqueued, StoreError>>, StoreError>),
    Put(Result<PutOutcome, StoreError>),
    Fetch(Result<Vec<StoredMessage>, StoreError>),
    Count(Result<u64, StoreError>),
    Unit(Result<(), StoreError>),
    Flag(Result<bool, StoreError>),
    Hash(Result<Option<String>, StoreError>),
    Changes(Result<Vec<AccountChange>, StoreError>),
    Names(Result<Vec<String>, StoreError>),
    Usage(Result<(Usage, u64), StoreError>),
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut carried: Option<Request> = None;
        loop {
            let first = match carried.take() {
                Some(r) => r,
                None => match rx.blocking_recv() {
                    Some(r) => r,
                    None => break,
                },
            };
            if first.is_ownership() {
                self.ownership(first);
                continue;
            }
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) if r.is_ownership() => {
                        carried = Some(r);
                        break;
                    }
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let before = batch.len();
            batch.retain(|r| !matches!(r, Request::Sweep));
            let sweep = batch.len() < before;
            if !batch.is_empty() {
                self.run_batch(&mut batch);
            }
            if sweep {
                self.sweep_expired();
            }
            self.prune_if_due();
        }
    }

    /// Runs one ownership request in a transaction of its own; the owned set changes
    /// once it committed (a release always ends the ownership).
    fn ownership(&mut self, req: Request) {
        match req {
            Request::Claim {
                recipient,
                block,
                reply,
            } => {
                let claimed = self.own_tx(|tx| {
                    let (base, held) = mailbox_row(tx, &recipient)?;
                    set_last_seq(tx, &recipient, base.saturating_add(block))?;
                    Ok((base, held))
                });
                if let Ok((base, _)) = &claimed {
                    self.owned.insert(recipient, *base);
                }
                let _ = reply.send(claimed);
            }
            Request::Reserve {
                recipient,
                base,
                upto,
                reply,
            } => {
                if self.owned.get(&recipient) != Some(&base) {
                    let _ = reply.send(Err(StoreError::Owned { recipient }));
                    return;
                }
                let _ = reply.send(self.own_tx(|tx| {
                    let (last, _) = mailbox_row(tx, &recipient)?;
                    set_last_seq(tx, &recipient, last.max(upto))
                }));
            }
            Request::Release {
                recipient,
                base,
                last,
                reply,
            } => {
                // A session that ended after the next one claimed (a take-over that
                // stopped waiting for it) must not undo that claim.
                if self.owned.get(&recipient) != Some(&base) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                self.owned.remove(&recipient);
                let _ = reply.send(self.own_tx(|tx| set_last_seq(tx, &recipient, last)));
            }
            other => fail_request(
                other,
                StoreError::Backend("not an ownership request".into()),
            ),
        }
    }

    /// Runs `f` in a write transaction of its own and commits it.
    fn own_tx<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        let out = f(&tx)?;
        tx.commit().map_err(sql)?;
        Ok(out)
    }

    /// Runs `batch` in one transaction; on an SQL error inside it, rolls back and runs
    /// each request in a transaction of its own. When the transaction cannot even begin
    /// (another connection holds the lock past the busy timeout, the file cannot be
    /// written), every request would fail the same way, each after its own busy timeout:
    /// the whole batch fails at once instead.
    fn run_batch(&mut self, batch: &mut Vec<Request>) {
        match self.transaction(batch) {
            Ok(answers) => {
                for (req, answer) in batch.drain(..).zip(answers) {
                    answer_request(req, answer);
                }
            }
            Err(TxError::Begin(e)) => {
                for req in batch.drain(..) {
                    fail_request(req, clone_err(&e));
                }
            }
            Err(_) if batch.len() > 1 => {
                let mut cannot_begin: Option<StoreError> = None;
                for req in batch.drain(..) {
                    if let Some(e) = &cannot_begin {
                        fail_request(req, clone_err(e));
                        continue;
                    }
                    let one = [req];
                    match self.transaction(&one) {
                        Ok(mut answers) => {
                            let [req] = one;
                            if let Some(a) = answers.pop() {
                                answer_request(req, a);
                            }
                        }
                        Err(TxError::Begin(e)) => {
                            let [req] = one;
                            fail_request(req, clone_err(&e));
                            cannot_begin = Some(e);
                        }
                        Err(TxError::Statement(e)) => {
                            let [req] = one;
                            fail_request(req, e);
                        }
                    }
                }
            }
            Err(TxError::Statement(e)) => {
                for req in batch.drain(..) {
                    fail_request(req, clone_err(&e));
                }
            }
        }
    }

    fn transaction(&mut self, batch: &[Request]) -> Result<Vec<Answer>, TxError> {
        // IMMEDIATE: take the write lock up front (waiting up to busy_timeout). A deferred
        // transaction that reads and then writes fails at once with "database is locked"
        // when another connection (another process on the same file) wrote meanwhile.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| TxError::Begin(sql(e)))?;
        let (answers, dead_blobs) =
            run_requests(&tx, batch, &self.limits, self.dedupe_window_ms, &self.owned)
                .map_err(TxError::Statement)?;
        tx.commit().map_err(|e| TxError::Statement(sql(e)))?;
        let now = crate::now_ms();
        for key in dead_blobs {
            self.blobs.retire(&key, now);
        }
        Ok(answers)
    }

    /// Deletes the messages older than the TTL, gives their mailbox slots and quota back,
    /// and removes their blob files once that committed.
    fn sweep_expired(&mut self) {
        let cutoff = crate::now_ms().saturating_sub(self.offline_ttl_ms);
        let swept = (|| -> Result<(usize, Vec<String>), StoreError> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(sql)?;
            let per_recipient: Vec<(String, i64)> = tx
                .prepare_cached(
                    "SELECT recipient, count(*) FROM message WHERE accepted_at < ?1
                     GROUP BY recipient",
                )
                .and_then(|mut s| {
                    s.query_map(params![cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect()
                })
                .map_err(sql)?;
            if per_recipient.is_empty() {
                return Ok((0, Vec::new()));
            }
            let freed = freed_usage(&tx, "accepted_at < ?1", params![cutoff])?;
            let bodies: Vec<String> = tx
                .prepare_cached("SELECT body FROM message WHERE accepted_at < ?1 AND kind = 2")
                .and_then(|mut s| s.query_map(params![cutoff], |r| r.get(0))?.collect())
                .map_err(sql)?;
            let deleted = tx
                .prepare_cached("DELETE FROM message WHERE accepted_at < ?1")
                .and_then(|mut s| s.execute(params![cutoff]))
                .map_err(sql)?;
            for (recipient, n) in &per_recipient {
                tx.prepare_cached("UPDATE mailbox SET pending = pending - ?2 WHERE recipient = ?1")
                    .and_then(|mut s| s.execute(params![recipient, n]))
                    .map_err(sql)?;
            }
            release_usage(&tx, &freed)?;
            tx.commit().map_err(sql)?;
            let keys = bodies
                .into_iter()
                .filter_map(|b| Body::Blob(b).blob_meta().map(|m| m.key))
                .collect();
            Ok((deleted, keys))
        })();
        match swept {
            Ok((0, _)) => {}
            Ok((n, keys)) => {
                for key in &keys {
                    self.blobs.remove(key);
                }
                tracing::info!(messages = n, blobs = keys.len(), "deleted expired messages");
            }
            Err(e) => tracing::warn!(error = %e, "deleting expired messages failed"),
        }
    }

    fn prune_if_due(&mut self) {
        if self.last_prune.elapsed() < PRUNE_EVERY {
            return;
        }
        self.last_prune = Instant::now();
        let cutoff = crate::now_ms() - self.dedupe_window_ms;
        if let Err(e) = self.conn.execute(
            "DELETE FROM client_id WHERE accepted_at < ?1",
            params![cutoff],
        ) {
            tracing::warn!(error = %e, "pruning old client ids failed");
        }
        let cutoff = crate::now_ms() - super::ACCOUNT_CHANGE_KEEP_MS;
        if let Err(e) = self
            .conn
            .execute("DELETE FROM account_changes WHERE at < ?1", params![cutoff])
        {
            tracing::warn!(error = %e, "pruning old account changes failed");
        }
    }
}

/// Runs every request of a batch inside `tx`; returns the answers and the blobs whose
/// messages were acknowledged (to delete once the transaction commits).
fn run_requests(
    tx: &rusqlite::Transaction<'_>,
    batch: &[Request],
    limits: &StoreLimits,
    dedupe_window_ms: i64,
    owned: &HashMap<String, u64>,
) -> Result<(Vec<Answer>, Vec<String>), StoreError> {
    let mut answers = Vec::with_capacity(batch.len());
    let mut dead_blobs = Vec::new();
    for req in batch {
        let answer = match req {
            Request::Put(msgs, _) => {
                let mut out = PutOutcome::default();
                for m in msgs {
                    let recipient = &m.msg.recipient;
                    let current = owned.get(recipient).is_some_and(|base| m.msg.seq > *base);
                    if m.refusable && !current {
                        // Its session ended before it was written: the caller routes it
                        // again, under a seq of the mailbox's new owner or the store's.
                        out.answers.push(Err(StoreError::Owned {
                            recipient: recipient.clone(),
                        }));
                        continue;
                    }
                    match put(tx, m, limits, dedupe_window_ms) {
                        Err(
                            e @ (StoreError::IdConflict { .. }
                            | StoreError::QuotaExceeded { .. }
                            | StoreError::StoreFull { .. }),
                        ) => out.answers.push(Err(e)),
                        Ok((done, over)) => {
                            if over && !out.over_quota.contains(&m.msg.sender) {
                                out.over_quota.push(m.msg.sender.clone());
                            }
                            out.answers.push(Ok(done));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Answer::Put(Ok(out))
            }
            Request::Enqueue(msgs, _) => {
                let mut each = Vec::with_capacity(msgs.len());
                for msg in msgs {
                    if owned.contains_key(&msg.recipient) {
                        each.push(Err(StoreError::Owned {
                            recipient: msg.recipient.clone(),
                        }));
                        continue;
                    }
                    match enqueue(tx, msg, limits, dedupe_window_ms) {
                        // A refusal is an answer, not a failed transaction.
                        Err(
                            e @ (StoreError::MailboxFull { .. }
                            | StoreError::IdConflict { .. }
                            | StoreError::NoSuchUser { .. }
                            | StoreError::QuotaExceeded { .. }
                            | StoreError::StoreFull { .. }),
                        ) => each.push(Err(e)),
                        other => each.push(Ok(other?)),
                    }
                }
                Answer::Enqueue(Ok(each))
            }
            Request::Fetch {
                recipient,
                after,
                limit,
                ..
            } => Answer::Fetch(Ok(fetch(tx, recipient, *after, *limit)?)),
            Request::Ack {
                recipient, ranges, ..
            } => {
                let mut deleted = 0;
                for &(lo, hi) in ranges {
                    deleted += ack(tx, recipient, lo, hi, &mut dead_blobs)?;
                }
                Answer::Count(Ok(deleted))
            }
            Request::Pending { recipient, .. } => Answer::Count(Ok(pending(tx, recipient)?)),
            Request::CreateUser { user, hash, .. } => {
                match create_user(tx, user, hash) {
                    // A taken name is an answer, not a failed transaction.
                    Err(e @ StoreError::UserExists(_)) => Answer::Unit(Err(e)),
                    other => Answer::Unit(Ok(other?)),
                }
            }
            Request::DeleteUser { user, .. } => {
                Answer::Flag(Ok(delete_user(tx, user, &mut dead_blobs)?))
            }
            Request::SetHash { user, hash, .. } => {
                let changed = tx
                    .prepare_cached("UPDATE users SET password_hash = ?2 WHERE name = ?1")
                    .and_then(|mut s| s.execute(params![user, hash]))
                    .map_err(sql)?
                    > 0;
                if changed {
                    record_change(tx, user)?;
                }
                Answer::Flag(Ok(changed))
            }
            Request::AccountChanges { after, limit, .. } => {
                Answer::Changes(Ok(account_changes(tx, *after, *limit)?))
            }
            Request::ChangeCursor { .. } => Answer::Count(Ok(tx
                .prepare_cached("SELECT coalesce(max(seq), 0) FROM account_changes")
                .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
                .map_err(sql)?
                .max(0) as u64)),
            Request::LegacyUsers { limit, .. } => Answer::Names(Ok(legacy_user_names(tx, *limit)?)),
            Request::GetHash { user, .. } => Answer::Hash(Ok(tx
                .prepare_cached("SELECT password_hash FROM users WHERE name = ?1")
                .and_then(|mut s| s.query_row(params![user], |r| r.get(0)).optional())
                .map_err(sql)?)),
            Request::Usage { sender, .. } => {
                let (mine, total) = (usage_of(tx, sender)?, usage_of(tx, TOTAL)?);
                Answer::Usage(Ok((mine, total.bytes)))
            }
            // Taken out of every batch before it runs (`Worker::run`).
            Request::Sweep
            | Request::Claim { .. }
            | Request::Reserve { .. }
            | Request::Release { .. } => Answer::Unit(Ok(())),
        };
        answers.push(answer);
    }
    Ok((answers, dead_blobs))
}

/// Why a batch's transaction failed.
enum TxError {
    /// It could not begin: every request would fail the same way.
    Begin(StoreError),
    /// A statement or the commit failed: requests may succeed on their own.
    Statement(StoreError),
}

fn sql(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn clone_err(e: &StoreError) -> StoreError {
    e.clone()
}

fn answer_request(req: Request, answer: Answer) {
    // A caller that went away no longer needs its answer; ignoring the send is right.
    match (req, answer) {
        (Request::Enqueue(_, reply), Answer::Enqueue(a)) => {
            let _ = reply.send(a);
        }
        (Request::Put(_, reply), Answer::Put(a)) => {
            let _ = reply.send(a);
        }
        (Request::Fetch { reply, .. }, Answer::Fetch(a)) => {
            let _ = reply.send(a);
        }
        (Request::Ack { reply, .. }, Answer::Count(a))
        | (Request::Pending { reply, .. }, Answer::Count(a))
        | (Request::ChangeCursor { reply }, Answer::Count(a)) => {
            let _ = reply.send(a);
        }
        (Request::AccountChanges { reply, .. }, Answer::Changes(a)) => {
            let _ = reply.send(a);
        }
        (Request::LegacyUsers { reply, .. }, Answer::Names(a)) => {
            let _ = reply.send(a);
        }
        (Request::CreateUser { reply, .. }, Answer::Unit(a)) => {
            let _ = reply.send(a);
        }
        (Request::DeleteUser { reply, .. }, Answer::Flag(a))
        | (Request::SetHash { reply, .. }, Answer::Flag(a)) => {
            let _ = reply.send(a);
        }
        (Request::GetHash { reply, .. }, Answer::Hash(a)) => {
            let _ = reply.send(a);
        }
        (Request::Usage { reply, .. }, Answer::Usage(a)) => {
            let _ = reply.send(a);
        }
        (Request::Sweep, _) => {}
        (req, _) => fail_request(req, StoreError::Backend("mismatched answer".into())),
    }
}

fn fail_request(req: Request, e: StoreError) {
    match req {
        Request::Enqueue(_, reply) => {
            let _ = reply.send(Err(e));
        }
        Request::Put(_, reply) => {
            let _ = reply.send(Err(e));
        }
        Request::Claim { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Reserve { reply, .. } | Request::Release { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Fetch { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Ack { reply, .. }
        | Request::Pending { reply, .. }
        | Request::ChangeCursor { reply } => {
            let _ = reply.send(Err(e));
        }
        Request::AccountChanges { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::LegacyUsers { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::CreateUser { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::DeleteUser { reply, .. } | Request::SetHash { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::GetHash { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Usage { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Request::Sweep => {}
    }
}

fn create_user(tx: &rusqlite::Transaction<'_>, user: &str, hash: &str) -> Result<(), StoreError> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO users (name, password_hash, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![user, hash, crate::now_ms()]))
        .map_err(sql)?;
    if inserted == 0 {
        return Err(StoreError::UserExists(user.to_string()));
    }
    Ok(())
}

/// Deletes the account `user` with its mailbox and its client ids (the blob keys of its
/// messages go to `dead_blobs`), and records the change. False: there was no account.
fn delete_user(
    tx: &rusqlite::Transaction<'_>,
    user: &str,
    dead_blobs: &mut Vec<String>,
) -> Result<bool, StoreError> {
    let deleted = tx
        .prepare_cached("DELETE FROM users WHERE name = ?1")
        .and_then(|mut s| s.execute(params![user]))
        .map_err(sql)?;
    if deleted == 0 {
        return Ok(false);
    }
    ack(tx, user, 0, i64::MAX as u64, dead_blobs)?;
    // `ack` lowered `pending` by what it deleted; the row (and its last_seq) stays so a
    // new account under this name never sees a seq again.
    tx.prepare_cached("UPDATE mailbox SET pending = 0 WHERE recipient = ?1")
        .and_then(|mut s| s.execute(params![user]))
        .map_err(sql)?;
    tx.prepare_cached("DELETE FROM client_id WHERE sender = ?1")
        .and_then(|mut s| s.execute(params![user]))
        .map_err(sql)?;
    record_change(tx, user)?;
    Ok(true)
}

/// Appends `user` to the account change feed.
fn record_change(tx: &rusqlite::Transaction<'_>, user: &str) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO account_changes (name, at) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![user, crate::now_ms()]))
        .map_err(sql)?;
    Ok(())
}

fn account_changes(
    tx: &rusqlite::Transaction<'_>,
    after: u64,
    limit: usize,
) -> Result<Vec<AccountChange>, StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT seq, name FROM account_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .map_err(sql)?;
    let rows = stmt
        .query_map(params![to_i64(after), to_i64(limit as u64)], |r| {
            Ok(AccountChange {
                seq: r.get::<_, i64>(0)?.max(0) as u64,
                user: r.get(1)?,
            })
        })
        .map_err(sql)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql)
}

/// Account names outside the canonical alphabet or longer than 32 characters.
fn legacy_user_names(
    tx: &rusqlite::Transaction<'_>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT name FROM users WHERE name GLOB '*[^a-z0-9_.-]*' OR length(name) > ?1
             ORDER BY name LIMIT ?2",
        )
        .map_err(sql)?;
    let rows = stmt
        .query_map(
            params![
                crate::names::MAX_USERNAME_CHARS as i64,
                to_i64(limit as u64)
            ],
            |r| r.get::<_, String>(0),
        )
        .map_err(sql)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What `sender` has waiting (`TOTAL`: the whole store).
fn usage_of(tx: &rusqlite::Transaction<'_>, sender: &str) -> Result<Usage, StoreError> {
    let row: Option<(i64, i64)> = tx
        .prepare_cached("SELECT messages, bytes FROM usage WHERE sender = ?1")
        .and_then(|mut s| {
            s.query_row(params![sender], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(sql)?;
    let (messages, bytes) = row.unwrap_or((0, 0));
    Ok(Usage {
        messages: messages.max(0) as u64,
        bytes: bytes.max(0) as u64,
    })
}

/// Adds `messages` and `bytes` (negative: gives back) to `sender`'s usage.
fn add_usage(
    tx: &rusqlite::Transaction<'_>,
    sender: &str,
    messages: i64,
    bytes: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO usage (sender, messages, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (sender) DO UPDATE SET messages = messages + ?2, bytes = bytes + ?3",
    )
    .and_then(|mut s| s.execute(params![sender, messages, bytes]))
    .map_err(sql)?;
    Ok(())
}

/// Per sender, the messages and bytes of the rows `condition` selects (before they are
/// deleted).
fn freed_usage(
    tx: &rusqlite::Transaction<'_>,
    condition: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<(String, i64, i64)>, StoreError> {
    tx.prepare_cached(&format!(
        "SELECT sender, count(*), sum(bytes) FROM message WHERE {condition} GROUP BY sender"
    ))
    .and_then(|mut s| {
        s.query_map(args, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect()
    })
    .map_err(sql)
}

/// Gives `freed` back to its senders and to the store's total.
fn release_usage(
    tx: &rusqlite::Transaction<'_>,
    freed: &[(String, i64, i64)],
) -> Result<(), StoreError> {
    let (mut messages, mut bytes) = (0, 0);
    for (sender, m, b) in freed {
        add_usage(tx, sender, -m, -b)?;
        messages += m;
        bytes += b;
    }
    if messages > 0 {
        add_usage(tx, TOTAL, -messages, -bytes)?;
    }
    Ok(())
}

/// The seq and fingerprint remembered for `(sender, id)` since `since` (Unix ms).
fn seen_client_id(
    tx: &rusqlite::Transaction<'_>,
    sender: &str,
    id: &str,
    since: i64,
) -> Result<Option<(i64, Option<i64>)>, StoreError> {
    tx.prepare_cached(
        "SELECT seq, fingerprint FROM client_id
         WHERE sender = ?1 AND client_id = ?2 AND accepted_at >= ?3",
    )
    .and_then(|mut s| {
        s.query_row(params![sender, id, since], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    })
    .map_err(sql)
}

/// Remembers `(sender, id)` as the message stored under `seq` (retries are recognised).
fn remember_client_id(
    tx: &rusqlite::Transaction<'_>,
    sender: &str,
    id: &str,
    seq: i64,
    accepted_at: i64,
    fingerprint: Option<i64>,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO client_id (sender, client_id, seq, accepted_at, fingerprint)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| s.execute(params![sender, id, seq, accepted_at, fingerprint]))
    .map_err(sql)?;
    Ok(())
}

fn enqueue(
    tx: &rusqlite::Transaction<'_>,
    msg: &NewMessage,
    limits: &StoreLimits,
    dedupe_window_ms: i64,
) -> Result<Enqueued, StoreError> {
    let mailbox_max = limits.mailbox_max;
    if let Some(id) = &msg.client_id {
        let seen = seen_client_id(tx, &msg.sender, id, msg.accepted_at - dedupe_window_ms)?;
        if let Some((seq, fingerprint)) = seen {
            super::check_retry(msg, fingerprint)?;
            return Ok(Enqueued::Duplicate { seq: seq as u64 });
        }
    }
    let mailbox: Option<(i64, i64)> = tx
        .prepare_cached("SELECT last_seq, pending FROM mailbox WHERE recipient = ?1")
        .and_then(|mut s| {
            s.query_row(params![msg.recipient], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(sql)?;
    let (last_seq, held) = mailbox.unwrap_or((0, 0));
    if limits.recipients_need_account {
        // Every time, not only for a new mailbox: an account deleted since still has one.
        let exists = tx
            .prepare_cached("SELECT 1 FROM users WHERE name = ?1")
            .and_then(|mut s| s.exists(params![msg.recipient]))
            .map_err(sql)?;
        if !exists {
            return Err(StoreError::NoSuchUser {
                user: msg.recipient.clone(),
            });
        }
    }
    if held as u64 >= mailbox_max {
        return Err(StoreError::MailboxFull {
            recipient: msg.recipient.clone(),
            limit: mailbox_max,
        });
    }
    let bytes = msg.body.stored_bytes();
    if limits.quotas() {
        let (mine, total) = (usage_of(tx, &msg.sender)?, usage_of(tx, TOTAL)?);
        limits.check(&msg.sender, mine, total.bytes, bytes)?;
    }
    add_usage(tx, &msg.sender, 1, to_i64(bytes))?;
    add_usage(tx, TOTAL, 1, to_i64(bytes))?;
    // Inside the write transaction nobody else can move last_seq between the read above
    // and this write. (A plain UPDATE/INSERT: `RETURNING` costs a temporary table a row.)
    let seq = last_seq + 1;
    let sql_text = if mailbox.is_some() {
        "UPDATE mailbox SET last_seq = ?2, pending = pending + 1 WHERE recipient = ?1"
    } else {
        "INSERT INTO mailbox (recipient, last_seq, pending) VALUES (?1, ?2, 1)"
    };
    tx.prepare_cached(sql_text)
        .and_then(|mut s| s.execute(params![msg.recipient, seq]))
        .map_err(sql)?;
    tx.prepare_cached(
        "INSERT INTO message (recipient, seq, sender, client_id, kind, body, accepted_at, bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            msg.recipient,
            seq,
            msg.sender,
            msg.client_id,
            msg.body.kind(),
            msg.body.as_str(),
            msg.accepted_at,
            to_i64(bytes)
        ])
    })
    .map_err(sql)?;
    if let Some(id) = &msg.client_id {
        remember_client_id(tx, &msg.sender, id, seq, msg.accepted_at, msg.fingerprint())?;
    }
    Ok(Enqueued::New { seq: seq as u64 })
}

/// The recipient's (last_seq, pending), zeros when it has no mailbox row yet.
fn mailbox_row(tx: &rusqlite::Transaction<'_>, recipient: &str) -> Result<(u64, u64), StoreError> {
    let row: Option<(i64, i64)> = tx
        .prepare_cached("SELECT last_seq, pending FROM mailbox WHERE recipient = ?1")
        .and_then(|mut s| {
            s.query_row(params![recipient], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(sql)?;
    let (last, held) = row.unwrap_or((0, 0));
    Ok((last.max(0) as u64, held.max(0) as u64))
}

fn set_last_seq(
    tx: &rusqlite::Transaction<'_>,
    recipient: &str,
    last: u64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO mailbox (recipient, last_seq, pending) VALUES (?1, ?2, 0)
         ON CONFLICT (recipient) DO UPDATE SET last_seq = ?2",
    )
    .and_then(|mut s| s.execute(params![recipient, to_i64(last)]))
    .map_err(sql)?;
    Ok(())
}

/// Stores a message under the seq its live session gave it (`LiveSeqs::put`). Written
/// twice (a session's end and a write-behind batch both had it) it is stored once.
/// The flag: stored although it passes a quota (not `refusable`).
fn put(
    tx: &rusqlite::Transaction<'_>,
    live: &LiveMessage,
    limits: &StoreLimits,
    dedupe_window_ms: i64,
) -> Result<(Enqueued, bool), StoreError> {
    let msg = &live.msg;
    if let Some(id) = &msg.client_id {
        let seen = seen_client_id(tx, &msg.sender, id, msg.accepted_at - dedupe_window_ms)?;
        if let Some((seq, fingerprint)) = seen {
            super::check_fingerprint(Some(id), live.fingerprint, fingerprint)?;
            return Ok((Enqueued::Duplicate { seq: seq as u64 }, false));
        }
    }
    let bytes = msg.body.stored_bytes();
    let mut over = false;
    if limits.quotas() {
        let (mine, total) = (usage_of(tx, &msg.sender)?, usage_of(tx, TOTAL)?);
        if let Err(e) = limits.check(&msg.sender, mine, total.bytes, bytes) {
            if live.refusable {
                return Err(e);
            }
            over = true;
        }
    }
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO message
             (recipient, seq, sender, client_id, kind, body, accepted_at, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .and_then(|mut s| {
            s.execute(params![
                msg.recipient,
                to_i64(msg.seq),
                msg.sender,
                msg.client_id,
                msg.body.kind(),
                msg.body.as_str(),
                msg.accepted_at,
                to_i64(bytes)
            ])
        })
        .map_err(sql)?;
    if inserted == 0 {
        return Ok((Enqueued::New { seq: msg.seq }, false));
    }
    add_usage(tx, &msg.sender, 1, to_i64(bytes))?;
    add_usage(tx, TOTAL, 1, to_i64(bytes))?;
    tx.prepare_cached(
        "INSERT INTO mailbox (recipient, last_seq, pending) VALUES (?1, ?2, 1)
         ON CONFLICT (recipient) DO UPDATE SET pending = pending + 1,
             last_seq = max(last_seq, ?2)",
    )
    .and_then(|mut s| s.execute(params![msg.recipient, to_i64(msg.seq)]))
    .map_err(sql)?;
    if let Some(id) = &msg.client_id {
        let seq = to_i64(msg.seq);
        remember_client_id(tx, &msg.sender, id, seq, msg.accepted_at, live.fingerprint)?;
    }
    Ok((Enqueued::New { seq: msg.seq }, over))
}

fn fetch(
    tx: &rusqlite::Transaction<'_>,
    recipient: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT seq, sender, client_id, kind, body, accepted_at FROM message
             WHERE recipient = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .map_err(sql)?;
    let rows = stmt
        .query_map(
            params![recipient, to_i64(after), to_i64(limit as u64)],
            |r| {
                Ok(StoredMessage {
                    seq: r.get::<_, i64>(0)? as u64,
                    sender: r.get(1)?,
                    recipient: recipient.to_string(),
                    client_id: r.get(2)?,
                    body: Body::from_parts(r.get(3)?, r.get(4)?),
                    accepted_at: r.get(5)?,
                })
            },
        )
        .map_err(sql)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql)
}

fn ack(
    tx: &rusqlite::Transaction<'_>,
    recipient: &str,
    lo: u64,
    hi: u64,
    dead_blobs: &mut Vec<String>,
) -> Result<u64, StoreError> {
    let mut blobs = tx
        .prepare_cached(
            "SELECT body FROM message WHERE recipient = ?1 AND seq BETWEEN ?2 AND ?3 AND kind = 2",
        )
        .map_err(sql)?;
    let bodies = blobs
        .query_map(params![recipient, to_i64(lo), to_i64(hi)], |r| {
            r.get::<_, String>(0)
        })
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)?;
    dead_blobs.extend(
        bodies
            .into_iter()
            .filter_map(|b| Body::Blob(b).blob_meta().map(|m| m.key)),
    );
    let freed = freed_usage(
        tx,
        "recipient = ?1 AND seq BETWEEN ?2 AND ?3",
        params![recipient, to_i64(lo), to_i64(hi)],
    )?;
    let deleted = tx
        .prepare_cached("DELETE FROM message WHERE recipient = ?1 AND seq BETWEEN ?2 AND ?3")
        .and_then(|mut s| s.execute(params![recipient, to_i64(lo), to_i64(hi)]))
        .map_err(sql)?;
    release_usage(tx, &freed)?;
    if deleted > 0 {
        tx.prepare_cached("UPDATE mailbox SET pending = pending - ?2 WHERE recipient = ?1")
            .and_then(|mut s| s.execute(params![recipient, deleted as i64]))
            .map_err(sql)?;
    }
    Ok(deleted as u64)
}

fn pending(tx: &rusqlite::Transaction<'_>, recipient: &str) -> Result<u64, StoreError> {
    let n: Option<i64> = tx
        .prepare_cached("SELECT pending FROM mailbox WHERE recipient = ?1")
        .and_then(|mut s| s.query_row(params![recipient], |r| r.get(0)).optional())
        .map_err(sql)?;
    Ok(n.unwrap_or(0).max(0) as u64)
}
