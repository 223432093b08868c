//! Nothing lost on a restart: 10,000 messages stored for `rita`, who reads them slowly
//! in one of the three dialects; after ~1,000 the server is stopped (SIGTERM, or
//! `kill -9`), and half a second later her client sends one frame (which, against a
//! socket the server closed or abandoned, makes the server's kernel answer with a reset
//! and drop its send queue). The server restarts on the same data directory, she logs in
//! again and reads everything. Every message must have arrived at least once across
//! both connections; repeats are counted and printed (allowed: a message her TCP had not
//! acknowledged when the first session ended is still in the mailbox).
//!
//! A take-over variant (no restart) has a second login of rita take over while the first
//! client is still reading slowly; that client sends its frame after the server's close
//! linger is over, so it meets a closed socket.
//!
//! The hash and seed-JSON dialects cannot acknowledge: a message counts as received once
//! the client's TCP acknowledged its bytes (docs/PROTOCOL.md, "Delivery model").
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{free_port, Client, Frame, ServerProcess, TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

const MESSAGES: usize = 10_000;
/// Messages read slowly before the server is stopped.
const READ_BEFORE_STOP: usize = 1_000;
const ENV: [(&str, &str); 1] = [("PIGEON_LIMITS_MAILBOX_MAX", "1000000")];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Hash,
    Seed,
    Pigeon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Term,
    Kill9,
    /// No restart: a second login of rita takes over; the first client sends its frame
    /// after the server's linger (2 s) is over, when its socket is closed.
    Takeover,
}

fn body(i: usize) -> String {
    format!("m{i:05}-{}", "x".repeat(200))
}

