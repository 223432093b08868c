//! Binary blobs (files, video): streamed live between online users, stored for offline
//! ones and delivered in order at login, limited, checked, and cleaned up.
mod common;

use std::path::Path;
use std::time::Duration;

use common::{test_config, Client, Frame, TestServer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The test config with download links off (`blob_link_secs = 0`): an acknowledged
/// blob is then deleted with its ack, which these tests check (tests/legacy_files.rs
/// covers the links and the deferred deletion).
fn config(dir: &Path) -> pigeon::config::Config {
    let mut c = test_config(dir);
    c.limits.blob_link_secs = 0;
    c
}

fn blob_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("blobs"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Announces a blob and returns the stream the server assigned.
async fn announce(c: &mut Client, id: &str, to: &str, data: &[u8], with_sha: bool) -> u32 {
    let mut frame = json!({"type":"blob","id":id,"to":to,"name":"clip.mp4","mime":"video/mp4","size":data.len()});
    if with_sha {
        frame["sha256"] = json!(sha(data));
    }
    c.send_json(frame).await;
    let v = c.json().await;
    assert_eq!(v["type"], "blob_accepted", "{v}");
    assert_eq!(v["id"], id);
    v["stream"].as_u64().unwrap() as u32
}

async fn send_chunks(c: &mut Client, stream: u32, data: &[u8], chunk: usize) {
    for part in data.chunks(chunk) {
        let mut f = stream.to_be_bytes().to_vec();
        f.extend_from_slice(part);
        c.binary(f).await;
    }
}

/// Reads one whole blob (blob_start, chunks, blob_end) and returns (start, bytes, end).
async fn receive_blob(c: &mut Client) -> (Value, Vec<u8>, Value) {
    let start = c.json().await;
    assert_eq!(start["type"], "blob_start", "{start}");
    let stream = start["stream"].as_u64().unwrap() as u32;
    let mut bytes = Vec::new();
    loop {
        match c.frame().await {
            Frame::Binary(b) => {
                assert_eq!(u32::from_be_bytes(b[..4].try_into().unwrap()), stream);
                bytes.extend_from_slice(&b[4..]);
            }
            Frame::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["stream"].as_u64().unwrap() as u32, stream, "{v}");
                return (start, bytes, v);
            }
        }
    }
}

#[tokio::test]
async fn online_multi_chunk_relay_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let data = pattern(3 * 1024 * 1024 + 17, 1);
    let stream = announce(&mut alice, "v1", "bob", &data, true).await;
    let sender = tokio::spawn(async move {
        send_chunks(&mut alice, stream, &data, 100_000).await;
        let sent = alice.json().await;
        (alice, sent, data)
    });
    let (start, bytes, end) = receive_blob(&mut bob).await;
    let (_alice, sent, data) = sender.await.unwrap();
    assert_eq!(start["from"], "alice");
    assert_eq!(start["name"], "clip.mp4");
    assert_eq!(start["mime"], "video/mp4");
    assert_eq!(start["size"].as_u64().unwrap() as usize, data.len());
    assert_eq!(start["sha256"], sha(&data));
    assert_eq!(bytes.len(), data.len());
    assert!(bytes == data, "relayed bytes differ");
    assert_eq!(sha(&bytes), sha(&data));
    assert_eq!(end["type"], "blob_end");
    assert_eq!(sent["type"], "sent");
    assert_eq!(sent["status"], "delivered");
    assert_eq!(sent["seq"], end["seq"]);
    bob.ack(end["seq"].as_u64().unwrap()).await;
    bob.ping().await;
    assert!(
        blob_files(dir.path()).is_empty(),
        "acked blob must be deleted: {:?}",
        blob_files(dir.path())
    );
    srv.stop().await;
}

