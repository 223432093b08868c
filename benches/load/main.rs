//! Load generator: measures Pigeon against bare relays (a tokio-tungstenite relay, Node.js
//! `ws`, tornado) on loopback, with the same client and the same message shape for all.
//! Scenarios: pairs, offline flush (SQLite and MongoDB), idle sessions, one large blob,
//! and pairs across two cluster nodes (Redis + MongoDB).
//!
//! `cargo bench --bench load -- all --peers all --seconds 10` (see docs/BENCHMARKS.md).
//! Every server runs as a subprocess started afresh for each scenario, so its CPU time
//! (`/proc/PID/stat`) and peak RSS (`/proc/PID/status` VmHWM) belong to that scenario
//! alone. Latencies are in microseconds, recorded with `hdrhistogram`. Nothing is pinned
//! to a core; use `taskset` around the command for that. A peer that cannot be started
//! gets a "not available: why" row, never a figure.
//!
//! The same binary also runs the bare relay (`load bare-relay --bind ADDR`), so that
//! `cargo bench` builds it with no extra step.

#[path = "../peers/bare_relay.rs"]
mod bare_relay;
#[path = "../common/procstat.rs"]
mod procstat;

mod cli;
mod client;
mod results;
mod servers;
mod table;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use sha2::Digest;
use tokio::net::TcpSocket;
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use cli::{parse_peers, Cli, Peer, Scenario, StoreKind};
use client::{connect, expect_empty_mailbox, new_hist, open_session, seq_of, Dialect, Ws};
use procstat::{ProcStats, RssSampler};
use results::{merge, row, Figure, Row};
use servers::{fresh_db, mongo_env, mongo_pid, start, start_redis, Server};

