//! `pigeon chat`, the real binary, driven through a pseudo-terminal (`openpty` from
//! libc; nothing to install): it says at once why a session ended and exits non-zero
//! when it cannot go on, reconnects after a server restart and sends what was typed
//! meanwhile exactly once, prints what comes from the network escaped, and speaks to
//! the user rather than in protocol codes.
mod common;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, test_config, Client, ServerProcess, TestServer};
use pigeon::accounts::{self, Action, PasswordSource};
use serde_json::{json, Value};

/// `pigeon chat` on a pseudo-terminal: its output (stdout and stderr) is collected.
struct Chat {
    child: Child,
    master: std::fs::File,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Chat {
    fn spawn(args: &[&str]) -> Chat {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds into the integers given; the null pointers ask
        // for default name, terminal settings and window size.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty failed");
        // SAFETY: both fds were just opened by openpty and are owned here only.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        // PIGEON_CHAT_BIN: run these tests against another build (an older one, to see
        // them fail).
        let bin = std::env::var("PIGEON_CHAT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_pigeon").to_string());
        let child = Command::new(bin)
            .arg("chat")
            .args(args)
            .env_remove("PIGEON_PASSWORD")
            .env_remove("RUST_LOG")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let master = std::fs::File::from(master);
        let out = Arc::new(Mutex::new(Vec::new()));
        let (mut reader, sink) = (master.try_clone().unwrap(), out.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child and every copy of the slave side are gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Chat { child, master, out }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn raw_output(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    /// Waits until the output contains `what`.
    async fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output().contains(what) {
            assert!(
                Instant::now() < deadline,
                "never printed {what:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\n").unwrap();
    }

    /// The exit status, if the client exits within `d`.
    async fn exit_within(&mut self, d: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn replaced_by_a_second_login_it_says_so_and_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let mut chat = Chat::spawn(&["--user", "tim", "--server", &base]);
    chat.wait_for("logged in as tim").await;
    let (_tim_elsewhere, _) = Client::pigeon(&base, "tim").await;
    let status = chat.exit_within(Duration::from_secs(1)).await;
    let out = chat.output();
    let status = status.unwrap_or_else(|| panic!("still running 1 s after the take-over:\n{out}"));
    assert!(!status.success(), "exit status {status}:\n{out}");
    assert!(out.contains("tim logged in somewhere else"), "{out}");
    srv.stop().await;
}

#[tokio::test]
async fn after_a_server_restart_it_reconnects_and_sends_what_was_typed_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = ServerProcess::spawn(dir.path(), port, &[]).await;
    let base = format!("ws://127.0.0.1:{port}");
    let mut chat = Chat::spawn(&["--user", "tim", "--server", &base]);
    chat.wait_for("logged in as tim").await;
    assert!(server.terminate().success());
    chat.type_line("ann: typed while the server was down");
    chat.wait_for("reconnecting").await;
    // Let it try (and fail) at least once more before the server is back.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let server = ServerProcess::spawn(dir.path(), port, &[]).await;
    chat.wait_for("[stored]").await;
    let (mut ann, flushed) = Client::pigeon(&base, "ann").await;
    let mut bodies: Vec<Value> = flushed.iter().map(|m| m["body"].clone()).collect();
    // Anything still on its way arrives live; give a repeat time to show up.
    while let Some(t) = ann.try_recv(Duration::from_millis(1500)).await {
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "msg" {
            bodies.push(v["body"].clone());
        }
    }
    assert_eq!(
        bodies,
        vec![json!("typed while the server was down")],
        "{}",
        chat.output()
    );
    assert!(
        chat.child.try_wait().unwrap().is_none(),
        "{}",
        chat.output()
    );
    drop(server);
}

#[tokio::test]
async fn what_comes_from_the_network_is_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (mut ann, _) = Client::pigeon(&base, "ann").await;
    ann.send_msg("1", "tim", json!("hi\n[offline] carol: x"))
        .await;
    ann.send_msg("2", "tim", json!("\u{1b}]0;pwned\u{7}title"))
        .await;
    ann.send_msg("3", "tim", json!("\u{1b}[2J\u{9b}31mred"))
        .await;
    let mut chat = Chat::spawn(&["--user", "tim", "--server", &base]);
    chat.wait_for("title").await;
    chat.wait_for("red").await;
    let out = chat.output();
    assert!(out.contains("ann: hi\\n[offline] carol: x"), "{out}");
    assert!(out.contains("\\x1b]0;pwned\\x07title"), "{out}");
    assert!(out.contains("\\x1b[2J\\u{9b}31mred"), "{out}");
    assert!(
        !out.lines()
            .any(|l| l.trim_start().starts_with("[offline] carol")),
        "a body forged a line:\n{out}"
    );
    let raw = chat.raw_output();
    for forbidden in [&b"\x1b]0;"[..], b"\x1b[2J", "\u{9b}".as_bytes(), b"\x07"] {
        assert!(
            !raw.windows(forbidden.len()).any(|w| w == forbidden),
            "{forbidden:?} reached the terminal:\n{out}"
        );
    }
    // Outgoing lines look different from incoming ones.
    chat.type_line("ann: hello back");
    chat.wait_for("you → ann: hello back").await;
    srv.stop().await;
}

async fn password_server(dir: &std::path::Path) -> TestServer {
    let mut cfg = test_config(dir);
    cfg.auth.mode = "password".into();
    cfg.auth.secret = "test-secret-test-secret-test-secret!".into();
    accounts::run(&cfg, Action::Add, "tim", PasswordSource::Given("tim-pw"))
        .await
        .unwrap();
    TestServer::start(cfg).await
}

#[tokio::test]
async fn wrong_or_missing_password_is_explained_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let srv = password_server(dir.path()).await;
    let base = format!("ws://{}", srv.addr);

    let mut chat = Chat::spawn(&["--user", "tim", "--server", &base, "--password", "nope"]);
    let status = chat.exit_within(Duration::from_secs(5)).await;
    let out = chat.output();
    let status = status.unwrap_or_else(|| panic!("still running after a refused login:\n{out}"));
    assert!(!status.success(), "exit status {status}:\n{out}");
    assert!(out.contains("wrong password for tim"), "{out}");
    assert!(!out.contains("bad_credentials"), "{out}");

    let mut chat = Chat::spawn(&["--user", "tim", "--server", &base]);
    let status = chat.exit_within(Duration::from_secs(5)).await;
    let out = chat.output();
    let status = status.unwrap_or_else(|| panic!("still running without a password:\n{out}"));
    assert!(!status.success(), "exit status {status}:\n{out}");
    assert!(
        out.contains("this server needs a password: --password or PIGEON_PASSWORD"),
        "{out}"
    );
    assert!(!out.contains("?token="), "{out}");

    let chat = Chat::spawn(&["--user", "tim", "--server", &base, "--password", "tim-pw"]);
    chat.wait_for("logged in as tim").await;
    srv.stop().await;
}

#[tokio::test]
async fn a_password_is_fine_against_an_open_server() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let chat = Chat::spawn(&["--user", "tim", "--server", &base, "--password", "whatever"]);
    chat.wait_for("logged in as tim").await;
    assert!(!chat.output().contains("bad_credentials"));
    srv.stop().await;
}

#[tokio::test]
async fn a_file_send_shows_its_progress() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let base = format!("ws://{}", srv.addr);
    let (_ann, _) = Client::pigeon(&base, "ann").await;
    let path = dir.path().join("big.bin");
    std::fs::write(&path, vec![5u8; 3 * 1024 * 1024]).unwrap();
    let mut chat = Chat::spawn(&["--user", "tim", "--server", &base]);
    chat.wait_for("logged in as tim").await;
    chat.type_line(&format!("/send ann {}", path.display()));
    chat.wait_for("sending big.bin: 100%").await;
    chat.wait_for("you → ann: file big.bin").await;
    let out = chat.output();
    assert!(
        out.contains("sending big.bin: 50%") || out.contains("sending big.bin: 4"),
        "{out}"
    );
    srv.stop().await;
}