#[tokio::test]
async fn offline_blob_is_delivered_at_login_in_order_with_text() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    assert_eq!(
        alice.send_msg("t1", "bob", json!("before")).await["status"],
        "stored"
    );
    let data = pattern(700_000, 9);
    let stream = announce(&mut alice, "b1", "bob", &data, false).await;
    send_chunks(&mut alice, stream, &data, 65_536).await;
    let sent = alice.json().await;
    assert_eq!(sent["status"], "stored", "{sent}");
    assert_eq!(
        alice.send_msg("t2", "bob", json!("after")).await["status"],
        "stored"
    );
    assert_eq!(blob_files(dir.path()).len(), 1);

    let mut bob = Client::connect(&srv.url("/ws?user=bob")).await;
    let welcome = bob.json().await;
    assert_eq!(welcome["pending"], 3);
    let first = bob.json().await;
    assert_eq!(
        (first["type"].as_str(), first["body"].as_str()),
        (Some("msg"), Some("before"))
    );
    let (start, bytes, end) = receive_blob(&mut bob).await;
    assert_eq!(start["offline"], true);
    assert_eq!(start["id"], "b1");
    assert!(bytes == data, "stored blob differs");
    assert_eq!(end["seq"], sent["seq"]);
    let last = bob.json().await;
    assert_eq!(last["body"], "after");
    assert_eq!(bob.json().await["type"], "synced");
    bob.ack(last["seq"].as_u64().unwrap()).await;
    bob.ping().await;
    assert!(blob_files(dir.path()).is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn limits_overflow_and_checksum_are_enforced_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.max_blob_bytes = 1_000_000;
    cfg.limits.max_transfers = 2;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;

    alice
        .send_json(json!({"type":"blob","id":"big","to":"bob","size":1_000_001}))
        .await;
    let e = alice.json().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("too_large"), Some("big"))
    );

    // More bytes than announced.
    let s = announce(&mut alice, "over", "bob", &[0u8; 10], false).await;
    assert_eq!(bob.json().await["type"], "blob_start");
    send_chunks(&mut alice, s, &[1u8; 11], 11).await;
    let e = alice.json().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("blob_overflow"), Some("over"))
    );
    let abort = bob.json().await;
    assert_eq!(
        (abort["type"].as_str(), abort["reason"].as_str()),
        (Some("blob_abort"), Some("overflow"))
    );

    // Wrong checksum: refused, recipient told, nothing stored.
    let data = pattern(5000, 3);
    let mut frame =
        json!({"type":"blob","id":"sum","to":"bob","size":data.len(),"sha256":sha(b"other")});
    frame["name"] = json!("x.bin");
    alice.send_json(frame).await;
    let s = alice.json().await["stream"].as_u64().unwrap() as u32;
    send_chunks(&mut alice, s, &data, 1000).await;
    let e = alice.json().await;
    assert_eq!(e["code"], "checksum_mismatch");
    let (start, _, end) = receive_blob(&mut bob).await;
    assert_eq!(start["name"], "x.bin");
    assert_eq!(
        (end["type"].as_str(), end["reason"].as_str()),
        (Some("blob_abort"), Some("checksum_mismatch"))
    );

    // Too many at once.
    announce(&mut alice, "p1", "carol", &[0u8; 4], false).await;
    announce(&mut alice, "p2", "carol", &[0u8; 4], false).await;
    alice
        .send_json(json!({"type":"blob","id":"p3","to":"carol","size":4}))
        .await;
    assert_eq!(alice.json().await["code"], "too_many_transfers");
    // The sender cancels one.
    alice
        .send_json(json!({"type":"blob_abort","stream":1}))
        .await;
    alice.ping().await;

    assert_eq!(bob.try_recv(Duration::from_millis(200)).await, None);
    let (_bob, flushed) = Client::pigeon(&base, "bob").await;
    assert!(
        flushed.is_empty(),
        "refused blobs must not reach the mailbox: {flushed:?}"
    );
    alice.close().await;
    // Pending partial transfers are deleted when the sender goes away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        blob_files(dir.path()).is_empty(),
        "{:?}",
        blob_files(dir.path())
    );
    srv.stop().await;
}

#[tokio::test]
async fn sender_dropping_mid_transfer_aborts_it_for_the_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let data = pattern(200_000, 5);
    let s = announce(&mut alice, "gone", "bob", &data, false).await;
    send_chunks(&mut alice, s, &data[..50_000], 25_000).await;
    alice.ping().await;
    drop(alice);
    let start = bob.json().await;
    assert_eq!(start["type"], "blob_start");
    let mut got = 0;
    let abort = loop {
        match bob.frame().await {
            Frame::Binary(b) => got += b.len() - 4,
            Frame::Text(t) => break serde_json::from_str::<Value>(&t).unwrap(),
        }
    };
    assert_eq!(got, 50_000);
    assert_eq!(
        (abort["type"].as_str(), abort["reason"].as_str()),
        (Some("blob_abort"), Some("sender_gone"))
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        blob_files(dir.path()).is_empty(),
        "{:?}",
        blob_files(dir.path())
    );
    srv.stop().await;
}

