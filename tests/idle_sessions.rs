//! Idle sessions are small (issue 15): an idle session holds a 1 KiB read buffer and no
//! timers, and reads larger frames through `wire::ReadAhead`. These tests check that an
//! idle session costs little memory, and that what the smaller idle state changed still
//! works after a quiet spell: the largest frames, a late login, the login timeout.

mod common;

use std::time::Duration;

use common::{test_config, Client, ServerProcess, TestServer};
use futures_util::{SinkExt, StreamExt};
use pigeon::accounts::{self, Action, PasswordSource};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A Pigeon JSON session at `/ws?user=`, from a bare socket (so that the test's own
/// clients cost little memory), read until its `synced`; then it only waits.
async fn bare_session(addr: std::net::SocketAddr, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws?user={user} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(8).any(|w| w == b"\"synced\"") {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("no synced in time")
            .unwrap();
        assert!(n > 0, "{user}: closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

/// 2,000 logged-in, idle Pigeon JSON sessions cost the server at most 10 KiB of RSS each
/// (14.8 KiB before issue 15's changes; about 7.5 at 10,000 sessions after them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_small() {
    const SESSIONS: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let srv = ServerProcess::spawn(
        dir.path(),
        port,
        &[
            ("PIGEON_SERVER_MAX_CONNECTIONS", "3000"),
            ("PIGEON_LIMITS_MAX_CONNECTIONS_PER_IP", "3000"),
        ],
    )
    .await;
    let pid = srv.pid().to_string();
    let rss = || common::proc_status_kib(&pid, "VmRSS");
    // Warm up what is built once (the store, the first session's lazy state).
    let mut warm = Vec::new();
    for i in 0..50 {
        warm.push(bare_session(srv.addr, &format!("warm{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let (gate, addr) = (gate.clone(), srv.addr);
        tasks.spawn(async move {
            let _p = gate.acquire_owned().await.unwrap();
            bare_session(addr, &format!("idle{i}")).await
        });
    }
    let mut sessions = Vec::with_capacity(SESSIONS);
    while let Some(s) = tasks.join_next().await {
        sessions.push(s.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = (rss() as f64 - before as f64) / SESSIONS as f64;
    assert!(per <= 10.0, "{per:.2} KiB of RSS per idle session");
    drop(sessions);
}

/// After a quiet spell the largest frames still arrive whole: a Pigeon JSON message just
/// under `max_text_bytes`, and (on the echo route) a binary frame just under
/// `max_message_bytes`, each read through a 1 KiB read buffer and the read-ahead.
#[tokio::test]
async fn largest_frames_after_idle_arrive_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.server.echo_route = true;
    let max_text = cfg.limits.max_text_bytes;
    let max_message = cfg.limits.max_message_bytes;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The send frame's JSON around the body: fill the rest of the limit with the body.
    let frame_len = |body: &str| {
        json!({"type": "send", "id": "big", "to": "bob", "body": body})
            .to_string()
            .len()
    };
    let body: String = (0..max_text)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let body = body[..max_text - frame_len("")].to_string();
    assert_eq!(frame_len(&body), max_text);
    let sent = alice.send_msg("big", "bob", json!(body)).await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let got = bob.json_except_receipts().await;
    assert_eq!(got["type"], "msg", "{}", &got.to_string()[..200]);
    assert_eq!(got["body"].as_str().map(str::len), Some(body.len()));
    assert!(got["body"] == json!(body), "the body arrived changed");

    let (mut echo, _) = tokio_tungstenite::connect_async(format!("{base}/echo"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let data: Vec<u8> = (0..max_message - 1).map(|i| (i % 251) as u8).collect();
    for _ in 0..2 {
        echo.send(Message::binary(data.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), echo.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(back.into_data() == data, "the echo came back changed");
    }
    srv.stop().await;
}

/// The login timer is dropped at login (an idle session holds none); before that it counts:
/// a socket that waits quietly and logs in within `login_timeout_secs` gets its welcome,
/// one that waits longer is closed (4010).
#[tokio::test]
async fn a_login_after_a_long_quiet_wait_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.auth.mode = "password".into();
    cfg.auth.secret = "idle-test-secret-0123456789abcdef".into();
    cfg.limits.login_timeout_secs = 3;
    accounts::run(&cfg, Action::Add, "erin", PasswordSource::Given("erin-pw"))
        .await
        .unwrap();
    let srv = TestServer::start(cfg).await;

    let mut late = Client::connect(&srv.url("/ws")).await;
    let mut quiet = Client::connect(&srv.url("/ws")).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    late.send_json(json!({"type": "login", "user": "erin", "password": "erin-pw"}))
        .await;
    let welcome = late.json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(late.json().await["type"], "synced");
    // Logged in, it outlives the login timeout and still answers.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    late.send_json(json!({"type": "ping"})).await;
    assert_eq!(late.json().await["type"], "pong");

    let (closed, _) = quiet.closed().await;
    assert_eq!(closed.code, 4010, "{closed:?}");
    srv.stop().await;
}
