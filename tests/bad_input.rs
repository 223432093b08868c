//! Bad input gets a clear error in the session's dialect (or the documented close code),
//! never a panic, and never disturbs other sessions.
mod common;

use common::{test_config, Client, TestServer};
use serde_json::{json, Value};

async fn pigeon_error(c: &mut Client, frame: &str) -> Value {
    c.text(frame).await;
    let v = c.json().await;
    assert_eq!(v["type"], "error", "{frame} -> {v}");
    v
}

#[tokio::test]
async fn pigeon_json_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bystander, _) = Client::pigeon(&base, "bystander").await;
    let (mut c, _) = Client::pigeon(&base, "eve").await;
    let cases = [
        ("{not json", "bad_frame"),
        ("[1,2]", "bad_frame"),
        (r#"{"type":"teleport"}"#, "unknown_type"),
        (r#"{"type":"send","to":"bob"}"#, "missing_field"),
        (r#"{"type":"send","body":"x"}"#, "missing_field"),
        (r#"{"type":"send","to":"","body":"x"}"#, "empty_field"),
        (
            r#"{"type":"send","id":"","to":"bob","body":"x"}"#,
            "empty_field",
        ),
        (
            r#"{"type":"send","to":"bad name!","body":"x"}"#,
            "invalid_user",
        ),
        (r#"{"type":"ack","upto":"ten"}"#, "bad_ack"),
        (r#"{"type":"login","user":"eve"}"#, "already_identified"),
    ];
    for (frame, code) in cases {
        let v = pigeon_error(&mut c, frame).await;
        assert_eq!(v["code"], code, "{frame}");
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    let v = pigeon_error(&mut c, r#"{"type":"send","id":"k7","to":"b b","body":1}"#).await;
    assert_eq!(v["id"], "k7");
    c.binary(vec![1, 2, 3]).await;
    assert_eq!(c.json().await["code"], "bad_frame");
    c.binary(vec![0, 0, 0, 9, 1]).await;
    assert_eq!(c.json().await["code"], "unknown_stream");
    let big = "y".repeat(64 * 1024 + 1);
    let v = pigeon_error(
        &mut c,
        &json!({"type":"send","to":"bob","body":big}).to_string(),
    )
    .await;
    assert_eq!(v["code"], "too_large");
    // Still usable, and nobody else noticed.
    assert_eq!(
        c.send_msg("ok", "bystander", json!("fine")).await["status"],
        "delivered"
    );
    assert_eq!(bystander.json().await["body"], "fine");
    srv.stop().await;
}

#[tokio::test]
async fn unidentified_sessions_are_told_to_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let mut c = Client::connect(&srv.url("/ws")).await;
    let v = pigeon_error(&mut c, r#"{"type":"send","to":"bob","body":"x"}"#).await;
    assert_eq!(v["code"], "not_identified");
    c.text(r#"{"to_user":"bob","msg":"x"}"#).await;
    assert_eq!(c.json().await["error"], "not_identified");
    let v = pigeon_error(&mut c, r#"{"type":"login","user":"no spaces"}"#).await;
    assert_eq!(v["code"], "invalid_user");
    c.text("nohashes").await;
    assert!(c.recv().await.starts_with("!error#bad_frame#"));
    c.text("bad name#x#bob").await;
    assert!(c.recv().await.starts_with("!error#invalid_user#"));
    // After all that, a valid first frame still identifies the session.
    c.text("okname#hi#bob").await;
    assert_eq!(c.recv().await, "Out Line");
    srv.stop().await;
}

#[tokio::test]
async fn hash_dialect_rejects_sending_as_someone_else() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let mut c = Client::connect(&srv.url("/ws")).await;
    c.text("mallory#hi#bob").await;
    assert_eq!(c.recv().await, "Out Line");
    assert_eq!(c.recv().await, "send success");
    c.text("alice#forged#bob").await;
    assert!(c.recv().await.starts_with("!error#wrong_sender#"));
    let (_bob, flushed) = Client::pigeon(&format!("ws://{}", srv.addr), "bob").await;
    assert_eq!(flushed.len(), 1, "the forged message must not be stored");
    srv.stop().await;
}

#[tokio::test]
async fn invalid_username_in_url_closes_with_4001() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let mut c = Client::connect(&srv.url("/ws/has%20space")).await;
    let (closed, texts) = c.closed().await;
    assert_eq!(closed.code, 4001);
    let v: Value = serde_json::from_str(&texts[0]).unwrap();
    assert_eq!(v["error"], "invalid_user");
    let mut c = Client::connect(&srv.url("/ws?user=a%23b")).await;
    let (closed, texts) = c.closed().await;
    assert_eq!(closed.code, 4001);
    let v: Value = serde_json::from_str(&texts[0]).unwrap();
    assert_eq!(v["code"], "invalid_user");
    let long = "x".repeat(33);
    let mut c = Client::connect(&srv.url(&format!("/ws/{long}"))).await;
    assert_eq!(c.closed().await.0.code, 4001);
    srv.stop().await;
}

#[tokio::test]
async fn repeated_errors_close_with_4002_and_huge_messages_with_1009() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.max_consecutive_errors = 5;
    cfg.limits.max_message_bytes = 128 * 1024;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (mut other, _) = Client::pigeon(&base, "other").await;

    let (mut c, _) = Client::pigeon(&base, "noisy").await;
    for _ in 0..5 {
        c.text("{").await;
    }
    let (closed, texts) = c.closed().await;
    assert_eq!(closed.code, 4002);
    assert_eq!(texts.len(), 5);

    let (mut c, _) = Client::pigeon(&base, "huge").await;
    c.text("z".repeat(200 * 1024)).await;
    assert_eq!(c.closed().await.0.code, 1009);

    other.ping().await;
    srv.stop().await;
}

#[tokio::test]
async fn plain_http_to_the_websocket_endpoint_is_a_clear_400() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("WebSocket endpoint"));
    srv.stop().await;
}