type Sink = Arc<Mutex<SplitSink<Ws, Message>>>;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench` to harness-less benches.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.get(1).map(String::as_str) == Some("bare-relay") {
        let bind = match (args.get(2).map(String::as_str), args.get(3)) {
            (Some("--bind"), Some(addr)) => addr.parse().context("--bind ADDR")?,
            _ => bail!("usage: load bare-relay --bind ADDR"),
        };
        return bare_relay::main(bind);
    }
    if args.get(1).map(String::as_str) == Some("attack") {
        return attack_main(&args[2..]);
    }
    let cli = Cli::parse_from(args);
    let peers = parse_peers(&cli.peers)?;
    let nofile = raise_nofile_limit();
    let rt = tokio::runtime::Runtime::new()?;
    let rows = rt.block_on(run(&cli, &peers, nofile))?;
    table::print_table(&cli, nofile, &rows);
    Ok(())
}

/// Raises the soft open-files limit to the hard one; servers started later inherit it.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

async fn run(cli: &Cli, peers: &[Peer], nofile: u64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let sc = cli.scenario;
    if matches!(sc, Scenario::All | Scenario::Pairs) {
        for &w in &cli.windows {
            // Rounds interleave the servers, so that a noisy minute on a shared machine
            // does not land on one server only; the figures add the rounds up.
            let mut hash: Vec<Option<Result<Figure>>> = peers.iter().map(|_| None).collect();
            let mut json: Option<Result<Figure>> = None;
            for _ in 0..cli.rounds.max(1) {
                for (k, &peer) in peers.iter().enumerate() {
                    let f = pairs_run(cli, peer, w, Dialect::Hash).await;
                    hash[k] = Some(merge(hash[k].take(), f));
                }
                let f = pairs_run(cli, Peer::Pigeon, w, Dialect::Json).await;
                json = Some(merge(json.take(), f));
            }
            let scenario = format!("pairs {} w={w} hash", cli.pairs);
            for (k, &peer) in peers.iter().enumerate() {
                if let Some(f) = hash[k].take() {
                    rows.push(row(&scenario, peer.name(), f));
                }
            }
            if let Some(f) = json {
                let scenario = format!("pairs {} w={w} JSON", cli.pairs);
                rows.push(row(&scenario, "pigeon", f));
            }
        }
    }
    if matches!(sc, Scenario::All | Scenario::Flush) {
        for &store in &cli.store {
            let (label, m, note) = match store {
                StoreKind::Sqlite => ("pigeon sqlite", cli.messages, String::new()),
                StoreKind::Mongodb => (
                    "pigeon mongodb",
                    cli.mongo_messages,
                    format!("measures the {}, not MongoDB", cli.mongodb_label),
                ),
            };
            let scenario = format!("offline flush {m}");
            let (store_fig, flush_fig) = flush_run(cli, store, m).await;
            let mut r = row(&format!("{scenario}: store"), label, store_fig);
            r.note.clone_from(&note);
            rows.push(r);
            let mut r = row(&scenario, label, flush_fig);
            r.note = note;
            rows.push(r);
        }
    }
    if matches!(sc, Scenario::All | Scenario::Idle) {
        // The bench and the server each hold one descriptor per session.
        let max = (nofile as usize).saturating_sub(200);
        let n = cli.idle.min(max);
        let scenario = format!("idle {n}");
        for &peer in peers {
            let figure = idle_run(cli, peer, n).await;
            let mut r = row(&scenario, peer.name(), figure);
            if n < cli.idle {
                r.note = format!("clamped from {} by the file limit {nofile}", cli.idle);
            }
            rows.push(r);
        }
    }
    if matches!(sc, Scenario::All | Scenario::Blob) {
        let scenario = format!("blob {} MiB", cli.blob_mib);
        // The bare relay forwards binary frames too (a ceiling); the others do not.
        let blob_peers: Vec<Peer> = peers
            .iter()
            .copied()
            .filter(|p| matches!(p, Peer::Pigeon | Peer::Bare))
            .collect();
        let mut figures: Vec<Option<Result<Figure>>> = blob_peers.iter().map(|_| None).collect();
        let mut notes = vec![String::new(); blob_peers.len()];
        for _ in 0..cli.rounds.max(1) {
            for (k, &peer) in blob_peers.iter().enumerate() {
                let f = match blob_run(cli, peer).await {
                    Ok((f, note)) => {
                        notes[k] = note;
                        Ok(f)
                    }
                    Err(e) => Err(e),
                };
                figures[k] = Some(merge(figures[k].take(), f));
            }
        }
        for (k, &peer) in blob_peers.iter().enumerate() {
            if let Some(f) = figures[k].take() {
                let mut r = row(&scenario, peer.name(), f);
                r.note = format!("{} round(s); {}", cli.rounds.max(1), notes[k]);
                rows.push(r);
            }
        }
    }
    if matches!(sc, Scenario::All | Scenario::Cluster) {
        // Rounds interleave the two set-ups like pairs does.
        let mut two = None;
        let mut one = None;
        for _ in 0..cli.rounds.max(1) {
            two = Some(merge(two.take(), cluster_run(cli, 2).await));
            one = Some(merge(one.take(), cluster_run(cli, 1).await));
        }
        let scenario = format!("cluster pairs {} w=1 hash", cli.cluster_pairs);
        let note = format!("store: {}, not MongoDB", cli.mongodb_label);
        for (label, f) in [("pigeon 2 nodes", two), ("pigeon 1 node", one)] {
            if let Some(f) = f {
                let mut r = row(&scenario, label, f);
                r.note.clone_from(&note);
                rows.push(r);
            }
        }
    }
    if matches!(sc, Scenario::All | Scenario::Hostile) {
        rows.extend(hostile_rows(cli).await);
    }
    Ok(rows)
}

/// Hostile clients: the same pairs measurement on one Pigeon, first calm, then while
/// slowloris sockets, never-reading sessions (with senders pushing at them) and ping
/// flooders run. Target: other users' p99 within 2× of calm.
async fn hostile_rows(cli: &Cli) -> Vec<Row> {
    // The per-connection frame limit is Pigeon's defence here; set above what one pairs
    // user sends at window 1 (~1,000/s), far below what a flooder does.
    let env = [
        ("PIGEON_LIMITS_MAILBOX_MAX", "1000000".to_string()),
        ("PIGEON_LIMITS_WRITE_TIMEOUT_SECS", "600".to_string()),
        ("PIGEON_LIMITS_RATE_PER_SEC", "3000".to_string()),
        ("PIGEON_LIMITS_RATE_BURST", "6000".to_string()),
    ];
    let scenario = format!("hostile: pairs {} w=1 hash", cli.hostile_pairs);
    let server = match start(cli, Peer::Pigeon, &env).await {
        Ok(s) => s,
        Err(e) => {
            return vec![row(
                &scenario,
                "pigeon",
                Ok(Figure::Unavailable(format!("{e:#}"))),
            )]
        }
    };
    let calm = pairs_measure(
        cli,
        &[&server],
        None,
        cli.hostile_pairs,
        1,
        Dialect::Hash,
        "pigeon",
    )
    .await;
    // The attackers run in a process of their own (one thread), so that the measuring
    // clients here are not starved by attack tasks on their own runtime.
    let attacker = match Command::new(std::env::current_exe().unwrap_or_else(|_| "load".into()))
        .args(["attack", &server.addr.to_string(), &cli.hostile_kinds])
        .arg(cli.hostiles.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return vec![row(
                &scenario,
                "pigeon",
                Ok(Figure::Unavailable(format!(
                    "cannot start the attackers: {e}"
                ))),
            )]
        }
    };
    let attacker = ChildGuard(attacker);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = server.stats().rss_kib;
    let peak = RssSampler::start(server.pid);
    let attacker_before = ProcStats::read(attacker.0.id() as i32);
    let t0 = Instant::now();
    let loud = pairs_measure(
        cli,
        &[&server],
        None,
        cli.hostile_pairs,
        1,
        Dialect::Hash,
        "pigeon",
    )
    .await;
    let rss_after = server.stats().rss_kib;
    let rss_peak = peak.stop();
    let attacker_cpu = (ProcStats::read(attacker.0.id() as i32).cpu_s - attacker_before.cpu_s)
        / t0.elapsed().as_secs_f64()
        * 100.0;
    drop(attacker);
    let p99 = |f: &Result<Figure>| match f {
        Ok(Figure::Rate { hist: Some(h), .. }) => Some(h.value_at_quantile(0.99)),
        _ => None,
    };
    let note = match (p99(&calm), p99(&loud)) {
        (Some(a), Some(b)) if a > 0 => format!(
            "p99 under attack / calm = {:.2}× (target ≤ 2×); RSS during the attack {} → {} MiB \
             (peak {} MiB); attackers' process {attacker_cpu:.0}% CPU",
            b as f64 / a as f64,
            rss_before / 1024,
            rss_after / 1024,
            rss_peak / 1024
        ),
        _ => "no p99 to compare".into(),
    };
    let mut calm_row = row(&scenario, "pigeon calm", calm);
    calm_row.note = "no hostile clients".into();
    let mut loud_row = row(&scenario, "pigeon attacked", loud);
    loud_row.note = format!(
        "{} each of {} (sink: a never-reading session with 100 msg/s of 1 KiB pushed at it); {note}",
        cli.hostiles, cli.hostile_kinds
    );
    vec![calm_row, loud_row]
}

/// Kills the child when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `load attack ADDR KINDS N`: runs N attackers of each kind (comma list of slowloris,
/// sink, ping, busy, longname, guess) against ADDR on one thread, until stdin closes or
/// it is killed.
fn attack_main(args: &[String]) -> Result<()> {
    let [addr, kinds, n] = args else {
        bail!("usage: load attack ADDR KINDS N");
    };
    let addr: SocketAddr = addr.parse().context("ADDR")?;
    let n: usize = n.parse().context("N")?;
    let kind = |k: &str| kinds.split(',').any(|x| x.trim() == k);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        // Each kind comes from an address of its own, as from a host of its own (the
        // measured users are on 127.0.0.1): Pigeon's per-address defences then hit the
        // attackers only.
        let from = |last: u8| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)));
        for i in 0..n {
            if kind("slowloris") {
                tokio::spawn(slowloris(addr, from(2), stop.clone()));
            }
            if kind("sink") {
                tokio::spawn(sink_and_flood(addr, i, from(3), stop.clone()));
            }
            if kind("ping") {
                tokio::spawn(ping_flood(addr, i, from(4), stop.clone()));
            }
            if kind("busy") {
                // The sink's traffic to a session that does read: the same load, no hostility.
                tokio::spawn(busy_reader_and_flood(addr, i, from(5), stop.clone()));
            }
            if kind("longname") {
                tokio::spawn(long_name_logins(addr, i, from(6), stop.clone()));
            }
            if kind("guess") {
                // A botnet: every guesser cycles through 250 addresses of its own.
                tokio::spawn(password_guesses(addr, i, stop.clone()));
            }
        }
        // Until the parent goes away (stdin closes).
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while tokio::io::AsyncReadExt::read(&mut stdin, &mut buf)
            .await
            .is_ok_and(|n| n > 0)
        {}
    });
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

/// Sends an HTTP request's headers one byte at a time, forever (reconnecting when closed).
async fn slowloris(addr: SocketAddr, source: Option<IpAddr>, stop: Arc<AtomicBool>) {
    let request = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    let open = || async {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(addr).await
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = open().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for b in request.iter().cycle() {
            if stop.load(Ordering::Relaxed)
                || tokio::io::AsyncWriteExt::write_all(&mut s, &[*b])
                    .await
                    .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A session that never reads, and a sender pushing 100 msgs/s of 1 KiB at it.
async fn sink_and_flood(addr: SocketAddr, i: usize, source: Option<IpAddr>, stop: Arc<AtomicBool>) {
    let sink = format!("sink{i}");
    let Ok(_sink_ws) = connect(addr, &format!("/ws?user={sink}"), source).await else {
        return;
    };
    sink_flood_into(addr, &format!("flood{i}"), &sink, source, stop).await;
}

/// Sends 100 msgs/s of 1 KiB from `from` to `to` until stopped, reading the answers.
async fn sink_flood_into(
    addr: SocketAddr,
    from: &str,
    sink: &str,
    source: Option<IpAddr>,
    stop: Arc<AtomicBool>,
) {
    let Ok(mut ws) = open_session(addr, from, Dialect::Json, source).await else {
        return;
    };
    let body = "x".repeat(1024);
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                let f = format!(r#"{{"type":"send","id":"{n}","to":"{sink}","body":"{body}"}}"#);
                if ws.send(Message::text(f)).await.is_err() {
                    return;
                }
            }
            m = ws.next() => if m.is_none() { return },
        }
    }
}

/// Like `sink_and_flood`, but the recipient reads (and acks) everything: a control.
async fn busy_reader_and_flood(
    addr: SocketAddr,
    i: usize,
    source: Option<IpAddr>,
    stop: Arc<AtomicBool>,
) {
    let reader = format!("busy{i}");
    let Ok(rws) = open_session(addr, &reader, Dialect::Json, source).await else {
        return;
    };
    let (mut rsink, mut rstream) = rws.split();
    let acker = tokio::spawn(async move {
        while let Some(Ok(m)) = rstream.next().await {
            if let Message::Text(t) = m {
                if let Some(seq) = seq_of(t.as_str()) {
                    let ack = format!(r#"{{"type":"ack","upto":{seq}}}"#);
                    if rsink.send(Message::text(ack)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    sink_flood_into(addr, &format!("feeder{i}"), &reader, source, stop).await;
    acker.abort();
}

/// One `POST /api/login` with `body` from `source`; the status (0 when it failed).
async fn post_login(addr: SocketAddr, source: Option<IpAddr>, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let mut s = socket.connect(addr).await?;
        let head = format!(
            "POST /api/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        // The server may refuse a huge body (413) before reading it all.
        let _ = s.write_all(body.as_bytes()).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        anyhow::Ok(out)
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out)
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// Failed logins with huge user names, one after the other: a 1.9 MB name over HTTP,
/// then a 0.9 MB name in a WebSocket login frame (each name unique).
async fn long_name_logins(
    addr: SocketAddr,
    i: usize,
    source: Option<IpAddr>,
    stop: Arc<AtomicBool>,
) {
    let pad = "n".repeat(1_900_000);
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let body = format!(r#"{{"user":"{pad}{i}-{k}","password":"x"}}"#);
        post_login(addr, source, &body).await;
        if let Ok(mut ws) = connect(addr, "/ws", source).await {
            let frame = format!(
                r#"{{"type":"login","user":"{}{i}-{k}","password":"x"}}"#,
                &pad[..900_000]
            );
            if ws.send(Message::text(frame)).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            }
        }
    }
}

/// Wrong passwords over HTTP for ten users, each guess from the next of 250 addresses
/// (127.0.1.1-250): no single address reaches its limit quickly, so these cost hashes
/// until the per-user cap and the hashing queue refuse them.
async fn password_guesses(addr: SocketAddr, i: usize, stop: Arc<AtomicBool>) {
    let mut k = 0usize;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, (1 + (i * 7 + k) % 250) as u8));
        let body = format!(r#"{{"user":"victim{}","password":"guess{k}"}}"#, k % 10);
        if post_login(addr, Some(ip), &body).await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A session that sends WebSocket pings as fast as the socket takes them, and logs in
/// again when it is closed (Pigeon closes ping flooders).
async fn ping_flood(addr: SocketAddr, i: usize, source: Option<IpAddr>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(ws) = open_session(addr, &format!("pinger{i}"), Dialect::Json, source).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut sink, mut stream) = ws.split();
        let reader = tokio::spawn(async move { while stream.next().await.is_some() {} });
        while !stop.load(Ordering::Relaxed) && !reader.is_finished() {
            if sink
                .send(Message::Ping(vec![0u8; 16].into()))
                .await
                .is_err()
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        reader.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Scenario 1: pairs

struct PairsShared {
    start: Instant,
    measure_from: u64,
    measure_to: u64,
    stop: AtomicBool,
    errors: AtomicU64,
    out_lines: AtomicU64,
}

impl PairsShared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

async fn pairs_run(cli: &Cli, peer: Peer, window: usize, dialect: Dialect) -> Result<Figure> {
    let env = [(
        "PIGEON_LIMITS_MAILBOX_MAX",
        (window as u64 * 4 + 10_000).to_string(),
    )];
    let server = match start(cli, peer, &env).await {
        Ok(s) => s,
        Err(e) => return Ok(Figure::Unavailable(format!("{e:#}"))),
    };
    pairs_measure(
        cli,
        &[&server],
        None,
        cli.pairs,
        window,
        dialect,
        peer.name(),
    )
    .await
}

/// Cluster pairs: hash dialect, window 1, on `nodes` Pigeon nodes sharing one MongoDB
/// database (and, for more than one node, a fresh Redis); user `2k` is on node 0 and
/// its partner `2k+1` on node 1.
async fn cluster_run(cli: &Cli, nodes: usize) -> Result<Figure> {
    let mut env = match mongo_env(cli, &fresh_db("cluster")) {
        Ok(env) => env,
        Err(e) => return Ok(Figure::Unavailable(format!("{e:#}"))),
    };
    env.push(("PIGEON_LIMITS_MAILBOX_MAX", "10000".into()));
    let _redis = if nodes > 1 {
        let redis = match start_redis(cli).await {
            Ok(r) => r,
            Err(e) => return Ok(Figure::Unavailable(format!("{e:#}"))),
        };
        env.push((
            "PIGEON_CLUSTER_REDIS_URL",
            format!("redis://{}/", redis.addr),
        ));
        Some(redis)
    } else {
        None
    };
    let mut servers = Vec::new();
    for k in 0..nodes {
        let mut env = env.clone();
        if nodes > 1 {
            env.push(("PIGEON_CLUSTER_NODE_ID", format!("node{k}")));
        }
        match start(cli, Peer::Pigeon, &env).await {
            Ok(s) => servers.push(s),
            Err(e) => return Ok(Figure::Unavailable(format!("{e:#}"))),
        }
    }
    let refs: Vec<&Server> = servers.iter().collect();
    let store = mongo_pid(cli);
    pairs_measure(
        cli,
        &refs,
        store,
        cli.cluster_pairs,
        1,
        Dialect::Hash,
        "pigeon",
    )
    .await
}

/// Runs pairs against `servers` (user `i` on server `i % len`) and measures. CPU time
/// and peak RSS are the sums over the servers; `store_pid`'s CPU is measured too.
async fn pairs_measure(
    cli: &Cli,
    servers: &[&Server],
    store_pid: Option<i32>,
    pairs: usize,
    window: usize,
    dialect: Dialect,
    name: &str,
) -> Result<Figure> {
    let n = pairs * 2;
    let partner = |i: usize| i ^ 1;
    let tag = match dialect {
        Dialect::Hash => "h",
        Dialect::Json => "j",
    };
    let users: Vec<String> = (0..n)
        .map(|i| format!("p{tag}{}{}", i / 2, i % 2))
        .collect();
    let mut sessions = Vec::with_capacity(n);
    for (i, u) in users.iter().enumerate() {
        let addr = servers[i % servers.len()].addr;
        sessions.push(open_session(addr, u, dialect, None).await?);
    }
    let stats = || {
        servers
            .iter()
            .map(|s| s.stats())
            .fold(ProcStats::default(), |a, b| ProcStats {
                cpu_s: a.cpu_s + b.cpu_s,
                rss_kib: a.rss_kib + b.rss_kib,
                hwm_kib: a.hwm_kib + b.hwm_kib,
            })
    };
    let warmup = Duration::from_secs(cli.warmup).as_nanos() as u64;
    let measured = Duration::from_secs(cli.seconds).as_nanos() as u64;
    let shared = Arc::new(PairsShared {
        start: Instant::now(),
        measure_from: warmup,
        measure_to: warmup + measured,
        stop: AtomicBool::new(false),
        errors: AtomicU64::new(0),
        out_lines: AtomicU64::new(0),
    });
    let windows: Vec<Arc<Semaphore>> = (0..n).map(|_| Arc::new(Semaphore::new(window))).collect();
    let done = CancellationToken::new();
    let mut readers = Vec::new();
    let mut senders = Vec::new();
    let pad = "x".repeat(cli.body_bytes.saturating_sub(20));
    for (i, ws) in sessions.into_iter().enumerate() {
        let (sink, stream) = ws.split();
        let sink: Sink = Arc::new(Mutex::new(sink));
        readers.push(tokio::spawn(pairs_reader(
            stream,
            sink.clone(),
            dialect,
            windows[partner(i)].clone(),
            shared.clone(),
            cli.pair_ack_every,
            done.clone(),
        )));
        senders.push(tokio::spawn(pairs_sender(
            sink,
            dialect,
            users[i].clone(),
            users[partner(i)].clone(),
            pad.clone(),
            windows[i].clone(),
            window,
            shared.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_nanos(warmup)).await;
    let before = stats();
    let store_before = store_pid.map(ProcStats::read);
    let gen_before = ProcStats::own();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_nanos(measured)).await;
    let after = stats();
    let store_after = store_pid.map(ProcStats::read);
    let gen_after = ProcStats::own();
    let wall = t0.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Release);
    for w in &windows {
        w.close(); // wakes senders waiting for a permit
    }
    let mut hist = new_hist();
    for s in senders {
        s.await??;
    }
    // Let in-flight messages land, then stop reading.
    tokio::time::sleep(Duration::from_millis(200)).await;
    done.cancel();
    for r in readers {
        hist.add(&r.await??)?;
    }
    let errors = shared.errors.load(Ordering::Relaxed);
    if errors > 0 {
        bail!("{errors} error frames from the server");
    }
    let out_lines = shared.out_lines.load(Ordering::Relaxed);
    if out_lines > 0 {
        eprintln!("warning: {name} answered Out Line {out_lines} times");
    }
    let msgs = hist.len();
    Ok(Figure::Rate {
        rate: msgs as f64 / (measured as f64 / 1e9),
        hist: Some(hist),
        cpu_s: after.cpu_s - before.cpu_s,
        gen_cpu_s: gen_after.cpu_s - gen_before.cpu_s,
        wall_s: wall,
        msgs,
        peak_rss_kib: after.hwm_kib,
        store_cpu_s: store_before
            .zip(store_after)
            .map(|(a, b)| b.cpu_s - a.cpu_s),
    })
}

#[allow(clippy::too_many_arguments)]
async fn pairs_sender(
    sink: Sink,
    dialect: Dialect,
    me: String,
    to: String,
    pad: String,
    window: Arc<Semaphore>,
    size: usize,
    shared: Arc<PairsShared>,
) -> Result<()> {
    let mut id = 0u64;
    loop {
        let Ok(permit) = window.acquire().await else {
            return Ok(());
        };
        permit.forget();
        let mut sink = sink.lock().await;
        let mut batch = 1;
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let t = shared.now_ns();
            id += 1;
            let frame = match dialect {
                Dialect::Hash => format!("{me}#{t:020}{pad}#{to}"),
                Dialect::Json => {
                    format!(r#"{{"type":"send","id":"{id}","to":"{to}","body":"{t:020}{pad}"}}"#)
                }
            };
            sink.feed(Message::text(frame)).await?;
            if batch >= size {
                break;
            }
            match window.try_acquire() {
                Ok(p) => {
                    p.forget();
                    batch += 1;
                }
                Err(_) => break,
            }
        }
        sink.flush().await?;
    }
}

async fn pairs_reader(
    mut stream: SplitStream<Ws>,
    sink: Sink,
    dialect: Dialect,
    partner_window: Arc<Semaphore>,
    shared: Arc<PairsShared>,
    ack_every: u64,
    done: CancellationToken,
) -> Result<Histogram<u64>> {
    let mut hist = new_hist();
    let mut unacked = 0u64;
    loop {
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = done.cancelled() => break,
        };
        let Some(frame) = frame else { break };
        let Message::Text(text) = frame? else {
            continue;
        };
        let t = text.as_str();
        let sent_at = match dialect {
            Dialect::Hash => {
                if t == "send success" {
                    continue;
                }
                if t == "Out Line" {
                    shared.out_lines.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if t.starts_with('!') {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let body = t.split('#').nth(1).unwrap_or("");
                body.get(..20).and_then(|v| v.parse::<u64>().ok())
            }
            Dialect::Json => {
                let v: serde_json::Value = serde_json::from_str(t)?;
                match v["type"].as_str() {
                    Some("msg") => {
                        let seq = v["seq"].as_u64().unwrap_or(0);
                        unacked += 1;
                        if unacked >= ack_every {
                            unacked = 0;
                            let ack = format!(r#"{{"type":"ack","upto":{seq}}}"#);
                            sink.lock().await.send(Message::text(ack)).await?;
                        }
                        v["body"]
                            .as_str()
                            .and_then(|b| b.get(..20))
                            .and_then(|b| b.parse::<u64>().ok())
                    }
                    Some("error") => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    _ => continue,
                }
            }
        };
        let Some(sent_at) = sent_at else {
            continue; // the hello, or someone else's frame
        };
        let now = shared.now_ns();
        partner_window.add_permits(1);
        if sent_at >= shared.measure_from && now < shared.measure_to {
            let us = (now.saturating_sub(sent_at) / 1000).max(1);
            hist.saturating_record(us);
        }
    }
    Ok(hist)
}

// ---------------------------------------------------------------------------------------
// Scenario 2: offline flush

async fn flush_run(cli: &Cli, store: StoreKind, m: u64) -> (Result<Figure>, Result<Figure>) {
    match flush_inner(cli, store, m).await {
        Ok((a, b)) => (Ok(a), Ok(b)),
        Err(e) => {
            let msg = format!("{e:#}");
            (Err(anyhow::anyhow!(msg.clone())), Err(anyhow::anyhow!(msg)))
        }
    }
}

async fn flush_inner(cli: &Cli, store: StoreKind, m: u64) -> Result<(Figure, Figure)> {
    let mut env = vec![("PIGEON_LIMITS_MAILBOX_MAX", (m + 1000).to_string())];
    if store == StoreKind::Mongodb {
        match mongo_env(cli, &fresh_db("flush")) {
            Ok(e) => env.extend(e),
            Err(e) => {
                let f = Figure::Unavailable(format!("{e:#}"));
                return Ok((f.clone(), f));
            }
        }
    }
    let server = match start(cli, Peer::Pigeon, &env).await {
        Ok(s) => s,
        Err(e) => {
            let f = Figure::Unavailable(format!("{e:#}"));
            return Ok((f.clone(), f));
        }
    };
    // Store phase: one sender, pipelined, recipient offline.
    let ws = open_session(server.addr, "flush_src", Dialect::Json, None).await?;
    let (mut sink, mut stream) = ws.split();
    let store_pid = (store == StoreKind::Mongodb)
        .then(|| mongo_pid(cli))
        .flatten();
    let store_cpu = || store_pid.map(|p| ProcStats::read(p).cpu_s);
    let s0 = server.stats();
    let n0 = store_cpu();
    let g0 = ProcStats::own();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        for i in 0..m {
            let f = format!(
                r#"{{"type":"send","id":"f{i}","to":"flush_dst","body":"offline message {i:08}"}}"#
            );
            sink.feed(Message::text(f)).await?;
        }
        sink.flush().await?;
        anyhow::Ok(sink)
    });
    let mut stored = 0u64;
    while stored < m {
        let Some(frame) = stream.next().await else {
            bail!("sender closed after {stored} sends")
        };
        if let Message::Text(t) = frame? {
            if t.as_str().contains(r#""type":"sent""#) {
                stored += 1;
            } else if t.as_str().contains(r#""type":"error""#) {
                bail!("store phase: {}", t.as_str());
            }
        }
    }
    let store_wall = t0.elapsed().as_secs_f64();
    let s1 = server.stats();
    let n1 = store_cpu();
    let g1 = ProcStats::own();
    let _sink = writer.await??;
    let store = Figure::Rate {
        rate: m as f64 / store_wall,
        hist: None,
        cpu_s: s1.cpu_s - s0.cpu_s,
        gen_cpu_s: g1.cpu_s - g0.cpu_s,
        wall_s: store_wall,
        msgs: m,
        peak_rss_kib: s1.hwm_kib,
        store_cpu_s: n0.zip(n1).map(|(a, b)| b - a),
    };

    // Flush phase: the recipient logs in and acks cumulatively.
    let t0 = Instant::now();
    let mut ws = connect(server.addr, "/ws?user=flush_dst", None).await?;
    let mut received = 0u64;
    let mut last_seq = 0u64;
    let mut acked = 0u64;
    loop {
        let Some(frame) = ws.next().await else {
            bail!("recipient closed after {received} messages")
        };
        let Message::Text(t) = frame? else { continue };
        let t = t.as_str();
        if t.starts_with(r#"{"type":"msg""#) {
            received += 1;
            last_seq = seq_of(t).unwrap_or(last_seq);
            if received.is_multiple_of(cli.ack_every.max(1)) {
                ws.send(Message::text(format!(
                    r#"{{"type":"ack","upto":{last_seq}}}"#
                )))
                .await?;
                acked = last_seq;
            }
        } else if t.contains(r#""type":"synced""#) {
            break;
        } else if t.contains(r#""type":"error""#) {
            bail!("flush: {t}");
        }
    }
    if acked < last_seq {
        ws.send(Message::text(format!(
            r#"{{"type":"ack","upto":{last_seq}}}"#
        )))
        .await?;
    }
    // The reader handles frames in order: the pong comes after the last ack is stored.
    ws.send(Message::text(r#"{"type":"ping"}"#)).await?;
    loop {
        let Some(frame) = ws.next().await else {
            bail!("recipient closed before the pong")
        };
        if let Message::Text(t) = frame? {
            if t.as_str().contains("pong") {
                break;
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let s2 = server.stats();
    let n2 = store_cpu();
    let g2 = ProcStats::own();
    if received != m {
        bail!("flush delivered {received} of {m} messages");
    }
    drop(ws);
    // Untimed check that the acks emptied the mailbox: a new login sees nothing pending.
    expect_empty_mailbox(server.addr, "flush_dst", "mailbox not empty after the acks").await?;
    let flush = Figure::Rate {
        rate: m as f64 / wall,
        hist: None,
        cpu_s: s2.cpu_s - s1.cpu_s,
        gen_cpu_s: g2.cpu_s - g1.cpu_s,
        wall_s: wall,
        msgs: m,
        peak_rss_kib: s2.hwm_kib,
        store_cpu_s: n1.zip(n2).map(|(a, b)| b - a),
    };
    Ok((store, flush))
}

// ---------------------------------------------------------------------------------------
// Scenario 3: idle sessions

async fn idle_run(cli: &Cli, peer: Peer, n: usize) -> Result<Figure> {
    let env = [("PIGEON_SERVER_MAX_CONNECTIONS", (n + 100).to_string())];
    let server = match start(cli, peer, &env).await {
        Ok(s) => s,
        Err(e) => return Ok(Figure::Unavailable(format!("{e:#}"))),
    };
    // Pigeon as specified: Pigeon JSON sessions; the peers only speak hash.
    let dialect = if peer == Peer::Pigeon {
        Dialect::Json
    } else {
        Dialect::Hash
    };
    // One session first, so that lazily built state is in the baseline.
    let first = open_session(server.addr, "idlewarm", dialect, None).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.stats();
    let sources: Vec<IpAddr> = (0..cli.source_addrs.max(1))
        .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k)))
        .collect();
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let gate = gate.clone();
        let src = sources[i % sources.len()];
        let addr = server.addr;
        tasks.spawn(async move {
            let _p = gate.acquire_owned().await?;
            open_session(addr, &format!("idle{i}"), dialect, Some(src)).await
        });
    }
    let mut sessions = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        sessions.push(r??);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.stats();
    let per = (after.rss_kib as f64 - before.rss_kib as f64) / n.max(1) as f64;
    drop(sessions);
    drop(first);
    Ok(Figure::Idle {
        sessions: n,
        per_session_kib: per,
        rss_before_kib: before.rss_kib,
        rss_after_kib: after.rss_kib,
        peak_rss_kib: after.hwm_kib,
    })
}

// ---------------------------------------------------------------------------------------
// Scenario 4: one large blob between two online users

/// A running checksum of a byte stream (64-bit words, order-sensitive); the sender and
/// the recipient each compute it over the payload bytes they saw.
#[derive(Clone, Copy)]
struct Checksum {
    h: u64,
    tail: [u8; 8],
    tail_len: usize,
}

impl Checksum {
    fn new() -> Checksum {
        Checksum {
            h: 0xcbf2_9ce4_8422_2325,
            tail: [0; 8],
            tail_len: 0,
        }
    }

    fn word(&mut self, w: u64) {
        self.h = (self.h.rotate_left(23) ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn update(&mut self, mut data: &[u8]) {
        // Chunks need not be multiples of 8 bytes: carry the odd bytes over.
        while self.tail_len > 0 && !data.is_empty() {
            self.tail[self.tail_len] = data[0];
            self.tail_len += 1;
            data = &data[1..];
            if self.tail_len == 8 {
                self.word(u64::from_le_bytes(self.tail));
                self.tail_len = 0;
            }
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        for &b in words.remainder() {
            self.tail[self.tail_len] = b;
            self.tail_len += 1;
        }
    }

    fn finish(mut self) -> u64 {
        for k in self.tail_len..8 {
            self.tail[k] = 0;
        }
        self.word(u64::from_le_bytes(self.tail) ^ self.tail_len as u64);
        self.h
    }
}

/// The blob's bytes, chunk by chunk: pseudo-random, with each chunk's index in its
/// first 8 bytes so that no two chunks are equal.
struct BlobData {
    base: Vec<u8>,
    size: u64,
}

impl BlobData {
    fn new(size: u64, chunk: usize) -> BlobData {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let base = (0..chunk)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        BlobData { base, size }
    }

    fn chunks(&self) -> u64 {
        self.size.div_ceil(self.base.len() as u64)
    }

    /// Chunk `k` as a binary frame: the 4-byte stream number, then the payload.
    fn frame(&self, stream: u32, k: u64) -> Vec<u8> {
        let len = (self.size - k * self.base.len() as u64).min(self.base.len() as u64) as usize;
        let mut f = Vec::with_capacity(4 + len);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(&self.base[..len]);
        let n = len.min(8);
        f[4..4 + n].copy_from_slice(&k.to_le_bytes()[..n]);
        f
    }
}

/// Pigeon: a Pigeon JSON sender announces the blob (`size`, and `sha256` unless
/// `--blob-no-sha256`) to an online Pigeon JSON recipient and sends it in
/// `--blob-chunk-kib` frames, awaiting each send (the socket's backpressure); the
/// recipient counts and checksums the payload and acks at `blob_end`. The clock runs
/// from the announce until the recipient has `blob_end` and the sender `sent`.
/// Bare relay (a ceiling): the same frames after a hash text frame that names the
/// recipient; it relays binary frames to the last recipient, with no flow control.
async fn blob_run(cli: &Cli, peer: Peer) -> Result<(Figure, String)> {
    let size = cli.blob_mib * 1024 * 1024;
    let chunk = cli.blob_chunk_kib.max(1) * 1024;
    if size == 0 {
        bail!("--blob-mib must be positive");
    }
    let env = [
        ("PIGEON_LIMITS_MAX_BLOB_BYTES", size.to_string()),
        (
            "PIGEON_LIMITS_MAX_MESSAGE_BYTES",
            (chunk + 4).max(1024 * 1024).to_string(),
        ),
    ];
    let server = match start(cli, peer, &env).await {
        Ok(s) => s,
        Err(e) => return Ok((Figure::Unavailable(format!("{e:#}")), String::new())),
    };
    let data = Arc::new(BlobData::new(size, chunk));
    // The sender's checksum (and sha256) over exactly the bytes it will send.
    let mut sum = Checksum::new();
    let mut sha = sha2::Sha256::new();
    let announce_sha = peer == Peer::Pigeon && !cli.blob_no_sha256;
    for k in 0..data.chunks() {
        let f = data.frame(0, k);
        sum.update(&f[4..]);
        if announce_sha {
            sha.update(&f[4..]);
        }
    }
    let sent_sum = sum.finish();
    let sha_hex: String = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();

    let dialect = if peer == Peer::Pigeon {
        Dialect::Json
    } else {
        Dialect::Hash
    };
    let src = open_session(server.addr, "blob_src", dialect, None).await?;
    let dst = open_session(server.addr, "blob_dst", dialect, None).await?;
    let (mut src_sink, mut src_stream) = src.split();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.stats();
    let g0 = ProcStats::own();
    let sampler = RssSampler::start(server.pid);
    let t0 = Instant::now();
    let receiver = tokio::spawn(blob_receive(dst, peer, size));
    let stream = if peer == Peer::Pigeon {
        let sha_field = if announce_sha {
            format!(r#","sha256":"{sha_hex}""#)
        } else {
            String::new()
        };
        let announce = format!(
            r#"{{"type":"blob","id":"b-1","to":"blob_dst","name":"bench.bin","mime":"application/octet-stream","size":{size}{sha_field}}}"#
        );
        src_sink.send(Message::text(announce)).await?;
        loop {
            let Some(frame) = src_stream.next().await else {
                bail!("sender closed before blob_accepted")
            };
            if let Message::Text(t) = frame? {
                let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                match v["type"].as_str() {
                    Some("blob_accepted") => {
                        break v["stream"].as_u64().context("stream")? as u32;
                    }
                    Some("error") => bail!("blob refused: {}", t.as_str()),
                    _ => {}
                }
            }
        }
    } else {
        src_sink
            .send(Message::text("blob_src#start#blob_dst"))
            .await?;
        0
    };
    for k in 0..data.chunks() {
        src_sink
            .send(Message::binary(data.frame(stream, k)))
            .await?;
    }
    if peer == Peer::Pigeon {
        loop {
            let Some(frame) = src_stream.next().await else {
                bail!("sender closed before sent")
            };
            if let Message::Text(t) = frame? {
                let t = t.as_str();
                if t.contains(r#""type":"sent""#) {
                    if !t.contains(r#""status":"delivered""#) {
                        bail!("blob not delivered live: {t}");
                    }
                    break;
                }
                if t.contains(r#""type":"error""#) {
                    bail!("blob transfer: {t}");
                }
            }
        }
    }
    let (got, got_sum, mut dst) = receiver.await??;
    let wall = t0.elapsed().as_secs_f64();
    let after = server.stats();
    let g1 = ProcStats::own();
    let rss_peak = sampler.stop().max(after.rss_kib);
    if got != size {
        bail!("recipient got {got} of {size} bytes");
    }
    if got_sum != sent_sum {
        bail!("checksum mismatch: sent {sent_sum:016x}, received {got_sum:016x}");
    }
    // Untimed: the ack deletes the blob; a new login must see nothing pending.
    if peer == Peer::Pigeon {
        dst.send(Message::text(r#"{"type":"ping"}"#)).await?;
        while let Some(frame) = dst.next().await {
            if let Message::Text(t) = frame? {
                if t.as_str().contains("pong") {
                    break;
                }
            }
        }
        drop(dst);
        expect_empty_mailbox(server.addr, "blob_dst", "blob still pending after its ack").await?;
    }
    let note = format!(
        "{} KiB chunks; {}checksum ok",
        chunk / 1024,
        match peer {
            Peer::Pigeon if announce_sha => "sha256 announced; ",
            Peer::Pigeon => "no sha256; ",
            _ => "",
        },
    );
    Ok((
        Figure::Blob {
            bytes: size,
            wall_s: wall,
            cpu_s: after.cpu_s - before.cpu_s,
            gen_cpu_s: g1.cpu_s - g0.cpu_s,
            rss_before_kib: before.rss_kib,
            rss_peak_kib: rss_peak,
        },
        note,
    ))
}

/// The recipient's side: payload bytes and their checksum, then the socket back.
async fn blob_receive(mut ws: Ws, peer: Peer, size: u64) -> Result<(u64, u64, Ws)> {
    let mut stream: Option<u32> = if peer == Peer::Pigeon { None } else { Some(0) };
    let mut got = 0u64;
    let mut sum = Checksum::new();
    loop {
        let Some(frame) = ws.next().await else {
            bail!("recipient closed after {got} bytes")
        };
        match frame? {
            Message::Binary(b) => {
                if b.len() < 4 {
                    bail!("binary frame of {} bytes", b.len());
                }
                let s = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                if Some(s) != stream {
                    bail!("chunk on stream {s}, expected {stream:?}");
                }
                got += (b.len() - 4) as u64;
                sum.update(&b[4..]);
                if peer != Peer::Pigeon && got >= size {
                    return Ok((got, sum.finish(), ws));
                }
            }
            Message::Text(t) if peer == Peer::Pigeon => {
                let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                match v["type"].as_str() {
                    Some("blob_start") => stream = v["stream"].as_u64().map(|s| s as u32),
                    Some("blob_end") => {
                        let seq = v["seq"].as_u64().context("blob_end without seq")?;
                        ws.send(Message::text(format!(r#"{{"type":"ack","upto":{seq}}}"#)))
                            .await?;
                        return Ok((got, sum.finish(), ws));
                    }
                    Some("blob_abort" | "error") => bail!("recipient: {}", t.as_str()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}
