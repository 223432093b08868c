//! Account changes against a real server: a password change or deletion made by the real
//! `pigeon user` binary (another process, the same store) ends the user's live sessions
//! in every dialect, on SQLite and on MongoDB; names are canonical (NFKC + lowercase,
//! ASCII) in every dialect, path, login, registration and recipient field; look-alikes
//! are refused; a deleted and re-registered name gets none of the old mail.
mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{test_config, Client, TestServer, TIMEOUT};
use pigeon::accounts::{self, Action, PasswordSource};
use pigeon::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "test-secret-test-secret-test-secret!";
/// How soon a live session must end after the account command returned.
const KICK_WITHIN: Duration = Duration::from_secs(2);

fn password_config(dir: &Path) -> Config {
    let mut c = test_config(dir);
    c.auth.mode = "password".into();
    c.auth.secret = SECRET.into();
    c.auth.allow_register = true;
    c
}

fn mongo_config(dir: &Path, uri: &str) -> Config {
    let mut c = password_config(dir);
    c.storage.backend = "mongodb".into();
    c.storage.mongodb_uri = uri.into();
    c.storage.mongodb_database = common::unique_name("accounts");
    c
}

async fn add_user(cfg: &Config, user: &str, password: &str) {
    accounts::run(cfg, Action::Add, user, PasswordSource::Given(password))
        .await
        .unwrap();
}

