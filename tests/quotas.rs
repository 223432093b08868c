//! Storage bounds against a real server, in every dialect: in password mode a recipient
//! without an account gets `no_such_user` and nothing is stored; in every mode a sender's
//! waiting messages and bytes (`sender_quota_*`) and the whole store (`store_max_bytes`)
//! are capped, with errors that name the config key.
mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::{test_config, Client, TestServer, TIMEOUT};
use pigeon::accounts::{self, Action, PasswordSource};
use pigeon::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GHOST: &str = "ghost-never-created";

async fn add_user(cfg: &Config, user: &str, password: &str) {
    accounts::run(cfg, Action::Add, user, PasswordSource::Given(password))
        .await
        .unwrap();
}

/// POST /api/login; the token.
async fn token(addr: SocketAddr, user: &str, password: &str) -> String {
    let body = json!({"user": user, "password": password}).to_string();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /api/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out).to_string();
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{out}: {e}"));
    v["token"].as_str().unwrap().to_string()
}

/// Reads frames until a hash-dialect `!error#...` notice; returns it.
async fn hash_error(c: &mut Client) -> String {
    loop {
        let t = c.recv().await;
        if t.starts_with("!error#") {
            return t;
        }
    }
}

/// Reads frames until a seed-JSON `{"error":...}` frame; returns it.
async fn seed_error(c: &mut Client) -> Value {
    loop {
        let v = c.json().await;
        if v.get("error").is_some() {
            return v;
        }
    }
}

async fn mailbox_len(cfg: &Config, user: &str) -> u64 {
    let store = pigeon::store::open(&cfg.storage, 10).await.unwrap();
    store.pending(user).await.unwrap()
}

#[tokio::test]
async fn unknown_recipients_get_no_such_user_in_every_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.auth.mode = "password".into();
    cfg.auth.secret = "test-secret-test-secret-test-secret!".into();
    add_user(&cfg, "alice", "alice-pw").await;
    add_user(&cfg, "bob", "bob-pw").await;
    let srv = TestServer::start(cfg.clone()).await;
    let t = token(srv.addr, "alice", "alice-pw").await;

    // Pigeon JSON: an error frame with the send's id, for text and for a blob announce.
    let mut c = Client::connect(&srv.url(&format!("/ws?user=alice&token={t}"))).await;
    while c.json().await["type"] != "synced" {}
    let e = c.send_msg("g1", GHOST, json!("hello?")).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
        (Some("error"), Some("no_such_user"), Some("g1")),
        "{e}"
    );
    c.send_json(
        json!({"type":"blob","id":"b1","to":GHOST,"name":"f","mime":"text/plain","size":100}),
    )
    .await;
    let e = c.json().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("no_such_user"), Some("b1")),
        "{e}"
    );
    // A real recipient still works.
    assert_eq!(c.send_msg("ok1", "bob", json!("hi")).await["type"], "sent");
    c.close().await;

    // Hash dialect: a `!error` notice.
    let mut c = Client::connect(&srv.url(&format!("/ws?token={t}"))).await;
    c.text(format!("alice#hello?#{GHOST}")).await;
    let notice = hash_error(&mut c).await;
    assert!(notice.starts_with("!error#no_such_user#"), "{notice}");
    c.close().await;

    // Seed JSON: an `{"error","message"}` frame.
    let mut c = Client::connect(&srv.url(&format!("/ws/alice?token={t}"))).await;
    c.send_json(json!({"to_user": GHOST, "msg": "hello?"}))
        .await;
    let e = seed_error(&mut c).await;
    assert_eq!(e["error"], "no_such_user", "{e}");
    assert!(e["message"].as_str().unwrap().contains(GHOST), "{e}");
    c.close().await;

    srv.stop().await;
    assert_eq!(
        mailbox_len(&cfg, GHOST).await,
        0,
        "nothing stored for a ghost"
    );
    assert_eq!(mailbox_len(&cfg, "bob").await, 1);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn quota_config(dir: &Path) -> Config {
    let mut cfg = test_config(dir);
    cfg.limits.sender_quota_messages = 2;
    cfg.limits.sender_quota_bytes = 10_000;
    cfg
}

#[tokio::test]
async fn sender_quota_holds_in_every_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(quota_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);

    // Pigeon JSON: two stored for offline bob, the third refused.
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    for i in 0..2 {
        let v = alice.send_msg(&format!("m{i}"), "bob", json!("x")).await;
        assert_eq!(v["type"], "sent", "{v}");
    }
    let e = alice.send_msg("m2", "carol", json!("x")).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("quota_exceeded"), Some("m2")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("sender_quota_messages"),
        "{e}"
    );
    // A blob announce that would pass the byte quota is refused before any byte moves.
    alice
        .send_json(json!({"type":"blob","id":"big","to":"bob","name":"f","mime":"text/plain","size":20_000}))
        .await;
    let e = alice.json().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("quota_exceeded"), Some("big")),
        "{e}"
    );
    alice.close().await;

    // Hash dialect.
    let mut c = Client::connect(&format!("{base}/ws")).await;
    c.text("alice#third#dave").await;
    let notice = hash_error(&mut c).await;
    assert!(
        notice.starts_with("!error#quota_exceeded#") && notice.contains("sender_quota_messages"),
        "{notice}"
    );
    c.close().await;

    // Seed JSON.
    let mut c = Client::connect(&format!("{base}/ws/alice")).await;
    c.send_json(json!({"to_user":"dave","msg":"third"})).await;
    let e = seed_error(&mut c).await;
    assert_eq!(e["error"], "quota_exceeded", "{e}");
    c.close().await;

    // Bob reads them: alice may send again.
    let (mut bob, flushed) = Client::pigeon(&base, "bob").await;
    assert_eq!(flushed.len(), 2, "{flushed:?}");
    bob.ack(flushed[1]["seq"].as_u64().unwrap()).await;
    bob.ping().await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let v = alice.send_msg("m3", "carol", json!("x")).await;
    assert_eq!(v["type"], "sent", "{v}");
    srv.stop().await;
    assert_eq!(mailbox_len(&quota_config(dir.path()), "dave").await, 0);
}

#[tokio::test]
async fn store_cap_refuses_with_store_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.store_max_bytes = 100;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let v = alice.send_msg("a", "bob", json!("a".repeat(80))).await;
    assert_eq!(v["type"], "sent", "{v}");
    let (mut carol, _) = Client::pigeon(&base, "carol").await;
    let e = carol.send_msg("c", "dave", json!("c".repeat(40))).await;
    assert_eq!(e["code"], "store_full", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("store_max_bytes"),
        "{e}"
    );
    srv.stop().await;
}
