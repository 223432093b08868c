//! The live path (issue 15): a message to a user online on this server goes to their
//! session at once and is written to the store only if they have not acknowledged it
//! within `[storage] write_behind_ms`. What the tests pin down:
//! - acknowledged first: never written (the store stays empty, the metrics say so), and
//!   the sender still hears `delivered` (legacy dialects: once the client's TCP
//!   acknowledged the bytes);
//! - not acknowledged: the recipient gets everything at the next login, same seqs, in
//!   order, and the mailbox's seqs go on without a gap;
//! - `kill -9` while messages are on the live path loses nothing a sender was told about.
mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::{free_port, http_get, test_config, Client, Frame, ServerProcess, TestServer};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A counter from `/metrics`.
async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let page = http_get(addr, "/metrics").await;
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Messages in the SQLite store and the mailbox's last seq for `user`.
fn store_rows(dir: &Path, user: &str) -> (i64, i64) {
    let db = rusqlite::Connection::open(dir.join("pigeon.db")).unwrap();
    let rows: i64 = db
        .query_row(
            "SELECT count(*) FROM message WHERE recipient = ?1",
            [user],
            |r| r.get(0),
        )
        .unwrap();
    let last: i64 = db
        .query_row(
            "SELECT coalesce(max(last_seq), 0) FROM mailbox WHERE recipient = ?1",
            [user],
            |r| r.get(0),
        )
        .unwrap_or(0);
    (rows, last)
}

