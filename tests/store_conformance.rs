//! The store conformance suite: one set of checks of the `Store` contract
//! (`src/store/mod.rs`), run against every backend. SQLite runs in a temporary
//! directory; MongoDB runs against the server in `PIGEON_TEST_MONGODB_URI` (start one with
//! `eval "$(bash .ci/mongo.sh start)"`), one fresh database per test. Without that
//! variable the MongoDB tests print `SKIPPED: PIGEON_TEST_MONGODB_URI not set`, and fail
//! when `CI` is set.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pigeon::config::StorageConfig;
use pigeon::message::{BlobMeta, Body};
use pigeon::store::{self, Enqueued, NewMessage, Store, StoreError, StoreLimits};

/// Where a test's store lives; `open` can be called again to reopen the same data.
enum Target {
    Sqlite { dir: tempfile::TempDir },
    Mongo { uri: String, database: String },
}

impl Target {
    fn config(&self) -> StorageConfig {
        match self {
            Target::Sqlite { dir } => StorageConfig {
                backend: "sqlite".into(),
                data_dir: dir.path().to_path_buf(),
                ..StorageConfig::default()
            },
            Target::Mongo { uri, database } => StorageConfig {
                backend: "mongodb".into(),
                mongodb_uri: uri.clone(),
                mongodb_database: database.clone(),
                ..StorageConfig::default()
            },
        }
    }

    async fn open(&self, mailbox_max: u64) -> Arc<dyn Store> {
        match store::open(&self.config(), mailbox_max).await {
            Ok(s) => s,
            Err(e) => panic!("opening the store failed: {e}"),
        }
    }

    /// Opens with `limits` and `offline_ttl_secs = ttl_secs`.
    async fn open_with(&self, limits: StoreLimits, ttl_secs: u64) -> Arc<dyn Store> {
        let cfg = StorageConfig {
            offline_ttl_secs: ttl_secs,
            ..self.config()
        };
        match store::open_with(&cfg, limits).await {
            Ok(s) => s,
            Err(e) => panic!("opening the store failed: {e}"),
        }
    }

    async fn cleanup(self) {
        if let Target::Mongo { uri, database } = self {
            // Best effort: a test server may not support dropDatabase.
            if let Ok(client) = ::mongodb::Client::with_uri_str(&uri).await {
                let _ = client.database(&database).drop().await;
            }
        }
    }
}

fn sqlite_target() -> Target {
    Target::Sqlite {
        dir: tempfile::tempdir().unwrap(),
    }
}

/// The MongoDB target for `test`, or `None` (after saying so) when no server is given.
fn mongo_target(test: &str) -> Option<Target> {
    let Some(uri) = std::env::var("PIGEON_TEST_MONGODB_URI")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        skipped(&format!(
            "SKIPPED: PIGEON_TEST_MONGODB_URI not set (mongodb::{test})"
        ));
        if std::env::var_os("CI").is_some() {
            panic!(
                "PIGEON_TEST_MONGODB_URI not set but CI is: the MongoDB tests must run in CI \
                 (eval \"$(bash .ci/mongo.sh start)\")"
            );
        }
        return None;
    };
    Some(Target::Mongo {
        uri,
        database: unique_database(test),
    })
}

/// A database name no other test (or earlier run) uses; MongoDB allows 63 bytes.
fn unique_database(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut name = format!("pt_{:x}_{}_{}", nanos, std::process::id(), test);
    name.truncate(63);
    name
}

fn text(from: &str, to: &str, body: &str, client_id: Option<&str>) -> NewMessage {
    NewMessage {
        sender: from.into(),
        recipient: to.into(),
        client_id: client_id.map(Into::into),
        body: Body::Text(body.into()),
        accepted_at: pigeon::now_ms(),
    }
}

async fn enqueue_new(store: &Arc<dyn Store>, msg: NewMessage) -> u64 {
    match store.enqueue(msg).await {
        Ok(Enqueued::New { seq }) => seq,
        other => panic!("expected a new message, got {other:?}"),
    }
}

