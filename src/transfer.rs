//! Blob transfers from one sender: each announced blob is spooled to the store's blob
//! storage chunk by chunk (hashing as it goes) and, when its recipient is online,
//! relayed live to that session under the recipient's byte budget, so a slow recipient
//! slows the sender instead of growing memory. A finished blob becomes an ordinary
//! mailbox message (`Body::Blob`), delivered and acknowledged like any other.
//!
//! A chunk is a pipeline, not a sequence: the session task hands the received buffer
//! (shared, never copied) to the transfer's spool (`spool`: written and hashed on a
//! blocking thread) and to the relay, and goes back to reading the socket. The bytes
//! queued for spools are bounded per session (`limits.blob_spool_bytes`); a storage
//! error is reported at the next chunk or at the end, and the hash is checked only
//! after the last byte is written.

mod spool;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::message::BlobMeta;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::session::handle::{BlobChunk, Outgoing, SessionHandle};
use crate::store::StoreLimits;

use spool::Spool;

/// A fresh blob key: 128 random bits from the OS (hex). Unique, and never guessable: a
/// key names a file that `GET /api/blobs/{key}` serves (to its owners only, but a
/// guessable name would still tell who is sending files when).
pub fn new_blob_key() -> String {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The type of a file sent without a name or type (a tutorial client's raw binary
/// frame), from its first bytes: `(mime, file name)`. Only types the download route
/// serves as themselves; anything else is `application/octet-stream`.
pub fn sniff(data: &[u8]) -> (&'static str, &'static str) {
    let at = |i: usize, magic: &[u8]| data.get(i..i + magic.len()) == Some(magic);
    if at(0, &[0x1a, 0x45, 0xdf, 0xa3]) {
        ("video/webm", "video.webm")
    } else if at(4, b"ftyp") {
        ("video/mp4", "video.mp4")
    } else if at(0, b"OggS") {
        ("video/ogg", "video.ogg")
    } else if at(0, b"\x89PNG\r\n\x1a\n") {
        ("image/png", "image.png")
    } else if at(0, &[0xff, 0xd8, 0xff]) {
        ("image/jpeg", "image.jpg")
    } else if at(0, b"GIF8") {
        ("image/gif", "image.gif")
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        ("image/webp", "image.webp")
    } else if at(0, b"ID3") {
        ("audio/mpeg", "audio.mp3")
    } else {
        ("application/octet-stream", "file.bin")
    }
}

/// One blob on its way in.
struct Transfer {
    to: String,
    meta: Arc<BlobMeta>,
    key: Arc<str>,
    received: u64,
    /// Writes and hashes the chunks, in order, off the session task.
    spool: Spool,
    /// The recipient's session the bytes are relayed to, while it keeps up.
    relay: Option<SessionHandle>,
    /// When the last chunk (or the announce) arrived: `blob_idle_secs` counts from here.
    last_chunk: Instant,
}

/// A blob whose bytes are all stored.
pub struct Completed {
    pub to: String,
    pub meta: Arc<BlobMeta>,
    key: Arc<str>,
    relay: Option<SessionHandle>,
}

impl Completed {
    /// The blob will not become a message after all (a duplicate, a full mailbox):
    /// tell the live recipient and delete the bytes.
    pub async fn discard(self, app: &App, reason: &'static str) {
        relay_abort(&self.relay, &self.key, reason).await;
        app.store.blob_remove(&self.key).await;
    }
}

/// What a chunk did to its transfer.
pub enum ChunkOutcome {
    /// More bytes expected.
    Partial,
    /// All announced bytes arrived.
    Complete,
}

/// The transfers one session has in flight, by stream number.
#[derive(Default)]
pub struct Transfers {
    by_stream: HashMap<u32, Transfer>,
    next_stream: u32,
    /// Bytes received and not yet written to blob storage, over all of this session's
    /// transfers (`limits.blob_spool_bytes`); made at the first announce.
    spool_budget: Option<Arc<Semaphore>>,
}

impl Transfers {
    pub fn is_empty(&self) -> bool {
        self.by_stream.is_empty()
    }

    /// Opens blob storage for a new transfer and starts the live relay when the
    /// recipient is online. Returns the stream number the sender must use.
    pub async fn start(
        &mut self,
        app: &App,
        from: &str,
        to: String,
        mut meta: BlobMeta,
    ) -> Result<u32, ProtocolError> {
        let id = meta.id.clone();
        let fail = |code, msg: String| ProtocolError::new(code, msg).with_id(id.clone());
        let limits = &app.config.limits;
        if self.by_stream.len() >= limits.max_transfers {
            return Err(fail(
                ErrorCode::TooManyTransfers,
                format!("at most {} transfers at once", limits.max_transfers),
            ));
        }
        if meta.size == 0 || meta.size > limits.max_blob_bytes {
            return Err(fail(
                ErrorCode::TooLarge,
                format!(
                    "blob size must be 1..={} bytes (limits.max_blob_bytes)",
                    limits.max_blob_bytes
                ),
            ));
        }
        // Refused before a byte moves: a recipient without an account (password mode),
        // a blob the sender's quota or the store cannot take. The enqueue at the end
        // checks again, atomically.
        if app.config.auth.password_mode() {
            match app.store.user_exists(&to).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(fail(
                        ErrorCode::NoSuchUser,
                        format!("there is no account named {to}"),
                    ))
                }
                Err(e) => return Err(fail(ErrorCode::StoreUnavailable, e.to_string())),
            }
        }
        match app.store.usage(from).await {
            Ok((usage, total)) => {
                if let Err(e) =
                    StoreLimits::from_config(&app.config).check(from, usage, total, meta.size)
                {
                    return Err(fail(ErrorCode::from(&e), e.to_string()));
                }
            }
            Err(e) => return Err(fail(ErrorCode::StoreUnavailable, e.to_string())),
        }
        match app.store.pending(&to).await {
            Ok(n) if n >= limits.mailbox_max => {
                return Err(fail(
                    ErrorCode::MailboxFull,
                    format!("{to}'s mailbox is full"),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(fail(ErrorCode::StoreUnavailable, e.to_string())),
        }
        let key = new_blob_key();
        let writer = app
            .store
            .blob_writer(&key)
            .await
            .map_err(|e| fail(ErrorCode::StoreUnavailable, e.to_string()))?;
        meta.key = key.clone();
        let spool = Spool::start(writer, meta.sha256.is_some());
        self.spool_budget
            .get_or_insert_with(|| Arc::new(Semaphore::new(limits.blob_spool_bytes)));
        let meta = Arc::new(meta);
        let mut relay = app.router.session(&to);
        if let Some(r) = &relay {
            let start = Outgoing::BlobStart {
                from: from.to_string(),
                meta: meta.clone(),
            };
            if r.tx.send(start).await.is_err() {
                relay = None;
            }
        }
        self.next_stream = self.next_stream.wrapping_add(1);
        while self.by_stream.contains_key(&self.next_stream) {
            self.next_stream = self.next_stream.wrapping_add(1);
        }
        let stream = self.next_stream;
        self.by_stream.insert(
            stream,
            Transfer {
                to,
                meta,
                key: key.into(),
                received: 0,
                spool,
                relay,
                last_chunk: Instant::now(),
            },
        );
        Ok(stream)
    }

    /// Takes one chunk for `stream`: queues it for its spool worker (which writes and
    /// hashes it) and relays it, the same buffer to both.
    pub async fn chunk(
        &mut self,
        app: &App,
        stream: u32,
        data: Bytes,
    ) -> Result<ChunkOutcome, ProtocolError> {
        let budget = self.spool_budget.clone();
        let Some(t) = self.by_stream.get_mut(&stream) else {
            return Err(ProtocolError::new(
                ErrorCode::UnknownStream,
                format!("no transfer on stream {stream}"),
            ));
        };
        let id = t.meta.id.clone();
        t.last_chunk = Instant::now();
        if t.received + data.len() as u64 > t.meta.size {
            let e = ProtocolError::new(
                ErrorCode::BlobOverflow,
                format!(
                    "more bytes than the {} announced; transfer aborted",
                    t.meta.size
                ),
            )
            .with_id(id);
            self.abort(stream, "overflow").await;
            return Err(e);
        }
        // The spool's budget is reserved before the chunk is queued: a disk slower than
        // the socket slows the sender down instead of growing memory.
        let spool_bytes = app.config.limits.blob_spool_bytes;
        let want = u32::try_from(data.len().min(spool_bytes)).unwrap_or(u32::MAX);
        let permit = match budget {
            Some(b) => b.acquire_many_owned(want).await.ok(),
            None => None,
        };
        let queued = match permit {
            Some(permit) if !t.spool.failed() => {
                t.spool.push(data.clone(), permit);
                true
            }
            _ => false,
        };
        if !queued {
            let e = self.fail(stream).await;
            return Err(ProtocolError::new(ErrorCode::StoreUnavailable, e).with_id(id));
        }
        t.received += data.len() as u64;
        if let Some(r) = &t.relay {
            let budget = app.config.limits.blob_relay_bytes;
            let want = u32::try_from(data.len().min(budget)).unwrap_or(u32::MAX);
            let sent = match r.shared.blob_budget.clone().acquire_many_owned(want).await {
                Ok(permit) => {
                    let chunk = Outgoing::BlobChunk(Box::new(BlobChunk {
                        key: t.key.clone(),
                        data,
                        permit,
                    }));
                    r.tx.send(chunk).await.is_ok()
                }
                Err(_) => false,
            };
            if !sent {
                t.relay = None; // the recipient went away: it gets the blob from its mailbox
            }
            // Time spent waiting for a slow recipient is not the sender's idleness.
            t.last_chunk = Instant::now();
        }
        Ok(if t.received == t.meta.size {
            ChunkOutcome::Complete
        } else {
            ChunkOutcome::Partial
        })
    }

    /// Ends a transfer whose spool failed: the live recipient told (`store_unavailable`),
    /// the partial bytes deleted. Returns what went wrong, for the sender.
    async fn fail(&mut self, stream: u32) -> String {
        let Some(t) = self.by_stream.remove(&stream) else {
            return "no such transfer".into();
        };
        relay_abort(&t.relay, &t.key, "store_unavailable").await;
        match t.spool.close().await {
            Some(done) => {
                done.writer.discard().await;
                done.error
                    .map_or_else(|| "blob storage failed".into(), |e| e.to_string())
            }
            None => "blob storage failed".into(),
        }
    }

    /// Finishes a complete transfer: every byte written, the hash checked, the bytes
    /// durable. The caller enqueues the mailbox message (and removes the blob if that
    /// fails).
    pub async fn finish(&mut self, app: &App, stream: u32) -> Result<Completed, ProtocolError> {
        let Some(t) = self.by_stream.remove(&stream) else {
            return Err(ProtocolError::new(
                ErrorCode::UnknownStream,
                "no such transfer",
            ));
        };
        let Transfer {
            to,
            meta,
            key,
            spool,
            relay,
            ..
        } = t;
        let id = meta.id.clone();
        let unavailable = |e: String| ProtocolError::new(ErrorCode::StoreUnavailable, e);
        let Some(done) = spool.close().await else {
            relay_abort(&relay, &key, "store_unavailable").await;
            return Err(unavailable("blob storage failed".into()).with_id(id));
        };
        if let Some(e) = done.error {
            relay_abort(&relay, &key, "store_unavailable").await;
            done.writer.discard().await;
            return Err(unavailable(e.to_string()).with_id(id));
        }
        if let Some(expected) = &meta.sha256 {
            let digest = done.digest.unwrap_or_default();
            if *expected != digest {
                relay_abort(&relay, &key, "checksum_mismatch").await;
                done.writer.discard().await;
                return Err(ProtocolError::new(
                    ErrorCode::ChecksumMismatch,
                    format!("sha256 of the received bytes is {digest}, not {expected}"),
                )
                .with_id(id));
            }
        }
        if let Err(e) = done.writer.finish().await {
            relay_abort(&relay, &key, "store_unavailable").await;
            app.store.blob_remove(&key).await;
            return Err(unavailable(e.to_string()).with_id(id));
        }
        Ok(Completed {
            to,
            meta,
            key,
            relay,
        })
    }

    /// Gives up a transfer: partial bytes deleted, the live recipient told.
    pub async fn abort(&mut self, stream: u32, reason: &'static str) -> bool {
        let Some(t) = self.by_stream.remove(&stream) else {
            return false;
        };
        relay_abort(&t.relay, &t.key, reason).await;
        t.spool.discard().await;
        true
    }

    /// When the transfer idle longest reaches `idle`, if any is in flight.
    pub fn next_deadline(&self, idle: Duration) -> Option<Instant> {
        self.by_stream.values().map(|t| t.last_chunk + idle).min()
    }

    /// Aborts the transfers that received nothing for `idle` (reason `blob_timeout`);
    /// returns their sender ids.
    pub async fn abort_idle(&mut self, idle: Duration) -> Vec<Option<String>> {
        let now = Instant::now();
        let stale: Vec<(u32, Option<String>)> = self
            .by_stream
            .iter()
            .filter(|(_, t)| now.duration_since(t.last_chunk) >= idle)
            .map(|(s, t)| (*s, t.meta.id.clone()))
            .collect();
        let mut ids = Vec::with_capacity(stale.len());
        for (stream, id) in stale {
            self.abort(stream, "blob_timeout").await;
            ids.push(id);
        }
        ids
    }

    /// Gives up every transfer (the sender went away).
    pub async fn abort_all(&mut self, reason: &'static str) {
        let streams: Vec<u32> = self.by_stream.keys().copied().collect();
        for s in streams {
            self.abort(s, reason).await;
        }
    }
}

async fn relay_abort(relay: &Option<SessionHandle>, key: &Arc<str>, reason: &'static str) {
    if let Some(r) = relay {
        let abort = Outgoing::BlobAbort {
            key: key.clone(),
            reason,
        };
        let _ = r.tx.send(abort).await;
    }
}