/// Runs the real `pigeon user ARGS` against `cfg`'s store, the password on stdin.
fn pigeon_user(cfg: &Config, args: &[&str], stdin: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pigeon"));
    cmd.arg("user")
        .args(args)
        .arg("--data-dir")
        .arg(&cfg.storage.data_dir)
        .current_dir(&cfg.storage.data_dir) // no config.toml here
        .env("PIGEON_LOG_LEVEL", "warn")
        .env("PIGEON_STORAGE_BACKEND", &cfg.storage.backend)
        .env("PIGEON_STORAGE_MONGODB_URI", &cfg.storage.mongodb_uri)
        .env(
            "PIGEON_STORAGE_MONGODB_DATABASE",
            &cfg.storage.mongodb_database,
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "pigeon user {args:?}: {out:?}");
    out
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
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
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn login(addr: SocketAddr, user: &str, password: &str) -> (u16, Value) {
    let body = json!({"user": user, "password": password}).to_string();
    http(addr, "POST", "/api/login", &body).await
}

async fn token(addr: SocketAddr, user: &str, password: &str) -> String {
    let (status, v) = login(addr, user, password).await;
    assert_eq!(status, 200, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// Reads Pigeon JSON frames until welcome and synced; returns the welcome and what
/// was flushed in between.
async fn welcome(c: &mut Client) -> (Value, Vec<Value>) {
    let w = c.json().await;
    assert_eq!(w["type"], "welcome", "{w}");
    let mut flushed = Vec::new();
    loop {
        let v = c.json().await;
        if v["type"] == "synced" {
            return (w, flushed);
        }
        flushed.push(v);
    }
}

/// A Pigeon JSON session logged in with a login frame.
async fn pigeon_login(srv: &TestServer, user: &str, password: &str) -> (Client, Value) {
    let mut c = Client::connect(&srv.url("/ws")).await;
    c.send_json(json!({"type":"login","user":user,"password":password}))
        .await;
    let (w, _) = welcome(&mut c).await;
    (c, w)
}

#[derive(Debug, Clone, Copy)]
enum Dialect {
    Pigeon,
    Hash,
    Seed,
}

/// Logs `user` in on `dialect` and makes sure the session is registered (a message to
/// `peer`, who is online on Pigeon JSON, arrived).
async fn session(
    srv: &TestServer,
    dialect: Dialect,
    user: &str,
    password: &str,
    peer: &mut Client,
) -> Client {
    let t = token(srv.addr, user, password).await;
    let mut c = match dialect {
        Dialect::Pigeon => {
            let mut c = Client::connect(&srv.url(&format!("/ws?token={t}"))).await;
            c.send_json(json!({"type":"login","user":user})).await;
            welcome(&mut c).await;
            // A fresh id each time: a reused one would be a duplicate, not delivered again.
            let id = common::unique_name("m");
            let sent = c.send_msg(&id, "alice", json!("hi")).await;
            assert_eq!(sent["type"], "sent", "{sent}");
            c
        }
        Dialect::Hash => {
            let mut c = Client::connect(&srv.url(&format!("/ws?token={t}"))).await;
            c.text(format!("{user}#hi#alice")).await;
            loop {
                if c.recv().await == "send success" {
                    break;
                }
            }
            c
        }
        Dialect::Seed => {
            let mut c = Client::connect(&srv.url(&format!("/ws/{user}?token={t}"))).await;
            c.send_json(json!({"to_user":"alice","msg":"hi"})).await;
            c
        }
    };
    let m = peer.json_except_receipts().await;
    assert_eq!(m["from"], user, "{m}");
    if let Dialect::Pigeon = dialect {
        c.ping().await;
    }
    c
}

/// Expects the kick notice with `reason` and then the close 4003 within `KICK_WITHIN`
/// of `since`.
async fn expect_kicked(c: &mut Client, dialect: Dialect, reason: &str, since: Instant) {
    let (closed, texts) = tokio::time::timeout(KICK_WITHIN + Duration::from_millis(500), async {
        c.closed().await
    })
    .await
    .unwrap_or_else(|_| panic!("{dialect:?}: the session was not closed after the change"));
    let took = since.elapsed();
    assert!(took <= KICK_WITHIN, "{dialect:?}: closed after {took:?}");
    assert_eq!(closed.code, 4003, "{dialect:?}: {closed:?} {texts:?}");
    assert_eq!(closed.reason, reason, "{dialect:?}");
    let last = texts.last().cloned().unwrap_or_default();
    match dialect {
        Dialect::Pigeon => {
            let v: Value = serde_json::from_str(&last).unwrap();
            assert_eq!(
                (v["type"].as_str(), v["reason"].as_str()),
                (Some("kicked"), Some(reason)),
                "{v}"
            );
        }
        Dialect::Hash => {
            assert!(last.starts_with(&format!("!kicked#{reason}#")), "{texts:?}")
        }
        Dialect::Seed => {
            let v: Value = serde_json::from_str(&last).unwrap();
            assert_eq!(
                (v["error"].as_str(), v["reason"].as_str()),
                (Some("kicked"), Some(reason)),
                "{v}"
            );
        }
    }
}

/// Password changes and deletions by the `pigeon user` binary end bob's live session in
/// every dialect; alice's stays; bob logs in again with the new password.
async fn changes_end_live_sessions(cfg: Config) {
    add_user(&cfg, "alice", "alice-pw").await;
    add_user(&cfg, "bob", "bob-pw-0").await;
    let srv = TestServer::start(cfg.clone()).await;
    let (mut alice, _) = pigeon_login(&srv, "alice", "alice-pw").await;
    let mut pw = "bob-pw-0".to_string();
    for (n, dialect) in [Dialect::Pigeon, Dialect::Hash, Dialect::Seed]
        .into_iter()
        .enumerate()
    {
        let mut bob = session(&srv, dialect, "bob", &pw, &mut alice).await;
        pw = format!("bob-pw-{}", n + 1);
        pigeon_user(&cfg, &["passwd", "bob"], &format!("{pw}\n"));
        expect_kicked(&mut bob, dialect, "credentials_changed", Instant::now()).await;
    }
    for dialect in [Dialect::Pigeon, Dialect::Hash, Dialect::Seed] {
        let mut bob = session(&srv, dialect, "bob", &pw, &mut alice).await;
        pigeon_user(&cfg, &["del", "bob"], "");
        expect_kicked(&mut bob, dialect, "account_deleted", Instant::now()).await;
        assert_eq!(login(srv.addr, "bob", &pw).await.0, 401);
        pigeon_user(&cfg, &["add", "bob"], &format!("{pw}\n"));
    }
    // Alice's session saw none of it.
    alice.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_password_change_and_deletion_end_live_sessions() {
    let dir = tempfile::tempdir().unwrap();
    changes_end_live_sessions(password_config(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_password_change_and_deletion_end_live_sessions() {
    let Some(uri) = common::service_from_env("PIGEON_TEST_MONGODB_URI") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    changes_end_live_sessions(mongo_config(dir.path(), &uri)).await;
}

/// Registration, HTTP login, the login frame, the URL, and every dialect's recipient
/// field map `Alice`, `ALICE` and full-width `ａｌｉｃｅ` to the one account `alice`.
#[tokio::test]
async fn names_are_canonical_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = password_config(dir.path());
    add_user(&cfg, "bob", "bob-pw-0").await;
    let srv = TestServer::start(cfg.clone()).await;
    let reg = |user: &str| json!({"user": user, "password": "alice-pw"}).to_string();
    let (status, v) = http(srv.addr, "POST", "/api/register", &reg("Alice")).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["user"], "alice");
    for same in ["alice", "ALICE", "ａｌｉｃｅ", "Ａlice"] {
        let (status, v) = http(srv.addr, "POST", "/api/register", &reg(same)).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (409, Some("user_exists")),
            "{same}: {v}"
        );
    }
    // The CLI agrees.
    let out = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["user", "add", "ＡＬＩＣＥ", "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );

    for name in ["ALICE", "ａｌｉｃｅ"] {
        let (status, v) = login(srv.addr, name, "alice-pw").await;
        assert_eq!(
            (status, v["user"].as_str()),
            (200, Some("alice")),
            "{name}: {v}"
        );
    }
    let (mut alice, w) = pigeon_login(&srv, "ALICE", "alice-pw").await;
    assert_eq!(w["user"], "alice");
    // A token in the URL with the name in another case in the path.
    let t = token(srv.addr, "Alice", "alice-pw").await;
    let mut seed_alice = Client::connect(&srv.url(&format!("/ws/ALICE?token={t}"))).await;
    seed_alice
        .send_json(json!({"to_user":"bob","msg":"x"}))
        .await;
    // That took alice over: her Pigeon session is kicked as replaced.
    let (closed, _) = alice.closed().await;
    assert_eq!(closed.code, 4000);
    seed_alice.close().await;
    let (mut alice, _) = pigeon_login(&srv, "alice", "alice-pw").await;

    // Bob writes to her under every spelling, in every dialect.
    let tb = token(srv.addr, "BOB", "bob-pw-0").await;
    let mut bob = Client::connect(&srv.url(&format!("/ws?token={tb}"))).await;
    bob.send_json(json!({"type":"login","user":"Bob"})).await;
    let (w, _) = welcome(&mut bob).await;
    assert_eq!(w["user"], "bob");
    for (i, to) in ["Alice", "ALICE", "ａｌｉｃｅ"].iter().enumerate() {
        let sent = bob
            .send_msg(&i.to_string(), to, json!(format!("p{i}")))
            .await;
        assert_eq!(
            (sent["type"].as_str(), sent["to"].as_str()),
            (Some("sent"), Some("alice")),
            "{sent}"
        );
        let m = alice.json_except_receipts().await;
        assert_eq!(
            (m["to"].as_str(), m["body"].as_str()),
            (Some("alice"), Some(format!("p{i}").as_str())),
            "{m}"
        );
    }
    bob.close().await;
    let mut bob = Client::connect(&srv.url(&format!("/ws?token={tb}"))).await;
    bob.text("BOB#via hash#ａｌｉｃｅ").await;
    let m = alice.json_except_receipts().await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("bob"), Some("via hash")),
        "{m}"
    );
    bob.text("Bob#again#Alice").await;
    let m = alice.json_except_receipts().await;
    assert_eq!(m["body"], "again", "{m}");
    bob.close().await;
    let mut bob = Client::connect(&srv.url(&format!("/ws/Bob?token={tb}"))).await;
    bob.send_json(json!({"to_user":"ALICE","msg":"via seed"}))
        .await;
    let m = alice.json_except_receipts().await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("bob"), Some("via seed")),
        "{m}"
    );
    bob.close().await;
    srv.stop().await;
}

/// Cyrillic `а` in `аlice`, `é` (NFC or NFD) and other non-ASCII names are refused with
/// `invalid_user` in every dialect and path.
#[tokio::test]
async fn look_alike_names_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = password_config(dir.path());
    add_user(&cfg, "alice", "alice-pw").await;
    add_user(&cfg, "bob", "bob-pw-0").await;
    let srv = TestServer::start(cfg.clone()).await;
    let cyrillic = "\u{0430}lice";
    for bad in [
        cyrillic,
        "zo\u{e9}",
        "zoe\u{301}",
        "a\u{200b}lice",
        "al ice",
    ] {
        let body = json!({"user": bad, "password": "long enough pw"}).to_string();
        let (status, v) = http(srv.addr, "POST", "/api/register", &body).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("invalid_user")),
            "{bad:?}: {v}"
        );
    }
    let (status, v) = login(srv.addr, cyrillic, "alice-pw").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_user")),
        "{v}"
    );
    let mut c = Client::connect(&srv.url("/ws")).await;
    c.send_json(json!({"type":"login","user":cyrillic,"password":"alice-pw"}))
        .await;
    let (closed, texts) = c.closed().await;
    assert!(
        texts.last().is_some_and(|t| t.contains("invalid_user")),
        "{closed:?} {texts:?}"
    );

    let (mut bob, _) = pigeon_login(&srv, "bob", "bob-pw-0").await;
    let e = bob.send_msg("1", cyrillic, json!("x")).await;
    assert_eq!(e["code"], "invalid_user", "{e}");
    assert!(e["message"].as_str().unwrap().contains("ASCII"), "{e}");
    bob.close().await;
    let tb = token(srv.addr, "bob", "bob-pw-0").await;
    let mut bob = Client::connect(&srv.url(&format!("/ws?token={tb}"))).await;
    bob.text(format!("bob#x#{cyrillic}")).await;
    loop {
        let t = bob.recv().await;
        if t.starts_with("!error#") {
            assert!(t.starts_with("!error#invalid_user#"), "{t}");
            break;
        }
    }
    bob.close().await;
    let mut bob = Client::connect(&srv.url(&format!("/ws/bob?token={tb}"))).await;
    bob.send_json(json!({"to_user":cyrillic,"msg":"x"})).await;
    let e = bob.json().await;
    assert_eq!(e["error"], "invalid_user", "{e}");
    bob.close().await;
    srv.stop().await;
}

