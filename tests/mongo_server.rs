//! End-to-end: the real Pigeon server on the MongoDB backend, driven by a real WebSocket
//! client. An offline message is stored, survives a server restart on the same database,
//! and is flushed to the recipient at login; an unreachable MongoDB makes `server::run`
//! fail quickly with a clear error. Needs `PIGEON_TEST_MONGODB_URI` (see
//! `.ci/mongo.sh`); without it the server tests print `SKIPPED`, and fail when `CI` is set.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use pigeon::config::Config;
use pigeon::server::{self, ServerError};
use pigeon::store::StoreError;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

fn mongo_uri() -> Option<String> {
    let uri = std::env::var("PIGEON_TEST_MONGODB_URI")
        .ok()
        .filter(|u| !u.is_empty());
    if uri.is_none() {
        skipped("SKIPPED: PIGEON_TEST_MONGODB_URI not set");
        if std::env::var_os("CI").is_some() {
            panic!("PIGEON_TEST_MONGODB_URI not set but CI is: the MongoDB tests must run in CI");
        }
    }
    uri
}

fn mongo_config(uri: &str, database: &str) -> Config {
    let mut config = Config::default();
    config.storage.backend = "mongodb".into();
    config.storage.mongodb_uri = uri.into();
    config.storage.mongodb_database = database.into();
    config.server.shutdown_grace_secs = 1;
    config
}

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    async fn start(config: Config) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        // The listener is bound already; wait until the store is open and serving.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            assert!(!task.is_finished(), "server::run ended during start-up");
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
                if buf.starts_with(b"HTTP/1.1 200") {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Running { addr, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let r = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server did not stop")
            .unwrap();
        assert!(r.is_ok(), "server::run failed: {r:?}");
    }

    async fn connect(&self, user: &str) -> Ws {
        let (ws, _) = connect_async(format!("ws://{}/ws?user={user}", self.addr))
            .await
            .unwrap();
        ws
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON text frame.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .expect("no frame within 10 s")
            .expect("socket closed")
            .unwrap();
        if let Message::Text(t) = frame {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

async fn expect(ws: &mut Ws, kind: &str) -> Value {
    let v = next(ws).await;
    assert_eq!(v["type"], kind, "expected a {kind} frame, got {v}");
    v
}

/// Logs `user` in: the `welcome`, then the flushed messages up to `synced`.
async fn login(server: &Running, user: &str) -> (Ws, Value, Vec<Value>) {
    let mut ws = server.connect(user).await;
    let welcome = expect(&mut ws, "welcome").await;
    assert_eq!(welcome["user"], user, "{welcome}");
    let mut flushed = Vec::new();
    loop {
        let v = next(&mut ws).await;
        match v["type"].as_str() {
            Some("synced") => break,
            Some("msg") => flushed.push(v),
            _ => panic!("expected msg or synced at login, got {v}"),
        }
    }
    (ws, welcome, flushed)
}

fn unique_database(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("pe_{:x}_{}_{test}", nanos, std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_message_survives_restart_and_is_flushed_at_login() {
    let Some(uri) = mongo_uri() else { return };
    let database = unique_database("offline");

    // 1. alice sends to bob, who is offline: stored.
    let server = Running::start(mongo_config(&uri, &database)).await;
    let (mut alice, _, flushed) = login(&server, "alice").await;
    assert!(flushed.is_empty());
    send(
        &mut alice,
        json!({"type":"send","id":"1","to":"bob","body":"hi"}),
    )
    .await;
    let sent = expect(&mut alice, "sent").await;
    assert_eq!(sent["status"], "stored", "{sent}");
    assert_eq!(sent["seq"], 1, "{sent}");
    assert_eq!(sent["duplicate"], false, "{sent}");
    assert_eq!(sent["id"], "1");
    // A JSON body too, and a retry that must not make a second copy.
    send(
        &mut alice,
        json!({"type":"send","id":"2","to":"bob","body":{"k":[1,2]}}),
    )
    .await;
    assert_eq!(expect(&mut alice, "sent").await["seq"], 2);
    send(
        &mut alice,
        json!({"type":"send","id":"1","to":"bob","body":"hi"}),
    )
    .await;
    let retry = expect(&mut alice, "sent").await;
    assert_eq!(retry["seq"], 1, "{retry}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    let _ = alice.close(None).await;
    server.stop().await;

    // 2. A new server process on the same database: bob logs in and gets both.
    let server = Running::start(mongo_config(&uri, &database)).await;
    let (mut bob, welcome, flushed) = login(&server, "bob").await;
    assert_eq!(welcome["pending"], 2, "{welcome}");
    let [m1, m2] = &flushed[..] else {
        panic!("expected 2 flushed messages, got {flushed:?}");
    };
    assert_eq!(m1["seq"], 1, "{m1}");
    assert_eq!(m1["from"], "alice");
    assert_eq!(m1["to"], "bob");
    assert_eq!(m1["id"], "1");
    assert_eq!(m1["body"], "hi");
    assert_eq!(m1["offline"], true, "{m1}");
    assert_eq!(m2["seq"], 2, "{m2}");
    assert_eq!(m2["body"], json!({"k":[1,2]}));
    assert_eq!(m2["offline"], true);

    // 3. Acknowledged messages are gone at the next login; seqs keep increasing.
    send(&mut bob, json!({"type":"ack","upto":2})).await;
    send(&mut bob, json!({"type":"ping"})).await;
    expect(&mut bob, "pong").await; // the ack before it has been handled
    let _ = bob.close(None).await;
    drop(bob);
    let (mut alice, _, _) = login(&server, "alice").await;
    send(
        &mut alice,
        json!({"type":"send","id":"3","to":"bob","body":"after ack"}),
    )
    .await;
    let sent = expect(&mut alice, "sent").await;
    assert_eq!(sent["seq"], 3, "{sent}");
    let (_bob, welcome, flushed) = login(&server, "bob").await;
    assert_eq!(welcome["pending"], 1, "{welcome}");
    assert_eq!(
        flushed.len(),
        1,
        "acknowledged messages came back: {flushed:?}"
    );
    assert_eq!(flushed[0]["seq"], 3);
    assert_eq!(flushed[0]["body"], "after ack");
    server.stop().await;

    if let Ok(client) = mongodb::Client::with_uri_str(&uri).await {
        let _ = client.database(&database).drop().await;
    }
}

/// A TCP proxy to the test MongoDB that can be cut (every connection dropped) and
/// restored on the same port: MongoDB going away while Pigeon runs.
struct Proxy {
    addr: SocketAddr,
    upstream: String,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(uri: &str) -> Proxy {
        let rest = uri.strip_prefix("mongodb://").expect("a mongodb:// URI");
        let hosts = rest.split(['/', '?']).next().unwrap();
        let upstream = hosts.rsplit('@').next().unwrap().to_string();
        assert!(
            !upstream.contains(','),
            "the proxy test needs a single-host URI"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(Self::serve(listener, upstream.clone()));
        Proxy {
            addr,
            upstream,
            task,
        }
    }

    async fn serve(listener: TcpListener, upstream: String) {
        // Dropping the set (when this task is aborted) aborts every connection.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let upstream = upstream.clone();
            conns.spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    }

    fn cut(&self) {
        self.task.abort();
    }

    async fn restore(&mut self) {
        // The aborted task (and with it the listener) is dropped asynchronously.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot rebind the proxy on {}: {e}", self.addr),
            }
        };
        self.task = tokio::spawn(Self::serve(listener, self.upstream.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_outage_answers_store_unavailable_and_recovers() {
    let Some(uri) = mongo_uri() else { return };
    let database = unique_database("outage");
    let mut proxy = Proxy::start(&uri).await;
    let proxied = format!("mongodb://{}/?directConnection=true", proxy.addr);
    let server = Running::start(mongo_config(&proxied, &database)).await;
    let (mut alice, _, _) = login(&server, "alice").await;
    send(
        &mut alice,
        json!({"type":"send","id":"a","to":"bob","body":"before"}),
    )
    .await;
    assert_eq!(expect(&mut alice, "sent").await["status"], "stored");

    proxy.cut();
    let started = Instant::now();
    send(
        &mut alice,
        json!({"type":"send","id":"b","to":"bob","body":"during"}),
    )
    .await;
    let v = tokio::time::timeout(Duration::from_secs(20), next(&mut alice))
        .await
        .expect("no answer within 20 s while MongoDB was away");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    assert_eq!(v["id"], "b", "{v}");
    println!("store_unavailable after {:?}", started.elapsed());

    // MongoDB is back: the same session carries on, and the retry is stored.
    proxy.restore().await;
    send(
        &mut alice,
        json!({"type":"send","id":"b","to":"bob","body":"during"}),
    )
    .await;
    let v = tokio::time::timeout(Duration::from_secs(20), next(&mut alice))
        .await
        .expect("no answer within 20 s after MongoDB came back");
    assert_eq!(v["type"], "sent", "{v}");
    assert_eq!(v["status"], "stored", "{v}");
    let (mut bob, _, flushed) = login(&server, "bob").await;
    let bodies: Vec<_> = flushed.iter().map(|m| m["body"].clone()).collect();
    assert_eq!(bodies, [json!("before"), json!("during")]);
    let _ = bob.close(None).await;
    let _ = alice.close(None).await;
    server.stop().await;
    proxy.cut();
}

/// Needs no MongoDB: nothing listens on the URI's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_mongodb_fails_start_up_clearly() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let uri = format!("mongodb://127.0.0.1:{port}");
    let config = mongo_config(&uri, "pigeon_unreachable");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();

    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        server::run(listener, config, std::future::pending()),
    )
    .await
    .expect("server::run neither failed nor served within 10 s");
    let elapsed = started.elapsed();
    match r {
        Err(ServerError::Store(StoreError::Unavailable(msg))) => {
            assert!(msg.contains(&uri), "error does not name the URI: {msg}");
            println!("after {elapsed:?}: {msg}");
        }
        other => panic!("expected a store-unavailable error, got {other:?}"),
    }
}

/// Says a test was skipped where it is seen: straight to stderr, past libtest's capture.
fn skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{what}");
}
