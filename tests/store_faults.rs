//! Store faults: the SQLite data directory becoming unwritable (`chattr +i`: root ignores
//! permission bits, not the immutable flag), full (a tiny tmpfs filled to the last byte),
//! and locked (another connection holding `BEGIN EXCLUSIVE` past the busy timeout).
//!
//! In each case a sender gets `store_unavailable` and never `sent` for a message that was
//! not stored, nothing unstored reaches a recipient, other sessions keep working, and once
//! the fault clears sends work again with no sequence number lost or reused.
//! A fault that cannot be injected here (no `chattr`, no `mount`) skips its test with a
//! message saying so.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{test_config, Client, TestServer};
use serde_json::{json, Value};

fn base(srv: &TestServer) -> String {
    format!("ws://{}", srv.addr)
}

/// `chattr +i` on some paths while alive; `chattr -i` when dropped.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[PathBuf]) -> Result<Immutable, String> {
        let mut done = Immutable(Vec::new());
        for p in paths {
            let out = Command::new("chattr")
                .arg("+i")
                .arg(p)
                .output()
                .map_err(|e| format!("chattr: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
            }
            done.0.push(p.clone());
        }
        Ok(done)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(p).status();
        }
    }
}

/// A tmpfs of `size` mounted on `at` while alive.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a server that is still up (a failed assertion) must not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn assert_refused(v: &Value, id: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    assert_eq!(v["id"], id, "{v}");
}

/// Announces a blob of `size` bytes and sends it; returns the server's final answer
/// (`sent` or `error`).
async fn send_blob(c: &mut Client, id: &str, to: &str, size: usize) -> Value {
    c.send_json(json!({"type":"blob","id":id,"to":to,"name":"f.bin","mime":"application/octet-stream","size":size}))
        .await;
    let v = c.json().await;
    if v["type"] != "blob_accepted" {
        return v;
    }
    let stream = v["stream"].as_u64().unwrap() as u32;
    let mut frame = stream.to_be_bytes().to_vec();
    frame.extend(vec![7u8; size]);
    c.binary(frame).await;
    c.json().await
}

/// Ids of the Pigeon `msg` frames in a flush, in order.
fn ids(flushed: &[Value]) -> Vec<String> {
    flushed
        .iter()
        .map(|m| m["id"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test]
async fn unwritable_data_dir_refuses_sends_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.storage.sqlite_busy_timeout_ms = 300;
    let srv = TestServer::start(config).await;
    let b = base(&srv);
    let (mut alice, _) = Client::pigeon(&b, "alice").await;
    let (mut bob, _) = Client::pigeon(&b, "bob").await;
    let (mut dave, _) = Client::pigeon(&b, "dave").await;
    let mut hash = Client::connect(&srv.url("/ws")).await;
    hash.text("hugo#before#bob").await;
    assert_eq!(hash.recv().await, "send success");
    assert_eq!(bob.json().await["body"], "before");
    let first = alice.send_msg("a1", "bob", json!("one")).await;
    assert_eq!(first["status"], "delivered", "{first}");
    let last_seq = first["seq"].as_u64().unwrap();
    assert_eq!(bob.json().await["seq"], last_seq);
    bob.ack(last_seq).await;
    assert_eq!(
        alice.send_msg("a2", "carol", json!("two")).await["status"],
        "stored"
    );

    let mut frozen = vec![
        dir.path().join("pigeon.db"),
        dir.path().join("pigeon.db-wal"),
    ];
    if dir.path().join("blobs").exists() {
        frozen.push(dir.path().join("blobs"));
    }
    frozen.push(dir.path().to_path_buf());
    let guard = match Immutable::set(&frozen) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED: cannot make the data dir unwritable (chattr +i): {e}");
            return;
        }
    };

    // One at a time, and 20 pipelined (one store batch): every one refused.
    for i in 0..4 {
        let to = if i % 2 == 0 { "bob" } else { "carol" };
        let v = alice.send_msg(&format!("f{i}"), to, json!(i)).await;
        assert_refused(&v, &format!("f{i}"));
    }
    for i in 10..30 {
        alice
            .send_json(json!({"type":"send","id":format!("f{i}"),"to":"bob","body":i}))
            .await;
    }
    for i in 10..30 {
        assert_refused(&alice.json().await, &format!("f{i}"));
    }
    hash.text("hugo#during#bob").await;
    let h = hash.recv().await;
    assert!(h.starts_with("!error#store_unavailable#"), "{h}");
    let v = send_blob(&mut alice, "blob1", "carol", 1000).await;
    assert_refused(&v, "blob1");
    // Nothing that was not stored reached bob; everybody else is still served.
    assert_eq!(bob.try_recv(Duration::from_millis(300)).await, None);
    dave.ping().await;
    bob.ping().await;
    let (mut erin, _) = Client::pigeon(&b, "erin").await;
    erin.ping().await;

    drop(guard);
    // Recovered: the next message takes the very next seq (the refused ones used none).
    let v = alice.send_msg("r1", "bob", json!("after")).await;
    assert_eq!(v["status"], "delivered", "{v}");
    assert_eq!(v["seq"], last_seq + 1);
    let m = bob.json().await;
    assert_eq!(
        (m["id"].as_str(), m["seq"].as_u64()),
        (Some("r1"), Some(last_seq + 1))
    );
    // A refused id was never stored: sending it again is not a duplicate.
    let v = alice.send_msg("f1", "carol", json!(1)).await;
    assert_eq!(
        (v["status"].as_str(), v["duplicate"].as_bool()),
        (Some("stored"), Some(false)),
        "{v}"
    );
    hash.text("hugo#again#bob").await;
    assert_eq!(hash.recv().await, "send success");
    assert_eq!(bob.json().await["body"], "again");
    assert_eq!(
        send_blob(&mut alice, "blob1", "carol", 1000).await["type"],
        "sent"
    );
    let (_carol, flushed) = Client::pigeon(&b, "carol").await;
    let got: Vec<String> = flushed
        .iter()
        .map(|m| match m["type"].as_str() {
            Some("blob_start") => format!("blob:{}", m["id"].as_str().unwrap_or("?")),
            _ => m["id"].as_str().unwrap_or("?").to_string(),
        })
        .filter(|s| !s.is_empty() && s != "?")
        .collect();
    assert_eq!(got, ["a2", "f1", "blob:blob1"]);
    srv.stop().await;
}

