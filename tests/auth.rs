//! Accounts and security against a real server: password and token logins over HTTP and
//! WebSocket, identity in every dialect, take-over rules, TLS with a real client, the
//! Origin check, rate and connection limits, the login timeout and `pigeon user`.
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{test_config, Client, TestServer, TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use pigeon::accounts::{self, Action, PasswordSource};
use pigeon::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-test-secret-test-secret!";

fn password_config(dir: &Path) -> Config {
    let mut c = test_config(dir);
    c.auth.mode = "password".into();
    c.auth.secret = SECRET.into();
    c
}

async fn add_user(cfg: &Config, user: &str, password: &str) {
    accounts::run(cfg, Action::Add, user, PasswordSource::Given(password))
        .await
        .unwrap();
}

/// A server in password mode with accounts alice/alice-pw and bob/bob-pw.
async fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> (TestServer, Config) {
    let mut cfg = password_config(dir);
    tweak(&mut cfg);
    add_user(&cfg, "alice", "alice-pw").await;
    add_user(&cfg, "bob", "bob-pw").await;
    (TestServer::start(cfg.clone()).await, cfg)
}

/// One HTTP/1.1 request over any stream; returns (status, headers, body).
async fn http_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    // The account API reads only JSON bodies (a browser form cannot post those cross-site).
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out).to_string();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    http_on(s, method, path, &[], body).await
}

/// POST /api/login; returns (status, parsed body).
async fn login(addr: SocketAddr, user: &str, password: &str) -> (u16, Value) {
    let body = json!({"user": user, "password": password}).to_string();
    let (status, _, body) = http(addr, "POST", "/api/login", &body).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn token(addr: SocketAddr, user: &str, password: &str) -> String {
    let (status, v) = login(addr, user, password).await;
    assert_eq!(status, 200, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// Expects an error frame with `code` (any dialect) and then a close with `close`.
async fn expect_refused(c: &mut Client, code: &str, close: u16) {
    let (closed, texts) = c.closed().await;
    assert_eq!(closed.code, close, "{texts:?}");
    let last = texts.last().cloned().unwrap_or_default();
    assert!(last.contains(code), "expected {code} in {texts:?}");
}

/// Reads Pigeon JSON frames until welcome and synced.
async fn expect_welcome(c: &mut Client, user: &str) {
    let w = c.json().await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["user"], user);
    while c.json().await["type"] != "synced" {}
}

#[tokio::test]
async fn login_over_http_good_and_bad_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = start(dir.path(), |c| c.limits.login_max_failures = 3).await;

    let (status, v) = login(srv.addr, "alice", "alice-pw").await;
    assert_eq!(status, 200, "{v}");
    assert!(v["token"].as_str().unwrap().len() > 40);
    let now = pigeon::token::now_secs();
    let exp = v["expires_at"].as_u64().unwrap();
    assert!(exp > now + 86_000 && exp <= now + 86_400 + 5, "{v}");

    let (status, v) = login(srv.addr, "alice", "wrong").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("bad_credentials"))
    );
    let (status, v) = login(srv.addr, "nobody", "alice-pw").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("bad_credentials"))
    );
    let (status, _, body) = http(srv.addr, "POST", "/api/login", "{not json").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_request"), "{body}");
    let (status, _, body) = http(srv.addr, "POST", "/api/register", "{}").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("registration_disabled"), "{body}");

    // Two more failures make three: alice from this address must now wait, even with
    // the right password.
    login(srv.addr, "alice", "wrong").await;
    login(srv.addr, "alice", "wrong").await;
    let body = json!({"user":"alice","password":"alice-pw"}).to_string();
    let (status, head, body) = http(srv.addr, "POST", "/api/login", &body).await;
    assert_eq!(status, 429, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "too_many_attempts");
    assert!(v["try_again_in"].as_u64().unwrap() > 0);
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    // Bob is not affected.
    assert_eq!(login(srv.addr, "bob", "bob-pw").await.0, 200);
    srv.stop().await;
}

