//! Soak test: mixed traffic against a Pigeon subprocess for a long time, watching its
//! memory and file descriptors for leaks.
//!
//! `cargo bench --bench soak` (60 s) or `cargo bench --bench soak -- --minutes 30`.
//! Options: `--minutes M` / `--seconds S` (run time), `--every N` (report every N s,
//! default 10), `--pairs P` (online sender/recipient pairs, default 10), `--server PATH`
//! (another pigeon binary; default the one `cargo bench` built, i.e. release).
//!
//! Traffic: P senders writing to P online recipients who acknowledge as they go; P
//! senders writing to recipients who are offline most of the time and log in every few
//! seconds to collect their mail; a take-over of a random online recipient every 3 s; a
//! 256 KiB blob every 2 s (online and offline recipients in turn); a short-lived
//! connection every 50 ms. The server runs with `PIGEON_AUTH_MODE=open
//! PIGEON_LIMITS_RATE_PER_SEC=0` on a fresh data directory.
//!
//! Every `--every` seconds it prints the server's RSS (`/proc/PID/status` VmRSS), its open
//! fds (`/proc/PID/fd`) and the traffic so far; at the end a verdict: after warm-up (the
//! first sample is dropped) the last third's maximum must not be above the first third's
//! maximum by more than 10 % + 4 MiB (RSS) or 16 (fds). Exit status 1 on growth.

#[path = "common/procstat.rs"]
mod procstat;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use procstat::{fd_count, ProcStats};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Default)]
struct Counters {
    confirmed: AtomicU64,
    received: AtomicU64,
    blobs: AtomicU64,
    takeovers: AtomicU64,
    short_conns: AtomicU64,
    errors: AtomicU64,
}