async fn seqs(store: &Arc<dyn Store>, recipient: &str) -> Vec<u64> {
    store
        .fetch(recipient, 0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The checks. Each takes the target and may open it as often as it needs.

async fn ordered_seq_per_recipient(t: &Target) {
    let store = t.open(1000).await;
    for i in 1..=5u64 {
        assert_eq!(
            enqueue_new(&store, text("alice", "bob", &format!("b{i}"), None)).await,
            i
        );
        if i <= 3 {
            // Another recipient's sequence is independent.
            assert_eq!(
                enqueue_new(&store, text("alice", "carol", &format!("c{i}"), None)).await,
                i
            );
        }
    }
    let bob = store.fetch("bob", 0, 100).await.unwrap();
    assert_eq!(
        bob.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let bodies: Vec<_> = bob.iter().map(|m| m.body.as_str().to_string()).collect();
    assert_eq!(bodies, ["b1", "b2", "b3", "b4", "b5"]);
    assert!(bob
        .iter()
        .all(|m| m.recipient == "bob" && m.sender == "alice"));
    assert_eq!(seqs(&store, "carol").await, [1, 2, 3]);
    assert_eq!(store.pending("bob").await.unwrap(), 5);
    assert_eq!(store.pending("carol").await.unwrap(), 3);
    assert_eq!(store.pending("nobody").await.unwrap(), 0);
}

async fn fetch_after_and_limit(t: &Target) {
    let store = t.open(1000).await;
    for i in 0..10 {
        enqueue_new(&store, text("alice", "bob", &format!("m{i}"), None)).await;
    }
    let page = |after, limit| {
        let store = store.clone();
        async move {
            store
                .fetch("bob", after, limit)
                .await
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(0, 3).await, [1, 2, 3]);
    assert_eq!(page(3, 3).await, [4, 5, 6]);
    assert_eq!(page(7, 100).await, [8, 9, 10]);
    assert_eq!(page(10, 100).await, Vec::<u64>::new());
    assert_eq!(page(0, 0).await, Vec::<u64>::new());
    assert_eq!(page(u64::MAX, 10).await, Vec::<u64>::new());
    assert!(store.fetch("carol", 0, 10).await.unwrap().is_empty());
}

async fn ack_deletes_upto_and_counts(t: &Target) {
    let store = t.open(1000).await;
    for i in 0..6 {
        enqueue_new(&store, text("alice", "bob", &format!("m{i}"), None)).await;
    }
    enqueue_new(&store, text("alice", "carol", "other", None)).await;
    assert_eq!(store.pending("bob").await.unwrap(), 6);
    assert_eq!(store.ack("bob", 4).await.unwrap(), 4);
    assert_eq!(store.pending("bob").await.unwrap(), 2);
    assert_eq!(seqs(&store, "bob").await, [5, 6]);
    assert_eq!(
        store.ack("bob", 4).await.unwrap(),
        0,
        "acking again deletes nothing"
    );
    assert_eq!(store.ack("bob", 0).await.unwrap(), 0);
    // Acks never touch another recipient.
    assert_eq!(store.pending("carol").await.unwrap(), 1);
    assert_eq!(store.ack("bob", 1_000).await.unwrap(), 2);
    assert_eq!(store.pending("bob").await.unwrap(), 0);
    assert!(store.fetch("bob", 0, 100).await.unwrap().is_empty());
    // Seqs are never reused, even with an empty mailbox.
    assert_eq!(
        enqueue_new(&store, text("alice", "bob", "again", None)).await,
        7
    );
    assert_eq!(store.pending("bob").await.unwrap(), 1);
}

async fn duplicate_client_id_returns_first_seq(t: &Target) {
    let store = t.open(1000).await;
    assert_eq!(
        enqueue_new(&store, text("alice", "bob", "first", Some("c-1"))).await,
        1
    );
    let r = store
        .enqueue(text("alice", "bob", "first", Some("c-1")))
        .await
        .unwrap();
    assert_eq!(r, Enqueued::Duplicate { seq: 1 });
    assert_eq!(store.pending("bob").await.unwrap(), 1, "nothing new stored");
    let stored = store.fetch("bob", 0, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].body, Body::Text("first".into()));
    assert_eq!(stored[0].client_id.as_deref(), Some("c-1"));
    // A dedupe hit burns no seq: the next new message is 2.
    assert_eq!(
        enqueue_new(&store, text("alice", "bob", "second", Some("c-2"))).await,
        2
    );
    // The pair is (sender, client id): another sender may reuse the id.
    assert_eq!(
        enqueue_new(&store, text("dave", "bob", "dave's", Some("c-1"))).await,
        3
    );
    // Messages without an id are never deduplicated.
    assert_eq!(
        enqueue_new(&store, text("alice", "bob", "x", None)).await,
        4
    );
    assert_eq!(
        enqueue_new(&store, text("alice", "bob", "x", None)).await,
        5
    );
    // Still a duplicate after the first copy was acknowledged and deleted.
    store.ack("bob", 5).await.unwrap();
    let r = store
        .enqueue(text("alice", "bob", "first", Some("c-1")))
        .await
        .unwrap();
    assert_eq!(r, Enqueued::Duplicate { seq: 1 });
    assert_eq!(store.pending("bob").await.unwrap(), 0);
}

async fn mailbox_full_and_recovery(t: &Target) {
    let store = t.open(3).await;
    for i in 1..=3 {
        assert_eq!(
            enqueue_new(&store, text("alice", "bob", &format!("m{i}"), None)).await,
            i
        );
    }
    for _ in 0..2 {
        match store
            .enqueue(text("alice", "bob", "one too many", None))
            .await
        {
            Err(StoreError::MailboxFull { recipient, limit }) => {
                assert_eq!(recipient, "bob");
                assert_eq!(limit, 3);
            }
            other => panic!("expected MailboxFull, got {other:?}"),
        }
    }
    assert_eq!(
        store.pending("bob").await.unwrap(),
        3,
        "nothing stored when full"
    );
    assert_eq!(seqs(&store, "bob").await, [1, 2, 3]);
    // Other mailboxes are not affected.
    assert_eq!(
        enqueue_new(&store, text("alice", "carol", "hi", None)).await,
        1
    );
    // Acknowledging makes room again; refusals burned no seq.
    assert_eq!(store.ack("bob", 1).await.unwrap(), 1);
    assert_eq!(
        enqueue_new(&store, text("alice", "bob", "m4", None)).await,
        4
    );
    assert!(matches!(
        store
            .enqueue(text("alice", "bob", "full again", None))
            .await,
        Err(StoreError::MailboxFull { .. })
    ));
    assert_eq!(store.ack("bob", 4).await.unwrap(), 3);
    for i in 5..=7 {
        assert_eq!(
            enqueue_new(&store, text("alice", "bob", &format!("m{i}"), None)).await,
            i
        );
    }
    assert_eq!(store.pending("bob").await.unwrap(), 3);
}

async fn persists_across_reopen(t: &Target) {
    let store = t.open(1000).await;
    enqueue_new(&store, text("alice", "bob", "one", Some("p-1"))).await;
    enqueue_new(&store, text("alice", "bob", "two", None)).await;
    enqueue_new(&store, text("alice", "bob", "three", None)).await;
    store.ack("bob", 1).await.unwrap();
    drop(store);
    // Let the SQLite worker thread notice its handle is gone and close the database.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let store = t.open(1000).await;
    let kept = store.fetch("bob", 0, 10).await.unwrap();
    assert_eq!(kept.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(kept[0].body, Body::Text("two".into()));
    assert_eq!(store.pending("bob").await.unwrap(), 2);
    assert_eq!(
        enqueue_new(&store, text("alice", "bob", "four", None)).await,
        4
    );
    let r = store
        .enqueue(text("alice", "bob", "one", Some("p-1")))
        .await
        .unwrap();
    assert_eq!(r, Enqueued::Duplicate { seq: 1 }, "dedupe memory survives");
}

/// The same id with another recipient or body is not a retry: `IdConflict`, nothing
/// stored; the true retry is still a duplicate.
async fn reused_id_with_another_message_conflicts(t: &Target) {
    let store = t.open(100).await;
    let first = enqueue_new(&store, text("alice", "bob", "hello", Some("r-1"))).await;
    for (to, body) in [("bob", "something else"), ("carol", "hello")] {
        match store.enqueue(text("alice", to, body, Some("r-1"))).await {
            Err(StoreError::IdConflict { id }) => assert_eq!(id, "r-1"),
            other => panic!("{to}/{body}: expected IdConflict, got {other:?}"),
        }
    }
    assert!(matches!(
        store.enqueue(text("alice", "bob", "hello", Some("r-1"))).await,
        Ok(Enqueued::Duplicate { seq }) if seq == first
    ));
    // In one batch too (pipelined sends).
    let answers = store
        .enqueue_many(vec![
            text("alice", "bob", "two", Some("r-2")),
            text("alice", "bob", "not two", Some("r-2")),
            text("alice", "bob", "three", Some("r-3")),
        ])
        .await;
    assert!(
        matches!(answers[0], Ok(Enqueued::New { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], Err(StoreError::IdConflict { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[2], Ok(Enqueued::New { .. })),
        "{answers:?}"
    );
    assert_eq!(store.pending("bob").await.unwrap(), 3);
    assert_eq!(store.pending("carol").await.unwrap(), 0);
    let bodies: Vec<String> = store
        .fetch("bob", 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body.as_str().to_string())
        .collect();
    assert_eq!(bodies, ["hello", "two", "three"]);
}

/// 8 senders × 50 messages to one recipient, concurrently, through two store handles
/// (two independent connections to the same data, as two server processes would have).
async fn concurrent_senders(t: &Target) {
    const SENDERS: usize = 8;
    const EACH: usize = 50;
    let stores = [t.open(100_000).await, t.open(100_000).await];
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let store = stores[s % 2].clone();
        tasks.push(tokio::spawn(async move {
            let sender = format!("sender{s}");
            let mut got = Vec::with_capacity(EACH);
            for i in 0..EACH {
                let id = format!("{sender}-{i}");
                let msg = text(&sender, "bob", &id, Some(&id));
                match store.enqueue(msg).await {
                    Ok(Enqueued::New { seq }) => got.push(seq),
                    other => panic!("{sender} message {i}: {other:?}"),
                }
            }
            (sender, got)
        }));
    }
    let mut all = Vec::new();
    let mut by_sender = BTreeMap::new();
    for task in tasks {
        let (sender, got) = task.await.unwrap();
        // Each sender's messages get increasing seqs, in its send order.
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{sender} got {got:?}");
        all.extend(got.iter().copied());
        by_sender.insert(sender, got);
    }
    let elapsed = started.elapsed();
    println!(
        "{} enqueues in {elapsed:?} ({:.0}/s)",
        all.len(),
        all.len() as f64 / elapsed.as_secs_f64()
    );
    let unique: HashSet<_> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "a seq was handed out twice");
    all.sort_unstable();
    let expected: Vec<u64> = (1..=(SENDERS * EACH) as u64).collect();
    assert_eq!(all, expected, "seqs are not a contiguous range");

    // The mailbox holds exactly those messages, in seq order, each sender's in send order.
    let stored = stores[0].fetch("bob", 0, 10_000).await.unwrap();
    assert_eq!(stored.len(), SENDERS * EACH);
    assert!(stored.windows(2).all(|w| w[0].seq < w[1].seq));
    for (sender, got) in &by_sender {
        let bodies: Vec<_> = stored
            .iter()
            .filter(|m| &m.sender == sender)
            .map(|m| m.body.as_str().to_string())
            .collect();
        let sent: Vec<_> = (0..EACH).map(|i| format!("{sender}-{i}")).collect();
        assert_eq!(bodies, sent, "{sender}'s messages out of order");
        let stored_seqs: Vec<_> = stored
            .iter()
            .filter(|m| &m.sender == sender)
            .map(|m| m.seq)
            .collect();
        assert_eq!(&stored_seqs, got);
    }
    assert_eq!(
        stores[1].pending("bob").await.unwrap(),
        (SENDERS * EACH) as u64
    );
}

/// Retries of one send racing each other: exactly one copy, every answer its seq.
async fn concurrent_duplicates(t: &Target) {
    let stores = [t.open(1000).await, t.open(1000).await];
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            store
                .enqueue(text("alice", "bob", "same", Some("race-1")))
                .await
                .unwrap()
        }));
    }
    let mut new = Vec::new();
    let mut dup = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Enqueued::New { seq } => new.push(seq),
            Enqueued::Duplicate { seq } => dup.push(seq),
        }
    }
    assert_eq!(new.len(), 1, "new: {new:?}, duplicates: {dup:?}");
    assert!(
        dup.iter().all(|s| *s == new[0]),
        "new: {new:?}, duplicates: {dup:?}"
    );
    assert_eq!(seqs(&stores[0], "bob").await, new);
    assert_eq!(stores[1].pending("bob").await.unwrap(), 1);
}

