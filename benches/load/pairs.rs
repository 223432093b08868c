//! Scenario 1, pairs: pairs of online users sending to each other with a window of
//! messages in flight, in the hash dialect (every server) and in Pigeon JSON (Pigeon, sends with and without an `id`);
//! throughput, latency, CPU and peak RSS. `pairs_measure` also serves cluster and hostile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Peer};
use crate::client::{new_hist, open_session, Dialect, Ws};
use crate::procstat::ProcStats;
use crate::results::{merge, row, Figure, Row};
use crate::servers::{start, Server};

type Sink = Arc<Mutex<SplitSink<Ws, Message>>>;

/// One row per server and window in the hash dialect, and two for Pigeon JSON: sends
/// with an `id` (written before they are routed) and without (the live path).
pub async fn rows(cli: &Cli, peers: &[Peer]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &w in &cli.windows {
        // Rounds interleave the servers, so that a noisy minute on a shared machine
        // does not land on one server only; the figures add the rounds up.
        let mut hash: Vec<Option<Result<Figure>>> = peers.iter().map(|_| None).collect();
        let mut json: Option<Result<Figure>> = None;
        let mut json_no_id: Option<Result<Figure>> = None;
        for _ in 0..cli.rounds.max(1) {
            for (k, &peer) in peers.iter().enumerate() {
                let f = pairs_run(cli, peer, w, Dialect::Hash).await;
                hash[k] = Some(merge(hash[k].take(), f));
            }
            let f = pairs_run(cli, Peer::Pigeon, w, Dialect::Json).await;
            json = Some(merge(json.take(), f));
            let f = pairs_run(cli, Peer::Pigeon, w, Dialect::JsonNoId).await;
            json_no_id = Some(merge(json_no_id.take(), f));
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
        if let Some(f) = json_no_id {
            let scenario = format!("pairs {} w={w} JSON no id", cli.pairs);
            rows.push(row(&scenario, "pigeon", f));
        }
    }
    rows
}

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

/// Runs pairs against `servers` (user `i` on server `i % len`) and measures. CPU time
/// and peak RSS are the sums over the servers; `store_pid`'s CPU is measured too.
pub async fn pairs_measure(
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
        Dialect::JsonNoId => "n",
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
                Dialect::JsonNoId => {
                    format!(r#"{{"type":"send","to":"{to}","body":"{t:020}{pad}"}}"#)
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
            Dialect::Json | Dialect::JsonNoId => {
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
