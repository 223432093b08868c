//! Slow and hostile clients: slowloris request headers (and silent sockets), a client
//! that never reads while 50 MiB pile up for it, more sockets than
//! `server.max_connections`, a fragmented message whose continuation frames add up past
//! `limits.max_message_bytes`, and a flood of WebSocket pings. In every case the server
//! sheds the offender within its configured bounds, its memory stays bounded (measured
//! in `/proc/PID/status` of a server subprocess), and other users keep being served.
mod common;

use std::time::{Duration, Instant};

use common::{free_port, proc_status_kib, test_config, Client, Frame, ServerProcess, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::Message;

/// Two fresh users exchange a message; panics (after `common::TIMEOUT`) if not served.
async fn others_are_served(base: &str, tag: &str) -> Duration {
    let t = Instant::now();
    let (mut a, _) = Client::pigeon(base, &format!("{tag}a")).await;
    let (mut b, _) = Client::pigeon(base, &format!("{tag}b")).await;
    let v = a.send_msg("hello", &format!("{tag}b"), json!("hi")).await;
    assert_eq!(v["status"], "delivered", "{v}");
    assert_eq!(b.json().await["body"], "hi");
    a.close().await;
    b.close().await;
    t.elapsed()
}

/// Connects a raw TCP socket and sends `header` one byte per `every` until the server
/// closes it; returns how long that took and how many bytes got out.
async fn slowloris(addr: std::net::SocketAddr, every: Duration) -> (Duration, usize) {
    let header = b"GET /ws?user=slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let start = Instant::now();
    let sock = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = sock.into_split();
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 answer, if any
            }
        }
    });
    let mut sent = 0;
    for b in header {
        if closed.is_finished() || wr.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(every).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), closed).await;
    (start.elapsed(), sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_sockets_are_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.header_timeout_secs = 2;
    let srv = TestServer::start(config).await;
    let base = format!("ws://{}", srv.addr);
    let mut loris = Vec::new();
    for _ in 0..20 {
        loris.push(tokio::spawn(slowloris(srv.addr, Duration::from_secs(1))));
    }
    // Silent sockets: connect and send nothing at all.
    let mut silent = Vec::new();
    for _ in 0..20 {
        let addr = srv.addr;
        silent.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 256];
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            (r.is_ok(), start.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served_in = others_are_served(&base, "during").await;
    for l in loris {
        let (took, sent) = l.await.unwrap();
        assert!(
            took < Duration::from_secs(6) && took >= Duration::from_millis(1500),
            "slowloris socket closed after {took:?}"
        );
        assert!(sent < 10, "{sent} header bytes went out before the close");
    }
    for s in silent {
        let (closed, took) = s.await.unwrap();
        assert!(closed, "a silent socket was still open after 30 s");
        assert!(
            took < Duration::from_secs(6),
            "silent socket closed after {took:?}"
        );
    }
    eprintln!("40 slow/silent sockets closed within the 2 s header timeout; others served in {served_in:?}");
    others_are_served(&base, "after").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let srv = ServerProcess::spawn(
        dir.path(),
        free_port(),
        &[("PIGEON_LIMITS_WRITE_TIMEOUT_SECS", "2")],
    )
    .await;
    let pid = srv.pid().to_string();
    let base = format!("ws://{}", srv.addr);
    let (lazy, _) = Client::pigeon(&base, "lazy").await; // and never reads again
    let (mut flood, _) = Client::pigeon(&base, "flood").await;
    others_are_served(&base, "warm").await;
    let rss_before = proc_status_kib(&pid, "VmRSS");

    // 800 x 64000 bytes = 51 MB for lazy, 32 sends in flight at a time.
    let body = "z".repeat(64_000);
    let (mut delivered, mut stored) = (0, 0);
    let mut seqs = Vec::new();
    let mut slowest_other = Duration::ZERO;
    for window in 0..25 {
        for i in 0..32 {
            let id = format!("m{}", window * 32 + i);
            flood
                .send_json(json!({"type":"send","id":id,"to":"lazy","body":body}))
                .await;
        }
        for _ in 0..32 {
            let v = flood.json().await;
            assert_eq!(v["type"], "sent", "{v}");
            match v["status"].as_str() {
                Some("delivered") => delivered += 1,
                _ => stored += 1,
            }
            seqs.push(v["seq"].as_u64().unwrap());
        }
        if window % 8 == 0 {
            slowest_other =
                slowest_other.max(others_are_served(&base, &format!("o{window}")).await);
        }
    }
    let peak = proc_status_kib(&pid, "VmHWM");
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "never-reading client: 51 MB sent to it, {delivered} handed to its session, {stored} \
         to its mailbox; server RSS {} MiB before, peak {} MiB (+{growth_mib} MiB); \
         others served in <= {slowest_other:?}",
        rss_before / 1024,
        peak / 1024
    );
    assert!(growth_mib < 64, "server grew by {growth_mib} MiB");
    assert!(stored > 0, "nothing went to the mailbox");

    // The write timeout (2 s) dropped it: reading now gets what the kernel buffered, then
    // the end of the socket, not an endless stream.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut lazy = lazy;
    let mut seen = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match lazy.next_or_close().await {
                Ok(Frame::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if let Some(s) = v["seq"].as_u64() {
                        seen.push(s);
                    }
                }
                Ok(Frame::Binary(_)) => {}
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the non-reading session was never dropped");
    // Nothing lost: what it did not get is in its mailbox.
    let (_again, flushed) = Client::pigeon(&base, "lazy").await;
    let mut all: Vec<u64> = seen
        .into_iter()
        .chain(flushed.iter().filter_map(|m| m["seq"].as_u64()))
        .collect();
    all.sort();
    all.dedup();
    seqs.sort();
    assert_eq!(all, seqs);
    others_are_served(&base, "end").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_and_are_served_later() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.max_connections = 8;
    let srv = TestServer::start(config).await;
    let base = format!("ws://{}", srv.addr);
    let mut held = Vec::new();
    for i in 0..8 {
        held.push(Client::pigeon(&base, &format!("h{i}")).await.0);
    }
    // 4 more: TCP connects (kernel backlog) but no handshake while 8 are open.
    let mut waiting = Vec::new();
    for i in 0..4 {
        let url = format!("{base}/ws?user=w{i}");
        waiting.push(tokio::spawn(async move {
            let start = Instant::now();
            let (ws, _) = tokio::time::timeout(
                Duration::from_secs(20),
                tokio_tungstenite::connect_async(url),
            )
            .await
            .expect("a waiting connection was never served")
            .expect("handshake failed");
            (ws, start.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "a connection beyond max_connections was served"
    );
    // Held sessions still work.
    let v = held[0].send_msg("x", "h1", json!("still here")).await;
    assert_eq!(v["status"], "delivered", "{v}");
    assert_eq!(held[1].json().await["body"], "still here");
    // Close four: the four waiting ones get in.
    for c in held.drain(4..) {
        c.close().await;
    }
    for w in waiting {
        let (mut ws, waited) = w.await.unwrap();
        assert!(waited >= Duration::from_millis(1400), "{waited:?}");
        let welcome = ws.next().await.unwrap().unwrap();
        assert!(
            welcome.to_text().unwrap().contains("welcome"),
            "{welcome:?}"
        );
        let _ = ws.close(None).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn fragmented_message_above_the_limit_closes_1009() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.limits.max_message_bytes = 64 * 1024;
    config.limits.max_text_bytes = 16 * 1024;
    config.limits.blob_chunk_bytes = 32 * 1024;
    let srv = TestServer::start(config).await;
    let base = format!("ws://{}", srv.addr);
    for (dialect, first) in [("pigeon", Data::Text), ("binary", Data::Binary)] {
        let (mut c, _) = Client::pigeon(&base, &format!("frag{dialect}")).await;
        // 1 KiB fragments: each alone is fine, 65 of them are not.
        let part = vec![b'a'; 1024];
        let mut frames = 0;
        let mut code = None;
        for i in 0..200 {
            let op = if i == 0 {
                OpCode::Data(first)
            } else {
                OpCode::Data(Data::Continue)
            };
            let f = WsFrame::message(part.clone(), op, false);
            if c.try_send(Message::Frame(f)).await.is_err() {
                break;
            }
            frames += 1;
            if frames * 1024 > 64 * 1024 {
                break; // over the limit: stop, and leave nothing unread in its socket
            }
        }
        while code.is_none() {
            match c.next_or_close().await {
                Ok(_) => {}
                Err(c) => code = Some(c),
            }
        }
        assert_eq!(code, Some(1009), "{dialect}: after {frames} fragments");
        others_are_served(&base, &format!("frag{dialect}o")).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_answered_or_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // The ping budget would close these flooders early (tests/auth.rs shows it does):
    // off here, to show what the pongs alone cost.
    let srv = ServerProcess::spawn(
        dir.path(),
        free_port(),
        &[("PIGEON_LIMITS_PING_PER_SEC", "0")],
    )
    .await;
    let pid = srv.pid().to_string();
    let base = format!("ws://{}", srv.addr);
    others_are_served(&base, "warm").await;
    let rss_before = proc_status_kib(&pid, "VmRSS");

    // A client that reads: 10 000 pings of 125 bytes, pongs counted as they come.
    let (ws, _) = tokio_tungstenite::connect_async(format!("{base}/ws?user=pinger"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    let counter = tokio::spawn(async move {
        let mut pongs = 0u32;
        let mut texts = 0u32;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(3), rx.next()).await {
            match m {
                Message::Pong(_) => pongs += 1,
                Message::Text(t) if t.contains("\"pong\"") => {
                    texts += 1;
                    break;
                }
                Message::Text(_) => texts += 1,
                _ => {}
            }
        }
        (pongs, texts)
    });
    for _ in 0..10_000 {
        tx.feed(Message::Ping(vec![b'p'; 125].into()))
            .await
            .unwrap();
    }
    tx.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    let served_during = others_are_served(&base, "during").await;
    let (pongs, texts) = counter.await.unwrap();
    assert!(texts >= 1, "the session stopped answering after the flood");
    assert!((1..=10_000).contains(&pongs), "{pongs} pongs");

    // A client that does not read: 20 000 pings, nothing read back.
    let (mut deaf, _) = Client::pigeon(&base, "deaf").await;
    let mut sent = 0;
    for _ in 0..20_000 {
        if deaf
            .try_send(Message::Ping(vec![b'q'; 125].into()))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    let served_after = others_are_served(&base, "after").await;
    let peak = proc_status_kib(&pid, "VmHWM");
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "ping flood: 10000 pings -> {pongs} pongs (tungstenite keeps only the latest \
         unanswered pong); then {sent} pings nobody read; server RSS {} MiB -> peak {} MiB; \
         others served in {served_during:?} / {served_after:?}",
        rss_before / 1024,
        peak / 1024
    );
    assert!(
        growth_mib < 16,
        "server grew by {growth_mib} MiB under a ping flood"
    );
}
