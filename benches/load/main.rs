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
//!
//! Modules: `cli` (options), `servers` (the server processes), `client` (the WebSocket
//! client side), one module per scenario (`pairs`, `flush`, `idle`, `blob`, `cluster`,
//! `hostile` with its `attack` process), `results` (figures and rows) and `table` (the
//! printed table); process statistics come from `benches/common/procstat.rs`, shared
//! with the soak bench.

#[path = "../peers/bare_relay.rs"]
mod bare_relay;
#[path = "../common/procstat.rs"]
mod procstat;

mod attack;
mod blob;
mod cli;
mod client;
mod cluster;
mod flush;
mod hostile;
mod idle;
mod pairs;
mod results;
mod servers;
mod table;

use anyhow::{bail, Context, Result};
use clap::Parser;

use cli::{parse_peers, Cli, Peer, Scenario};
use results::Row;

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
        return attack::attack_main(&args[2..]);
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
        rows.extend(pairs::rows(cli, peers).await);
    }
    if matches!(sc, Scenario::All | Scenario::Flush) {
        rows.extend(flush::rows(cli).await);
    }
    if matches!(sc, Scenario::All | Scenario::Idle) {
        rows.extend(idle::rows(cli, peers, nofile).await);
    }
    if matches!(sc, Scenario::All | Scenario::Blob) {
        rows.extend(blob::rows(cli, peers).await);
    }
    if matches!(sc, Scenario::All | Scenario::Cluster) {
        rows.extend(cluster::rows(cli).await);
    }
    if matches!(sc, Scenario::All | Scenario::Hostile) {
        rows.extend(hostile::rows(cli).await);
    }
    Ok(rows)
}