#[tokio::test]
async fn self_registration_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = start(dir.path(), |c| c.auth.allow_register = true).await;
    let reg = |user: &str, pw: &str| json!({"user": user, "password": pw}).to_string();
    let (status, _, body) = http(
        srv.addr,
        "POST",
        "/api/register",
        &reg("carol", "long enough"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let t = v["token"].as_str().unwrap().to_string();
    let mut c = Client::connect(&srv.url(&format!("/ws?user=carol&token={t}"))).await;
    expect_welcome(&mut c, "carol").await;
    let (status, _, body) = http(
        srv.addr,
        "POST",
        "/api/register",
        &reg("carol", "long enough"),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, _, body) = http(srv.addr, "POST", "/api/register", &reg("dan", "short")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("weak_password"));
    let (status, _, _) = http(
        srv.addr,
        "POST",
        "/api/register",
        &reg("a b", "long enough"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(login(srv.addr, "carol", "long enough").await.0, 200);
    srv.stop().await;
}

#[tokio::test]
async fn login_frame_with_password_or_token() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = start(dir.path(), |c| c.limits.login_max_failures = 2).await;

    let mut c = Client::connect(&srv.url("/ws")).await;
    c.send_json(json!({"type":"login","user":"alice","password":"alice-pw"}))
        .await;
    expect_welcome(&mut c, "alice").await;
    c.close().await;

    let t = token(srv.addr, "bob", "bob-pw").await;
    let mut c = Client::connect(&srv.url("/ws")).await;
    c.send_json(json!({"type":"login","token":t})).await;
    expect_welcome(&mut c, "bob").await;
    // The token names bob: it cannot log in alice.
    let mut c2 = Client::connect(&srv.url("/ws")).await;
    c2.send_json(json!({"type":"login","user":"alice","token":t}))
        .await;
    expect_refused(&mut c2, "bad_credentials", 4003).await;

    for _ in 0..2 {
        let mut c = Client::connect(&srv.url("/ws")).await;
        c.send_json(json!({"type":"login","user":"alice","password":"nope"}))
            .await;
        expect_refused(&mut c, "bad_credentials", 4003).await;
    }
    let mut c = Client::connect(&srv.url("/ws")).await;
    c.send_json(json!({"type":"login","user":"alice","password":"alice-pw"}))
        .await;
    let (closed, texts) = c.closed().await;
    assert_eq!(closed.code, 4003);
    let e: Value = serde_json::from_str(texts.last().unwrap()).unwrap();
    assert_eq!(e["code"], "too_many_attempts");
    assert!(e["try_again_in"].as_u64().unwrap() > 0, "{e}");
    srv.stop().await;
}

#[tokio::test]
async fn names_without_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = start(dir.path(), |_| {}).await;
    let mut c = Client::connect(&srv.url("/ws?user=alice")).await;
    expect_refused(&mut c, "auth_required", 4003).await;
    let mut c = Client::connect(&srv.url("/ws/alice")).await;
    let (closed, texts) = c.closed().await;
    assert_eq!(closed.code, 4003);
    let e: Value = serde_json::from_str(&texts[0]).unwrap();
    assert_eq!(e["error"], "auth_required", "seed dialect error: {e}");
    let mut c = Client::connect(&srv.url("/ws")).await;
    c.text("alice#hi#bob").await;
    expect_refused(&mut c, "!error#auth_required#", 4003).await;
    let mut c = Client::connect(&srv.url("/ws")).await;
    c.send_json(json!({"type":"login","user":"alice"})).await;
    expect_refused(&mut c, "auth_required", 4003).await;
    let mut c = Client::connect(&srv.url("/ws?user=alice&token=garbage")).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    srv.stop().await;
}

#[tokio::test]
async fn tokens_in_url_and_header_work_in_every_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = start(dir.path(), |_| {}).await;
    let ta = token(srv.addr, "alice", "alice-pw").await;
    let tb = token(srv.addr, "bob", "bob-pw").await;

    // Bob on Pigeon JSON with a Bearer header.
    let mut req = srv.url("/ws?user=bob").into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {tb}").parse().unwrap());
    let mut bob = Client::connect_request(req).await;
    expect_welcome(&mut bob, "bob").await;

    // Alice on the hash dialect: token in the URL, then `from#msg#to`.
    let mut alice = Client::connect(&srv.url(&format!("/ws?token={ta}"))).await;
    alice.text("alice#via hash#bob").await;
    assert_eq!(alice.recv().await, "send success");
    let m = bob.json().await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("alice"), Some("via hash"))
    );
    alice.close().await;

    // Alice on the seed dialect (this takes over nothing: the hash session is gone).
    let mut alice = Client::connect(&srv.url(&format!("/ws/alice?token={ta}"))).await;
    alice
        .send_json(json!({"to_user":"bob","msg":"via seed"}))
        .await;
    let m = bob.json().await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("alice"), Some("via seed"))
    );

    // A token is good for its own user only.
    let mut c = Client::connect(&srv.url(&format!("/ws/bob?token={ta}"))).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    let mut c = Client::connect(&srv.url(&format!("/ws?user=bob&token={ta}"))).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    bob.ping().await; // still bob's session
    srv.stop().await;
}