/// The next frame of `type` (others, such as receipts, are passed over).
async fn next_of(c: &mut Client, kind: &str) -> Value {
    loop {
        let v = c.json().await;
        if v["type"] == kind {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_acknowledged_first_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // Far longer than an acknowledgement takes: only acks can answer the senders.
    cfg.storage.write_behind_ms = 60_000;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    for i in 0..10u64 {
        alice
            .send_json(json!({"type":"send","to":"bob","body":format!("m{i}")}))
            .await;
        let m = next_of(&mut bob, "msg").await;
        assert_eq!(m["seq"], i + 1, "{m}");
        assert_eq!(m["body"], format!("m{i}"));
        bob.ack(i + 1).await;
        let sent = tokio::time::timeout(Duration::from_secs(5), next_of(&mut alice, "sent"))
            .await
            .expect("the sender is answered by the acknowledgement, not the write");
        assert_eq!(sent["seq"], i + 1, "{sent}");
        assert_eq!(sent["status"], "delivered", "{sent}");
    }
    // A legacy (hash) recipient acknowledges with its TCP.
    let mut hank = Client::connect(&format!("{base}/ws")).await;
    hank.text("hank#hi#nobody").await;
    // The answer to hank's own frame comes after his session took over his mailbox (it
    // is queued behind the session's start): from here on his messages are live.
    while hank.recv().await != "send success" {}
    for i in 0..5 {
        alice
            .send_json(json!({"type":"send","to":"hank","body":format!("h{i}")}))
            .await;
        assert_eq!(hank.recv().await, format!("alice#h{i}#hank"));
        let sent = tokio::time::timeout(Duration::from_secs(5), next_of(&mut alice, "sent"))
            .await
            .expect("a hash recipient's TCP acknowledgement answers the sender");
        assert_eq!(sent["status"], "delivered", "{sent}");
    }
    assert_eq!(
        metric(srv.addr, "pigeon_messages_acked_unwritten_total").await,
        15
    );
    assert_eq!(
        metric(srv.addr, "pigeon_messages_written_behind_total").await,
        0
    );
    bob.close().await;
    hank.close().await;
    alice.close().await;
    srv.stop().await;
    // Nothing was written; the seqs handed out were given back exactly (no gap).
    assert_eq!(store_rows(dir.path(), "bob"), (0, 10));
    assert_eq!(store_rows(dir.path(), "hank"), (0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_who_leaves_without_acknowledging_gets_everything_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.storage.write_behind_ms = 60_000;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    for i in 0..10 {
        alice
            .send_json(json!({"type":"send","to":"bob","body":format!("m{i}")}))
            .await;
    }
    // bob sees the first and leaves without acknowledging it: it is written at the
    // session's end (long before the write-behind would), the rest is stored as for
    // anyone offline, under the next seqs.
    assert_eq!(next_of(&mut bob, "msg").await["seq"], 1);
    bob.close().await;
    for i in 0..10u64 {
        let sent = tokio::time::timeout(Duration::from_secs(5), next_of(&mut alice, "sent"))
            .await
            .expect("answered at the recipient's session end");
        assert_eq!(sent["seq"], i + 1, "{sent}");
    }
    let (mut bob, flushed) = Client::pigeon(&base, "bob").await;
    let seqs: Vec<u64> = flushed.iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "{flushed:?}");
    let bodies: Vec<&str> = flushed.iter().filter_map(|v| v["body"].as_str()).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
    bob.ack(10).await;
    // The seqs go on where they were, live again.
    alice
        .send_json(json!({"type":"send","to":"bob","body":"next"}))
        .await;
    assert_eq!(next_of(&mut bob, "msg").await["seq"], 11);
    bob.ack(11).await;
    assert_eq!(next_of(&mut alice, "sent").await["seq"], 11);
    // A take-over while a live message is unacknowledged: the second session gets it.
    alice
        .send_json(json!({"type":"send","to":"bob","body":"t"}))
        .await;
    assert_eq!(next_of(&mut bob, "msg").await["seq"], 12);
    let (mut bob2, flushed) = Client::pigeon(&base, "bob").await;
    let seqs: Vec<u64> = flushed.iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs, [12], "{flushed:?}");
    let sent = tokio::time::timeout(Duration::from_secs(5), next_of(&mut alice, "sent"))
        .await
        .expect("answered at the replaced session's end");
    assert_eq!(sent["seq"], 12, "{sent}");
    bob2.ack(12).await;
    bob2.ping().await;
    alice.close().await;
    bob2.close().await;
    drop(bob);
    srv.stop().await;
    assert_eq!(store_rows(dir.path(), "bob"), (0, 12));
}

/// Sends with ids to a live recipient are written before they are routed, a
/// pipelined batch of them in one store round trip: a retry and a reused id in the
/// middle of such a batch are answered as one at a time would be, and the recipient
/// gets each message once, in the order sent, under the seq its sender was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_with_ids_keep_order_retries_and_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let mut frames = Vec::new();
    for i in 0..40 {
        if i == 20 {
            frames.push(json!({"type":"send","id":"p5","to":"bob","body":"b5"}));
        }
        if i == 30 {
            frames.push(json!({"type":"send","id":"p7","to":"bob","body":"not b7"}));
        }
        frames.push(json!({"type":"send","id":format!("p{i}"),"to":"bob","body":format!("b{i}")}));
    }
    // All at once, so that the server reads them as one batch (or a few).
    let text: Vec<Message> = frames
        .iter()
        .map(|f| Message::text(f.to_string()))
        .collect();
    for m in text {
        alice.try_send(m).await.unwrap();
    }
    let mut told: HashMap<String, u64> = HashMap::new();
    let mut last = 0;
    for f in &frames {
        let id = f["id"].as_str().unwrap();
        let answer = alice.json_except_receipts().await;
        assert_eq!(
            answer["id"], id,
            "answers come in the order of the sends: {answer}"
        );
        match (f["body"].as_str().unwrap(), told.get(id)) {
            ("not b7", _) => {
                assert_eq!(answer["type"], "error", "{answer}");
                assert_eq!(answer["code"], "id_conflict", "{answer}");
            }
            (_, Some(first)) => {
                assert_eq!(answer["type"], "sent", "{answer}");
                assert_eq!(answer["duplicate"], true, "{answer}");
                assert_eq!(answer["seq"], *first, "{answer}");
            }
            (_, None) => {
                assert_eq!(answer["type"], "sent", "{answer}");
                assert_eq!(answer["duplicate"], false, "{answer}");
                let seq = answer["seq"].as_u64().unwrap();
                assert!(
                    seq > last,
                    "seqs grow in the order sent: {answer} after {last}"
                );
                last = seq;
                told.insert(id.to_string(), seq);
            }
        }
    }
    for i in 0..40 {
        let m = next_of(&mut bob, "msg").await;
        assert_eq!(m["body"], format!("b{i}"), "once each, in order: {m}");
        assert_eq!(m["seq"], told[&format!("p{i}")], "{m}");
    }
    bob.ack(last).await;
    bob.ping().await;
    assert_eq!(
        bob.try_recv(Duration::from_millis(300)).await,
        None,
        "no second copy reaches the recipient"
    );
    alice.close().await;
    bob.close().await;
    srv.stop().await;
    assert_eq!(store_rows(dir.path(), "bob").0, 0, "acknowledged: deleted");
}

/// Two senders to one live recipient, one whose sends carry ids (written before they
/// are routed, a batch at a time) and one whose do not (routed at once): the recipient
/// still gets its mailbox in seq order, each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_first_and_live_messages_reach_the_recipient_in_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let (mut carol, _) = Client::pigeon(&base, "carol").await;
    const EACH: usize = 300;
    let with_ids = tokio::spawn(async move {
        for i in 0..EACH {
            let f = json!({"type":"send","id":format!("a{i}"),"to":"bob","body":format!("a{i}")});
            alice.try_send(Message::text(f.to_string())).await.unwrap();
        }
        alice
    });
    let without = tokio::spawn(async move {
        for i in 0..EACH {
            let f = json!({"type":"send","to":"bob","body":format!("c{i}")});
            carol.try_send(Message::text(f.to_string())).await.unwrap();
        }
        carol
    });
    let mut last = 0;
    let mut bodies = Vec::new();
    while bodies.len() < 2 * EACH {
        let m = next_of(&mut bob, "msg").await;
        let seq = m["seq"].as_u64().unwrap();
        assert!(seq > last, "seq {seq} after {last}: {m}");
        last = seq;
        bodies.push(m["body"].as_str().unwrap().to_string());
        if bodies.len() % 50 == 0 {
            bob.ack(seq).await;
        }
    }
    for prefix in ["a", "c"] {
        let mine: Vec<&String> = bodies.iter().filter(|b| b.starts_with(prefix)).collect();
        let expected: Vec<String> = (0..EACH).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(
            mine,
            expected.iter().collect::<Vec<_>>(),
            "each sender's in order, once"
        );
    }
    let alice = with_ids.await.unwrap();
    let carol = without.await.unwrap();
    alice.close().await;
    carol.close().await;
    bob.close().await;
    srv.stop().await;
}