/// Open mode: the name in the path, the query and the hash sender is canonical too.
#[tokio::test]
async fn open_mode_names_are_canonical() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let (mut alice, _) = Client::pigeon(&srv.url(""), "ALICE").await;
    let mut bob = Client::connect(&srv.url("/ws/Ｂob")).await;
    bob.send_json(json!({"to_user":"Alice","msg":"seed"})).await;
    let m = alice.json().await;
    assert_eq!(
        (m["from"].as_str(), m["to"].as_str()),
        (Some("bob"), Some("alice")),
        "{m}"
    );
    bob.close().await;
    let mut bob = Client::connect(&srv.url("/ws")).await;
    bob.text("BOB#hash#alice").await;
    let m = alice.json().await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("bob"), Some("hash")),
        "{m}"
    );
    let mut c = Client::connect(&srv.url("/ws/\u{0430}lice")).await;
    let (closed, _) = c.closed().await;
    assert_eq!(closed.code, 4001);
    srv.stop().await;
}

/// `pigeon user del alice` deletes her mailbox: a new `alice` gets none of the old mail,
/// and a reused client id of hers is a new message, not a duplicate of the old one's.
#[tokio::test]
async fn recycled_name_gets_no_old_mail() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = password_config(dir.path());
    add_user(&cfg, "alice", "alice-pw").await;
    add_user(&cfg, "bob", "bob-pw-0").await;
    let srv = TestServer::start(cfg.clone()).await;
    let (mut alice, _) = pigeon_login(&srv, "alice", "alice-pw").await;
    let sent = alice
        .send_msg("a1", "bob", json!("from the old alice"))
        .await;
    assert_eq!(sent["type"], "sent");
    alice.close().await;
    let (mut bob, _) = pigeon_login(&srv, "bob", "bob-pw-0").await;
    for i in 0..3 {
        let sent = bob
            .send_msg(&format!("b{i}"), "alice", json!("secret for the old alice"))
            .await;
        assert_eq!(sent["status"], "stored", "{sent}");
    }
    pigeon_user(&cfg, &["del", "alice"], "");
    let body = json!({"user": "alice", "password": "new alice pw"}).to_string();
    let (status, v) = http(srv.addr, "POST", "/api/register", &body).await;
    assert_eq!(status, 201, "{v}");
    let (mut alice, w) = pigeon_login(&srv, "alice", "new alice pw").await;
    assert_eq!(w["pending"], 0, "{w}");
    let sent = alice
        .send_msg("a1", "bob", json!("from the new alice"))
        .await;
    assert_eq!(
        (sent["type"].as_str(), sent["duplicate"].as_bool()),
        (Some("sent"), Some(false)),
        "{sent}"
    );
    assert!(alice.try_recv(Duration::from_millis(300)).await.is_none());
    // Mail sent after the re-registration arrives as usual.
    bob.send_msg("b9", "alice", json!("welcome")).await;
    let m = alice.json_except_receipts().await;
    assert_eq!(m["body"], "welcome", "{m}");
    srv.stop().await;
}

