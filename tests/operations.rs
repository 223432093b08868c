//! Operations: health and metrics endpoints, the web client being served, graceful
//! shutdown (1001 to every session), the connection cap, and the terminal client.
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, http_get, test_config, Client, ServerProcess, TestServer};
use serde_json::json;

#[tokio::test]
async fn healthz_metrics_and_static_files() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut a, _) = Client::pigeon(&base, "a").await;
    let (_b, _) = Client::pigeon(&base, "b").await;
    a.send_msg("1", "b", json!("x")).await;
    a.send_msg("2", "nobody", json!("x")).await;
    a.text("{").await;
    a.json().await;

    let h = http_get(srv.addr, "/healthz").await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(
        h.contains(r#""online":2"#) && h.contains(r#""store":"sqlite""#),
        "{h}"
    );
    let m = http_get(srv.addr, "/metrics").await;
    for line in [
        "pigeon_messages_delivered_total 1",
        "pigeon_messages_stored_total 1",
        "pigeon_errors_total 1",
        "pigeon_users_online 2",
        "pigeon_sessions_open 2",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    let page = http_get(srv.addr, "/").await;
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("<html"),
        "{page}"
    );
    assert!(http_get(srv.addr, "/no-such-file")
        .await
        .starts_with("HTTP/1.1 404"));
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_going_away() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut a, _) = Client::pigeon(&base, "a").await;
    let mut h = Client::connect(&srv.url("/ws")).await;
    h.text("h#x#a").await;
    assert_eq!(h.recv().await, "send success");
    assert_eq!(a.json().await["body"], "x");
    let addr = srv.addr;
    srv.stop().await;
    assert_eq!(a.closed().await.0.code, 1001);
    assert_eq!(h.closed().await.0.code, 1001);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener must be closed"
    );
}

#[tokio::test]
async fn sigterm_exits_cleanly_and_keeps_unacknowledged_messages() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut srv = ServerProcess::spawn(dir.path(), port, &[]).await;
    let base = format!("ws://{}", srv.addr);
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let (mut ann, _) = Client::pigeon(&base, "ann").await;
    assert_eq!(
        ann.send_msg("1", "bob", json!("unacked")).await["status"],
        "delivered"
    );
    assert_eq!(bob.json().await["body"], "unacked");
    let status = srv.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(bob.closed().await.0.code, 1001);
    let srv = ServerProcess::spawn(dir.path(), port, &[]).await;
    let (_bob, flushed) = Client::pigeon(&format!("ws://{}", srv.addr), "bob").await;
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0]["body"], "unacked");
}

#[tokio::test]
async fn connection_cap_holds_extra_connections_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.server.max_connections = 2;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (a, _) = Client::pigeon(&base, "a").await;
    let (_b, _) = Client::pigeon(&base, "b").await;
    let third = tokio::spawn({
        let base = base.clone();
        async move { Client::pigeon(&base, "c").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection must wait while two are open"
    );
    a.close().await;
    let (mut c, _) = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap();
    c.ping().await;
    srv.stop().await;
}

#[tokio::test]
async fn terminal_client_sends_and_shows_offline_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut ann, _) = Client::pigeon(&base, "ann").await;
    ann.send_msg("1", "tim", json!("while you were out")).await;

    let mut child = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["chat", "--user", "tim", "--server", &base])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    // Wait until tim is online (his session acked the offline message) before typing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = http_get(srv.addr, "/healthz").await;
        if h.contains(r#""online":2"#) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chat client never came online"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The terminal client acknowledged the offline message: ann hears about it.
    let r = ann.json().await;
    assert_eq!(
        (r["type"].as_str(), r["from"].as_str()),
        (Some("receipt"), Some("tim")),
        "{r}"
    );
    writeln!(stdin, "ann: hello from the terminal").unwrap();
    let m = ann.json_except_receipts().await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("tim"), Some("hello from the terminal"))
    );
    drop(stdin); // Ctrl-D
    let out = tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut { stdout }, &mut s).unwrap();
        s
    })
    .await
    .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(out.contains("[offline] ann: while you were out"), "{out}");
    assert!(
        out.contains("you → ann: hello from the terminal  [delivered]"),
        "{out}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn terminal_client_sends_and_saves_files() {
    let dir = tempfile::tempdir().unwrap();
    let downloads = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut ann, _) = Client::pigeon(&base, "ann").await;
    // A file for tim while he is offline.
    let incoming: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ann.send_json(
        json!({"type":"blob","id":"f1","to":"tim","name":"../sneaky.bin","size":incoming.len()}),
    )
    .await;
    let stream = ann.json().await["stream"].as_u64().unwrap() as u32;
    for part in incoming.chunks(64 * 1024) {
        let mut f = stream.to_be_bytes().to_vec();
        f.extend_from_slice(part);
        ann.binary(f).await;
    }
    assert_eq!(ann.json().await["status"], "stored");

    let outgoing_path = dir.path().join("report.pdf");
    let outgoing: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
    std::fs::write(&outgoing_path, &outgoing).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["chat", "--user", "tim", "--server", &base, "--download-dir"])
        .arg(downloads.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "/send ann {}", outgoing_path.display()).unwrap();
    let start = ann.json_except_receipts().await;
    assert_eq!(
        (start["type"].as_str(), start["name"].as_str()),
        (Some("blob_start"), Some("report.pdf"))
    );
    let mut got = Vec::new();
    loop {
        match ann.frame().await {
            common::Frame::Binary(b) => got.extend_from_slice(&b[4..]),
            common::Frame::Text(t) if t.contains(r#""type":"receipt""#) => {}
            common::Frame::Text(t) => {
                assert!(t.contains("blob_end"), "{t}");
                break;
            }
        }
    }
    assert!(got == outgoing, "file sent from the terminal differs");
    let saved = downloads.path().join("sneaky.bin");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&saved).map(|m| m.len()).unwrap_or(0) < incoming.len() as u64 {
        assert!(tokio::time::Instant::now() < deadline, "file never saved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(std::fs::read(&saved).unwrap() == incoming);
    drop(stdin);
    assert!(child.wait().unwrap().success());
    srv.stop().await;
}