/// A take-over whose old session ends late: bob's first session reads nothing, so its
/// goodbye is stuck behind megabytes in the socket and its end takes longer than
/// `takeover_wait_ms`; the new session claims the mailbox meanwhile. The old session's
/// hand-back, when it finally comes, must not undo that claim: messages to bob, written
/// first (with ids) or live, still reach the new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_session_ending_after_the_take_over_leaves_the_new_claim_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.server.takeover_wait_ms = 200;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (stuck, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    // Far more than the loopback socket buffers hold: the session's writes block.
    let big = "x".repeat(60 * 1024);
    const BIG: usize = 300;
    for _ in 0..BIG {
        let f = json!({"type":"send","to":"bob","body":big});
        alice.try_send(Message::text(f.to_string())).await.unwrap();
    }
    for _ in 0..BIG {
        let sent = next_of(&mut alice, "sent").await;
        assert!(sent["seq"].as_u64().is_some(), "{sent}");
    }
    let started = std::time::Instant::now();
    let (mut bob, flushed) = Client::pigeon(&base, "bob").await;
    let got = flushed.iter().filter(|v| v["type"] == "msg").count();
    // Read the rest of the big ones, whatever was not in the flush.
    let mut left = BIG.saturating_sub(got);
    while left > 0 {
        next_of(&mut bob, "msg").await;
        left -= 1;
    }
    // The old session's end gives up after 3 × takeover_wait_ms; then it hands back.
    let settle = Duration::from_millis(1_500).saturating_sub(started.elapsed());
    tokio::time::sleep(settle).await;
    for (i, id) in [Some("late-1"), None, Some("late-2")]
        .into_iter()
        .enumerate()
    {
        let mut f = json!({"type":"send","to":"bob","body":format!("after {i}")});
        if let Some(id) = id {
            f["id"] = json!(id);
        }
        alice.send_json(f).await;
        let sent = tokio::time::timeout(Duration::from_secs(5), next_of(&mut alice, "sent"))
            .await
            .expect("answered");
        assert_eq!(sent["type"], "sent", "{sent}");
        let m = tokio::time::timeout(Duration::from_secs(5), next_of(&mut bob, "msg"))
            .await
            .expect("the new session gets it");
        assert_eq!(m["body"], format!("after {i}"), "{m}");
        assert_eq!(m["seq"], sent["seq"], "{m} {sent}");
    }
    drop(stuck);
    alice.close().await;
    bob.close().await;
    srv.stop().await;
}