async fn bodies_round_trip(t: &Target) {
    let store = t.open(1000).await;
    let bodies = [
        Body::Text("héllo \"quoted\" #hash# 🐦\nnew line".into()),
        Body::Text(String::new()),
        Body::Text(r#"{"looks":"like json"}"#.into()),
        Body::Json(r#"{"a":[1,2.5,{"b":null}],"c":"x","big":9007199254740993}"#.into()),
        Body::Json("[]".into()),
        Body::Json("42".into()),
    ];
    let accepted_at = 1_763_768_000_123;
    for (i, body) in bodies.iter().enumerate() {
        let msg = NewMessage {
            sender: "alice".into(),
            recipient: "bob".into(),
            client_id: (i % 2 == 0).then(|| format!("body-{i}")),
            body: body.clone(),
            accepted_at: accepted_at + i as i64,
        };
        enqueue_new(&store, msg).await;
    }
    let stored = store.fetch("bob", 0, 100).await.unwrap();
    assert_eq!(stored.len(), bodies.len());
    for (i, (m, body)) in stored.iter().zip(&bodies).enumerate() {
        assert_eq!(&m.body, body);
        assert_eq!(m.seq, i as u64 + 1);
        assert_eq!(m.sender, "alice");
        assert_eq!(m.recipient, "bob");
        assert_eq!(m.accepted_at, accepted_at + i as i64);
        assert_eq!(m.client_id, (i % 2 == 0).then(|| format!("body-{i}")));
    }
}

async fn read_all(store: &Arc<dyn Store>, key: &str) -> Result<Vec<u8>, StoreError> {
    let mut r = store.blob_reader(key).await?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 7777];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Blob bytes: streamed in, read back exactly, invisible until finished, gone after
/// a discard, and deleted with the ack of the message that refers to them.
async fn blobs_round_trip_and_die_with_their_ack(t: &Target) {
    let store = t.open(1000).await;
    let data: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let key = pigeon::transfer::new_blob_key();
    let mut w = store.blob_writer(&key).await.unwrap();
    for part in data.chunks(100_000) {
        w.write(part).await.unwrap();
    }
    assert!(
        read_all(&store, &key).await.is_err(),
        "an unfinished blob must not be readable"
    );
    w.finish().await.unwrap();
    assert!(read_all(&store, &key).await.unwrap() == data);

    let gone = pigeon::transfer::new_blob_key();
    let mut w = store.blob_writer(&gone).await.unwrap();
    w.write(b"partial").await.unwrap();
    w.discard().await;
    assert!(read_all(&store, &gone).await.is_err());

    let meta = BlobMeta {
        key: key.clone(),
        id: Some("f1".into()),
        name: "clip.mp4".into(),
        mime: "video/mp4".into(),
        size: data.len() as u64,
        sha256: None,
    };
    let msg = NewMessage {
        sender: "alice".into(),
        recipient: "bob".into(),
        client_id: Some("f1".into()),
        body: meta.to_body(),
        accepted_at: pigeon::now_ms(),
    };
    let seq = enqueue_new(&store, msg).await;
    let stored = store.fetch("bob", 0, 10).await.unwrap();
    assert_eq!(stored[0].body.blob_meta(), Some(meta));
    store.ack("bob", seq).await.unwrap();
    assert!(
        read_all(&store, &key).await.is_err(),
        "an acknowledged blob must be deleted"
    );
}

/// Acknowledging exact ranges deletes those seqs and nothing else.
async fn ack_ranges_delete_exactly_those(t: &Target) {
    let store = t.open(1000).await;
    for i in 0..10 {
        enqueue_new(&store, text("alice", "bob", &format!("m{i}"), None)).await;
    }
    let deleted = store.ack_ranges("bob", &[(2, 3), (6, 6)]).await.unwrap();
    assert_eq!(deleted, 3);
    assert_eq!(seqs(&store, "bob").await, vec![1, 4, 5, 7, 8, 9, 10]);
    assert_eq!(store.pending("bob").await.unwrap(), 7);
    assert_eq!(store.ack_ranges("bob", &[]).await.unwrap(), 0);
    assert_eq!(
        store.ack_ranges("bob", &[(2, 3)]).await.unwrap(),
        0,
        "already gone"
    );
}

/// Accounts: create, refuse a taken name, read, change, delete.
async fn accounts(t: &Target) {
    let store = t.open(1000).await;
    assert_eq!(store.password_hash("zoë").await.unwrap(), None);
    store.create_user("zoë", "$argon2id$one").await.unwrap();
    assert!(matches!(
        store.create_user("zoë", "$argon2id$two").await,
        Err(StoreError::UserExists(_))
    ));
    assert_eq!(
        store.password_hash("zoë").await.unwrap().as_deref(),
        Some("$argon2id$one")
    );
    assert!(store
        .set_password_hash("zoë", "$argon2id$three")
        .await
        .unwrap());
    assert!(!store.set_password_hash("nobody", "x").await.unwrap());
    assert_eq!(
        store.password_hash("zoë").await.unwrap().as_deref(),
        Some("$argon2id$three")
    );
    assert!(store.delete_user("zoë").await.unwrap());
    assert!(!store.delete_user("zoë").await.unwrap());
    assert_eq!(store.password_hash("zoë").await.unwrap(), None);
}

/// Deleting an account deletes its mailbox (messages and blob bytes) and its senders'
/// dedupe memory, so a new account under the name starts empty; seqs are not reused;
/// other users' mail is untouched.
async fn deleting_a_user_deletes_their_mail(t: &Target) {
    let store = t.open(1000).await;
    store.create_user("carol", "$argon2id$old").await.unwrap();
    let first = enqueue_new(
        &store,
        text("bob", "carol", "for the old carol", Some("b1")),
    )
    .await;
    enqueue_new(
        &store,
        text("carol", "bob", "from the old carol", Some("c1")),
    )
    .await;
    enqueue_new(&store, text("bob", "dave", "for dave", None)).await;
    let key = pigeon::transfer::new_blob_key();
    let mut w = store.blob_writer(&key).await.unwrap();
    w.write(b"old carol's file").await.unwrap();
    w.finish().await.unwrap();
    let meta = BlobMeta {
        key: key.clone(),
        id: Some("f1".into()),
        name: "f.txt".into(),
        mime: "text/plain".into(),
        size: 16,
        sha256: None,
    };
    let blob = NewMessage {
        sender: "bob".into(),
        recipient: "carol".into(),
        client_id: Some("f1".into()),
        body: meta.to_body(),
        accepted_at: pigeon::now_ms(),
    };
    let last = enqueue_new(&store, blob).await;
    assert!(store.delete_user("carol").await.unwrap());
    assert_eq!(seqs(&store, "carol").await, Vec::<u64>::new());
    assert_eq!(store.pending("carol").await.unwrap(), 0);
    assert!(
        read_all(&store, &key).await.is_err(),
        "the blob must be deleted"
    );
    assert_eq!(seqs(&store, "dave").await.len(), 1, "other mailboxes stay");
    assert_eq!(
        seqs(&store, "bob").await.len(),
        1,
        "mail the old carol sent stays"
    );
    store.create_user("carol", "$argon2id$new").await.unwrap();
    let seq = enqueue_new(&store, text("bob", "carol", "for the new carol", None)).await;
    assert!(
        seq > last && last > first,
        "seqs are never reused: {seq} after {last}"
    );
    // The new carol's client id "c1" is hers, not a retry of the old carol's.
    enqueue_new(
        &store,
        text("carol", "bob", "from the new carol", Some("c1")),
    )
    .await;
    let bodies: Vec<String> = store
        .fetch("carol", 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body.as_str().to_string())
        .collect();
    assert_eq!(bodies, vec!["for the new carol".to_string()]);
}

/// The account change feed: a password change and a deletion each append the user, in
/// increasing seq order after the cursor; a change to no account appends nothing.
/// Legacy (non-canonical) names are listed.
async fn account_change_feed(t: &Target) {
    let store = t.open(1000).await;
    let start = store.account_change_cursor().await.unwrap();
    assert!(store.account_changes(start, 100).await.unwrap().is_empty());
    store.create_user("erin", "$argon2id$one").await.unwrap();
    store.create_user("frank", "$argon2id$one").await.unwrap();
    assert!(
        store.account_changes(start, 100).await.unwrap().is_empty(),
        "creating is no change"
    );
    assert!(store
        .set_password_hash("erin", "$argon2id$two")
        .await
        .unwrap());
    assert!(store.delete_user("frank").await.unwrap());
    assert!(!store.set_password_hash("nobody", "x").await.unwrap());
    assert!(!store.delete_user("nobody").await.unwrap());
    let changes = store.account_changes(start, 100).await.unwrap();
    let users: Vec<&str> = changes.iter().map(|c| c.user.as_str()).collect();
    assert_eq!(users, vec!["erin", "frank"]);
    assert!(changes[0].seq > start && changes[1].seq > changes[0].seq);
    assert_eq!(store.account_change_cursor().await.unwrap(), changes[1].seq);
    assert_eq!(
        store.account_changes(changes[0].seq, 100).await.unwrap(),
        changes[1..]
    );
    assert_eq!(store.account_changes(start, 1).await.unwrap(), changes[..1]);
    // Another handle (another process) sees the same feed.
    let other = t.open(1000).await;
    assert_eq!(other.account_changes(start, 100).await.unwrap(), changes);

    assert!(store.legacy_user_names(10).await.unwrap().is_empty());
    store.create_user("Gina", "$argon2id$one").await.unwrap();
    store
        .create_user("zo\u{eb}", "$argon2id$one")
        .await
        .unwrap();
    let mut legacy = store.legacy_user_names(10).await.unwrap();
    legacy.sort();
    assert_eq!(legacy, vec!["Gina".to_string(), "zo\u{eb}".to_string()]);
    assert_eq!(store.legacy_user_names(1).await.unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Quotas, the recipient check and expiry (`StoreLimits`, `offline_ttl_secs`).

fn limits(f: impl FnOnce(&mut StoreLimits)) -> StoreLimits {
    let mut l = StoreLimits::mailbox_only(1000);
    f(&mut l);
    l
}

fn quota_key(r: Result<Enqueued, StoreError>) -> &'static str {
    match r {
        Err(StoreError::QuotaExceeded { key, .. }) => key,
        other => panic!("expected quota_exceeded, got {other:?}"),
    }
}

/// Password mode: a recipient without an account is refused and nothing is stored.
async fn recipients_need_an_account(t: &Target) {
    let store = t
        .open_with(limits(|l| l.recipients_need_account = true), 0)
        .await;
    store.create_user("bob", "$argon2id$x").await.unwrap();
    match store
        .enqueue(text("alice", "ghost-never-created", "hi", Some("g1")))
        .await
    {
        Err(StoreError::NoSuchUser { user }) => assert_eq!(user, "ghost-never-created"),
        other => panic!("expected no_such_user, got {other:?}"),
    }
    assert!(store
        .fetch("ghost-never-created", 0, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.pending("ghost-never-created").await.unwrap(), 0);
    enqueue_new(&store, text("alice", "bob", "hi", Some("g2"))).await;
    assert!(store.user_exists("bob").await.unwrap());
    assert!(!store.user_exists("ghost-never-created").await.unwrap());
    // Several in one batch: each answered on its own.
    let answers = store
        .enqueue_many(vec![
            text("alice", "bob", "a", None),
            text("alice", "nobody", "b", None),
            text("alice", "bob", "c", None),
        ])
        .await;
    assert!(matches!(answers[0], Ok(Enqueued::New { .. })));
    assert!(matches!(answers[1], Err(StoreError::NoSuchUser { .. })));
    assert!(matches!(answers[2], Ok(Enqueued::New { .. })));
}

/// A sender's waiting messages and bytes are capped; acks give the share back; other
/// senders are not affected; the error names the config key.
async fn sender_quota_messages_and_bytes(t: &Target) {
    let store = t
        .open_with(
            limits(|l| {
                l.sender_messages = 3;
                l.sender_bytes = 1000;
            }),
            0,
        )
        .await;
    for i in 0..3 {
        enqueue_new(&store, text("alice", "bob", &format!("m{i}"), None)).await;
    }
    let refused = store.enqueue(text("alice", "carol", "m3", None)).await;
    let msg = refused.as_ref().map_err(|e| e.to_string()).unwrap_err();
    assert!(msg.contains("sender_quota_messages"), "{msg}");
    assert_eq!(quota_key(refused), "sender_quota_messages");
    assert!(store.fetch("carol", 0, 10).await.unwrap().is_empty());
    assert_eq!(store.usage("alice").await.unwrap().0.messages, 3);
    // Someone else still sends.
    enqueue_new(&store, text("dave", "bob", "d", None)).await;
    // Bob reads two of alice's: she may send two more.
    store.ack("bob", 2).await.unwrap();
    enqueue_new(&store, text("alice", "carol", "again", None)).await;
    enqueue_new(&store, text("alice", "carol", "again", None)).await;
    assert_eq!(
        quota_key(store.enqueue(text("alice", "carol", "x", None)).await),
        "sender_quota_messages"
    );
    // Bytes: 600 then 500 would pass 1000.
    enqueue_new(&store, text("erin", "bob", &"x".repeat(600), None)).await;
    assert_eq!(
        quota_key(
            store
                .enqueue(text("erin", "bob", &"y".repeat(500), None))
                .await
        ),
        "sender_quota_bytes"
    );
    let (usage, _) = store.usage("erin").await.unwrap();
    assert_eq!((usage.messages, usage.bytes), (1, 600));
    // Blobs count with their size.
    let meta = BlobMeta {
        key: "k-quota".into(),
        id: None,
        name: "f".into(),
        mime: "application/octet-stream".into(),
        size: 5000,
        sha256: None,
    };
    let blob = NewMessage {
        sender: "frank".into(),
        recipient: "bob".into(),
        client_id: None,
        body: meta.to_body(),
        accepted_at: pigeon::now_ms(),
    };
    assert_eq!(quota_key(store.enqueue(blob).await), "sender_quota_bytes");
}

/// All mailboxes together are capped by `store_bytes`.
async fn store_cap_refuses_everyone(t: &Target) {
    let store = t.open_with(limits(|l| l.store_bytes = 1000), 0).await;
    enqueue_new(&store, text("alice", "bob", &"a".repeat(900), None)).await;
    match store
        .enqueue(text("carol", "dave", &"c".repeat(200), None))
        .await
    {
        Err(e @ StoreError::StoreFull { .. }) => {
            assert!(e.to_string().contains("store_max_bytes"), "{e}")
        }
        other => panic!("expected store_full, got {other:?}"),
    }
    assert_eq!(store.usage("carol").await.unwrap().1, 900);
    store.ack("bob", 1).await.unwrap();
    enqueue_new(&store, text("carol", "dave", &"c".repeat(200), None)).await;
}

/// What is waiting is still counted after the store is reopened.
async fn quota_survives_reopen(t: &Target) {
    let l = limits(|l| l.sender_messages = 2);
    {
        let store = t.open_with(l, 0).await;
        enqueue_new(&store, text("alice", "bob", "1", None)).await;
        enqueue_new(&store, text("alice", "bob", "2", None)).await;
    }
    let store = t.open_with(l, 0).await;
    assert_eq!(
        quota_key(store.enqueue(text("alice", "bob", "3", None)).await),
        "sender_quota_messages"
    );
    store.ack("bob", 1).await.unwrap();
    enqueue_new(&store, text("alice", "bob", "3", None)).await;
}

/// Concurrent sends of one sender never overshoot the quota.
async fn quota_holds_under_concurrency(t: &Target) {
    let store = t.open_with(limits(|l| l.sender_messages = 10), 0).await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .enqueue(text("alice", &format!("r{}", i % 4), "m", None))
                    .await
            })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(Enqueued::New { .. }) => stored += 1,
            Err(StoreError::QuotaExceeded { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stored, 10);
    let mut held = 0;
    for r in 0..4 {
        held += store.pending(&format!("r{r}")).await.unwrap();
    }
    assert_eq!(held, 10);
}

/// With `offline_ttl_secs`, old messages and their blobs are deleted in the background,
/// and give their quota back.
async fn expired_messages_and_blobs_are_swept(t: &Target) {
    // A TTL of 30 s: the sweep runs every 3 s; the old messages are a minute old.
    let store = t.open_with(limits(|l| l.sender_messages = 3), 30).await;
    let old = pigeon::now_ms() - 60_000;
    let key = pigeon::transfer::new_blob_key();
    let mut w = store.blob_writer(&key).await.unwrap();
    w.write(b"old bytes").await.unwrap();
    w.finish().await.unwrap();
    let meta = BlobMeta {
        key: key.clone(),
        id: None,
        name: "old".into(),
        mime: "text/plain".into(),
        size: 9,
        sha256: None,
    };
    let mut m1 = text("alice", "bob", "old text", None);
    m1.accepted_at = old;
    let m2 = NewMessage {
        sender: "alice".into(),
        recipient: "bob".into(),
        client_id: None,
        body: meta.to_body(),
        accepted_at: old,
    };
    enqueue_new(&store, m1).await;
    enqueue_new(&store, m2).await;
    let fresh = enqueue_new(&store, text("alice", "bob", "fresh", None)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if seqs(&store, "bob").await == [fresh] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expired messages still stored: {:?}",
            seqs(&store, "bob").await
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(store.pending("bob").await.unwrap(), 1);
    assert!(
        read_all(&store, &key).await.is_err(),
        "an expired blob must be deleted"
    );
    // Alice's quota of 3 has room again for 2.
    enqueue_new(&store, text("alice", "bob", "a", None)).await;
    enqueue_new(&store, text("alice", "bob", "b", None)).await;
    assert_eq!(
        quota_key(store.enqueue(text("alice", "bob", "c", None)).await),
        "sender_quota_messages"
    );
}

// ---------------------------------------------------------------------------------------
// One test per (backend, check).

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let t = super::sqlite_target();
                    super::$check(&t).await;
                    t.cleanup().await;
                }
            )*
        }

        mod mongodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let Some(t) = super::mongo_target(stringify!($check)) else {
                        return;
                    };
                    super::$check(&t).await;
                    t.cleanup().await;
                }
            )*
        }
    };
}

