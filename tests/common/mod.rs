//! Test harness: real Pigeon servers (in-process on port 0, or as a subprocess for
//! crash tests) and real WebSocket clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pigeon::config::Config;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A config for tests: data in `dir`, static files from the repo.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.storage.data_dir = dir.to_path_buf();
    c.server.static_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("static");
    c.server.shutdown_grace_secs = 2;
    c
}

/// A Pigeon server running in this process on an ephemeral port.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            pigeon::server::run(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        TestServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Graceful shutdown; waits until the server has finished.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(TIMEOUT, t).await.unwrap().unwrap();
        }
    }
}

/// A Pigeon server as a child process (for kill -9 tests).
pub struct ServerProcess {
    pub addr: SocketAddr,
    child: Child,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ServerProcess {
    pub async fn spawn(data_dir: &Path, port: u16, env: &[(&str, &str)]) -> ServerProcess {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pigeon"));
        cmd.args(["serve", "--bind", &addr.to_string(), "--data-dir"])
            .arg(data_dir)
            .env("PIGEON_LOG_LEVEL", "warn")
            // The shipped config.toml (read from the working directory) asks for
            // passwords and rate limits; these tests exercise the built-in defaults,
            // like the in-process servers of `test_config`. `env` may override.
            .env("PIGEON_AUTH_MODE", "open")
            .env("PIGEON_LIMITS_RATE_PER_SEC", "0")
            .env_remove("RUST_LOG")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ServerProcess { addr, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// The server's process id (for `/proc/PID/status` and `/proc/PID/fd`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        // SIGKILL, like `kill -9`: no chance to clean up.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a client saw when the server closed the socket.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

impl Frame {
    pub fn json(&self) -> Value {
        match self {
            Frame::Text(t) => {
                serde_json::from_str(t).unwrap_or_else(|e| panic!("not JSON: {t:?}: {e}"))
            }
            Frame::Binary(b) => panic!("expected a text frame, got {} binary bytes", b.len()),
        }
    }
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Client { ws }
    }

    /// Connects with a prepared request (extra headers such as `Authorization`).
    pub async fn connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Client {
        let (ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|e| panic!("connect: {e}"));
        Client { ws }
    }

    /// A Pigeon JSON session at `/ws?user=`, past its welcome / flush / synced.
    pub async fn pigeon(base: &str, user: &str) -> (Client, Vec<Value>) {
        let mut c = Client::connect(&format!("{base}/ws?user={user}")).await;
        let welcome = c.json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let mut flushed = Vec::new();
        loop {
            let v = c.json().await;
            if v["type"] == "synced" {
                break;
            }
            flushed.push(v);
        }
        (c, flushed)
    }

    pub async fn text(&mut self, t: impl Into<String>) {
        self.ws.send(Message::text(t.into())).await.unwrap();
    }

    pub async fn send_json(&mut self, v: Value) {
        self.text(v.to_string()).await;
    }

    /// Sends a message; an error (the server already closed) is returned, not a panic.
    pub async fn try_send(&mut self, m: Message) -> Result<(), String> {
        self.ws.send(m).await.map_err(|e| e.to_string())
    }

    pub async fn binary(&mut self, b: Vec<u8>) {
        self.ws.send(Message::binary(b)).await.unwrap();
    }

    /// The next text frame, passing over binary ones (panics on close or timeout).
    pub async fn recv(&mut self) -> String {
        loop {
            if let Frame::Text(t) = self.frame().await {
                return t;
            }
        }
    }

    /// The next text or binary frame (panics on close or timeout).
    pub async fn frame(&mut self) -> Frame {
        loop {
            let m = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("socket ended")
                .expect("socket error");
            match m {
                Message::Text(t) => return Frame::Text(t.to_string()),
                Message::Binary(b) => return Frame::Binary(b.to_vec()),
                Message::Close(c) => panic!("closed while waiting for a frame: {c:?}"),
                _ => continue,
            }
        }
    }

    /// The next text or binary frame, or the close code once the server closed (0 when
    /// the socket ended without a close frame). Panics on timeout.
    pub async fn next_or_close(&mut self) -> Result<Frame, u16> {
        loop {
            let m = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for a frame or a close");
            match m {
                Some(Ok(Message::Text(t))) => return Ok(Frame::Text(t.to_string())),
                Some(Ok(Message::Binary(b))) => return Ok(Frame::Binary(b.to_vec())),
                Some(Ok(Message::Close(Some(f)))) => return Err(u16::from(f.code)),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return Err(0),
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn json(&mut self) -> Value {
        let t = self.recv().await;
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON: {t:?}: {e}"))
    }

    /// The next frame within `d`, if any.
    pub async fn try_recv(&mut self, d: Duration) -> Option<String> {
        match tokio::time::timeout(d, self.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => Some(t.to_string()),
            _ => None,
        }
    }

    /// Reads until the server closes; returns the close frame and the text frames before it.
    pub async fn closed(&mut self) -> (Closed, Vec<String>) {
        let mut texts = Vec::new();
        loop {
            let m = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match m {
                Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
                Some(Ok(Message::Close(Some(f)))) => {
                    return (
                        Closed {
                            code: u16::from(f.code),
                            reason: f.reason.to_string(),
                        },
                        texts,
                    )
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                    return (
                        Closed {
                            code: 0,
                            reason: String::new(),
                        },
                        texts,
                    )
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Pigeon JSON send; returns the server's answer (`sent` or `error`), passing over
    /// receipts, which arrive whenever a recipient acknowledges.
    pub async fn send_msg(&mut self, id: &str, to: &str, body: Value) -> Value {
        self.send_json(serde_json::json!({"type":"send","id":id,"to":to,"body":body}))
            .await;
        self.json_except_receipts().await
    }

    /// The next JSON frame that is not a receipt.
    pub async fn json_except_receipts(&mut self) -> Value {
        loop {
            let v = self.json().await;
            if v["type"] != "receipt" {
                return v;
            }
        }
    }

    pub async fn ack(&mut self, upto: u64) {
        self.send_json(serde_json::json!({"type":"ack","upto":upto}))
            .await;
    }

    /// Round trip through the server: everything sent before it has been handled.
    pub async fn ping(&mut self) {
        self.send_json(serde_json::json!({"type":"ping"})).await;
        loop {
            let v = self.json().await;
            if v["type"] == "pong" {
                return;
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A test service's address from the environment (`PIGEON_TEST_MONGODB_URI`,
/// `PIGEON_TEST_REDIS_URL`, …). Unset: prints that the test was skipped and returns
/// `None` — or fails when `CI` is set, because CI must run every test.
pub fn service_from_env(var: &str) -> Option<String> {
    let v = std::env::var(var).ok().filter(|v| !v.is_empty());
    if v.is_none() {
        eprintln!("SKIPPED: {var} not set");
        assert!(
            std::env::var_os("CI").is_none(),
            "{var} not set but CI is: CI must run this test"
        );
    }
    v
}

/// A database name no other test uses.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        pigeon::now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`, ...); `pid` "self" for this
/// process. 0 when it cannot be read.
pub fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Open file descriptors of a process (`/proc/PID/fd`).
pub fn proc_fd_count(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A plain HTTP/1.1 GET; returns the whole response (status line, headers, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