#[tokio::test]
async fn full_disk_refuses_sends_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiny");
    let _mount = match Tmpfs::mount(&data, "4m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a tmpfs for the full-disk test: {e}");
            return;
        }
    };
    let mut config = test_config(&data);
    config.storage.sqlite_busy_timeout_ms = 300;
    let srv = TestServer::start(config).await;
    let b = base(&srv);
    let (mut alice, _) = Client::pigeon(&b, "alice").await;
    let (mut bob, _) = Client::pigeon(&b, "bob").await;
    let (mut dave, _) = Client::pigeon(&b, "dave").await;
    assert_eq!(
        alice.send_msg("a0", "carol", json!("before")).await["status"],
        "stored"
    );

    // Fill the file system to the last byte.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut full = false;
        for _ in 0..1024 {
            if f.write_all(&chunk).and_then(|_| f.sync_all()).is_err() {
                full = true;
                break;
            }
        }
        assert!(full, "a 4 MiB tmpfs took 64 MiB");
        let byte = [0u8; 1];
        while f.write_all(&byte).is_ok() {}
    }

    // 48 KiB bodies: the WAL has no room left for them.
    let big = "x".repeat(48 * 1024);
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    for i in 0..30 {
        let id = format!("f{i}");
        let to = if i % 2 == 0 { "bob" } else { "carol" };
        let v = alice.send_msg(&id, to, json!(big)).await;
        match v["type"].as_str() {
            Some("sent") => ok.push((id, to)),
            _ => {
                assert_refused(&v, &id);
                refused.push(id);
            }
        }
    }
    eprintln!(
        "disk full: {} sends stored, {} refused",
        ok.len(),
        refused.len()
    );
    assert!(refused.len() >= 10, "a full disk refused only {refused:?}");
    assert_refused(
        &send_blob(&mut alice, "blob1", "carol", 100_000).await,
        "blob1",
    );
    // Bob got exactly the stored ones, nothing else; the others are still served.
    let to_bob: Vec<&str> = ok
        .iter()
        .filter(|(_, to)| *to == "bob")
        .map(|(id, _)| id.as_str())
        .collect();
    for id in &to_bob {
        assert_eq!(bob.json().await["id"], *id);
    }
    assert_eq!(bob.try_recv(Duration::from_millis(300)).await, None);
    dave.ping().await;
    let (mut erin, _) = Client::pigeon(&b, "erin").await;
    erin.ping().await;

    std::fs::remove_file(&filler).unwrap();
    let v = alice.send_msg("r1", "bob", json!(big)).await;
    assert_eq!(v["status"], "delivered", "{v}");
    assert_eq!(bob.json().await["id"], "r1");
    let v = alice.send_msg(&refused[0], "carol", json!("retried")).await;
    assert_eq!(
        (v["status"].as_str(), v["duplicate"].as_bool()),
        (Some("stored"), Some(false)),
        "{v}"
    );
    let (_carol, flushed) = Client::pigeon(&b, "carol").await;
    let mut want = vec!["a0".to_string()];
    want.extend(
        ok.iter()
            .filter(|(_, to)| *to == "carol")
            .map(|(id, _)| id.clone()),
    );
    want.push(refused[0].clone());
    assert_eq!(ids(&flushed), want);
    srv.stop().await;
}