/// A database from before canonical names with an account that is not canonical: the
/// server refuses to start and names it, with the command that fixes it.
#[tokio::test]
async fn legacy_account_names_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = password_config(dir.path());
    let store = pigeon::store::open(&cfg.storage, 10).await.unwrap();
    store
        .create_user("Alice", "$argon2id$legacy")
        .await
        .unwrap();
    store.create_user("bob", "$argon2id$fine").await.unwrap();
    drop(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = tokio::time::timeout(
        TIMEOUT,
        pigeon::server::run(listener, cfg.clone(), std::future::pending::<()>()),
    )
    .await
    .expect("the server started although a legacy name is stored");
    let e = format!("{:#}", r.unwrap_err());
    assert!(
        e.contains("\"Alice\"") && e.contains("pigeon user del"),
        "{e}"
    );
    assert!(!e.contains("\"bob\""), "{e}");
    // The exact legacy name can be deleted; then the server starts.
    pigeon_user(&cfg, &["del", "Alice"], "");
    let srv = TestServer::start(cfg).await;
    assert_eq!(login(srv.addr, "bob", "x").await.0, 401);
    srv.stop().await;
}

/// Cluster mode (two nodes on one Redis and one MongoDB): the session ends on whichever
/// node holds it, after `pigeon user` changed the shared store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_changes_end_sessions_on_every_node() {
    let Some(redis) = common::service_from_env("PIGEON_TEST_REDIS_URL") else {
        return;
    };
    let Some(uri) = common::service_from_env("PIGEON_TEST_MONGODB_URI") else {
        return;
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a_cfg = mongo_config(dir_a.path(), &uri);
    let mut b_cfg = password_config(dir_b.path());
    b_cfg.storage = a_cfg.storage.clone();
    b_cfg.storage.data_dir = dir_b.path().to_path_buf();
    let mut a_cfg = a_cfg;
    for (c, n) in [(&mut a_cfg, "a"), (&mut b_cfg, "b")] {
        c.cluster.redis_url = redis.clone();
        c.cluster.node_id = format!("{}-{n}", c.storage.mongodb_database);
    }
    add_user(&a_cfg, "alice", "alice-pw").await;
    add_user(&a_cfg, "bob", "bob-pw-0").await;
    let a = TestServer::start(a_cfg.clone()).await;
    let b = TestServer::start(b_cfg.clone()).await;
    let (mut alice, _) = pigeon_login(&a, "alice", "alice-pw").await;
    // Bob on node B; the change is made through the store only.
    let mut bob = session(&b, Dialect::Pigeon, "bob", "bob-pw-0", &mut alice).await;
    pigeon_user(&a_cfg, &["passwd", "bob"], "bob-pw-1\n");
    expect_kicked(
        &mut bob,
        Dialect::Pigeon,
        "credentials_changed",
        Instant::now(),
    )
    .await;
    // Bob on node A, deleted.
    let mut bob = session(&a, Dialect::Hash, "bob", "bob-pw-1", &mut alice).await;
    pigeon_user(&b_cfg, &["del", "bob"], "");
    expect_kicked(&mut bob, Dialect::Hash, "account_deleted", Instant::now()).await;
    alice.ping().await;
    a.stop().await;
    b.stop().await;
}