#[tokio::test]
async fn expired_tampered_and_stale_tokens_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, cfg) = start(dir.path(), |_| {}).await;
    let store = pigeon::store::open(&cfg.storage, 10).await.unwrap();
    let hash = store.password_hash("alice").await.unwrap().unwrap();
    let key = pigeon::token::TokenKey::new(SECRET.as_bytes());
    let now = pigeon::token::now_secs();

    let expired = key.sign("alice", now - 5, &hash);
    let mut c = Client::connect(&srv.url(&format!("/ws?user=alice&token={expired}"))).await;
    expect_refused(&mut c, "token_expired", 4003).await;
    // The same key and hash with a future expiry is accepted: the test above can fail.
    let good = key.sign("alice", now + 60, &hash);
    let mut c = Client::connect(&srv.url(&format!("/ws?user=alice&token={good}"))).await;
    expect_welcome(&mut c, "alice").await;
    c.close().await;

    // Moving the expiry or swapping the user breaks the signature.
    let parts: Vec<&str> = good.split('.').collect();
    let later = format!("{}.{}.{}", parts[0], now + 999_999, parts[2]);
    let mut c = Client::connect(&srv.url(&format!("/ws?token={later}"))).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    let bob = key.sign("bob", now + 60, &hash);
    let swapped = format!(
        "{}.{}.{}",
        bob.split('.').next().unwrap(),
        parts[1],
        parts[2]
    );
    let mut c = Client::connect(&srv.url(&format!("/ws?token={swapped}"))).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    // A token signed with another key.
    let other = pigeon::token::TokenKey::new(b"some-other-secret-of-enough-length");
    let forged = other.sign("alice", now + 60, &hash);
    let mut c = Client::connect(&srv.url(&format!("/ws?token={forged}"))).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;

    // Changing the password voids tokens issued before.
    let issued = token(srv.addr, "alice", "alice-pw").await;
    accounts::run(
        &cfg,
        Action::Passwd,
        "alice",
        PasswordSource::Given("new-pw"),
    )
    .await
    .unwrap();
    let mut c = Client::connect(&srv.url(&format!("/ws?user=alice&token={issued}"))).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    assert_eq!(login(srv.addr, "alice", "new-pw").await.0, 200);
    srv.stop().await;
}

