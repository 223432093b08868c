//! Scenario 4, one large blob between two online users: throughput, CPU and the
//! server's RSS during the transfer, with the payload checksummed end to end (Pigeon
//! and the bare relay only: the other peers do not relay binary frames).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use sha2::Digest;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{Cli, Peer};
use crate::client::{expect_empty_mailbox, open_session, Dialect, Ws};
use crate::procstat::{ProcStats, RssSampler};
use crate::results::{merge, row, Figure, Row};
use crate::servers::start;

/// One row per server that relays binary frames.
pub async fn rows(cli: &Cli, peers: &[Peer]) -> Vec<Row> {
    let mut rows = Vec::new();
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
    rows
}

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
        // The sender's quota counts what waits in mailboxes: a blob of the default quota's
        // size plus anything else would be refused, so the quota is twice the blob.
        ("PIGEON_LIMITS_SENDER_QUOTA_BYTES", (2 * size).to_string()),
        (
            "PIGEON_LIMITS_MAX_MESSAGE_BYTES",
            (chunk + 4).max(1024 * 1024).to_string(),
        ),
        // A tutorial client's whole-file frame may not be larger than a blob may be.
        (
            "PIGEON_LIMITS_LEGACY_BINARY_MAX_BYTES",
            size.min(16 * 1024 * 1024).to_string(),
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
