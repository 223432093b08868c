//! The command line: the options (`Cli`), the scenarios, the store backends and the
//! servers measured (`Peer`), with their parsing. Nothing here runs anything.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(name = "load", about = "Pigeon load generator (loopback only)")]
pub struct Cli {
    /// What to run.
    #[arg(value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// Servers to measure: `all` or a comma list of pigeon, bare, node, tornado.
    /// Pigeon always runs (every ratio is to it).
    #[arg(long, default_value = "all")]
    pub peers: String,
    /// Measured seconds per server, scenario and round (after the warm-up).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// pairs, blob and cluster: rounds over all servers (interleaved); each server is
    /// measured `rounds × seconds` (blob: `rounds` transfers) in all.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Unmeasured seconds before each measurement.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// pairs: pairs of online users.
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// pairs: messages in flight per sender, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub windows: Vec<usize>,
    /// pairs: body bytes per message (at least 20: a send timestamp).
    #[arg(long, default_value_t = 32)]
    pub body_bytes: usize,
    /// pairs, Pigeon JSON run: acknowledge every this many messages received.
    #[arg(long, default_value_t = 16)]
    pub pair_ack_every: u64,
    /// offline flush: messages stored for the offline user.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// offline flush: cumulative ack every this many messages.
    #[arg(long, default_value_t = 512)]
    pub ack_every: u64,
    /// offline flush: the store backends to run it on, one row pair each.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sqlite,mongodb"
    )]
    pub store: Vec<StoreKind>,
    /// offline flush on MongoDB: messages stored (small by default: the nx-27017 test
    /// server does about 1,500 operations per second).
    #[arg(long, default_value_t = 2_000)]
    pub mongo_messages: u64,
    /// MongoDB connection string for `--store mongodb` and the cluster scenario
    /// (`eval "$(bash .ci/mongo.sh start)"` starts the nx-27017 test server and sets it).
    #[arg(long, env = "PIGEON_TEST_MONGODB_URI")]
    pub mongodb_uri: Option<String>,
    /// The MongoDB server's pid, to report its CPU next to the figures that use it
    /// (default: the pid file of `.ci/mongo.sh`, when it names a live process).
    #[arg(long)]
    pub mongodb_pid: Option<i32>,
    /// What the MongoDB URI points at, printed next to every figure that depends on it.
    #[arg(long, default_value = "nx-27017 test server")]
    pub mongodb_label: String,
    /// cluster: pairs of online users (each pair's two users on different nodes).
    #[arg(long, default_value_t = 10)]
    pub cluster_pairs: usize,
    /// hostile: pairs measured (window 1, hash) without and then with hostile clients.
    #[arg(long, default_value_t = 20)]
    pub hostile_pairs: usize,
    /// hostile: how many of each kind of hostile client (slowloris sockets, sessions
    /// that never read while a sender pushes 100 msgs/s of 1 KiB at each, ping flooders).
    #[arg(long, default_value_t = 50)]
    pub hostiles: usize,
    /// hostile: which kinds run (comma list of slowloris, sink, ping, busy, longname,
    /// guess). longname: failed logins with 1.9 MB names over HTTP and 0.9 MB names in
    /// login frames; guess: wrong-password logins over HTTP from 250 addresses.
    #[arg(long, default_value = "slowloris,sink,ping")]
    pub hostile_kinds: String,
    /// cluster: the Redis server binary (started on a free loopback port per run).
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// blob: MiB sent in one transfer.
    #[arg(long, default_value_t = 1024)]
    pub blob_mib: u64,
    /// blob: payload KiB per binary frame.
    #[arg(long, default_value_t = 256)]
    pub blob_chunk_kib: usize,
    /// blob: announce without `sha256` (by default the sender announces it, as
    /// `pigeon chat`'s `/send` does, and the server checks it).
    #[arg(long)]
    pub blob_no_sha256: bool,
    /// idle: sessions to open (clamped to what the file limit allows).
    #[arg(long, default_value_t = 10_000)]
    pub idle: usize,
    /// idle: source addresses 127.0.0.2, 127.0.0.3, … to spread the client sockets over.
    #[arg(long, default_value_t = 4)]
    pub source_addrs: u8,
    /// Run Pigeon under this command, e.g. "valgrind --tool=callgrind" (for profiling).
    #[arg(long)]
    pub pigeon_wrap: Option<String>,
    /// Start every server (Pigeon and peers) under this command, e.g. "taskset -c 0"
    /// to pin the servers to core 0 (see docs/BENCHMARKS.md). Nothing is pinned unless
    /// asked.
    #[arg(long)]
    pub server_prefix: Option<String>,
    /// Extra environment for every Pigeon server, e.g.
    /// `--pigeon-env PIGEON_WEBSOCKET_READ_BUFFER_BYTES=65536` (repeatable; for
    /// experiments: the table does not say it was set).
    #[arg(long, value_name = "KEY=VALUE")]
    pub pigeon_env: Vec<String>,
    /// The pigeon binary (default: the one cargo built for this bench).
    #[arg(long)]
    pub pigeon_bin: Option<PathBuf>,
    /// Where Pigeon's temporary data directories go (default: the system temp dir;
    /// e.g. /dev/shm to take the disk out of the measurement).
    #[arg(long)]
    pub data_base: Option<PathBuf>,
    /// Keep each server's log under this directory (default: discarded).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    All,
    Pairs,
    Flush,
    Idle,
    Blob,
    Cluster,
    Hostile,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Mongodb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Pigeon,
    Bare,
    Node,
    Tornado,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Pigeon => "pigeon",
            Peer::Bare => "bare",
            Peer::Node => "node ws",
            Peer::Tornado => "tornado",
        }
    }
}

pub fn parse_peers(s: &str) -> Result<Vec<Peer>> {
    let mut out = vec![Peer::Pigeon];
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let add: &[Peer] = match name {
            "all" => &[Peer::Bare, Peer::Node, Peer::Tornado],
            "pigeon" => &[],
            "bare" => &[Peer::Bare],
            "node" => &[Peer::Node],
            "tornado" => &[Peer::Tornado],
            other => bail!("unknown peer {other:?} (all, pigeon, bare, node, tornado)"),
        };
        for p in add {
            if !out.contains(p) {
                out.push(*p);
            }
        }
    }
    Ok(out)
}
