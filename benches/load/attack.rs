//! The attackers of the hostile scenario, run as `load attack ADDR KINDS N` in a process
//! of their own: slowloris sockets, never-reading sessions with floods pushed at them,
//! ping flooders, busy readers (a control), huge login names and password guessing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{connect, open_session, seq_of, Dialect};

/// `load attack ADDR KINDS N`: runs N attackers of each kind (comma list of slowloris,
/// sink, ping, busy, longname, guess) against ADDR on one thread, until stdin closes or
/// it is killed.
pub fn attack_main(args: &[String]) -> Result<()> {
    let [addr, kinds, n] = args else {
        bail!("usage: load attack ADDR KINDS N");
    };
    let addr: SocketAddr = addr.parse().context("ADDR")?;
    let n: usize = n.parse().context("N")?;
    let kind = |k: &str| kinds.split(',').any(|x| x.trim() == k);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        // Each kind comes from an address of its own, as from a host of its own (the
        // measured users are on 127.0.0.1): Pigeon's per-address defences then hit the
        // attackers only.
        let from = |last: u8| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)));
        for i in 0..n {
            if kind("slowloris") {
                tokio::spawn(slowloris(addr, from(2), stop.clone()));
            }
            if kind("sink") {
                tokio::spawn(sink_and_flood(addr, i, from(3), stop.clone()));
            }
            if kind("ping") {
                tokio::spawn(ping_flood(addr, i, from(4), stop.clone()));
            }
            if kind("busy") {
                // The sink's traffic to a session that does read: the same load, no hostility.
                tokio::spawn(busy_reader_and_flood(addr, i, from(5), stop.clone()));
            }
            if kind("longname") {
                tokio::spawn(long_name_logins(addr, i, from(6), stop.clone()));
            }
            if kind("guess") {
                // A botnet: every guesser cycles through 250 addresses of its own.
                tokio::spawn(password_guesses(addr, i, stop.clone()));
            }
        }
        // Until the parent goes away (stdin closes).
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while tokio::io::AsyncReadExt::read(&mut stdin, &mut buf)
            .await
            .is_ok_and(|n| n > 0)
        {}
    });
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

/// Sends an HTTP request's headers one byte at a time, forever (reconnecting when closed).
async fn slowloris(addr: SocketAddr, source: Option<IpAddr>, stop: Arc<AtomicBool>) {
    let request = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    let open = || async {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(addr).await
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = open().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for b in request.iter().cycle() {
            if stop.load(Ordering::Relaxed)
                || tokio::io::AsyncWriteExt::write_all(&mut s, &[*b])
                    .await
                    .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A session that never reads, and a sender pushing 100 msgs/s of 1 KiB at it.
async fn sink_and_flood(addr: SocketAddr, i: usize, source: Option<IpAddr>, stop: Arc<AtomicBool>) {
    let sink = format!("sink{i}");
    let Ok(_sink_ws) = connect(addr, &format!("/ws?user={sink}"), source).await else {
        return;
    };
    sink_flood_into(addr, &format!("flood{i}"), &sink, source, stop).await;
}

/// Sends 100 msgs/s of 1 KiB from `from` to `to` until stopped, reading the answers.
async fn sink_flood_into(
    addr: SocketAddr,
    from: &str,
    sink: &str,
    source: Option<IpAddr>,
    stop: Arc<AtomicBool>,
) {
    let Ok(mut ws) = open_session(addr, from, Dialect::Json, source).await else {
        return;
    };
    let body = "x".repeat(1024);
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                let f = format!(r#"{{"type":"send","id":"{n}","to":"{sink}","body":"{body}"}}"#);
                if ws.send(Message::text(f)).await.is_err() {
                    return;
                }
            }
            m = ws.next() => if m.is_none() { return },
        }
    }
}

/// Like `sink_and_flood`, but the recipient reads (and acks) everything: a control.
async fn busy_reader_and_flood(
    addr: SocketAddr,
    i: usize,
    source: Option<IpAddr>,
    stop: Arc<AtomicBool>,
) {
    let reader = format!("busy{i}");
    let Ok(rws) = open_session(addr, &reader, Dialect::Json, source).await else {
        return;
    };
    let (mut rsink, mut rstream) = rws.split();
    let acker = tokio::spawn(async move {
        while let Some(Ok(m)) = rstream.next().await {
            if let Message::Text(t) = m {
                if let Some(seq) = seq_of(t.as_str()) {
                    let ack = format!(r#"{{"type":"ack","upto":{seq}}}"#);
                    if rsink.send(Message::text(ack)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    sink_flood_into(addr, &format!("feeder{i}"), &reader, source, stop).await;
    acker.abort();
}

/// One `POST /api/login` with `body` from `source`; the status (0 when it failed).
async fn post_login(addr: SocketAddr, source: Option<IpAddr>, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let mut s = socket.connect(addr).await?;
        let head = format!(
            "POST /api/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        // The server may refuse a huge body (413) before reading it all.
        let _ = s.write_all(body.as_bytes()).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        anyhow::Ok(out)
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out)
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// Failed logins with huge user names, one after the other: a 1.9 MB name over HTTP,
/// then a 0.9 MB name in a WebSocket login frame (each name unique).
async fn long_name_logins(
    addr: SocketAddr,
    i: usize,
    source: Option<IpAddr>,
    stop: Arc<AtomicBool>,
) {
    let pad = "n".repeat(1_900_000);
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let body = format!(r#"{{"user":"{pad}{i}-{k}","password":"x"}}"#);
        post_login(addr, source, &body).await;
        if let Ok(mut ws) = connect(addr, "/ws", source).await {
            let frame = format!(
                r#"{{"type":"login","user":"{}{i}-{k}","password":"x"}}"#,
                &pad[..900_000]
            );
            if ws.send(Message::text(frame)).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            }
        }
    }
}

/// Wrong passwords over HTTP for ten users, each guess from the next of 250 addresses
/// (127.0.1.1-250): no single address reaches its limit quickly, so these cost hashes
/// until the per-user cap and the hashing queue refuse them.
async fn password_guesses(addr: SocketAddr, i: usize, stop: Arc<AtomicBool>) {
    let mut k = 0usize;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, (1 + (i * 7 + k) % 250) as u8));
        let body = format!(r#"{{"user":"victim{}","password":"guess{k}"}}"#, k % 10);
        if post_login(addr, Some(ip), &body).await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A session that sends WebSocket pings as fast as the socket takes them, and logs in
/// again when it is closed (Pigeon closes ping flooders).
async fn ping_flood(addr: SocketAddr, i: usize, source: Option<IpAddr>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(ws) = open_session(addr, &format!("pinger{i}"), Dialect::Json, source).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut sink, mut stream) = ws.split();
        let reader = tokio::spawn(async move { while stream.next().await.is_some() {} });
        while !stop.load(Ordering::Relaxed) && !reader.is_finished() {
            if sink
                .send(Message::Ping(vec![0u8; 16].into()))
                .await
                .is_err()
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        reader.abort();
    }
}