/// The disk fills while a blob arrives. Chunks are written off the session task, so the
/// failed write reaches the sender at a later chunk or at the end: `store_unavailable`
/// with the transfer's id either way, the live recipient gets `blob_abort`, the partial
/// file is deleted, and once there is room again the same id goes through.
#[tokio::test]
async fn disk_filling_mid_blob_aborts_it_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiny");
    let _mount = match Tmpfs::mount(&data, "8m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a tmpfs for the full-disk test: {e}");
            return;
        }
    };
    let mut config = test_config(&data);
    config.limits.blob_link_secs = 0;
    let srv = TestServer::start(config).await;
    let b = base(&srv);
    let (mut alice, _) = Client::pigeon(&b, "alice").await;
    let (mut bob, _) = Client::pigeon(&b, "bob").await;
    alice.ping().await;

    // Fill the file system, then free 1 MiB: a 4 MiB blob runs out of room mid-way.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).and_then(|_| f.sync_all()).is_ok() {}
        let byte = [0u8; 1];
        while f.write_all(&byte).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len - 1024 * 1024).unwrap();
    }
    let size = 4 * 1024 * 1024;
    alice
        .send_json(json!({"type":"blob","id":"big","to":"bob","name":"f.bin","size":size}))
        .await;
    let v = alice.json().await;
    assert_eq!(v["type"], "blob_accepted", "{v}");
    let stream = v["stream"].as_u64().unwrap() as u32;
    for _ in 0..size / (128 * 1024) {
        let mut frame = stream.to_be_bytes().to_vec();
        frame.extend(vec![7u8; 128 * 1024]);
        alice.binary(frame).await;
    }
    assert_refused(&alice.json().await, "big");
    // The chunks after the refusal are answered unknown_stream (enough of them close the
    // socket: a real client stops at the refusal); the retry below logs in again.
    drop(alice);

    assert_eq!(bob.json().await["type"], "blob_start");
    let end = loop {
        if let common::Frame::Text(t) = bob.frame().await {
            break serde_json::from_str::<Value>(&t).unwrap();
        }
    };
    assert_eq!(
        (end["type"].as_str(), end["reason"].as_str()),
        (Some("blob_abort"), Some("store_unavailable")),
        "{end}"
    );
    let left: Vec<_> = std::fs::read_dir(data.join("blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "a failed blob leaves nothing: {left:?}");

    std::fs::remove_file(&filler).unwrap();
    let (mut alice, _) = Client::pigeon(&b, "alice").await;
    let v = send_blob(&mut alice, "big", "bob", 100_000).await;
    assert_eq!(
        (v["type"].as_str(), v["status"].as_str()),
        (Some("sent"), Some("delivered")),
        "{v}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn locked_database_refuses_sends_then_recovers() {
    const BUSY_MS: u64 = 1000;
    const SENDERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.storage.sqlite_busy_timeout_ms = BUSY_MS;
    let srv = TestServer::start(config).await;
    let b = base(&srv);
    let (mut bob, _) = Client::pigeon(&b, "bob").await;
    let (mut dave, _) = Client::pigeon(&b, "dave").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(Client::pigeon(&b, &format!("s{i}")).await.0);
    }
    let v = senders[0].send_msg("ok0", "carol", json!("before")).await;
    assert_eq!(v["status"], "stored", "{v}");

    let locker = rusqlite::Connection::open(dir.path().join("pigeon.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let locked_at = Instant::now();
    // Every sender sends at once: the store sees one request, then a batch of the rest.
    for (i, s) in senders.iter_mut().enumerate() {
        let to = if i % 2 == 0 { "bob" } else { "carol" };
        s.send_json(json!({"type":"send","id":format!("x{i}"),"to":to,"body":i}))
            .await;
    }
    let answers = futures_util::future::join_all(senders.iter_mut().map(|s| s.json())).await;
    let waited = locked_at.elapsed();
    for (i, v) in answers.iter().enumerate() {
        assert_refused(v, &format!("x{i}"));
    }
    // One busy timeout for the first request, one for the batch behind it; not one per
    // request (which kept the store thread, and every session, waiting 9 s here).
    eprintln!("{SENDERS} sends refused after {waited:?} (busy timeout {BUSY_MS} ms)");
    assert!(
        waited < Duration::from_millis(BUSY_MS * 4),
        "refusing {SENDERS} sends under a lock took {waited:?}"
    );
    assert_eq!(bob.try_recv(Duration::from_millis(200)).await, None);
    dave.ping().await;
    assert!(locked_at.elapsed() > Duration::from_millis(BUSY_MS));
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);

    for (i, s) in senders.iter_mut().enumerate() {
        let to = if i % 2 == 0 { "bob" } else { "carol" };
        let v = s.send_msg(&format!("x{i}"), to, json!(i)).await;
        assert_eq!(v["type"], "sent", "{v}");
        assert_eq!(v["duplicate"], false, "{v}");
    }
    let mut to_bob = Vec::new();
    for _ in 0..SENDERS / 2 {
        to_bob.push(bob.json().await["id"].as_str().unwrap().to_string());
    }
    to_bob.sort();
    assert_eq!(to_bob, ["x0", "x2", "x4", "x6"]);
    let (_carol, flushed) = Client::pigeon(&b, "carol").await;
    let mut got = ids(&flushed);
    got[1..].sort();
    assert_eq!(got, ["ok0", "x1", "x3", "x5", "x7"]);
    srv.stop().await;
}