/// Stores `n` messages from `sam` to the offline `rita` (Pigeon JSON, pipelined).
async fn fill(base: &str, n: usize) {
    let (ws, _) = tokio_tungstenite::connect_async(format!("{base}/ws?user=sam"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    let writer = tokio::spawn(async move {
        for i in 0..n {
            let f = json!({"type":"send","id":format!("s{i}"),"to":"rita","body":body(i)});
            tx.feed(Message::text(f.to_string())).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    let mut sent = 0;
    while sent < n {
        let m = tokio::time::timeout(TIMEOUT, rx.next())
            .await
            .expect("fill: no answer")
            .expect("fill: socket ended")
            .unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            match v["type"].as_str() {
                Some("sent") => sent += 1,
                Some("welcome") | Some("synced") => {}
                _ => panic!("fill: {v}"),
            }
        }
    }
    let tx = writer.await.unwrap();
    let mut ws = tx.reunite(rx).unwrap();
    let _ = ws.close(None).await;
}

async fn connect(base: &str, dialect: Dialect) -> Client {
    match dialect {
        Dialect::Hash => {
            let mut c = Client::connect(&format!("{base}/ws")).await;
            c.text("rita#hi#nobody").await;
            c
        }
        Dialect::Seed => Client::connect(&format!("{base}/ws/rita")).await,
        Dialect::Pigeon => Client::connect(&format!("{base}/ws?user=rita")).await,
    }
}

/// A message from sam in this frame: (body, seq if the dialect shows it).
fn message(dialect: Dialect, t: &str) -> Option<(String, Option<u64>)> {
    match dialect {
        Dialect::Hash => {
            let rest = t.strip_prefix("sam#")?;
            let (b, _) = rest.rsplit_once('#')?;
            Some((b.to_string(), None))
        }
        Dialect::Seed => {
            let v: Value = serde_json::from_str(t).ok()?;
            (v["from_user"] == "sam").then(|| (v["msg"].as_str().unwrap_or("").into(), None))
        }
        Dialect::Pigeon => {
            let v: Value = serde_json::from_str(t).ok()?;
            (v["type"] == "msg")
                .then(|| (v["body"].as_str().unwrap_or("").into(), v["seq"].as_u64()))
        }
    }
}

fn late_frame(dialect: Dialect) -> String {
    match dialect {
        Dialect::Hash => "rita#late#nobody".into(),
        Dialect::Seed => json!({"to_user":"nobody","msg":"late"}).to_string(),
        Dialect::Pigeon => json!({"type":"ping"}).to_string(),
    }
}

/// What rita's client saw.
#[derive(Default)]
struct Seen {
    bodies: Vec<String>,
    highest_seq: u64,
    since_ack: usize,
}

impl Seen {
    /// Takes a frame; a Pigeon JSON client acknowledges every 50 messages.
    async fn take(&mut self, dialect: Dialect, c: &mut Client, t: &str) {
        let Some((b, seq)) = message(dialect, t) else {
            return;
        };
        self.bodies.push(b);
        if let Some(s) = seq {
            self.highest_seq = self.highest_seq.max(s);
            self.since_ack += 1;
            if self.since_ack >= 50 {
                self.since_ack = 0;
                let ack = json!({"type":"ack","upto":self.highest_seq}).to_string();
                let _ = c.try_send(Message::text(ack)).await;
            }
        }
    }
}

/// The first connection: reads slowly, says when it has `READ_BEFORE_STOP` messages,
/// sends one frame 0.5 s after being told the server was stopped, then reads fast until
/// the socket ends. Returns what it saw and the close code (0: none).
async fn first_connection(
    base: String,
    dialect: Dialect,
    reached: oneshot::Sender<()>,
    stopped: oneshot::Receiver<Instant>,
) -> (Seen, u16) {
    let mut c = connect(&base, dialect).await;
    let mut seen = Seen::default();
    let mut reached = Some(reached);
    let mut stopped = Some(stopped);
    let mut late_at: Option<tokio::time::Instant> = None;
    let mut late_sent = false;
    loop {
        let next = async {
            match late_at.filter(|_| !late_sent) {
                Some(at) => tokio::time::timeout_at(at, c.next_or_close()).await.ok(),
                None => Some(c.next_or_close().await),
            }
        };
        let frame = match next.await {
            Some(Ok(Frame::Text(t))) => Some(t),
            Some(Ok(Frame::Binary(_))) => None,
            Some(Err(code)) => return (seen, code),
            None => None, // time for the late frame
        };
        if let Some(t) = frame {
            seen.take(dialect, &mut c, &t).await;
        }
        let n = seen.bodies.len();
        if n >= READ_BEFORE_STOP {
            if let Some(r) = reached.take() {
                let _ = r.send(());
            }
        }
        if let Some(rx) = stopped.as_mut() {
            if let Ok(at) = rx.try_recv() {
                late_at = Some(tokio::time::Instant::from_std(at) + Duration::from_millis(500));
                stopped = None;
            }
        }
        if !late_sent && late_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            late_sent = true;
            let _ = c.try_send(Message::text(late_frame(dialect))).await;
        }
        // Slow (about 1,000 messages a second) until the late frame went out.
        if !late_sent && n.is_multiple_of(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The second connection (after the restart, or taking over): reads everything there is
/// until nothing came for 2 s (Pigeon JSON: until `synced`).
async fn second_connection(base: String, dialect: Dialect) -> Seen {
    let mut seen = Seen::default();
    let mut c = connect(&base, dialect).await;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), c.next_or_close()).await;
        let t = match next {
            Ok(Ok(Frame::Text(t))) => t,
            Ok(Ok(Frame::Binary(_))) => continue,
            Ok(Err(code)) => panic!("second connection closed: {code}"),
            Err(_) => break, // quiet: nothing more is coming
        };
        if dialect == Dialect::Pigeon && t.contains(r#""type":"synced""#) {
            break;
        }
        seen.take(dialect, &mut c, &t).await;
    }
    c.close().await;
    seen
}

/// Runs the scenario; returns (lost, repeats, close code of the first connection).
async fn scenario(dialect: Dialect, stop: Stop) -> (usize, usize, u16) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut srv = ServerProcess::spawn(dir.path(), port, &ENV).await;
    let base = format!("ws://{}", srv.addr);
    fill(&base, MESSAGES).await;
    let filled = started.elapsed();

    let (reached_tx, reached_rx) = oneshot::channel();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    let first = tokio::spawn(first_connection(
        base.clone(),
        dialect,
        reached_tx,
        stopped_rx,
    ));
    tokio::time::timeout(Duration::from_secs(30), reached_rx)
        .await
        .expect("rita did not get 1,000 messages in time")
        .unwrap();
    let mut second = None;
    let srv = match stop {
        Stop::Takeover => {
            second = Some(tokio::spawn(second_connection(base.clone(), dialect)));
            let _ = stopped_tx.send(Instant::now() + Duration::from_millis(2_500));
            srv
        }
        Stop::Term => {
            let pid = srv.pid().to_string();
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap();
            let _ = stopped_tx.send(Instant::now());
            // Reaped off the runtime: the client keeps reading meanwhile.
            tokio::task::spawn_blocking(move || {
                let status = srv.terminate();
                (srv, status)
            })
            .await
            .unwrap()
            .0
        }
        Stop::Kill9 => {
            srv.kill9();
            let _ = stopped_tx.send(Instant::now());
            srv
        }
    };
    let (mut seen, close) = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("the first connection did not end")
        .unwrap();
    let first_count = seen.bodies.len();
    let later = match second {
        Some(taking_over) => taking_over.await.unwrap(),
        None => {
            drop(srv);
            let _srv = ServerProcess::spawn(dir.path(), port, &ENV).await;
            second_connection(base.clone(), dialect).await
        }
    };
    seen.bodies.extend(later.bodies);
    let distinct: HashSet<String> = seen.bodies.iter().cloned().collect();
    let lost: Vec<usize> = (0..MESSAGES)
        .filter(|i| !distinct.contains(&body(*i)))
        .collect();
    let repeats = seen.bodies.len() - distinct.len();
    eprintln!(
        "{dialect:?} {stop:?}: filled in {filled:?}; first connection {first_count} messages, \
         close {close}; then {} more; lost {}, repeats {repeats}; {:?} in all",
        seen.bodies.len() - first_count,
        lost.len(),
        started.elapsed()
    );
    if !lost.is_empty() {
        eprintln!(
            "lost (first ten): {:?}",
            lost.iter().take(10).collect::<Vec<_>>()
        );
    }
    (lost.len(), repeats, close)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_client_loses_nothing_on_sigterm() {
    let (lost, _, close) = scenario(Dialect::Hash, Stop::Term).await;
    assert_eq!(lost, 0, "messages lost");
    assert_eq!(close, 1001, "close code at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_json_client_loses_nothing_on_sigterm() {
    let (lost, _, close) = scenario(Dialect::Seed, Stop::Term).await;
    assert_eq!(lost, 0, "messages lost");
    assert_eq!(close, 1001, "close code at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pigeon_client_loses_nothing_on_sigterm() {
    let (lost, _, close) = scenario(Dialect::Pigeon, Stop::Term).await;
    assert_eq!(lost, 0, "messages lost");
    assert_eq!(close, 1001, "close code at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_client_loses_nothing_on_kill9() {
    let (lost, _, _) = scenario(Dialect::Hash, Stop::Kill9).await;
    assert_eq!(lost, 0, "messages lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_json_client_loses_nothing_on_kill9() {
    let (lost, _, _) = scenario(Dialect::Seed, Stop::Kill9).await;
    assert_eq!(lost, 0, "messages lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pigeon_client_loses_nothing_on_kill9() {
    let (lost, _, _) = scenario(Dialect::Pigeon, Stop::Kill9).await;
    assert_eq!(lost, 0, "messages lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_client_loses_nothing_on_takeover() {
    let (lost, _, _) = scenario(Dialect::Hash, Stop::Takeover).await;
    assert_eq!(lost, 0, "messages lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_json_client_loses_nothing_on_takeover() {
    let (lost, _, _) = scenario(Dialect::Seed, Stop::Takeover).await;
    assert_eq!(lost, 0, "messages lost");
}

/// Over TLS the bytes TCP acknowledges are TLS records: the count sits beneath TLS, so a
/// seed-JSON client that read its messages and closed has them recorded as received (its
/// next login gets nothing), just as on a plain socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_legacy_messages_read_are_recorded() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mut cfg = common::test_config(&dir.path().join("data"));
    cfg.tls.cert = cert_path.to_string_lossy().into_owned();
    cfg.tls.key = key_path.to_string_lossy().into_owned();
    let srv = common::TestServer::start(cfg).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let connect = |path: &'static str| {
        let connector = connector.clone();
        let addr = srv.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let url = format!("wss://localhost:{}{path}", addr.port());
            tokio_tungstenite::client_async(url, tls).await.unwrap().0
        }
    };
    let text = |m: Option<Result<Message, _>>| match m {
        Some(Ok(Message::Text(t))) => Some(t.to_string()),
        _ => None,
    };
    let n = 300;
    let mut sam = connect("/ws?user=sam").await;
    for i in 0..n {
        let f = json!({"type":"send","id":format!("s{i}"),"to":"tess","body":body(i)});
        sam.send(Message::text(f.to_string())).await.unwrap();
        loop {
            let t = text(tokio::time::timeout(TIMEOUT, sam.next()).await.unwrap()).unwrap();
            if t.contains(r#""type":"sent""#) {
                break;
            }
        }
    }
    let mut tess = connect("/ws/tess").await;
    let mut got = 0;
    while got < n {
        let t = text(tokio::time::timeout(TIMEOUT, tess.next()).await.unwrap()).unwrap();
        if t.contains(r#""from_user":"sam""#) {
            got += 1;
        }
    }
    tess.close(None).await.unwrap();
    while tess.next().await.is_some() {}
    let mut again = connect("/ws/tess").await;
    let more = tokio::time::timeout(Duration::from_millis(700), again.next()).await;
    assert!(
        more.is_err(),
        "a message read over TLS came again: {more:?}"
    );
    srv.stop().await;
}