conformance!(
    ordered_seq_per_recipient,
    fetch_after_and_limit,
    ack_deletes_upto_and_counts,
    duplicate_client_id_returns_first_seq,
    reused_id_with_another_message_conflicts,
    mailbox_full_and_recovery,
    persists_across_reopen,
    concurrent_senders,
    concurrent_duplicates,
    bodies_round_trip,
    blobs_round_trip_and_die_with_their_ack,
    ack_ranges_delete_exactly_those,
    accounts,
    deleting_a_user_deletes_their_mail,
    account_change_feed,
    recipients_need_an_account,
    sender_quota_messages_and_bytes,
    store_cap_refuses_everyone,
    quota_survives_reopen,
    quota_holds_under_concurrency,
    expired_messages_and_blobs_are_swept,
);

// ---------------------------------------------------------------------------------------
// MongoDB specifics the shared contract does not cover.

mod mongodb_only {
    use super::*;
    use ::mongodb::bson::{doc, Document};

    async fn raw_db(t: &Target) -> ::mongodb::Database {
        let Target::Mongo { uri, database } = t else {
            unreachable!()
        };
        ::mongodb::Client::with_uri_str(uri)
            .await
            .unwrap()
            .database(database)
    }

    /// A counter left too high (TTL expiry, a crash mid-ack) is corrected once it has
    /// been idle, but never while allocations may be in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_mailbox_counter_is_repaired() {
        let Some(t) = mongo_target("stale_counter") else {
            return;
        };
        let store = t.open(3).await;
        for _ in 0..3 {
            enqueue_new(&store, text("alice", "bob", "m", None)).await;
        }
        let db = raw_db(&t).await;
        // Remove a message behind the store's back, as the TTL monitor would.
        let gone = db
            .collection::<Document>("messages")
            .delete_one(doc! { "recipient": "bob", "seq": 2_i64 })
            .await
            .unwrap();
        assert_eq!(gone.deleted_count, 1);
        assert_eq!(store.pending("bob").await.unwrap(), 2, "pending is counted");
        assert!(
            matches!(
                store.enqueue(text("alice", "bob", "m", None)).await,
                Err(StoreError::MailboxFull { .. })
            ),
            "a counter touched just now is trusted"
        );
        db.collection::<Document>("counters")
            .update_one(doc! { "_id": "bob" }, doc! { "$set": { "last_at": 0_i64 } })
            .await
            .unwrap();
        assert_eq!(
            enqueue_new(&store, text("alice", "bob", "m", None)).await,
            4
        );
        assert!(matches!(
            store.enqueue(text("alice", "bob", "m", None)).await,
            Err(StoreError::MailboxFull { .. })
        ));
        assert_eq!(seqs(&store, "bob").await, [1, 3, 4]);
        t.cleanup().await;
    }

    /// At open, blobs nothing refers to and nobody wrote to for an hour are deleted
    /// (an upload cut by a crash, a finished blob whose message never came); referenced
    /// blobs and recent uploads (maybe another node's) stay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_orphan_blobs_are_swept_at_open() {
        let Some(t) = mongo_target("blob_sweep") else {
            return;
        };
        let store = t.open(100).await;
        let bytes = vec![7u8; 300 * 1024]; // more than one 255 KiB chunk
        let [partial, unreferenced, referenced, fresh] =
            std::array::from_fn(|_| pigeon::transfer::new_blob_key());
        for key in [&partial, &unreferenced, &referenced, &fresh] {
            let mut w = store.blob_writer(key).await.unwrap();
            w.write(&bytes).await.unwrap();
            if key == &unreferenced || key == &referenced {
                w.finish().await.unwrap();
            } // the others are left as a crash would leave them
        }
        let meta = BlobMeta {
            key: referenced.clone(),
            id: Some("f-ref".into()),
            name: "a.bin".into(),
            mime: "application/octet-stream".into(),
            size: bytes.len() as u64,
            sha256: None,
        };
        enqueue_new(
            &store,
            NewMessage {
                sender: "alice".into(),
                recipient: "bob".into(),
                client_id: Some("f-ref".into()),
                body: meta.to_body(),
                accepted_at: pigeon::now_ms(),
            },
        )
        .await;
        drop(store);
        let db = raw_db(&t).await;
        let (chunks, files) = (
            db.collection::<Document>("blob_chunks"),
            db.collection::<Document>("blob_files"),
        );
        for key in [&partial, &unreferenced, &referenced] {
            let aged = chunks
                .update_many(doc! { "key": key }, doc! { "$set": { "at": 0_i64 } })
                .await
                .unwrap();
            assert!(aged.matched_count >= 1, "no chunks for {key}");
            files
                .update_many(doc! { "_id": key }, doc! { "$set": { "at": 0_i64 } })
                .await
                .unwrap();
        }
        let count = |key: String| {
            let chunks = chunks.clone();
            async move { chunks.count_documents(doc! { "key": key }).await.unwrap() }
        };
        let _store = t.open(100).await; // the sweep runs in the background
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while count(partial.clone()).await + count(unreferenced.clone()).await > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "old orphan chunks still there"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(files
            .find_one(doc! { "_id": &unreferenced })
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            count(referenced.clone()).await,
            2,
            "a referenced blob was swept"
        );
        assert!(files
            .find_one(doc! { "_id": &referenced })
            .await
            .unwrap()
            .is_some());
        assert_eq!(count(fresh.clone()).await, 1, "a recent upload was swept");
        t.cleanup().await;
    }

    /// A client id remembered by an older Pigeon (no `fingerprint` field) still makes a
    /// retry a duplicate, whatever its body: there is nothing to compare.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_id_without_fingerprint_is_a_retry() {
        let Some(t) = mongo_target("old_client_id") else {
            return;
        };
        let store = t.open(100).await;
        let seq = enqueue_new(&store, text("alice", "bob", "first", Some("o-1"))).await;
        let db = raw_db(&t).await;
        let ids = db.collection::<Document>("client_ids");
        let unset = ids
            .update_one(
                doc! { "client_id": "o-1" },
                doc! { "$unset": { "fingerprint": "" } },
            )
            .await
            .unwrap();
        assert_eq!(
            unset.modified_count, 1,
            "the entry had a fingerprint to remove"
        );
        assert!(matches!(
            store.enqueue(text("alice", "bob", "other body", Some("o-1"))).await,
            Ok(Enqueued::Duplicate { seq: s }) if s == seq
        ));
        t.cleanup().await;
    }

    /// Collections and indexes exist (found by key, not by name); messages carry the
    /// `bytes` they count against quotas, and no `expire_at` (the expiry sweep, not the
    /// TTL index, deletes them now, so it can give their quota back; the TTL index stays
    /// for messages stored by older versions).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn schema_and_ttl() {
        let Some(t) = mongo_target("schema_and_ttl") else {
            return;
        };
        let mut cfg = t.config();
        cfg.offline_ttl_secs = 3600;
        let store = store::open(&cfg, 100).await.unwrap();
        let msg = text("alice", "bob", "expiring", Some("t-1"));
        let accepted_at = msg.accepted_at;
        enqueue_new(&store, msg).await;
        // Opening again (as a second process would) is fine with everything in place.
        let plain = t.open(100).await;
        enqueue_new(&plain, text("alice", "bob", "kept", None)).await;

        let db = raw_db(&t).await;
        let names = db.list_collection_names().await.unwrap();
        for c in ["messages", "counters", "client_ids", "users", "usage"] {
            assert!(
                names.iter().any(|n| n == c),
                "no {c} collection in {names:?}"
            );
        }
        use futures_util::TryStreamExt;
        let indexes: Vec<_> = db
            .collection::<Document>("messages")
            .list_indexes()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let by_keys = |keys: Document| indexes.iter().find(|i| i.keys == keys);
        let seq_index =
            by_keys(doc! { "recipient": 1, "seq": 1 }).expect("no {recipient, seq} index");
        assert_eq!(
            seq_index.options.as_ref().and_then(|o| o.unique),
            Some(true)
        );
        let ttl_index = by_keys(doc! { "expire_at": 1 }).expect("no TTL index");
        assert_eq!(
            ttl_index.options.as_ref().and_then(|o| o.expire_after),
            Some(std::time::Duration::ZERO)
        );

        let messages = db.collection::<Document>("messages");
        let expiring = messages
            .find_one(doc! { "recipient": "bob", "body": "expiring" })
            .await
            .unwrap()
            .unwrap();
        assert!(!expiring.contains_key("expire_at"), "{expiring}");
        // Servers may hand small Int64 values back as Int32.
        let int = |k: &str| {
            let v = expiring.get(k).unwrap();
            v.as_i64().or(v.as_i32().map(i64::from)).unwrap()
        };
        assert_eq!(int("accepted_at"), accepted_at);
        assert_eq!(int("bytes"), "expiring".len() as i64);
        assert!(
            by_keys(doc! { "accepted_at": 1 }).is_some(),
            "no expiry index"
        );
        let kept = messages
            .find_one(doc! { "recipient": "bob", "body": "kept" })
            .await
            .unwrap()
            .unwrap();
        assert!(!kept.contains_key("expire_at"), "{kept}");
        let claim = db
            .collection::<Document>("client_ids")
            .find_one(doc! { "sender": "alice", "client_id": "t-1" })
            .await
            .unwrap()
            .expect("client id not remembered");
        assert!(claim.get_datetime("expire_at").is_ok(), "{claim}");
        t.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------
