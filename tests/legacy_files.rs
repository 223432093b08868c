//! Files and the tutorial clients, with the shipped `config.toml`: a hash or seed-JSON
//! client sends a video of several MB as one binary frame; seed-JSON and hash recipients
//! get files as text notices with a download link; `GET /api/blobs/{key}` serves the
//! bytes (token or signed link, ranges, safe content types) from both store backends.
mod common;

use std::net::SocketAddr;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{Client, Frame, TestServer, TIMEOUT};
use hmac::{Hmac, Mac};
use pigeon::accounts::{self, Action, PasswordSource};
use pigeon::config::Config;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "legacy-files-test-secret-0123456789";
const USERS: [&str; 6] = ["alice", "bob", "sam", "hank", "pia", "eve"];

/// The shipped `config.toml`, loaded like `pigeon serve` does, with a test data directory.
fn shipped_config(dir: &Path) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let (mut c, unknown) = Config::load(Some(&path), std::iter::empty()).unwrap();
    assert!(unknown.is_empty(), "{unknown:?}");
    c.storage.data_dir = dir.to_path_buf();
    c.server.static_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("static");
    c.server.shutdown_grace_secs = 2;
    c.auth.secret = SECRET.into();
    c
}

fn mongo_variant(c: &mut Config) -> bool {
    let Some(uri) = common::service_from_env("PIGEON_TEST_MONGODB_URI") else {
        return false;
    };
    c.storage.backend = "mongodb".into();
    c.storage.mongodb_uri = uri;
    c.storage.mongodb_database = common::unique_name("legacy_files");
    c.storage.mongodb_write_concern = "1".into();
    true
}

struct Env {
    srv: TestServer,
    tokens: std::collections::HashMap<&'static str, String>,
}

impl Env {
    async fn start(cfg: Config) -> Env {
        for u in USERS {
            accounts::run(&cfg, Action::Add, u, PasswordSource::Given("password-1"))
                .await
                .unwrap();
        }
        let srv = TestServer::start(cfg).await;
        let mut tokens = std::collections::HashMap::new();
        for u in USERS {
            let body = json!({"user": u, "password": "password-1"}).to_string();
            let r = http(
                srv.addr,
                "POST",
                "/api/login",
                &[("Content-Type", "application/json")],
                &body,
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            tokens.insert(u, v["token"].as_str().unwrap().to_string());
        }
        Env { srv, tokens }
    }

    fn token(&self, user: &str) -> &str {
        &self.tokens[user]
    }

    async fn seed(&self, user: &str) -> Client {
        Client::connect(
            &self
                .srv
                .url(&format!("/ws/{user}?token={}", self.token(user))),
        )
        .await
    }

    async fn hash(&self, user: &str) -> Client {
        Client::connect(&self.srv.url(&format!("/ws?token={}", self.token(user)))).await
    }

    /// A Pigeon JSON session past its welcome; returns the frames up to `synced`.
    async fn pigeon(&self, user: &str) -> (Client, Vec<Value>) {
        let mut c = Client::connect(
            &self
                .srv
                .url(&format!("/ws?user={user}&token={}", self.token(user))),
        )
        .await;
        assert_eq!(c.json().await["type"], "welcome");
        let mut flushed = Vec::new();
        loop {
            let v = c.json().await;
            if v["type"] == "synced" {
                return (c, flushed);
            }
            flushed.push(v);
        }
    }
}

struct Http {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    fn text(&self) -> String {
        format!("{}\n{}", self.head, String::from_utf8_lossy(&self.body))
    }
}

/// One HTTP/1.1 request over a real socket.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Http {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = out[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Http { status, head, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..line_end]).unwrap().trim(), 16).unwrap();
        b = &b[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i / 7) as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A webm header (EBML magic) followed by `n` pattern bytes.
fn webm(n: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0x1a, 0x45, 0xdf, 0xa3];
    v.extend(pattern(n - 4, seed));
    v
}

/// Reads one whole blob (blob_start, chunks, blob_end): (start, bytes).
async fn receive_blob(c: &mut Client) -> (Value, Vec<u8>) {
    let start = loop {
        let v = c.json().await;
        if v["type"] != "receipt" {
            break v;
        }
    };
    assert_eq!(start["type"], "blob_start", "{start}");
    let mut bytes = Vec::new();
    loop {
        match c.frame().await {
            Frame::Binary(b) => bytes.extend_from_slice(&b[4..]),
            Frame::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "blob_end", "{v}");
                return (start, bytes);
            }
        }
    }
}