#[tokio::test]
async fn cannot_send_as_another_user_in_any_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, cfg) = start(dir.path(), |_| {}).await;
    add_user(&cfg, "carol", "carol-pw").await;
    let tc = token(srv.addr, "carol", "carol-pw").await;
    let ta = token(srv.addr, "alice", "alice-pw").await;
    let mut carol = Client::connect(&srv.url(&format!("/ws?user=carol&token={tc}"))).await;
    expect_welcome(&mut carol, "carol").await;

    // Hash: alice's token, a frame claiming to be bob, before and after identifying.
    let mut alice = Client::connect(&srv.url(&format!("/ws?token={ta}"))).await;
    alice.text("bob#forged#carol").await;
    assert!(alice.recv().await.starts_with("!error#wrong_sender#"));
    alice.text("alice#real#carol").await;
    assert_eq!(alice.recv().await, "send success");
    alice.text("bob#forged again#carol").await;
    assert!(alice.recv().await.starts_with("!error#wrong_sender#"));
    let m = carol.json().await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("alice"), Some("real"))
    );
    alice.close().await;

    // Pigeon JSON and seed JSON carry no sender: the session's user is the sender.
    let mut alice = Client::connect(&srv.url(&format!("/ws?user=alice&token={ta}"))).await;
    expect_welcome(&mut alice, "alice").await;
    alice
        .send_json(json!({"type":"send","id":"1","to":"carol","body":"p","from":"bob"}))
        .await;
    assert_eq!(alice.json().await["type"], "sent");
    alice.close().await;
    let mut alice = Client::connect(&srv.url(&format!("/ws/alice?token={ta}"))).await;
    alice
        .send_json(json!({"to_user":"carol","msg":"s","from_user":"bob"}))
        .await;
    for body in ["p", "s"] {
        let m = carol.json().await;
        assert_eq!(
            (m["from"].as_str(), m["body"].as_str()),
            (Some("alice"), Some(body))
        );
    }
    // And no frame at all may log in as bob without bob's credentials.
    let mut c = Client::connect(&srv.url(&format!("/ws?token={ta}"))).await;
    c.send_json(json!({"type":"login","user":"bob"})).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    srv.stop().await;
}

#[tokio::test]
async fn takeover_requires_the_owners_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = start(dir.path(), |_| {}).await;
    let ta = token(srv.addr, "alice", "alice-pw").await;
    let tb = token(srv.addr, "bob", "bob-pw").await;
    let mut alice = Client::connect(&srv.url(&format!("/ws?user=alice&token={ta}"))).await;
    expect_welcome(&mut alice, "alice").await;

    for url in [
        "/ws?user=alice".to_string(),
        "/ws/alice".to_string(),
        format!("/ws?user=alice&token={tb}"),
        format!("/ws/alice?token={tb}"),
    ] {
        let mut c = Client::connect(&srv.url(&url)).await;
        let (closed, _) = c.closed().await;
        assert_eq!(closed.code, 4003, "{url}");
    }
    let mut c = Client::connect(&srv.url("/ws")).await;
    c.send_json(json!({"type":"login","user":"alice","password":"guess"}))
        .await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    alice.ping().await; // none of them kicked alice

    let mut again = Client::connect(&srv.url("/ws")).await;
    again
        .send_json(json!({"type":"login","user":"alice","password":"alice-pw"}))
        .await;
    expect_welcome(&mut again, "alice").await;
    assert_eq!(alice.closed().await.0.code, 4000);
    srv.stop().await;
}

#[tokio::test]
async fn takeover_loops_are_damped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.takeover_max = 2;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (_a1, _) = Client::pigeon(&base, "eve").await;
    let (_a2, _) = Client::pigeon(&base, "eve").await; // take-over 1
    let (mut a3, _) = Client::pigeon(&base, "eve").await; // take-over 2
    let mut a4 = Client::connect(&srv.url("/ws?user=eve")).await;
    expect_refused(&mut a4, "takeover_loop", 4009).await;
    a3.ping().await; // the live session was left alone
    let (_other, _) = Client::pigeon(&base, "frank").await;
    srv.stop().await;
}

#[tokio::test]
async fn open_mode_serves_the_seed_dialects_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = password_config(dir.path());
    cfg.auth.mode = "open".into();
    let srv = TestServer::start(cfg).await;
    let mut seed = Client::connect(&srv.url("/ws/sue")).await;
    let mut hash = Client::connect(&srv.url("/ws")).await;
    hash.text("hal#hello sue#sue").await;
    assert_eq!(hash.recv().await, "send success");
    let m: Value = serde_json::from_str(&seed.recv().await).unwrap();
    assert_eq!(
        (m["from_user"].as_str(), m["msg"].as_str()),
        (Some("hal"), Some("hello sue"))
    );
    seed.send_json(json!({"to_user":"hal","msg":"hi hal"}))
        .await;
    assert_eq!(hash.recv().await, "sue#hi hal#hal");
    srv.stop().await;
}

