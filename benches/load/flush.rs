//! Scenario 2, offline flush: one sender stores messages for an offline user (the store
//! phase), then the user logs in and takes them all, acking cumulatively (the flush);
//! on SQLite and on MongoDB.

use std::time::Instant;

use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{Cli, Peer, StoreKind};
use crate::client::{connect, expect_empty_mailbox, open_session, seq_of, Dialect};
use crate::procstat::ProcStats;
use crate::results::{row, Figure, Row};
use crate::servers::{fresh_db, mongo_env, mongo_pid, start};

/// Two rows per store backend: the store phase and the flush.
pub async fn rows(cli: &Cli) -> Vec<Row> {
    let mut rows = Vec::new();
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
    rows
}

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
    // One sender stores all of them: above the default sender quota (50,000 messages).
    let mut env = vec![
        ("PIGEON_LIMITS_MAILBOX_MAX", (m + 1000).to_string()),
        (
            "PIGEON_LIMITS_SENDER_QUOTA_MESSAGES",
            (m + 1000).to_string(),
        ),
    ];
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