/// The path and query of an absolute link to this server.
fn path_of(url: &str) -> String {
    let rest = url.split_once("://").expect("absolute link").1;
    rest[rest.find('/').unwrap()..].to_string()
}

async fn announce_and_send(
    c: &mut Client,
    id: &str,
    to: &str,
    name: &str,
    mime: &str,
    data: &[u8],
) {
    c.send_json(json!({"type":"blob","id":id,"to":to,"name":name,"mime":mime,"size":data.len()}))
        .await;
    let v = loop {
        let v = c.json().await;
        if v["type"] != "msg" && v["type"] != "receipt" {
            break v;
        }
    };
    assert_eq!(v["type"], "blob_accepted", "{v}");
    let stream = v["stream"].as_u64().unwrap() as u32;
    for part in data.chunks(200_000) {
        let mut f = stream.to_be_bytes().to_vec();
        f.extend_from_slice(part);
        c.binary(f).await;
    }
    loop {
        let v = c.json().await;
        if v["type"] == "sent" {
            return;
        }
        assert_eq!(v["type"], "receipt", "{v}");
    }
}

/// Seed 004: a tutorial client sends a video of several MB as one binary frame. With the
/// shipped config it is accepted (it was `too_large` above 64 KiB), spooled, and arrives
/// byte-identical at an online and at an offline recipient.
async fn several_mb_binary_frames(cfg: Config) {
    let env = Env::start(cfg).await;
    let (mut pia, _) = env.pigeon("pia").await;
    let mut sam = env.seed("sam").await;
    sam.send_json(json!({"to_user":"pia","msg":"a video for you"}))
        .await;
    let mut hank = env.hash("hank").await;
    hank.text("hank#a video for you#pia").await;
    assert_eq!(hank.recv().await, "send success");
    let videos = [webm(5_000_000, 1), webm(5_000_000, 2)];
    // Online recipient.
    sam.binary(videos[0].clone()).await;
    hank.binary(videos[1].clone()).await;
    assert_eq!(hank.recv().await, "send success");
    let mut got = Vec::new();
    while got.len() < 2 {
        let v = pia.json().await;
        if v["type"] == "msg" {
            continue;
        }
        assert_eq!(v["type"], "blob_start", "{v}");
        let from = v["from"].as_str().unwrap().to_string();
        assert_eq!(v["mime"], "video/webm", "{v}");
        let mut bytes = Vec::new();
        loop {
            match pia.frame().await {
                Frame::Binary(b) => bytes.extend_from_slice(&b[4..]),
                Frame::Text(t) => {
                    let e: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(e["type"], "blob_end", "{e}");
                    pia.ack(e["seq"].as_u64().unwrap()).await;
                    break;
                }
            }
        }
        got.push((from, bytes));
    }
    got.sort();
    assert_eq!(got[0].0, "hank");
    assert!(got[0].1 == videos[1], "hank's video differs");
    assert_eq!(got[1].0, "sam");
    assert!(got[1].1 == videos[0], "sam's video differs");
    pia.close().await;

    // Offline recipient (bob): stored, then flushed at login.
    sam.send_json(json!({"to_user":"bob","msg":"later"})).await;
    hank.text("hank#later#bob").await;
    assert_eq!(hank.recv().await, "Out Line");
    assert_eq!(hank.recv().await, "send success");
    sam.binary(videos[0].clone()).await;
    hank.binary(videos[1].clone()).await;
    assert_eq!(hank.recv().await, "Out Line");
    assert_eq!(hank.recv().await, "send success");
    // The seed client got no error (it is told nothing on success).
    assert_eq!(
        sam.try_recv(std::time::Duration::from_millis(300)).await,
        None
    );
    let mut bob = Client::connect(
        &env.srv
            .url(&format!("/ws?user=bob&token={}", env.token("bob"))),
    )
    .await;
    assert_eq!(bob.json().await["type"], "welcome");
    let mut got = Vec::new();
    while got.len() < 2 {
        let v = bob.json().await;
        if v["type"] == "msg" {
            continue;
        }
        let (start, bytes) = {
            assert_eq!(v["type"], "blob_start", "{v}");
            let mut bytes = Vec::new();
            while let Frame::Binary(b) = bob.frame().await {
                bytes.extend_from_slice(&b[4..]);
            }
            (v, bytes)
        };
        got.push((start["from"].as_str().unwrap().to_string(), bytes));
    }
    got.sort();
    assert!(got[0].1 == videos[1] && got[1].1 == videos[0]);

    env.srv.stop().await;
}