#[tokio::test]
async fn tls_serves_wss_and_https_on_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mut cfg = test_config(&dir.path().join("data"));
    cfg.tls.cert = cert_path.to_string_lossy().into_owned();
    cfg.tls.key = key_path.to_string_lossy().into_owned();
    let srv = TestServer::start(cfg).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = |name: rustls::pki_types::ServerName<'static>| {
        let connector = connector.clone();
        let addr = srv.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector.connect(name, tcp).await.unwrap()
        }
    };

    // https://localhost/healthz
    let (status, _, body) = http_on(tls(name.clone()).await, "GET", "/healthz", &[], "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"ok""#), "{body}");

    // wss://localhost/ws?user=alice with a real WebSocket client.
    let stream = tls(name.clone()).await;
    let url = format!("wss://localhost:{}/ws?user=alice", srv.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let next = |m: Option<Result<Message, _>>| -> Value {
        match m {
            Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    };
    let w = next(tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap());
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(next(ws.next().await)["type"], "synced");
    ws.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    assert_eq!(next(ws.next().await)["type"], "pong");

    // Plain ws:// to the TLS port gets no WebSocket.
    let plain =
        tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(srv.url("/ws"))).await;
    assert!(matches!(plain, Ok(Err(_))), "plain connection must fail");
    srv.stop().await;
}

/// Pings have a budget of their own (each costs a pong): a ping flood is closed even
/// with the frame rate off, while a client pinging within `ping_burst` stays.
#[tokio::test]
async fn ping_flood_is_closed_without_a_frame_rate() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    assert_eq!(cfg.limits.rate_per_sec, 0, "the frame rate is off here");
    let (burst, strikes) = (cfg.limits.ping_burst, cfg.limits.rate_strikes);
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);

    let (mut calm, _) = Client::pigeon(&base, "calm_pinger").await;
    for _ in 0..burst {
        calm.try_send(Message::Ping(b"p".to_vec().into()))
            .await
            .unwrap();
    }
    calm.send_json(json!({"type":"ping"})).await;
    assert_eq!(
        calm.json().await["type"],
        "pong",
        "a burst within the budget is fine"
    );

    let (mut flood, _) = Client::pigeon(&base, "ping_flooder").await;
    for _ in 0..5_000 {
        if flood
            .try_send(Message::Ping(b"p".to_vec().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (closed, texts) = flood.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (4008, "rate_limited")
    );
    let refused: Vec<&String> = texts
        .iter()
        .filter(|t| t.contains("pings per second"))
        .collect();
    assert_eq!(refused.len() as u32, strikes, "{texts:?}");

    calm.send_json(json!({"type":"ping"})).await;
    assert_eq!(calm.json().await["type"], "pong", "the others go on");
    srv.stop().await;
}

/// A `send` dropped by the rate limit is named by its id, so the client can retry it.
#[tokio::test]
async fn rate_limited_send_names_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.rate_per_sec = 1;
    cfg.limits.rate_burst = 3;
    cfg.limits.rate_strikes = 5;
    let srv = TestServer::start(cfg).await;
    let (mut c, _) = Client::pigeon(&format!("ws://{}", srv.addr), "hasty").await;
    // The burst is 3 frames; 6 sends: every one is answered by its id, as `sent` or as
    // `rate_limited`.
    for k in 1..=6 {
        c.send_json(json!({"type":"send","id":format!("m{k}"),"to":"nobody","body":"x"}))
            .await;
    }
    let mut answers = BTreeMap::new();
    for _ in 1..=6 {
        let a = c.json().await;
        let kind = match (a["type"].as_str(), a["code"].as_str()) {
            (Some("sent"), _) => "sent",
            (Some("error"), Some("rate_limited")) => "rate_limited",
            _ => panic!("unexpected answer {a}"),
        };
        let id = a["id"].as_str().unwrap_or_else(|| panic!("no id in {a}"));
        assert!(answers.insert(id.to_string(), kind).is_none(), "{id} twice");
    }
    let ids: Vec<&str> = answers.keys().map(String::as_str).collect();
    assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5", "m6"]);
    let refused = answers.values().filter(|k| **k == "rate_limited").count();
    assert!((1..=3).contains(&refused), "{answers:?}");
    srv.stop().await;
}

