//! Delivery guarantees: order, persistence across restarts and crashes, retries that
//! never duplicate, full mailboxes, slow consumers.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{free_port, test_config, Client, ServerProcess, TestServer};
use serde_json::{json, Value};

fn base(srv: &TestServer) -> String {
    format!("ws://{}", srv.addr)
}

#[tokio::test]
async fn offline_messages_flush_in_acceptance_order_before_live_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let (mut a, _) = Client::pigeon(&base(&srv), "a").await;
    let (mut b, _) = Client::pigeon(&base(&srv), "b").await;
    let mut order = Vec::new();
    for i in 0..150 {
        let (c, who) = if i % 3 == 0 {
            (&mut b, "b")
        } else {
            (&mut a, "a")
        };
        let sent = c
            .send_msg(&format!("{who}{i}"), "carol", json!(format!("{who}:{i}")))
            .await;
        assert_eq!(sent["status"], "stored", "{sent}");
        order.push(format!("{who}:{i}"));
    }
    let (mut carol, flushed) = Client::pigeon(&base(&srv), "carol").await;
    let bodies: Vec<String> = flushed
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bodies, order);
    let seqs: Vec<u64> = flushed.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(flushed.iter().all(|m| m["offline"] == true));
    // Live traffic after the flush.
    assert_eq!(
        a.send_msg("live", "carol", json!("live")).await["status"],
        "delivered"
    );
    assert_eq!(carol.json().await["body"], "live");
    srv.stop().await;
}

#[tokio::test]
async fn stored_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let mut hash = Client::connect(&srv.url("/ws")).await;
    hash.text("ann#before restart#ben").await;
    assert_eq!(hash.recv().await, "Out Line");
    assert_eq!(hash.recv().await, "send success");
    let (mut p, _) = Client::pigeon(&base(&srv), "pat").await;
    let first = p.send_msg("x1", "ben", json!("json too")).await;
    srv.stop().await;

    let srv = TestServer::start(test_config(dir.path())).await;
    let (mut ben, flushed) = Client::pigeon(&base(&srv), "ben").await;
    let bodies: Vec<&str> = flushed
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["before restart", "json too"]);
    // Sequences continue after a restart; the same id is still known.
    let (mut p, _) = Client::pigeon(&base(&srv), "pat").await;
    let again = p.send_msg("x1", "ben", json!("json too")).await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["seq"], first["seq"]);
    let next = p.send_msg("x2", "ben", json!("after")).await;
    assert_eq!(
        next["seq"].as_u64().unwrap(),
        first["seq"].as_u64().unwrap() + 1
    );
    assert_eq!(ben.json().await["body"], "after");
    srv.stop().await;
}

#[tokio::test]
async fn resend_with_same_id_never_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let (mut a, _) = Client::pigeon(&base(&srv), "a").await;
    let first = a.send_msg("same", "b", json!("once")).await;
    let second = a.send_msg("same", "b", json!("once")).await;
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(first["seq"], second["seq"]);
    // Another sender may use the same id: ids are per sender.
    let (mut c, _) = Client::pigeon(&base(&srv), "c").await;
    assert_eq!(
        c.send_msg("same", "b", json!("other")).await["duplicate"],
        false
    );
    let (mut b, flushed) = Client::pigeon(&base(&srv), "b").await;
    let bodies: Vec<&str> = flushed
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["once", "other"]);
    // A retry after delivery and ack is still recognised and not delivered again.
    b.ack(flushed[1]["seq"].as_u64().unwrap()).await;
    b.ping().await;
    assert_eq!(
        a.send_msg("same", "b", json!("once")).await["duplicate"],
        true
    );
    assert_eq!(b.try_recv(Duration::from_millis(300)).await, None);
    srv.stop().await;
}