#[tokio::test]
async fn several_mb_binary_frames_from_tutorial_clients_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    several_mb_binary_frames(shipped_config(dir.path())).await;
}

#[tokio::test]
async fn several_mb_binary_frames_from_tutorial_clients_mongodb() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = shipped_config(dir.path());
    if mongo_variant(&mut cfg) {
        several_mb_binary_frames(cfg).await;
    }
}

/// Every size error names the setting that governs it.
#[tokio::test]
async fn size_errors_name_their_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = shipped_config(dir.path());
    cfg.limits.legacy_binary_max_bytes = 2 * 1024 * 1024;
    let env = Env::start(cfg).await;
    let mut hank = env.hash("hank").await;
    hank.text("hank#hi#pia").await;
    hank.recv().await;
    hank.recv().await;
    hank.text(format!("hank#{}#pia", "x".repeat(70_000))).await;
    let e = hank.recv().await;
    assert!(
        e.starts_with("!error#too_large#") && e.contains("limits.max_text_bytes"),
        "{e}"
    );
    // Beyond the legacy limit the WebSocket layer stops reading: 1009, naming the key.
    hank.binary(vec![1; 2 * 1024 * 1024 + 1]).await;
    let (closed, _) = hank.closed().await;
    assert_eq!(closed.code, 1009);
    assert!(
        closed.reason.contains("limits.legacy_binary_max_bytes"),
        "{}",
        closed.reason
    );
    let (mut alice, _) = env.pigeon("alice").await;
    alice
        .send_json(
            json!({"type":"blob","id":"b","to":"bob","name":"x","mime":"x/y","size": 1u64 << 40}),
        )
        .await;
    let e = alice.json().await;
    assert_eq!(e["code"], "too_large");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_blob_bytes"),
        "{e}"
    );
    env.srv.stop().await;
}

/// In password mode a socket without a token in its URL can only log in: a binary frame
/// above `limits.max_message_bytes` closes it (1009) before the server buffers it, while
/// a token-carrying tutorial client may still send one up to the legacy limit.
#[tokio::test]
async fn anonymous_sockets_cannot_send_large_frames() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = shipped_config(dir.path());
    let max = cfg.limits.max_message_bytes;
    assert!(cfg.limits.legacy_binary_max_bytes > 2 * max);
    let env = Env::start(cfg).await;
    let mut anon = Client::connect(&env.srv.url("/ws")).await;
    anon.binary(vec![7; 2 * max]).await;
    let (closed, _) = anon.closed().await;
    assert_eq!(closed.code, 1009, "{}", closed.reason);
    // The same size from a hash client with a token is a file.
    let mut hank = env.hash("hank").await;
    hank.text("hank#hi#pia").await;
    hank.recv().await;
    hank.recv().await;
    hank.binary(webm(2 * max, 3)).await;
    let answer = hank.recv().await;
    assert!(!answer.starts_with('!'), "{answer}");
    env.srv.stop().await;
}