/// Opens a WebSocket to the server from `source` (a 127.0.0.x address).
async fn ws_from(
    source: [u8; 4],
    server: SocketAddr,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let tcp = socket.connect(server).await?;
    let url = format!("ws://{server}{path}");
    tokio::time::timeout(TIMEOUT, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("handshake timed out")
        .map(|(ws, _)| ws)
}

/// Pings until the server closes the socket; returns the close code.
async fn flood_pings(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Option<u16> {
    for _ in 0..2_000 {
        if ws.send(Message::Ping(b"p".to_vec().into())).await.is_err() {
            break;
        }
    }
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("no close")
        {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            _ => return None,
        }
    }
}

/// An address whose connections were closed for flooding `flood_ban_after` times is
/// dropped on accept until `flood_ban_secs` have passed; other addresses are not.
#[tokio::test]
async fn flooding_address_is_banned_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.flood_ban_after = 2;
    cfg.limits.flood_ban_secs = 2;
    let srv = TestServer::start(cfg).await;
    let flooder = [127, 0, 0, 7];
    for k in 0..2 {
        let mut ws = ws_from(flooder, srv.addr, &format!("/ws?user=flood{k}"))
            .await
            .unwrap();
        assert_eq!(flood_pings(&mut ws).await, Some(4008), "flood {k}");
    }
    let banned = ws_from(flooder, srv.addr, "/ws?user=flood2").await;
    assert!(banned.is_err(), "a banned address got a WebSocket");
    // Others are served, and can see the ban counted.
    let mut ok = ws_from([127, 0, 0, 8], srv.addr, "/ws?user=bystander")
        .await
        .unwrap();
    ok.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    let metrics = common::http_get(srv.addr, "/metrics").await;
    assert!(
        metrics.contains("pigeon_connections_banned_total 1"),
        "{metrics}"
    );
    // Once the first close is flood_ban_secs old, the address is let in again.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let mut back = ws_from(flooder, srv.addr, "/ws?user=flood3").await.unwrap();
    back.send(Message::text(r#"{"type":"ping"}"#))
        .await
        .unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn rate_limit_refuses_then_closes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.rate_per_sec = 1;
    cfg.limits.rate_burst = 5;
    cfg.limits.rate_strikes = 3;
    let srv = TestServer::start(cfg).await;
    let (mut c, _) = Client::pigeon(&format!("ws://{}", srv.addr), "spammer").await;
    for _ in 0..20 {
        c.send_json(json!({"type":"ping"})).await;
    }
    let (closed, texts) = c.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (4008, "rate_limited")
    );
    let codes: Vec<String> = texts
        .iter()
        .map(|t| {
            let v: Value = serde_json::from_str(t).unwrap();
            v["code"]
                .as_str()
                .unwrap_or(v["type"].as_str().unwrap())
                .to_string()
        })
        .collect();
    // The burst (minus the login) is answered, then three strikes.
    assert_eq!(
        codes.iter().filter(|c| *c == "pong").count(),
        5,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "rate_limited").count(),
        3,
        "{codes:?}"
    );
    // A well-behaved client on the same server is fine.
    let (mut ok, _) = Client::pigeon(&format!("ws://{}", srv.addr), "calm").await;
    ok.ping().await;
    srv.stop().await;
}