/// A reused id on a different message is refused (`id_conflict`, with the id), not
/// answered as a duplicate of a message the client did not mean; nothing is stored.
#[tokio::test]
async fn reused_id_on_another_message_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let (mut a, _) = Client::pigeon(&base(&srv), "a").await;
    assert_eq!(
        a.send_msg("m-1", "b", json!("lunch?")).await["duplicate"],
        false
    );
    for (to, body) in [("b", json!("dinner?")), ("c", json!("lunch?"))] {
        let refused = a.send_msg("m-1", to, body).await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["code"], "id_conflict", "{refused}");
        assert_eq!(refused["id"], "m-1", "{refused}");
    }
    assert_eq!(
        a.send_msg("m-1", "b", json!("lunch?")).await["duplicate"],
        true
    );
    let (_b, flushed) = Client::pigeon(&base(&srv), "b").await;
    let bodies: Vec<&str> = flushed
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["lunch?"]);
    let (_c, flushed) = Client::pigeon(&base(&srv), "c").await;
    assert!(flushed.is_empty(), "{flushed:?}");
    srv.stop().await;
}

#[tokio::test]
async fn full_mailbox_is_refused_in_every_dialect_and_recovers_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.mailbox_max = 3;
    let srv = TestServer::start(cfg).await;
    let (mut a, _) = Client::pigeon(&base(&srv), "a").await;
    for i in 0..3 {
        assert_eq!(
            a.send_msg(&i.to_string(), "full", json!(i)).await["status"],
            "stored"
        );
    }
    let e = a.send_msg("3", "full", json!(3)).await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "mailbox_full");
    assert_eq!(e["id"], "3");
    let mut h = Client::connect(&srv.url("/ws")).await;
    h.text("h#x#full").await;
    assert!(h.recv().await.starts_with("!error#mailbox_full#"));
    let mut s = Client::connect(&srv.url("/ws/s")).await;
    s.text(r#"{"to_user":"full","msg":"x"}"#).await;
    let v = s.json().await;
    assert_eq!(
        (v["error"].as_str(), v["to_user"].as_str()),
        (Some("mailbox_full"), Some("full"))
    );

    let (mut full, flushed) = Client::pigeon(&base(&srv), "full").await;
    assert_eq!(flushed.len(), 3);
    full.ack(flushed[2]["seq"].as_u64().unwrap()).await;
    full.ping().await;
    assert_eq!(
        a.send_msg("4", "full", json!(4)).await["status"],
        "delivered"
    );
    srv.stop().await;
}

#[tokio::test]
async fn slow_consumer_is_diverted_to_the_mailbox_and_catches_up_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.session_queue = 8;
    cfg.limits.mailbox_max = 100_000;
    let srv = TestServer::start(cfg).await;
    let (mut slow, _) = Client::pigeon(&base(&srv), "slow").await;
    let (mut fast, _) = Client::pigeon(&base(&srv), "fast").await;
    // `slow` reads nothing while 3000 messages of 2 KiB arrive: the socket buffers fill,
    // the queue fills, and the rest must go to the mailbox without blocking the sender.
    let body = "x".repeat(2048);
    let n = 3000u64;
    let mut stored = 0;
    for i in 0..n {
        let sent = fast
            .send_msg(&i.to_string(), "slow", json!(format!("{i}:{body}")))
            .await;
        assert_eq!(sent["type"], "sent", "{sent}");
        if sent["status"] == "stored" {
            stored += 1;
        }
    }
    assert!(
        stored > 0,
        "a reader that reads nothing must have caused diversions"
    );
    let mut expect = 0u64;
    while expect < n {
        let m = slow.json().await;
        assert_eq!(m["type"], "msg");
        let body = m["body"].as_str().unwrap();
        let i: u64 = body.split(':').next().unwrap().parse().unwrap();
        assert_eq!(i, expect, "messages out of order or missing");
        expect += 1;
        if expect.is_multiple_of(500) {
            slow.ack(m["seq"].as_u64().unwrap()).await;
        }
    }
    assert_eq!(
        slow.try_recv(Duration::from_millis(200)).await,
        None,
        "no duplicates"
    );
    srv.stop().await;
}