/// Seed 003: a seed-JSON page parses every frame as JSON. A file from the web client
/// arrives as a JSON notice naming it, with a link that downloads it; errors and the
/// take-over notice carry `from_user` and `msg`. Hash recipients get a text notice.
async fn seed_and_hash_recipients_get_file_notices(cfg: Config) {
    let env = Env::start(cfg).await;
    let picture = pattern(300_000, 9);
    let (mut alice, _) = env.pigeon("alice").await;
    // Online seed recipient.
    let mut sam = env.seed("sam").await;
    announce_and_send(&mut alice, "p1", "sam", "cat.png", "image/png", &picture).await;
    let notice = match sam.frame().await {
        Frame::Text(t) => serde_json::from_str::<Value>(&t).unwrap(),
        Frame::Binary(b) => panic!("a seed-JSON recipient got a {} byte binary frame", b.len()),
    };
    assert_eq!(notice["from_user"], "alice");
    assert_eq!(notice["to_user"], "sam");
    let msg = notice["msg"].as_str().unwrap();
    assert!(msg.contains("cat.png") && msg.contains("300000"), "{msg}");
    let url = notice["file"]["url"].as_str().unwrap();
    assert!(msg.contains(url), "{msg}");
    let r = http(env.srv.addr, "GET", &path_of(url), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    assert!(r.body == picture);
    // Offline seed recipient (eve).
    announce_and_send(
        &mut alice,
        "p2",
        "eve",
        "notes.txt",
        "text/plain",
        b"hello eve",
    )
    .await;
    let mut eve = env.seed("eve").await;
    let notice = eve.frame().await.json();
    assert_eq!(notice["offline"], true);
    assert!(notice["msg"].as_str().unwrap().contains("notes.txt"));
    let r = http(
        env.srv.addr,
        "GET",
        &path_of(notice["file"]["url"].as_str().unwrap()),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello eve");
    // A hash recipient gets one text frame `from#notice#to` with the link.
    let mut hank = env.hash("hank").await;
    hank.text("hank#ready#alice").await;
    hank.recv().await;
    announce_and_send(&mut alice, "p3", "hank", "cat.png", "image/png", &picture).await;
    let line = loop {
        match hank.frame().await {
            Frame::Text(t) if t.starts_with("alice#") => break t,
            Frame::Text(_) => continue,
            Frame::Binary(b) => panic!("a hash recipient got a {} byte binary frame", b.len()),
        }
    };
    assert!(
        line.ends_with("#hank") && line.contains("cat.png"),
        "{line}"
    );
    let link = line
        .split(|c: char| c.is_whitespace() || c == '#')
        .find(|w| w.starts_with("http://"))
        .unwrap();
    let r = http(env.srv.addr, "GET", &path_of(link), &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body == picture);

    // Errors and the take-over notice are readable in a page that prints from_user: msg.
    sam.send_json(json!({"to_user":"not a user","msg":"x"}))
        .await;
    let e = sam.frame().await.json();
    assert_eq!(e["error"], "invalid_user", "{e}");
    assert!(e["from_user"].is_string() && e["msg"].is_string(), "{e}");
    let _sam2 = env.seed("sam").await;
    let k = sam.frame().await.json();
    assert_eq!(k["error"], "kicked");
    assert!(
        k["from_user"].is_string() && k["msg"].as_str().unwrap().contains("another"),
        "{k}"
    );
    env.srv.stop().await;
}

#[tokio::test]
async fn seed_and_hash_recipients_get_file_notices_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    seed_and_hash_recipients_get_file_notices(shipped_config(dir.path())).await;
}

#[tokio::test]
async fn seed_and_hash_recipients_get_file_notices_mongodb() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = shipped_config(dir.path());
    if mongo_variant(&mut cfg) {
        seed_and_hash_recipients_get_file_notices(cfg).await;
    }
}

fn signed_link(key: &str, user: &str, expires: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("pigeon-blob-v1\0{key}\0{user}\0{expires}").as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("/api/blobs/{key}?user={user}&expires={expires}&sig={sig}")
}