const UPGRADE: &[(&str, &str)] = &[
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

#[tokio::test]
async fn disallowed_origins_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.auth.allowed_origins = vec!["https://app.example".into()];
    let srv = TestServer::start(cfg).await;
    let with_origin = |origin: &'static str| async move {
        let mut h = UPGRADE.to_vec();
        h.push(("Origin", origin));
        let s = TcpStream::connect(srv.addr).await.unwrap();
        // The upgraded socket stays open; read just the response head.
        let mut s = s;
        let mut req = "GET /ws?user=o HTTP/1.1\r\nHost: localhost\r\n".to_string();
        for (k, v) in &h {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let evil = with_origin("https://evil.example").await;
    assert!(evil.starts_with("HTTP/1.1 403"), "{evil}");
    assert!(evil.contains("allowed_origins"), "{evil}");
    assert!(with_origin("https://app.example")
        .await
        .starts_with("HTTP/1.1 101"));
    // The server's own origin: scheme, host and listening port (see tests/web_security.rs).
    let own = format!("http://localhost:{}", srv.addr.port());
    assert!(with_origin(Box::leak(own.into_boxed_str()))
        .await
        .starts_with("HTTP/1.1 101"));
    assert!(with_origin("http://localhost")
        .await
        .starts_with("HTTP/1.1 403"));
    // Non-browser clients send no Origin and are allowed.
    let (mut c, _) = Client::pigeon(&format!("ws://{}", srv.addr), "cli").await;
    c.ping().await;
    srv.stop().await;
}

#[tokio::test]
async fn per_ip_connection_cap_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.max_connections_per_ip = 2;
    let srv = TestServer::start(cfg).await;
    let base = format!("ws://{}", srv.addr);
    let (a, _) = Client::pigeon(&base, "a").await;
    let (_b, _) = Client::pigeon(&base, "b").await;
    let (status, _, body) = http(srv.addr, "GET", "/healthz", "").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many_connections"));
    a.close().await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (status, _, _) = http(srv.addr, "GET", "/healthz", "").await;
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn unidentified_sockets_are_closed_after_the_login_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.login_timeout_secs = 1;
    let srv = TestServer::start(cfg).await;
    let (mut ok, _) = Client::pigeon(&format!("ws://{}", srv.addr), "ok").await;
    let started = std::time::Instant::now();
    let mut idle = Client::connect(&srv.url("/ws")).await;
    let (closed, texts) = idle.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (4010, "login_timeout")
    );
    assert!(texts.last().unwrap().contains("login_timeout"), "{texts:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    ok.ping().await; // identified sessions are not timed out
    srv.stop().await;
}

#[tokio::test]
async fn pigeon_user_cli_adds_changes_and_deletes_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let user = |args: &[&str], stdin: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pigeon"))
            .arg("user")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .current_dir(dir.path()) // no config.toml here
            .env("PIGEON_LOG_LEVEL", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = user(&["add", "bob"], "s3cret pw\n");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("added user bob"));
    let out = user(&["add", "bob"], "other\n");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
    let out = user(&["add", "empty"], "");
    assert!(!out.status.success(), "an empty password must be refused");

    let mut cfg = password_config(&data);
    cfg.auth.secret = String::new(); // generated and kept in the data dir
    let srv = TestServer::start(cfg.clone()).await;
    assert_eq!(login(srv.addr, "bob", "s3cret pw").await.0, 200);
    let t = token(srv.addr, "bob", "s3cret pw").await;
    let mut c = Client::connect(&srv.url(&format!("/ws?user=bob&token={t}"))).await;
    expect_welcome(&mut c, "bob").await;
    c.close().await;
    srv.stop().await;

    // Tokens survive a restart (the generated secret is persisted)...
    let srv = TestServer::start(cfg.clone()).await;
    let mut c = Client::connect(&srv.url(&format!("/ws?user=bob&token={t}"))).await;
    expect_welcome(&mut c, "bob").await;
    c.close().await;
    // ...but not a password change, and a deleted user cannot log in.
    assert!(user(&["passwd", "bob"], "new pw\n").status.success());
    assert_eq!(login(srv.addr, "bob", "s3cret pw").await.0, 401);
    assert_eq!(login(srv.addr, "bob", "new pw").await.0, 200);
    let mut c = Client::connect(&srv.url(&format!("/ws?user=bob&token={t}"))).await;
    expect_refused(&mut c, "bad_credentials", 4003).await;
    assert!(user(&["del", "bob"], "").status.success());
    assert_eq!(login(srv.addr, "bob", "new pw").await.0, 401);
    assert!(!user(&["del", "bob"], "").status.success());
    srv.stop().await;
}