// SQLite specifics: the database file's schema versions.

mod sqlite_only {
    use super::*;

    /// The messages table as the first release created it (`WITHOUT ROWID`, no
    /// `user_version`), with a mailbox of three for bob, one of them 4 KiB.
    fn write_version_0(dir: &std::path::Path) {
        let conn = rusqlite::Connection::open(dir.join("pigeon.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE mailbox (recipient TEXT PRIMARY KEY, last_seq INTEGER NOT NULL,
                 pending INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE message (recipient TEXT NOT NULL, seq INTEGER NOT NULL,
                 sender TEXT NOT NULL, client_id TEXT, kind INTEGER NOT NULL,
                 body TEXT NOT NULL, accepted_at INTEGER NOT NULL,
                 PRIMARY KEY (recipient, seq)) WITHOUT ROWID;
             CREATE TABLE client_id (sender TEXT NOT NULL, client_id TEXT NOT NULL,
                 seq INTEGER NOT NULL, accepted_at INTEGER NOT NULL,
                 PRIMARY KEY (sender, client_id)) WITHOUT ROWID;
             CREATE INDEX client_id_age ON client_id (accepted_at);
             CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL,
                 created_at INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO mailbox VALUES ('bob', 3, 3);",
        )
        .unwrap();
        let big = "b".repeat(4096);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for (seq, body) in [(1, "one"), (2, big.as_str()), (3, "three")] {
            conn.execute(
                "INSERT INTO message VALUES ('bob', ?1, 'alice', ?2, 0, ?3, ?4)",
                rusqlite::params![seq, format!("c{seq}"), body, now],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO client_id VALUES ('alice', ?1, ?2, ?3)",
                rusqlite::params![format!("c{seq}"), seq, now],
            )
            .unwrap();
        }
    }

    fn schema_of(dir: &std::path::Path) -> (i64, String) {
        let conn = rusqlite::Connection::open(dir.join("pigeon.db")).unwrap();
        let version = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        let sql = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'message'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (version, sql)
    }

    /// A database of the first release opens: its mailbox is moved to the current
    /// table, in order, and new messages continue its sequence.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_0_database_is_migrated() {
        let t = sqlite_target();
        let Target::Sqlite { dir } = &t else {
            unreachable!()
        };
        write_version_0(dir.path());
        let store = t.open(100).await;
        let msgs = store.fetch("bob", 0, 10).await.unwrap();
        let got: Vec<(u64, String)> = msgs
            .iter()
            .map(|m| (m.seq, m.body.as_str().to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (1, "one".to_string()),
                (2, "b".repeat(4096)),
                (3, "three".to_string())
            ]
        );
        assert_eq!(store.pending("bob").await.unwrap(), 3);
        // Version 3 counted what alice has waiting from the messages already there.
        let (alice, total) = store.usage("alice").await.unwrap();
        assert_eq!((alice.messages, alice.bytes), (3, 3 + 4096 + 5));
        assert_eq!(total, 3 + 4096 + 5);
        assert_eq!(
            enqueue_new(&store, text("alice", "bob", "four", None)).await,
            4
        );
        // Client ids of the old table still de-duplicate.
        assert!(matches!(
            store
                .enqueue(text("alice", "bob", "again", Some("c1")))
                .await,
            Ok(Enqueued::Duplicate { seq: 1 })
        ));
        store.ack("bob", 2).await.unwrap();
        assert_eq!(seqs(&store, "bob").await[..2], [3, 4]);
        drop(store);
        let (version, sql) = schema_of(dir.path());
        assert_eq!(version, 3);
        assert!(!sql.to_uppercase().contains("WITHOUT ROWID"), "{sql}");
        // Opening again leaves it alone.
        let store = t.open(100).await;
        assert_eq!(seqs(&store, "bob").await[..2], [3, 4]);
    }