/// Several `pigeon user add` at once on a fresh data directory (an install script, a test
/// harness): every one succeeds. The first opens race to switch the new database to WAL,
/// which SQLite refuses at once ("database is locked") instead of waiting. The race is
/// rare (3 of 60 rounds of six failed before the fix, measured by hand), hence rounds.
#[test]
fn parallel_user_adds_on_a_fresh_store_all_succeed() {
    for round in 0..25 {
        let dir = tempfile::tempdir().unwrap();
        let children: Vec<_> = (0..6)
            .map(|i| {
                let mut child = Command::new(env!("CARGO_BIN_EXE_pigeon"))
                    .args(["user", "add", &format!("user{i}"), "--data-dir"])
                    .arg(dir.path())
                    .current_dir(dir.path())
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
                    .write_all(format!("password-{i}\n").as_bytes())
                    .unwrap();
                child
            })
            .collect();
        for (i, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}, user{i}: {out:?}");
        }
    }
}

/// Self-registration is capped per address (`[limits] register_per_ip`), also when the
/// requests arrive all at once: the cap is taken before any hashing. Other addresses
/// still register.
#[tokio::test]
async fn registrations_are_capped_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = password_config(dir.path());
    cfg.limits.register_per_ip = 3;
    let srv = TestServer::start(cfg).await;
    let addr = srv.addr;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                let body = json!({"user": format!("reg{i}"), "password": "long enough pw"});
                http(addr, "POST", "/api/register", &body.to_string()).await
            })
        })
        .collect();
    let mut answers = std::collections::BTreeMap::new();
    for t in tasks {
        let (status, v) = t.await.unwrap();
        *answers
            .entry((status, v["error"].as_str().unwrap_or("").to_string()))
            .or_insert(0) += 1;
    }
    let created = answers.get(&(201, String::new())).copied().unwrap_or(0);
    let capped = answers
        .get(&(429, "too_many_registrations".to_string()))
        .copied()
        .unwrap_or(0);
    assert_eq!((created, capped), (3, 5), "{answers:?}");

    // Another address is not affected.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let body = json!({"user": "elsewhere", "password": "long enough pw"}).to_string();
    let req = format!(
        "POST /api/register HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 201"), "{out}");
    srv.stop().await;
}