/// `GET /api/blobs/{key}`: who may fetch, ranges, and how the bytes are labelled.
async fn blob_download_route(cfg: Config) {
    let env = Env::start(cfg).await;
    let addr = env.srv.addr;
    let video = pattern(1_500_000, 3);
    let (mut alice, _) = env.pigeon("alice").await;
    let (mut bob, _) = env.pigeon("bob").await;
    announce_and_send(&mut alice, "v", "bob", "clip.mp4", "video/mp4", &video).await;
    let (start, bytes) = receive_blob(&mut bob).await;
    assert!(bytes == video);
    let key = start["key"]
        .as_str()
        .expect("blob_start names its key")
        .to_string();
    assert!(key.len() >= 22, "{key}");
    let url = start["url"].as_str().expect("blob_start carries a link");
    let bearer = format!("Bearer {}", env.token("bob"));
    let path = format!("/api/blobs/{key}");

    // The recipient's token, as a header or in the query: the whole file.
    let r = http(addr, "GET", &path, &[("Authorization", &bearer)], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == video);
    assert_eq!(r.header("content-type").as_deref(), Some("video/mp4"));
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(
        r.header("content-security-policy").as_deref(),
        Some("sandbox; default-src 'none'")
    );
    let r = http(
        addr,
        "GET",
        &format!("{path}?token={}", env.token("bob")),
        &[],
        "",
    )
    .await;
    assert!(r.status == 200 && r.body == video);
    // The sender may fetch it too; the signed link works without a token.
    let r = http(
        addr,
        "GET",
        &format!("{path}?token={}", env.token("alice")),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = http(addr, "GET", &path_of(url), &[], "").await;
    assert!(r.status == 200 && r.body == video, "{}", r.head);

    // Ranges: an exact slice with 206, open-ended and suffix forms, 416 beyond the end.
    let r = http(
        addr,
        "GET",
        &path,
        &[("Authorization", &bearer), ("Range", "bytes=1000-1999")],
        "",
    )
    .await;
    assert_eq!(r.status, 206, "{}", r.head);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some(format!("bytes 1000-1999/{}", video.len()).as_str())
    );
    assert!(r.body == video[1000..2000]);
    let r = http(
        addr,
        "GET",
        &path,
        &[("Authorization", &bearer), ("Range", "bytes=1400000-")],
        "",
    )
    .await;
    assert_eq!(r.status, 206);
    assert!(r.body == video[1_400_000..]);
    let r = http(
        addr,
        "GET",
        &path,
        &[("Authorization", &bearer), ("Range", "bytes=-10")],
        "",
    )
    .await;
    assert_eq!(r.status, 206);
    assert!(r.body == video[video.len() - 10..]);
    let r = http(
        addr,
        "GET",
        &path,
        &[
            ("Authorization", &bearer),
            ("Range", "bytes=2000000-2000010"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some(format!("bytes */{}", video.len()).as_str())
    );

    // Nobody else: no credentials 401, another user's token 403/404, an expired or
    // forged link refused, an unknown key 404.
    let r = http(addr, "GET", &path, &[], "").await;
    assert_eq!(r.status, 401);
    let r = http(
        addr,
        "GET",
        &format!("{path}?token={}", env.token("eve")),
        &[],
        "",
    )
    .await;
    assert!(r.status == 403 || r.status == 404, "{}", r.status);
    let r = http(
        addr,
        "GET",
        &signed_link(&key, "bob", pigeon::token::now_secs() - 1),
        &[],
        "",
    )
    .await;
    assert!(
        r.status == 401 || r.status == 403,
        "expired link: {}",
        r.status
    );
    let r = http(
        addr,
        "GET",
        &signed_link(&key, "bob", pigeon::token::now_secs() + 60),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "a fresh link with the server secret works");
    let r = http(
        addr,
        "GET",
        &signed_link(&key, "eve", pigeon::token::now_secs() + 60),
        &[],
        "",
    )
    .await;
    assert!(
        r.status == 403 || r.status == 404,
        "a link for eve: {}",
        r.status
    );
    let forged = signed_link(&key, "bob", pigeon::token::now_secs() + 60).replace("sig=", "sig=A");
    let r = http(addr, "GET", &forged, &[], "").await;
    assert!(r.status == 401 || r.status == 403);
    let r = http(addr, "GET", "/api/blobs/0123abcd?token=x", &[], "").await;
    assert!(r.status == 401 || r.status == 404);

    // A type a browser would run is served as a download.
    let page = b"<script>alert(1)</script>".to_vec();
    announce_and_send(
        &mut alice,
        "h",
        "bob",
        "evil \"page\".html",
        "text/html",
        &page,
    )
    .await;
    let (start, _) = receive_blob(&mut bob).await;
    let r = http(
        addr,
        "GET",
        &path_of(start["url"].as_str().unwrap()),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(
        r.header("content-disposition").as_deref(),
        Some("attachment; filename*=UTF-8''evil%20%22page%22.html")
    );
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(r.body, page);

    // After the ack the blob stays downloadable for the link's lifetime.
    bob.ack(start["seq"].as_u64().unwrap_or(0).max(2)).await;
    let r = http(addr, "GET", &path, &[("Authorization", &bearer)], "").await;
    assert_eq!(r.status, 200, "acked, still within blob_link_secs");
    env.srv.stop().await;
}

#[tokio::test]
async fn blob_download_route_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    blob_download_route(shipped_config(dir.path())).await;
}

#[tokio::test]
async fn blob_download_route_mongodb() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = shipped_config(dir.path());
    if mongo_variant(&mut cfg) {
        blob_download_route(cfg).await;
    }
}

/// With a short `blob_link_secs` an acknowledged blob is deleted by the next sweep.
#[tokio::test]
async fn acked_blobs_are_swept_after_their_link_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = shipped_config(dir.path());
    cfg.limits.blob_link_secs = 1;
    let env = Env::start(cfg).await;
    let (mut alice, _) = env.pigeon("alice").await;
    let (mut bob, _) = env.pigeon("bob").await;
    announce_and_send(
        &mut alice,
        "v",
        "bob",
        "a.bin",
        "application/x-thing",
        &pattern(1000, 1),
    )
    .await;
    let (start, _) = receive_blob(&mut bob).await;
    bob.ack(1).await;
    let path = format!(
        "/api/blobs/{}?token={}",
        start["key"].as_str().unwrap(),
        env.token("bob")
    );
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let files = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        if files == 0 && http(env.srv.addr, "GET", &path, &[], "").await.status == 404 {
            gone = true;
            break;
        }
    }
    assert!(gone, "the acked blob was not swept");
    env.srv.stop().await;
}