struct Opts {
    run: Duration,
    every: Duration,
    pairs: usize,
    server: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        run: Duration::from_secs(60),
        every: Duration::from_secs(10),
        pairs: 10,
        server: env!("CARGO_BIN_EXE_pigeon").to_string(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        let num = || val.parse::<f64>().unwrap_or(0.0);
        match args[i].as_str() {
            "--minutes" => o.run = Duration::from_secs_f64(num() * 60.0),
            "--seconds" => o.run = Duration::from_secs_f64(num()),
            "--every" => o.every = Duration::from_secs_f64(num().max(1.0)),
            "--pairs" => o.pairs = (num() as usize).max(1),
            "--server" => o.server = val,
            // `cargo bench` passes `--bench`; ignore anything unknown.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

async fn connect(base: &str, user: &str) -> Option<Ws> {
    let url = format!("{base}/ws?user={user}");
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    {
        Ok(Ok((ws, _))) => Some(ws),
        _ => None,
    }
}

/// The next JSON text frame (binary frames skipped); `None` when the socket ends or is
/// quiet for 10 s.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).ok(),
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Sends until `stop`; reconnects when the socket ends.
async fn sender(
    base: String,
    me: String,
    to: String,
    pace: Duration,
    c: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = connect(&base, &me).await else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let send = json!({"type":"send","id":format!("{me}-{n}"),"to":to,"body":{"n":n,"pad":"x".repeat(100)}});
            if ws.send(Message::text(send.to_string())).await.is_err() {
                break;
            }
            let answer = loop {
                match next_json(&mut ws).await {
                    Some(v) if v["type"] == "sent" || v["type"] == "error" => break Some(v),
                    Some(_) => continue,
                    None => break None,
                }
            };
            match answer {
                Some(v) if v["type"] == "sent" => c.confirmed.fetch_add(1, Ordering::Relaxed),
                Some(_) => c.errors.fetch_add(1, Ordering::Relaxed),
                None => break,
            };
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
    }
}

/// Reads and acknowledges; reconnects (taking over in turn) when kicked.
async fn recipient(base: String, me: String, c: Arc<Counters>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = connect(&base, &me).await else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut since_ack = 0;
        while let Some(v) = next_json(&mut ws).await {
            if let Some(seq) = v["seq"].as_u64() {
                if v["type"] == "msg" || v["type"] == "blob_end" {
                    c.received.fetch_add(1, Ordering::Relaxed);
                    since_ack += 1;
                    if since_ack >= 50 {
                        since_ack = 0;
                        let ack = json!({"type":"ack","upto":seq}).to_string();
                        if ws.send(Message::text(ack)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs in, reads the flush up to `synced`, acknowledges it all, leaves.
async fn collect_mail(base: &str, me: &str, c: &Counters) {
    let Some(mut ws) = connect(base, me).await else {
        c.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut last = 0;
    while let Some(v) = next_json(&mut ws).await {
        if v["type"] == "synced" {
            break;
        }
        if let Some(seq) = v["seq"].as_u64() {
            c.received.fetch_add(1, Ordering::Relaxed);
            last = seq;
        }
    }
    if last > 0 {
        let _ = ws
            .send(Message::text(json!({"type":"ack","upto":last}).to_string()))
            .await;
    }
    let _ = ws.close(None).await;
}

async fn blob_once(base: &str, to: &str, n: u64, c: &Counters) {
    let Some(mut ws) = connect(base, "blobber").await else {
        c.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let size = 256 * 1024;
    let announce = json!({"type":"blob","id":format!("blob-{n}"),"to":to,"name":"f.bin","mime":"application/octet-stream","size":size});
    let mut ok = ws.send(Message::text(announce.to_string())).await.is_ok();
    let mut stream = 0u32;
    while ok {
        match next_json(&mut ws).await {
            Some(v) if v["type"] == "blob_accepted" => {
                stream = v["stream"].as_u64().unwrap_or(0) as u32;
                break;
            }
            Some(v) if v["type"] == "error" => ok = false,
            Some(_) => {}
            None => ok = false,
        }
    }
    for _ in 0..4 {
        if !ok {
            break;
        }
        let mut frame = stream.to_be_bytes().to_vec();
        frame.extend(vec![b'b'; size / 4]);
        ok = ws.send(Message::binary(frame)).await.is_ok();
    }
    while ok {
        match next_json(&mut ws).await {
            Some(v) if v["type"] == "sent" => {
                c.blobs.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Some(v) if v["type"] == "error" => ok = false,
            Some(_) => {}
            None => ok = false,
        }
    }
    if !ok {
        c.errors.fetch_add(1, Ordering::Relaxed);
    }
    let _ = ws.close(None).await;
}

fn spawn_server(o: &Opts, dir: &std::path::Path, port: u16) -> Child {
    Command::new(&o.server)
        .args([
            "serve",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir)
        .env("PIGEON_AUTH_MODE", "open")
        .env("PIGEON_LIMITS_RATE_PER_SEC", "0")
        .env("PIGEON_LOG_LEVEL", "warn")
        .env_remove("RUST_LOG")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", o.server))
}

fn main() {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(soak(o));
    std::process::exit(code);
}

async fn soak(o: Opts) -> i32 {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut child = spawn_server(&o, dir.path(), port);
    let pid = child.id() as i32;
    let base = format!("ws://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "soak: {} for {:?}, {} pairs, report every {:?}",
        o.server, o.run, o.pairs, o.every
    );

    let c = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..o.pairs {
        let (b, c1, s1) = (base.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(recipient(b, format!("on{i}"), c1, s1)));
        let (b, c1, s1) = (base.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(sender(
            b,
            format!("s{i}"),
            format!("on{i}"),
            Duration::ZERO,
            c1,
            s1,
        )));
        let (b, c1, s1) = (base.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(sender(
            b,
            format!("t{i}"),
            format!("off{i}"),
            Duration::from_millis(5),
            c1,
            s1,
        )));
    }
    // Offline recipients collect their mail now and then.
    {
        let (b, c1, s1, pairs) = (base.clone(), c.clone(), stop.clone(), o.pairs);
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !s1.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                collect_mail(&b, &format!("off{}", i % pairs), &c1).await;
                i += 1;
            }
        }));
    }
    // Take-overs of online recipients (who take their session back when kicked).
    {
        let (b, c1, s1, pairs) = (base.clone(), c.clone(), stop.clone(), o.pairs);
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !s1.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(3)).await;
                collect_mail(&b, &format!("on{}", (i * 7) % pairs), &c1).await;
                c1.takeovers.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    // Blobs, to online and offline recipients in turn.
    {
        let (b, c1, s1) = (base.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !s1.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let to = if n.is_multiple_of(2) { "on0" } else { "off0" };
                blob_once(&b, to, n, &c1).await;
                n += 1;
            }
        }));
    }
    // Short-lived connections.
    {
        let (b, c1, s1) = (base.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !s1.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(mut ws) = connect(&b, &format!("brief{}", n % 100)).await {
                    let _ = next_json(&mut ws).await; // welcome
                    let _ = ws.close(None).await;
                    c1.short_conns.fetch_add(1, Ordering::Relaxed);
                } else {
                    c1.errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }

    let start = Instant::now();
    let mut samples: Vec<(u64, usize)> = Vec::new();
    let mut last_confirmed = 0;
    let mut last_t = start;
    while start.elapsed() < o.run {
        tokio::time::sleep(o.every.min(o.run.saturating_sub(start.elapsed()))).await;
        if let Ok(Some(status)) = child.try_wait() {
            println!("VERDICT: FAIL: the server exited ({status})");
            return 1;
        }
        let rss = ProcStats::read(pid).rss_kib;
        let fds = fd_count(pid);
        samples.push((rss, fds));
        let confirmed = c.confirmed.load(Ordering::Relaxed);
        let rate = (confirmed - last_confirmed) as f64 / last_t.elapsed().as_secs_f64();
        (last_confirmed, last_t) = (confirmed, Instant::now());
        println!(
            "t={:>6.0}s rss={:>7.1} MiB fds={:>4} sent={:>9} ({:>6.0}/s) recv={:>9} blobs={:>4} takeovers={:>4} short_conns={:>6} errors={}",
            start.elapsed().as_secs_f64(),
            rss as f64 / 1024.0,
            fds,
            confirmed,
            rate,
            c.received.load(Ordering::Relaxed),
            c.blobs.load(Ordering::Relaxed),
            c.takeovers.load(Ordering::Relaxed),
            c.short_conns.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
    let peak = ProcStats::read(pid).hwm_kib;
    let _ = child.kill();
    let _ = child.wait();

    // Warm-up: the first sample is dropped.
    let s = samples.get(1..).unwrap_or(&[]);
    if s.len() < 3 {
        println!(
            "VERDICT: too few samples ({}); run longer or report more often",
            s.len()
        );
        return 2;
    }
    let third = s.len() / 3;
    let max_of = |part: &[(u64, usize)]| {
        (
            part.iter().map(|x| x.0).max().unwrap_or(0),
            part.iter().map(|x| x.1).max().unwrap_or(0),
        )
    };
    let (rss_first, fds_first) = max_of(&s[..third]);
    let (rss_last, fds_last) = max_of(&s[s.len() - third..]);
    let rss_ok = rss_last <= rss_first + rss_first / 10 + 4096;
    let fds_ok = fds_last <= fds_first + 16;
    println!(
        "RSS max first third {:.1} MiB, last third {:.1} MiB (peak VmHWM {:.1} MiB); fds max {} -> {}",
        rss_first as f64 / 1024.0,
        rss_last as f64 / 1024.0,
        peak as f64 / 1024.0,
        fds_first,
        fds_last
    );
    if rss_ok && fds_ok {
        println!("VERDICT: OK: no growth after warm-up");
        0
    } else {
        println!(
            "VERDICT: GROWTH: {}{}",
            if rss_ok { "" } else { "RSS grew " },
            if fds_ok { "" } else { "fds grew" }
        );
        1
    }
}