/// A take-over of the recipient mid-transfer: the old session's live relay stops, and
/// the new session receives the whole blob from the mailbox once it completes
/// (transfers restart from the first byte; they are not resumed).
#[tokio::test]
async fn recipient_takeover_mid_transfer_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob1, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let data = pattern(400_000, 7);
    let s = announce(&mut alice, "tk", "bob", &data, true).await;
    send_chunks(&mut alice, s, &data[..100_000], 50_000).await;
    alice.ping().await;
    assert_eq!(bob1.json().await["type"], "blob_start");
    let (mut bob2, _) = Client::pigeon(&base, "bob").await;
    assert_eq!(bob1.closed().await.0.code, 4000);
    send_chunks(&mut alice, s, &data[100_000..], 50_000).await;
    let sent = alice.json().await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let (start, bytes, end) = receive_blob(&mut bob2).await;
    assert_eq!(start["id"], "tk");
    assert!(bytes == data);
    assert_eq!(end["type"], "blob_end");
    srv.stop().await;
}

#[tokio::test]
async fn legacy_binary_frames_go_to_the_last_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(config(dir.path())).await;
    let mut hank = Client::connect(&srv.url("/ws")).await;
    // Before any text frame the session has no dialect yet: the error is Pigeon JSON.
    hank.binary(vec![1, 2, 3]).await;
    assert_eq!(hank.json().await["code"], "not_identified");
    hank.text("hank#hi#sam").await;
    assert_eq!(hank.recv().await, "Out Line");
    assert_eq!(hank.recv().await, "send success");
    hank.binary(vec![9; 1000]).await;
    assert_eq!(hank.recv().await, "Out Line");
    assert_eq!(hank.recv().await, "send success");
    // A seed-JSON recipient gets the text, then the file as a JSON notice (no link
    // with blob_link_secs = 0; tests/legacy_files.rs covers links and large frames).
    let mut sam = Client::connect(&srv.url("/ws/sam")).await;
    assert_eq!(sam.json().await["msg"], "hi");
    let notice = sam.json().await;
    assert_eq!(notice["from_user"], "hank");
    assert_eq!(notice["file"]["size"], 1000);
    // A Pigeon JSON recipient gets a legacy binary frame as a blob.
    hank.text("hank#for pia#pia").await;
    hank.recv().await;
    hank.recv().await;
    hank.binary(vec![7; 10]).await;
    hank.recv().await;
    hank.recv().await;
    let mut pia = Client::connect(&srv.url("/ws?user=pia")).await;
    pia.json().await; // welcome
    assert_eq!(pia.json().await["body"], "for pia");
    let (start, bytes, _) = receive_blob(&mut pia).await;
    assert_eq!(start["mime"], "application/octet-stream");
    assert_eq!(bytes, vec![7; 10]);
    srv.stop().await;
}

