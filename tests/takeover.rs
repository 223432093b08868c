//! One live session per user: a newer login takes over, the old session is told why
//! and closed with 4000, and nothing addressed to the user is lost or doubled.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{test_config, Client, TestServer};
use serde_json::{json, Value};

#[tokio::test]
async fn newer_login_kicks_older_session_in_each_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);

    let (mut old, _) = Client::pigeon(&base, "alice").await;
    let (mut new, _) = Client::pigeon(&base, "alice").await;
    let (closed, texts) = old.closed().await;
    assert_eq!(closed.code, 4000);
    assert_eq!(closed.reason, "session_replaced");
    let kicked: Value = serde_json::from_str(texts.last().unwrap()).unwrap();
    assert_eq!(kicked["type"], "kicked");
    assert_eq!(kicked["reason"], "session_replaced");
    new.ping().await;

    let mut old = Client::connect(&srv.url("/ws")).await;
    old.text("hal#x#nobody").await;
    let mut new = Client::connect(&srv.url("/ws")).await;
    new.text("hal#y#nobody").await;
    let (closed, texts) = old.closed().await;
    assert_eq!(closed.code, 4000);
    assert!(
        texts
            .last()
            .unwrap()
            .starts_with("!kicked#session_replaced#"),
        "{texts:?}"
    );

    let mut old = Client::connect(&srv.url("/ws/sue")).await;
    let _new = Client::connect(&srv.url("/ws/sue")).await;
    let (closed, texts) = old.closed().await;
    assert_eq!(closed.code, 4000);
    let kicked: Value = serde_json::from_str(texts.last().unwrap()).unwrap();
    assert_eq!(kicked["error"], "kicked");
    srv.stop().await;
}

#[tokio::test]
async fn new_session_gets_what_the_old_one_did_not_acknowledge() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    for i in 0..5 {
        assert_eq!(
            alice.send_msg(&i.to_string(), "bob", json!(i)).await["status"],
            "delivered"
        );
    }
    // Bob read all five but acknowledged only the first two.
    let mut seqs = Vec::new();
    for _ in 0..5 {
        seqs.push(bob.json().await["seq"].as_u64().unwrap());
    }
    bob.ack(seqs[1]).await;
    bob.ping().await;
    let (_bob2, flushed) = Client::pigeon(&base, "bob").await;
    let bodies: Vec<i64> = flushed
        .iter()
        .map(|m| m["body"].as_i64().unwrap())
        .collect();
    assert_eq!(bodies, [2, 3, 4]);
    let (closed, _) = bob.closed().await;
    assert_eq!(closed.code, 4000);
    srv.stop().await;
}

/// Many logins of one user at once, while messages for that user keep arriving.
/// Seed-JSON sessions count a message as received once the client's TCP acknowledged
/// it, and a replaced session waits a moment for those acknowledgements before the next
/// one starts; these clients read everything up to their `kicked` notice, so across all
/// sessions every message must arrive exactly once; and exactly one session survives.
#[tokio::test]
async fn concurrent_logins_leave_one_session_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let total = 300usize;

    let url = srv.url("/ws/dave");
    let sender = tokio::spawn({
        let base = base.clone();
        async move {
            let (mut s, _) = Client::pigeon(&base, "sender").await;
            for i in 0..total {
                let v = s.send_msg(&i.to_string(), "dave", json!(i)).await;
                assert_eq!(v["type"], "sent", "{v}");
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    });
    let logins: Vec<_> = (0..12)
        .map(|k| {
            let url = url.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(k * 7)).await;
                let mut c = Client::connect(&url).await;
                let mut got = Vec::new();
                // Read until kicked, or until the test says stop by timing out.
                loop {
                    match c.try_recv(Duration::from_millis(1500)).await {
                        Some(t) => {
                            let v: Value = serde_json::from_str(&t).unwrap();
                            if v["error"] == "kicked" {
                                return (true, got);
                            }
                            got.push(
                                v["msg"]
                                    .as_i64()
                                    .unwrap_or_else(|| panic!("unexpected frame {v}")),
                            );
                        }
                        None => return (false, got),
                    }
                }
            })
        })
        .collect();
    sender.await.unwrap();
    let mut survivors = 0;
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    for h in logins {
        let (kicked, got) = h.await.unwrap();
        if !kicked {
            survivors += 1;
        }
        for i in got {
            *count.entry(i).or_default() += 1;
        }
    }
    assert_eq!(survivors, 1, "exactly one session must stay live");
    let missing: Vec<usize> = (0..total)
        .filter(|i| !count.contains_key(&(*i as i64)))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let doubled: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "delivered twice: {doubled:?}");
    srv.stop().await;
}
