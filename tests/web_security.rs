//! The browser-facing defences against a real server over real sockets: the security
//! headers on every kind of response (page, script, API, errors), which browser origins
//! may open a WebSocket (scheme, host and port compared exactly: no DNS rebinding, no
//! http page for a TLS server), the JSON-only account API, the refusal that names the
//! setting to change, and the web client compiled into the binary.
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, test_config, TestServer, TIMEOUT};
use pigeon::config::Config;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Header lines, names lower-cased: "name: value".
    head: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `raw` and reads one response: the head, then `Content-Length` bytes of body (a
/// 101 has none: the socket then belongs to the WebSocket).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, raw: &str) -> Reply {
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if head.starts_with("HTTP/1.1 101") || buf.len() >= end + 4 + len {
                    return (head, String::from_utf8_lossy(&buf[end + 4..]).to_string());
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                let all = String::from_utf8_lossy(&buf).to_string();
                let (h, b) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
                return (h.to_string(), b.to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (head, body) = tokio::time::timeout(TIMEOUT, read).await.unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let head = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply { status, head, body }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    let s = TcpStream::connect(addr).await.unwrap();
    let raw = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    exchange(s, &raw).await
}

async fn post(addr: SocketAddr, path: &str, content_type: Option<&str>, body: &str) -> Reply {
    let s = TcpStream::connect(addr).await.unwrap();
    let ct = content_type
        .map(|c| format!("Content-Type: {c}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(s, &raw).await
}

/// A WebSocket upgrade request for `/ws` with the given `Host` and `Origin` headers.
fn upgrade_request(host: &str, origin: Option<&str>) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\n{origin}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

async fn upgrade(addr: SocketAddr, host: &str, origin: Option<&str>) -> Reply {
    let s = TcpStream::connect(addr).await.unwrap();
    exchange(s, &upgrade_request(host, origin)).await
}

fn assert_security_headers(r: &Reply, what: &str, port: u16) {
    let csp = r
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy in {:?}", r.head));
    let directive = |name: &str| -> Vec<String> {
        csp.split(';')
            .map(str::trim)
            .find(|d| d.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{what}: CSP has no {name}: {csp}"))
            .split_whitespace()
            .skip(1)
            .map(String::from)
            .collect()
    };
    assert_eq!(directive("default-src"), ["'none'"], "{what}: {csp}");
    assert_eq!(directive("script-src"), ["'self'"], "{what}: {csp}");
    assert_eq!(directive("object-src"), ["'none'"], "{what}: {csp}");
    assert_eq!(directive("base-uri"), ["'none'"], "{what}: {csp}");
    assert_eq!(directive("frame-ancestors"), ["'none'"], "{what}: {csp}");
    let connect = directive("connect-src");
    assert!(connect.contains(&"'self'".to_string()), "{what}: {csp}");
    assert!(
        connect.contains(&format!("ws://127.0.0.1:{port}")),
        "{what}: connect-src names the server's own ws origin: {csp}"
    );
    assert!(
        connect.iter().all(|s| s == "'self'"
            || s == "blob:"
            || s.starts_with("ws://")
            || s.starts_with("wss://")),
        "{what}: connect-src only the server itself: {csp}"
    );
    assert!(!csp.contains("unsafe-"), "{what}: {csp}");
    assert!(!csp.contains('*'), "{what}: {csp}");
    assert!(
        !csp.contains('['),
        "{what}: no IPv6 literal (invalid in a CSP): {csp}"
    );
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{what}");
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{what}");
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let port = srv.addr.port();

    let page = get(srv.addr, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>Pigeon</title>"), "{}", page.body);
    assert_security_headers(&page, "GET /", port);

    let js = get(srv.addr, "/js/app.js").await;
    assert_eq!(js.status, 200);
    assert!(
        js.header("content-type")
            .is_some_and(|c| c.starts_with("text/javascript")),
        "{:?}",
        js.head
    );
    assert_security_headers(&js, "GET /js/app.js", port);

    let api = post(
        srv.addr,
        "/api/login",
        Some("application/json"),
        r#"{"user":"nobody","password":"x"}"#,
    )
    .await;
    assert_security_headers(&api, "POST /api/login", port);

    let missing = get(srv.addr, "/no/such/file.html").await;
    assert_eq!(missing.status, 404);
    assert_security_headers(&missing, "a 404", port);

    let refused = upgrade(srv.addr, "evil.example", Some("http://evil.example")).await;
    assert_eq!(refused.status, 403);
    assert_security_headers(&refused, "a refused upgrade", port);
    srv.stop().await;
}

#[tokio::test]
async fn account_api_takes_only_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.auth.allow_register = true;
    let srv = TestServer::start(cfg).await;
    let creds = r#"{"user":"carol","password":"long enough pw"}"#;
    // A cross-site form can send text/plain, form-encoded or multipart bodies without a
    // preflight: none of them is read.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        for path in ["/api/login", "/api/register"] {
            let r = post(srv.addr, path, ct, creds).await;
            assert_eq!(r.status, 415, "{path} with {ct:?}: {r:?}");
            assert!(r.body.contains("unsupported_media_type"), "{}", r.body);
            assert!(r.body.contains("application/json"), "{}", r.body);
        }
    }
    let r = post(
        srv.addr,
        "/api/register",
        Some("Application/JSON; charset=utf-8"),
        creds,
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = post(srv.addr, "/api/login", Some("application/json"), creds).await;
    assert_eq!(r.status, 200, "{r:?}");
    srv.stop().await;
}

#[tokio::test]
async fn browser_origins_must_match_scheme_host_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(test_config(dir.path())).await;
    let port = srv.addr.port();
    let me = format!("127.0.0.1:{port}");

    // The server's own forms (bind address, localhost) are accepted, as are clients
    // without an Origin (not browsers).
    for origin in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
        format!("http://LOCALHOST:{port}/"),
    ] {
        let r = upgrade(srv.addr, &me, Some(&origin)).await;
        assert_eq!(r.status, 101, "{origin}: {r:?}");
    }
    assert_eq!(upgrade(srv.addr, &me, None).await.status, 101);

    // DNS rebinding: the page and the Host header both say evil.example.
    let host = format!("evil.example:{port}");
    let rebound = upgrade(srv.addr, &host, Some(&format!("http://{host}"))).await;
    assert_eq!(rebound.status, 403, "rebinding: {rebound:?}");
    // The right host at the wrong port or scheme, and opaque origins.
    for origin in [
        format!("http://127.0.0.1:{}", port.wrapping_add(1)),
        "http://127.0.0.1".to_string(),
        format!("https://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}.evil.example"),
        format!("http://127.0.0.1:{port}@evil.example"),
        "null".to_string(),
        String::new(),
    ] {
        let r = upgrade(srv.addr, &me, Some(&origin)).await;
        assert_eq!(r.status, 403, "{origin:?}: {r:?}");
    }

    // The account API refuses pages from other origins too (a rebound page could
    // otherwise guess passwords from the victim's network).
    let s = TcpStream::connect(srv.addr).await.unwrap();
    let body = r#"{"user":"a","password":"b"}"#;
    let r = exchange(
        s,
        &format!(
            "POST /api/login HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    srv.stop().await;
}

#[tokio::test]
async fn configured_public_url_and_allowed_origins() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.server.public_url = vec!["https://chat.example".into()];
    cfg.auth.allowed_origins = vec!["http://app.example:3000".into()];
    let srv = TestServer::start(cfg).await;
    for (origin, status) in [
        ("https://chat.example", 101),
        ("https://chat.example:443", 101),
        ("https://Chat.Example/", 101),
        ("http://app.example:3000", 101),
        ("http://chat.example", 403),
        ("https://chat.example:8443", 403),
        ("http://app.example", 403),
        ("https://app.example:3000", 403),
    ] {
        let r = upgrade(srv.addr, "chat.example", Some(origin)).await;
        assert_eq!(r.status, status, "{origin}: {r:?}");
    }
    // With a public URL set, the bind address forms are not implied.
    let port = srv.addr.port();
    let r = upgrade(
        srv.addr,
        "chat.example",
        Some(&format!("http://localhost:{port}")),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    let page = get(srv.addr, "/").await;
    let csp = page.header("content-security-policy").unwrap_or("");
    assert!(csp.contains("wss://chat.example"), "{csp}");
    srv.stop().await;
}

#[tokio::test]
async fn a_tls_server_refuses_http_pages() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mut cfg: Config = test_config(&dir.path().join("data"));
    cfg.tls.cert = cert_path.to_string_lossy().into_owned();
    cfg.tls.key = key_path.to_string_lossy().into_owned();
    let srv = TestServer::start(cfg).await;
    let port = srv.addr.port();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let host = format!("localhost:{port}");
    for (origin, status) in [
        (format!("https://localhost:{port}"), 101),
        (format!("http://localhost:{port}"), 403),
    ] {
        let tcp = TcpStream::connect(srv.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let r = exchange(tls, &upgrade_request(&host, Some(&origin))).await;
        assert_eq!(r.status, status, "{origin}: {r:?}");
    }
    srv.stop().await;
}

/// Sends an upgrade with `origin` to a server process and returns the status and body.
async fn upgrade_status(addr: SocketAddr, origin: &str) -> (u16, String) {
    let r = upgrade(addr, "x.example", Some(origin)).await;
    (r.status, r.body)
}

#[tokio::test]
async fn the_binary_serves_its_own_web_client_and_names_the_origin_setting() {
    // Run outside the checkout: no config.toml, no static/ next to it.
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("data");
    let log_path = cwd.path().join("server.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pigeon"))
        .args(["serve", "--bind", &addr.to_string(), "--data-dir"])
        .arg(&data)
        .env_remove("RUST_LOG")
        .env("PIGEON_LOG_LEVEL", "info")
        .env(
            "PIGEON_AUTH_ALLOWED_ORIGINS",
            "http://a.example:3000, http://b.example:4000",
        )
        .current_dir(cwd.path())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while TcpStream::connect(addr).await.is_err() {
        if tokio::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!(
                "server did not start: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let checks = async {
        assert!(!Path::new(&cwd.path().join("static")).exists());
        let page = get(addr, "/").await;
        assert_eq!(page.status, 200, "{page:?}");
        assert!(page.body.contains("<title>Pigeon</title>"), "{}", page.body);
        assert!(page
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/html")));
        assert_security_headers(&page, "embedded /", port);
        let js = get(addr, "/js/app.js").await;
        assert_eq!(js.status, 200, "{js:?}");
        assert!(js.body.contains("import "), "{}", js.body);
        assert!(js
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/javascript")));
        assert_security_headers(&js, "embedded /js/app.js", port);
        for path in ["/css/app.css", "/img/pigeon.svg", "/index.html"] {
            assert_eq!(get(addr, path).await.status, 200, "{path}");
        }
        assert_eq!(get(addr, "/../Cargo.toml").await.status, 404);
        assert_eq!(get(addr, "/js/nope.js").await.status, 404);

        // Both origins from the comma-separated environment list are allowed.
        assert_eq!(upgrade_status(addr, "http://a.example:3000").await.0, 101);
        assert_eq!(upgrade_status(addr, "http://b.example:4000").await.0, 101);
        // Another one is refused, and the refusal says what to change.
        let (status, body) = upgrade_status(addr, "http://c.example:5000").await;
        assert_eq!(status, 403);
        assert!(body.contains("[auth] allowed_origins"), "{body}");
        assert!(body.contains("PIGEON_AUTH_ALLOWED_ORIGINS"), "{body}");
        assert!(body.contains("http://c.example:5000"), "{body}");
    };
    let result = tokio::time::timeout(Duration::from_secs(30), checks).await;
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("c.example:5000"))
        .unwrap_or_else(|| panic!("no log line about the refused origin:\n{log}"));
    assert!(line.contains("[auth] allowed_origins"), "{line}");
    assert!(line.contains("PIGEON_AUTH_ALLOWED_ORIGINS"), "{line}");
}