/// A transfer that stalls (no chunk for `blob_idle_secs`) is aborted: the sender gets
/// `blob_timeout` naming the key, the live recipient a `blob_abort`, the spool file is
/// deleted, and the session goes on working.
#[tokio::test]
async fn stalled_transfer_times_out_and_frees_its_spool_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.blob_idle_secs = 1;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let data = pattern(30_000, 9);
    let s = announce(&mut alice, "stall", "bob", &data, false).await;
    send_chunks(&mut alice, s, &data[..10_000], 10_000).await;
    alice.ping().await;
    assert_eq!(bob.json().await["type"], "blob_start");
    assert!(
        blob_files(dir.path()).iter().any(|f| f.ends_with(".part")),
        "the transfer spools to a .part file: {:?}",
        blob_files(dir.path())
    );
    let started = std::time::Instant::now();
    let e = alice.json().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
        (Some("error"), Some("blob_timeout"), Some("stall")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("blob_idle_secs"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut relayed = 0;
    let abort = loop {
        match bob.frame().await {
            Frame::Binary(b) => relayed += b.len() - 4,
            Frame::Text(t) => break serde_json::from_str::<Value>(&t).unwrap(),
        }
    };
    assert_eq!(relayed, 10_000);
    assert_eq!(
        (abort["type"].as_str(), abort["reason"].as_str()),
        (Some("blob_abort"), Some("blob_timeout"))
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        blob_files(dir.path()).is_empty(),
        "{:?}",
        blob_files(dir.path())
    );
    // The stream is gone; the session still works.
    send_chunks(&mut alice, s, &data[10_000..11_000], 1_000).await;
    assert_eq!(alice.json().await["code"], "unknown_stream");
    let sent = alice.send_msg("after", "bob", json!("still here")).await;
    assert_eq!(sent["type"], "sent", "{sent}");
    assert_eq!(bob.json().await["body"], "still here");
    srv.stop().await;
}

/// A blob is written and hashed off the session task while the next chunks arrive and
/// are relayed: a wrong `sha256` is still refused once every byte is in, the recipient
/// gets `blob_abort`, nothing is left on disk or in the mailbox, and a retry of the same
/// id with the right hash arrives byte-exact (nothing of the first attempt leaks in).
#[tokio::test]
async fn wrong_sha256_is_refused_after_a_pipelined_transfer_and_the_retry_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let data = pattern(6 * 1024 * 1024 + 5, 9);

    let mut frame = json!({"type":"blob","id":"p1","to":"bob","size":data.len(),"sha256":sha(b"not these bytes")});
    frame["name"] = json!("p.bin");
    alice.send_json(frame).await;
    let v = alice.json().await;
    assert_eq!(v["type"], "blob_accepted", "{v}");
    let s = v["stream"].as_u64().unwrap() as u32;
    let sender = tokio::spawn(async move {
        send_chunks(&mut alice, s, &data, 256 * 1024).await;
        let answer = alice.json().await;
        (alice, answer, data)
    });
    let (start, bytes, end) = receive_blob(&mut bob).await;
    let (mut alice, answer, data) = sender.await.unwrap();
    assert_eq!(
        (answer["code"].as_str(), answer["id"].as_str()),
        (Some("checksum_mismatch"), Some("p1")),
        "{answer}"
    );
    assert_eq!(start["id"], "p1");
    assert!(bytes.len() <= data.len());
    assert_eq!(
        (end["type"].as_str(), end["reason"].as_str()),
        (Some("blob_abort"), Some("checksum_mismatch"))
    );
    alice.ping().await;
    assert!(
        blob_files(dir.path()).is_empty(),
        "a refused blob leaves nothing behind: {:?}",
        blob_files(dir.path())
    );

    // The same id again, with the right hash.
    let s = announce(&mut alice, "p1", "bob", &data, true).await;
    let sender = tokio::spawn(async move {
        send_chunks(&mut alice, s, &data, 256 * 1024).await;
        let sent = alice.json().await;
        (alice, sent, data)
    });
    let (start, bytes, end) = receive_blob(&mut bob).await;
    let (_alice, sent, data) = sender.await.unwrap();
    assert_eq!(sent["type"], "sent", "{sent}");
    assert_eq!(sent["status"], "delivered");
    assert_eq!(start["id"], "p1");
    assert!(bytes == data, "relayed bytes differ");
    assert_eq!(end["type"], "blob_end");
    assert_eq!(
        blob_files(dir.path()).len(),
        1,
        "{:?}",
        blob_files(dir.path())
    );
    bob.ack(end["seq"].as_u64().unwrap()).await;
    bob.ping().await;
    let (_bob2, flushed) = Client::pigeon(&base, "bob").await;
    assert!(flushed.is_empty(), "{flushed:?}");
    srv.stop().await;
}

/// `limits.blob_spool_bytes` far below a chunk: each chunk then takes the whole budget,
/// so two transfers on one session take turns; both still arrive byte-exact and hashed,
/// nothing waits forever.
#[tokio::test]
async fn a_spool_budget_below_a_chunk_still_moves_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.blob_spool_bytes = 1000;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut carol, _) = Client::pigeon(&base, "carol").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let one = pattern(1024 * 1024 + 3, 11);
    let two = pattern(700_001, 12);
    let s1 = announce(&mut alice, "one", "bob", &one, true).await;
    let s2 = announce(&mut alice, "two", "carol", &two, true).await;
    let (a, b) = (one.clone(), two.clone());
    let sender = tokio::spawn(async move {
        // Interleaved: both transfers share the session's budget.
        let (mut i, mut j) = (a.chunks(64 * 1024), b.chunks(50_000));
        loop {
            let (x, y) = (i.next(), j.next());
            if x.is_none() && y.is_none() {
                break;
            }
            for (s, part) in [(s1, x), (s2, y)] {
                if let Some(part) = part {
                    let mut f = s.to_be_bytes().to_vec();
                    f.extend_from_slice(part);
                    alice.binary(f).await;
                }
            }
        }
        let answers = [alice.json().await, alice.json().await];
        (alice, answers)
    });
    let (b1, c1) = tokio::join!(receive_blob(&mut bob), receive_blob(&mut carol));
    let (_alice, answers) = sender.await.unwrap();
    for a in &answers {
        assert_eq!(
            (a["type"].as_str(), a["status"].as_str()),
            (Some("sent"), Some("delivered")),
            "{a}"
        );
    }
    assert!(b1.1 == one, "bob's bytes differ");
    assert!(c1.1 == two, "carol's bytes differ");
    assert_eq!(b1.2["type"], "blob_end");
    assert_eq!(c1.2["type"], "blob_end");
    srv.stop().await;
}