/// A sender answered `stored` or `delivered` must find its message delivered after the
/// server is killed with SIGKILL and restarted, whether the recipient was offline or
/// online-but-not-acknowledging.
#[tokio::test]
async fn acknowledged_messages_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = [("PIGEON_LIMITS_MAILBOX_MAX", "100000")];
    let mut srv = ServerProcess::spawn(dir.path(), port, &env).await;
    let base = format!("ws://{}", srv.addr);
    let (online, _) = Client::pigeon(&base, "online").await;
    let mut sender = Client::connect(&srv.url("/ws?user=sender")).await;
    sender.json().await; // welcome
    sender.json().await; // synced

    // Pipeline sends and kill the server in the middle of the burst.
    let total = 4000;
    for i in 0..total {
        let to = if i % 2 == 0 { "offline" } else { "online" };
        sender
            .send_json(json!({"type":"send","id":format!("m{i}"),"to":to,"body":i}))
            .await;
    }
    let mut confirmed: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    let mut answers = 0;
    while answers < total / 4 {
        let v = sender.json().await;
        if v["type"] == "sent" {
            answers += 1;
            let i: i64 = v["id"].as_str().unwrap()[1..].parse().unwrap();
            let to = if i % 2 == 0 { "offline" } else { "online" };
            confirmed.entry(to).or_default().insert(i);
        }
    }
    srv.kill9();
    // Answers already in the socket buffer count as confirmed too.
    while let Some(t) = sender.try_recv(Duration::from_millis(100)).await {
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "sent" {
            let i: i64 = v["id"].as_str().unwrap()[1..].parse().unwrap();
            let to = if i % 2 == 0 { "offline" } else { "online" };
            confirmed.entry(to).or_default().insert(i);
        }
    }
    drop(online);
    let confirmed_total: usize = confirmed.values().map(|s| s.len()).sum();
    assert!(confirmed_total >= total / 4);

    let srv = ServerProcess::spawn(dir.path(), port, &env).await;
    let base = format!("ws://{}", srv.addr);
    for who in ["offline", "online"] {
        let (_c, flushed) = Client::pigeon(&base, who).await;
        let got: Vec<i64> = flushed
            .iter()
            .map(|m| m["body"].as_i64().unwrap())
            .collect();
        let got_set: BTreeSet<i64> = got.iter().copied().collect();
        assert_eq!(got.len(), got_set.len(), "{who}: duplicates after restart");
        let missing: Vec<_> = confirmed[who].difference(&got_set).collect();
        assert!(missing.is_empty(), "{who}: confirmed but lost: {missing:?}");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{who}: out of order");
    }
}

/// Sends written back to back are stored together, but every frame is still answered
/// in the order it was sent, errors and pongs included, and delivered in that order.
#[tokio::test]
async fn pipelined_frames_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let (mut a, _) = Client::pigeon(&base(&srv), "a").await;
    let (mut b, _) = Client::pigeon(&base(&srv), "b").await;
    let mut expected = Vec::new();
    for i in 0..200 {
        match i % 50 {
            17 => {
                a.text(
                    json!({"type":"send","id":format!("x{i}"),"to":"no body!","body":1})
                        .to_string(),
                )
                .await;
                expected.push(format!("error:x{i}"));
            }
            33 => {
                a.text(r#"{"type":"ping"}"#).await;
                expected.push("pong".to_string());
            }
            _ => {
                a.text(json!({"type":"send","id":format!("m{i}"),"to":"b","body":i}).to_string())
                    .await;
                expected.push(format!("sent:m{i}"));
            }
        }
    }
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let v = a.json().await;
        got.push(match v["type"].as_str().unwrap() {
            "sent" => format!("sent:{}", v["id"].as_str().unwrap()),
            "error" => format!("error:{}", v["id"].as_str().unwrap()),
            other => other.to_string(),
        });
    }
    assert_eq!(got, expected);
    let mut last = -1;
    for _ in 0..192 {
        let m = b.json().await;
        let i = m["body"].as_i64().unwrap();
        assert!(i > last, "out of order: {i} after {last}");
        last = i;
    }
    srv.stop().await;
}
