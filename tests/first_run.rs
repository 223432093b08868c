//! A first run as a new user and an operator see it: a typo in the configuration stops
//! start-up with a did-you-mean (file and environment), `--bind` takes the forms people
//! type, the data directory and database are owner-only, `/healthz` says `degraded`
//! (503) while the store cannot write and recovers, errors are one sentence without a
//! backtrace, and logs piped to a file carry no colour codes and no `Some(...)`.
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, http_get, test_config, Client, TestServer};
use serde_json::json;

/// Runs `pigeon serve` with `args`; it must exit within 10 s (a server that starts is
/// killed and reported as such).
fn serve_fails(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("serve").args(args);
    if !args.contains(&"--data-dir") {
        cmd.arg("--data-dir").arg(dir.path());
    }
    cmd.current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "pigeon serve {args:?} started instead of refusing; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    out
}

/// The binary under test; `PIGEON_BIN` runs the subprocess tests against another build
/// (an older one, to see them fail).
fn bin() -> String {
    std::env::var("PIGEON_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pigeon").to_string())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_typo_in_the_config_file_stops_start_up_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let port = free_port();
    std::fs::write(&path, format!("[server]\nbnd = \"127.0.0.1:{port}\"\n")).unwrap();
    let out = serve_fails(&["--config", path.to_str().unwrap()], &[]);
    let err = stderr(&out);
    assert!(
        err.contains("unknown key [server] bnd in") && err.contains("did you mean bind?"),
        "{err}"
    );
}

#[test]
fn a_typo_in_an_environment_variable_stops_start_up_with_a_suggestion() {
    let out = serve_fails(&[], &[("PIGEON_SERVER_BND", "127.0.0.1:0")]);
    let err = stderr(&out);
    assert!(
        err.contains("PIGEON_SERVER_BND") && err.contains("did you mean PIGEON_SERVER_BIND?"),
        "{err}"
    );
}

#[test]
fn a_bad_bind_names_the_forms_accepted() {
    let out = serve_fails(&["--bind", "8080"], &[]);
    let err = stderr(&out);
    assert!(
        err.contains("localhost:8080") && err.contains(":8080 for every interface"),
        "{err}"
    );
}

#[test]
fn errors_are_one_sentence_without_a_backtrace() {
    // A data directory that cannot be created.
    let out = serve_fails(&["--data-dir", "/proc/self/no/such"], &[]);
    let err = stderr(&out);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        !err.contains("backtrace") && !err.contains("Caused by"),
        "{err}"
    );
    assert!(
        !err.contains("store unavailable: store unavailable"),
        "{err}"
    );
}

#[tokio::test]
async fn bind_accepts_localhost_and_a_bare_port() {
    let dir = tempfile::tempdir().unwrap();
    for form in ["localhost:{port}", ":{port}"] {
        let port = free_port();
        let bind = form.replace("{port}", &port.to_string());
        let mut child = Command::new(bin())
            .args(["serve", "--bind", &bind, "--data-dir"])
            .arg(dir.path())
            .current_dir(dir.path())
            .env("PIGEON_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                panic!("--bind {bind} exited ({s}): {}", stderr(&out));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "--bind {bind} never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_and_what_is_in_it_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let top = tempfile::tempdir().unwrap();
    // A fresh data directory (parents included).
    let data = top.path().join("new").join("data");
    let srv = TestServer::start(test_config(&data)).await;
    let base = format!("ws://{}", srv.addr);
    let (mut ann, _) = Client::pigeon(&base, "ann").await;
    assert_eq!(
        ann.send_msg("1", "tim", json!("secret")).await["status"],
        "stored"
    );
    ann.send_json(json!({"type":"blob","id":"f1","to":"tim","name":"a.bin","size":3}))
        .await;
    let stream = ann.json().await["stream"].as_u64().unwrap() as u32;
    let mut frame = stream.to_be_bytes().to_vec();
    frame.extend_from_slice(b"abc");
    ann.binary(frame).await;
    assert_eq!(ann.json().await["status"], "stored");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("pigeon.db")), 0o600);
    for f in ["pigeon.db-wal", "pigeon.db-shm"] {
        if data.join(f).exists() {
            assert_eq!(mode(&data.join(f)), 0o600, "{f}");
        }
    }
    let blobs = data.join("blobs");
    assert_eq!(mode(&blobs), 0o700);
    let files: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!files.is_empty());
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    srv.stop().await;

    // An existing directory and database with loose modes are tightened at start.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("pigeon.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let srv = TestServer::start(test_config(&data)).await;
    let (_ann, _) = Client::pigeon(&format!("ws://{}", srv.addr), "ann").await;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("pigeon.db")), 0o600);
    srv.stop().await;
}

/// A tmpfs of `size` mounted on `at` while alive.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn healthz_is_degraded_while_the_disk_is_full_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiny");
    let _mount = match Tmpfs::mount(&data, "4m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a tmpfs for the full-disk test: {e}");
            return;
        }
    };
    let mut config = test_config(&data);
    config.storage.sqlite_busy_timeout_ms = 300;
    let srv = TestServer::start(config).await;
    let h = http_get(srv.addr, "/healthz").await;
    assert!(
        h.starts_with("HTTP/1.1 200") && h.contains(r#""status":"ok""#),
        "{h}"
    );

    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).and_then(|_| f.sync_all()).is_ok() {}
        let byte = [0u8; 1];
        while f.write_all(&byte).is_ok() {}
    }
    let h = http_get(srv.addr, "/healthz").await;
    assert!(h.starts_with("HTTP/1.1 503"), "{h}");
    assert!(h.contains(r#""status":"degraded""#), "{h}");
    // What a sender hears meanwhile reads as one sentence.
    let (mut alice, _) = Client::pigeon(&format!("ws://{}", srv.addr), "alice").await;
    let big = "x".repeat(48 * 1024);
    for i in 0..10 {
        let v = alice.send_msg(&format!("f{i}"), "carol", json!(big)).await;
        if v["type"] == "error" {
            let m = v["message"].as_str().unwrap_or("");
            assert!(!m.contains("store unavailable: store unavailable"), "{v}");
        }
    }

    std::fs::remove_file(&filler).unwrap();
    let h = http_get(srv.addr, "/healthz").await;
    assert!(
        h.starts_with("HTTP/1.1 200") && h.contains(r#""status":"ok""#),
        "{h}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn piped_logs_have_no_colour_codes_and_plain_fields() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(bin())
        .args([
            "serve",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .current_dir(dir.path())
        .env("PIGEON_LOG_LEVEL", "info")
        .env("PIGEON_AUTH_MODE", "password")
        .env("PIGEON_AUTH_SECRET", "test-secret-test-secret-test-secret!")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = Client::connect(&format!("ws://127.0.0.1:{port}/ws")).await;
    c.send_json(json!({"type":"login","user":"ghost","password":"nope"}))
        .await;
    let _ = c.closed().await;
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let (log, stdout) = (
        stderr(&out),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    );
    assert!(
        log.contains("failed password login"),
        "logs belong on stderr:\n{log}\nstdout:\n{stdout}"
    );
    assert!(
        !log.contains('\u{1b}') && !stdout.contains('\u{1b}'),
        "{log:?}"
    );
    assert!(
        log.contains("ip=127.0.0.1") && !log.contains("Some("),
        "{log}"
    );
}