    /// The live path's seqs (`LiveSeqs`): a claimed mailbox refuses `enqueue`; a message
    /// not routed yet (`refusable`) is stored only under a seq its current owner handed
    /// out, so one whose session ended before the write (released, or claimed again by
    /// the next session) is refused with `Owned` and routed again by the caller; a
    /// message already delivered (not refusable) is stored whatever the owner. A session
    /// that ends after the next one claimed cannot extend or undo that claim.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_seqs_store_only_the_current_owners_messages() {
        use pigeon::message::StoredMessage;
        use pigeon::store::LiveMessage;
        let t = sqlite_target();
        let store = t.open(100).await;
        let seqs = store.live_seqs().expect("SQLite offers the live path");
        let live = |seq: u64, body: &str, refusable: bool| LiveMessage {
            msg: Arc::new(StoredMessage {
                seq,
                sender: "alice".into(),
                recipient: "bob".into(),
                client_id: None,
                body: Body::Text(body.into()),
                accepted_at: 1,
            }),
            fingerprint: None,
            refusable,
        };
        let owned = |r: &Result<Enqueued, StoreError>| matches!(r, Err(StoreError::Owned { .. }));
        let (base, held) = seqs.claim("bob", 10).await.unwrap();
        assert_eq!((base, held), (0, 0));
        assert!(owned(&store.enqueue(text("alice", "bob", "x", None)).await));
        let out = seqs
            .put(vec![live(1, "one", true), live(2, "two", true)])
            .await;
        assert!(
            out.answers
                .iter()
                .all(|r| matches!(r, Ok(Enqueued::New { .. }))),
            "{:?}",
            out.answers
        );
        // The session ends having handed out seqs up to 3; the write of 3 comes late.
        seqs.release("bob", 0, 3).await;
        let out = seqs.put(vec![live(3, "late", true)]).await;
        assert!(owned(&out.answers[0]), "no owner: {:?}", out.answers);
        // The next session claims: seqs up to 3 are the old session's.
        let (base, _) = seqs.claim("bob", 10).await.unwrap();
        assert_eq!(base, 3);
        // The first session, ending late, can neither extend nor undo the new claim.
        assert!(matches!(
            seqs.reserve("bob", 0, 100).await,
            Err(StoreError::Owned { .. })
        ));
        seqs.release("bob", 0, 2).await;
        assert!(
            owned(&store.enqueue(text("alice", "bob", "x", None)).await),
            "still claimed"
        );
        seqs.reserve("bob", 3, 20).await.unwrap();
        let out = seqs
            .put(vec![live(3, "late", true), live(4, "four", true)])
            .await;
        assert!(
            owned(&out.answers[0]),
            "the old owner's seq: {:?}",
            out.answers
        );
        assert!(
            matches!(out.answers[1], Ok(Enqueued::New { seq: 4 })),
            "{:?}",
            out.answers
        );
        // Delivered already: written whatever the owner (its seq was the old session's).
        let out = seqs.put(vec![live(3, "delivered", false)]).await;
        assert!(
            matches!(out.answers[0], Ok(Enqueued::New { seq: 3 })),
            "{:?}",
            out.answers
        );
        seqs.release("bob", 3, 4).await;
        let bodies: Vec<(u64, String)> = store
            .fetch("bob", 0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.seq, m.body.as_str().to_string()))
            .collect();
        assert_eq!(
            bodies,
            [
                (1, "one".into()),
                (2, "two".into()),
                (3, "delivered".into()),
                (4, "four".into())
            ]
        );
    }

    /// A database from a newer Pigeon is refused with a message that says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn newer_schema_is_refused() {
        let t = sqlite_target();
        let Target::Sqlite { dir } = &t else {
            unreachable!()
        };
        let conn = rusqlite::Connection::open(dir.path().join("pigeon.db")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = match store::open(&t.config(), 100).await {
            Ok(_) => panic!("a schema from the future was opened"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("schema version 99"), "{err}");
    }
}

/// Says a test was skipped where it is seen: straight to stderr, past libtest's capture.
fn skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{what}");
}
