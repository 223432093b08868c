//! Scenario 3, idle sessions: opens many logged-in sessions that do nothing and
//! measures the server's RSS per session.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::Semaphore;

use crate::cli::{Cli, Peer};
use crate::client::{open_session, Dialect};
use crate::results::{row, Figure, Row};
use crate::servers::start;

/// One row per server; `nofile` (the open-files limit) clamps the session count.
pub async fn rows(cli: &Cli, peers: &[Peer], nofile: u64) -> Vec<Row> {
    let mut rows = Vec::new();
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
    rows
}

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
