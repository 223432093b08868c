//! A store shared by several writers (MongoDB; several nodes, or concurrent senders on
//! one) hands out a seq before the message is inserted, so a later seq can reach the
//! recipient first. The session must then not acknowledge — delete — the earlier one it
//! never wrote. Needs `PIGEON_TEST_MONGODB_URI`.
mod common;

use common::{service_from_env, test_config, unique_name, Client, TestServer};
use mongodb::bson::doc;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_insert_below_a_delivered_seq_is_not_acknowledged_away() {
    let Some(uri) = service_from_env("PIGEON_TEST_MONGODB_URI") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db_name = unique_name("late");
    let mut cfg = test_config(dir.path());
    cfg.storage.backend = "mongodb".into();
    cfg.storage.mongodb_uri = uri.clone();
    cfg.storage.mongodb_database = db_name.clone();
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let db = mongodb::Client::with_uri_str(&uri)
        .await
        .unwrap()
        .database(&db_name);

    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    assert_eq!(alice.send_msg("1", "bob", json!("first")).await["seq"], 1);
    assert_eq!(bob.json().await["seq"], 1);

    // Another writer takes seq 2 but has not inserted it yet...
    db.collection::<mongodb::bson::Document>("counters")
        .update_one(
            doc! { "_id": "bob" },
            doc! { "$inc": { "seq": 1, "pending": 1 } },
        )
        .await
        .unwrap();
    // ...while seq 3 is stored and delivered.
    assert_eq!(alice.send_msg("3", "bob", json!("third")).await["seq"], 3);
    let third = bob.json().await;
    assert_eq!(
        (third["seq"].as_u64(), third["body"].as_str()),
        (Some(3), Some("third"))
    );
    // Now seq 2 lands.
    db.collection::<mongodb::bson::Document>("messages")
        .insert_one(doc! {
            "recipient": "bob", "seq": 2_i64, "sender": "carol", "kind": 0_i64,
            "body": "second, late", "accepted_at": pigeon::now_ms(),
        })
        .await
        .unwrap();
    // Bob acknowledges everything he has: up to 3.
    bob.ack(3).await;
    bob.ping().await;
    bob.close().await;

    let (_bob, flushed) = Client::pigeon(&base, "bob").await;
    let bodies: Vec<&str> = flushed
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["second, late"],
        "the message bob was never sent must survive his ack"
    );
    srv.stop().await;
}