/// A frame a recipient saw: (sender, body).
fn hash_message(t: &str) -> Option<(String, String)> {
    let (from, rest) = t.split_once('#')?;
    let (body, _) = rest.rsplit_once('#')?;
    Some((from.to_string(), body.to_string()))
}

/// Sends `from#{from}-{i}#to` one at a time until the socket ends; returns the bodies
/// answered `send success` (the server was told it delivered them).
async fn hash_sender(base: String, from: String, to: String) -> Vec<String> {
    let mut c = Client::connect(&format!("{base}/ws")).await;
    let mut told = Vec::new();
    for i in 0.. {
        let body = format!("{from}-{i}");
        if c.try_send(tokio_tungstenite::tungstenite::Message::text(format!(
            "{from}#{body}#{to}"
        )))
        .await
        .is_err()
        {
            return told;
        }
        loop {
            match c.next_or_close().await {
                Ok(Frame::Text(t)) if t == "send success" => {
                    told.push(body);
                    break;
                }
                Ok(Frame::Text(t)) if t == "Out Line" => {}
                Ok(_) => {}
                Err(_) => return told,
            }
        }
    }
    told
}

/// Reads a hash recipient's messages until the socket ends.
async fn hash_reader(mut c: Client) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while let Ok(f) = c.next_or_close().await {
        if let Frame::Text(t) = f {
            got.extend(hash_message(&t));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_on_the_live_path_loses_nothing_a_sender_was_told() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // A write-behind long enough that many messages are still only in memory when the
    // kill lands, and short enough that some are written.
    let env = [("PIGEON_STORAGE_WRITE_BEHIND_MS", "30")];
    let mut told: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut got: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (round, run_ms) in [700u64, 1300, 400].into_iter().enumerate() {
        let mut srv = ServerProcess::spawn(dir.path(), port, &env).await;
        let base = format!("ws://{}", srv.addr);
        let mut readers = Vec::new();
        for r in ["rae", "rob"] {
            let mut c = Client::connect(&format!("{base}/ws")).await;
            c.text(format!("{r}#hi#nobody")).await;
            readers.push((r, tokio::spawn(hash_reader(c))));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut senders = Vec::new();
        for (s, r) in [("sam", "rae"), ("sue", "rob"), ("sid", "rae")] {
            let from = format!("{s}{round}");
            senders.push(tokio::spawn(hash_sender(base.clone(), from, r.to_string())));
        }
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        srv.kill9();
        for s in senders {
            for body in s.await.unwrap() {
                told.entry("any".into()).or_default().insert(body);
            }
        }
        for (r, h) in readers {
            for (_, body) in h.await.unwrap() {
                got.entry(r.into()).or_default().insert(body);
            }
        }
    }
    // After the last kill: log in once more and read what waits.
    let mut srv = ServerProcess::spawn(dir.path(), port, &[]).await;
    let base = format!("ws://{}", srv.addr);
    for r in ["rae", "rob"] {
        let mut c = Client::connect(&format!("{base}/ws")).await;
        c.text(format!("{r}#hi#nobody")).await;
        while let Some(t) = c.try_recv(Duration::from_millis(1500)).await {
            if let Some((_, body)) = hash_message(&t) {
                got.entry(r.into()).or_default().insert(body);
            }
        }
        c.close().await;
    }
    srv.terminate();
    let told = told.remove("any").unwrap_or_default();
    let all: BTreeSet<String> = got.values().flatten().cloned().collect();
    assert!(
        told.len() > 50,
        "too little traffic to mean anything: {}",
        told.len()
    );
    let lost: Vec<&String> = told.iter().filter(|b| !all.contains(*b)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} lost: {:?}",
        lost.len(),
        told.len(),
        lost
    );
}
