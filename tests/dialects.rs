//! Each wire dialect end to end, and every dialect talking to every other.
mod common;

use common::{test_config, Client, TestServer};
use serde_json::{json, Value};

async fn server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (TestServer::start(test_config(dir.path())).await, dir)
}

#[tokio::test]
async fn hash_dialect_offline_then_online() {
    let (srv, _dir) = server().await;
    let mut bob = Client::connect(&srv.url("/ws")).await;
    bob.text("bob#hello #1#alice").await;
    assert_eq!(bob.recv().await, "Out Line");
    assert_eq!(bob.recv().await, "send success");

    // Alice's first frame identifies her: her stored message comes before her reply.
    let mut alice = Client::connect(&srv.url("/web")).await;
    alice.text("alice#hey#bob").await;
    assert_eq!(alice.recv().await, "bob#hello #1#alice");
    assert_eq!(alice.recv().await, "send success");
    assert_eq!(bob.recv().await, "alice#hey#bob");

    // Both online now: no Out Line.
    bob.text("bob#again#alice").await;
    assert_eq!(bob.recv().await, "send success");
    assert_eq!(alice.recv().await, "bob#again#alice");
    srv.stop().await;
}

#[tokio::test]
async fn seed_json_dialect() {
    let (srv, _dir) = server().await;
    let mut alice = Client::connect(&srv.url("/ws/alice")).await;
    let mut bob = Client::connect(&srv.url("/ws/bob")).await;
    alice.text(r#"{"to_user":"bob","msg":"hi"}"#).await;
    let v = bob.json().await;
    assert_eq!(v["from_user"], "alice");
    assert_eq!(v["to_user"], "bob");
    assert_eq!(v["msg"], "hi");
    // The seed client gets no reply on success: the next frame alice sees is bob's answer.
    bob.text(r#"{"to_user":"alice","msg":{"k":[1,2]}}"#).await;
    let v = alice.json().await;
    assert_eq!(v["from_user"], "bob");
    assert_eq!(v["msg"], json!({"k":[1,2]}));
    srv.stop().await;
}

#[tokio::test]
async fn seed_json_flushes_stored_messages_on_open() {
    let (srv, _dir) = server().await;
    let mut alice = Client::connect(&srv.url("/ws/alice")).await;
    alice.text(r#"{"to_user":"bob","msg":"one"}"#).await;
    alice.text(r#"{"to_user":"bob","msg":"two"}"#).await;
    // A bad frame is answered, so we know both sends were handled before bob connects.
    alice.text(r#"{"to_user":"bob"}"#).await;
    assert_eq!(alice.json().await["error"], "missing_field");
    let mut bob = Client::connect(&srv.url("/ws/bob")).await;
    let (a, b) = (bob.json().await, bob.json().await);
    assert_eq!(
        (a["msg"].clone(), b["msg"].clone()),
        (json!("one"), json!("two"))
    );
    assert_eq!(a["offline"], true);
    srv.stop().await;
}

#[tokio::test]
async fn pigeon_json_send_sent_msg_ack() {
    let (srv, _dir) = server().await;
    let base = format!("ws://{}", srv.addr);
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let sent = alice.send_msg("a1", "bob", json!("stored one")).await;
    assert_eq!(sent["type"], "sent");
    assert_eq!(sent["status"], "stored");
    assert_eq!(sent["id"], "a1");
    assert_eq!(sent["duplicate"], false);
    let seq1 = sent["seq"].as_u64().unwrap();

    let (mut bob, flushed) = Client::pigeon(&base, "bob").await;
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0]["body"], "stored one");
    assert_eq!(flushed[0]["offline"], true);
    assert_eq!(flushed[0]["seq"].as_u64().unwrap(), seq1);
    assert_eq!(flushed[0]["id"], "a1");

    let sent = alice.send_msg("a2", "bob", json!({"rich": true})).await;
    assert_eq!(sent["status"], "delivered");
    let live = bob.json().await;
    assert_eq!(live["type"], "msg");
    assert_eq!(live["body"], json!({"rich": true}));
    assert!(live.get("offline").is_none());
    assert_eq!(live["seq"].as_u64().unwrap(), seq1 + 1);

    // Unacknowledged messages come back at the next login; acknowledged ones do not.
    bob.ack(seq1).await;
    bob.ping().await;
    bob.close().await;
    let (_bob, flushed) = Client::pigeon(&base, "bob").await;
    let bodies: Vec<Value> = flushed.iter().map(|m| m["body"].clone()).collect();
    assert_eq!(bodies, vec![json!({"rich": true})]);
    srv.stop().await;
}

#[tokio::test]
async fn login_frame_identifies() {
    let (srv, _dir) = server().await;
    let mut c = Client::connect(&srv.url("/ws")).await;
    // Names are canonical: the welcome names the user as the server keys it.
    c.send_json(json!({"type":"login","user":"Zoe.B"})).await;
    let w = c.json().await;
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["user"], "zoe.b");
    assert_eq!(w["pending"], 0);
    assert_eq!(c.json().await["type"], "synced");
    srv.stop().await;
}

#[tokio::test]
async fn every_dialect_talks_to_every_other() {
    let (srv, _dir) = server().await;
    let base = format!("ws://{}", srv.addr);
    let mut hash = Client::connect(&srv.url("/ws")).await;
    hash.text("hugo#first#nobody").await; // identifies hugo
    assert_eq!(hash.recv().await, "Out Line");
    assert_eq!(hash.recv().await, "send success");
    let mut seed = Client::connect(&srv.url("/ws/sara")).await;
    let (mut pig, _) = Client::pigeon(&base, "pia").await;

    // hash -> seed, hash -> pigeon
    hash.text("hugo#to sara#sara").await;
    assert_eq!(hash.recv().await, "send success");
    let v = seed.json().await;
    assert_eq!(
        (v["from_user"].as_str(), v["msg"].as_str()),
        (Some("hugo"), Some("to sara"))
    );
    hash.text("hugo#to pia#pia").await;
    assert_eq!(hash.recv().await, "send success");
    let v = pig.json().await;
    assert_eq!(
        (v["from"].as_str(), v["body"].as_str()),
        (Some("hugo"), Some("to pia"))
    );

    // seed -> hash, seed -> pigeon
    seed.text(r#"{"to_user":"hugo","msg":"from sara"}"#).await;
    assert_eq!(hash.recv().await, "sara#from sara#hugo");
    seed.text(r#"{"to_user":"pia","msg":"from sara"}"#).await;
    let v = pig.json().await;
    assert_eq!(
        (v["from"].as_str(), v["body"].as_str()),
        (Some("sara"), Some("from sara"))
    );

    // pigeon -> hash, pigeon -> seed (a JSON body reaches the hash user as JSON text)
    assert_eq!(
        pig.send_msg("p1", "hugo", json!({"n":1})).await["status"],
        "delivered"
    );
    assert_eq!(hash.recv().await, r#"pia#{"n":1}#hugo"#);
    assert_eq!(
        pig.send_msg("p2", "sara", json!("from pia")).await["status"],
        "delivered"
    );
    let v = seed.json().await;
    assert_eq!(
        (v["from_user"].as_str(), v["msg"].as_str()),
        (Some("pia"), Some("from pia"))
    );
    srv.stop().await;
}

/// Receipts: when the recipient acknowledges, each online Pigeon JSON sender of a
/// covered message is told `{"type":"receipt","from":recipient,"upto":seq}`; legacy
/// recipients count as acknowledging once the message is written.
#[tokio::test]
async fn senders_get_receipts_when_recipients_acknowledge() {
    let (srv, _dir) = server().await;
    let base = format!("ws://{}", srv.addr);
    let (mut ann, _) = Client::pigeon(&base, "ann").await;
    let (mut carl, _) = Client::pigeon(&base, "carl").await;
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let s1 = ann.send_msg("1", "bob", json!("from ann")).await["seq"]
        .as_u64()
        .unwrap();
    let s2 = carl.send_msg("1", "bob", json!("from carl")).await["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(bob.json().await["seq"].as_u64().unwrap(), s1);
    assert_eq!(bob.json().await["seq"].as_u64().unwrap(), s2);
    // Acknowledging only ann's message gives only ann a receipt.
    bob.ack(s1).await;
    let r = ann.json().await;
    assert_eq!(
        (r["type"].as_str(), r["from"].as_str(), r["upto"].as_u64()),
        (Some("receipt"), Some("bob"), Some(s1))
    );
    assert_eq!(
        carl.try_recv(std::time::Duration::from_millis(200)).await,
        None
    );
    bob.ack(s2).await;
    let r = carl.json().await;
    assert_eq!(
        (r["type"].as_str(), r["upto"].as_u64()),
        (Some("receipt"), Some(s2))
    );
    assert_eq!(
        ann.try_recv(std::time::Duration::from_millis(200)).await,
        None,
        "one receipt per ack"
    );

    // A hash-dialect recipient acknowledges by reading: the receipt follows on its own.
    let mut hal = Client::connect(&srv.url("/ws")).await;
    hal.text("hal#here#nobody").await;
    hal.recv().await;
    hal.recv().await;
    let s3 = ann.send_msg("2", "hal", json!("to hal")).await["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(hal.recv().await, "ann#to hal#hal");
    let r = ann.json().await;
    assert_eq!(
        (r["type"].as_str(), r["from"].as_str(), r["upto"].as_u64()),
        (Some("receipt"), Some("hal"), Some(s3))
    );
    srv.stop().await;
}
