//! The spool of one incoming blob: its chunks are written to blob storage and hashed
//! in order on a blocking thread, while the session task goes back to reading the
//! socket and relaying. The chunk's own buffer (shared with the relay) is what gets
//! written: nothing is copied on the way. A blocking job runs only while chunks are
//! queued, so a stalled sender holds no thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::store::{BlobWrite, StoreError};

/// A chunk on its way to blob storage, with the session's spool budget it holds until
/// it is written.
struct Chunk {
    data: Bytes,
    _permit: OwnedSemaphorePermit,
}

/// The writer and the running hash: with the blocking job while it runs, here between.
struct Work {
    writer: Box<dyn BlobWrite>,
    hasher: Option<Sha256>,
    /// The first write that failed; nothing after it is written.
    error: Option<StoreError>,
}

struct State {
    queue: VecDeque<Chunk>,
    /// A blocking job is draining the queue (and holds the `Work`).
    running: bool,
    work: Option<Work>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a blocking job stops.
    idle: Notify,
    /// Set on abort: queued chunks are dropped instead of written.
    cancelled: AtomicBool,
    /// A write failed (or the job panicked): the transfer must end.
    failed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a closed spool leaves.
pub(super) struct Spooled {
    pub writer: Box<dyn BlobWrite>,
    /// The sha256 (hex) of every byte written, when hashing was asked for.
    pub digest: Option<String>,
    pub error: Option<StoreError>,
}

pub(super) struct Spool {
    shared: Arc<Shared>,
}

impl Spool {
    /// A spool into `writer`, hashing (sha256) when `hash`.
    pub fn start(writer: Box<dyn BlobWrite>, hash: bool) -> Spool {
        let work = Work {
            writer,
            hasher: hash.then(Sha256::new),
            error: None,
        };
        Spool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    running: false,
                    work: Some(work),
                }),
                idle: Notify::new(),
                cancelled: AtomicBool::new(false),
                failed: AtomicBool::new(false),
            }),
        }
    }

    /// A write failed: the transfer ends at its next chunk.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Queues `data` (holding `permit` of the session's spool budget until it is
    /// written) and starts a blocking job unless one is draining the queue already.
    pub fn push(&self, data: Bytes, permit: OwnedSemaphorePermit) {
        let work = {
            let mut s = self.shared.lock();
            s.queue.push_back(Chunk {
                data,
                _permit: permit,
            });
            if s.running {
                return;
            }
            let Some(work) = s.work.take() else {
                return; // a job panicked: `failed` is set, the transfer ends
            };
            s.running = true;
            work
        };
        let shared = self.shared.clone();
        let handle = Handle::current();
        tokio::task::spawn_blocking(move || drain(shared, work, handle));
    }

    /// Waits until everything queued is written (or, cancelled, dropped). `None` only
    /// if the writer is gone, which `JobGuard` prevents even when a job panics.
    pub async fn close(self) -> Option<Spooled> {
        loop {
            let stopped = self.shared.idle.notified();
            {
                let mut s = self.shared.lock();
                if !s.running {
                    s.queue.clear();
                    return s.work.take().map(|w| Spooled {
                        writer: w.writer,
                        digest: w
                            .hasher
                            .map(|h| h.finalize().iter().map(|b| format!("{b:02x}")).collect()),
                        error: w.error,
                    });
                }
            }
            stopped.await;
        }
    }

    /// Drops what is queued and the partial bytes.
    pub async fn discard(self) {
        self.shared.cancelled.store(true, Ordering::Relaxed);
        if let Some(done) = self.close().await {
            done.writer.discard().await;
        }
    }
}

/// Gives the `Work` back when a job stops, also when it panics (then as failed).
struct JobGuard {
    shared: Arc<Shared>,
    work: Option<Work>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if let Some(mut work) = self.work.take() {
            // Only a panic leaves the loop with the work in hand.
            work.error
                .get_or_insert_with(|| StoreError::Backend("the blob spool failed".into()));
            self.shared.failed.store(true, Ordering::Relaxed);
            let mut s = self.shared.lock();
            s.running = false;
            s.work = Some(work);
        }
        self.shared.idle.notify_one();
    }
}

/// The blocking job: writes and hashes queued chunks until the queue is empty.
fn drain(shared: Arc<Shared>, work: Work, handle: Handle) {
    let mut guard = JobGuard {
        shared: shared.clone(),
        work: Some(work),
    };
    loop {
        let chunk = {
            let mut s = shared.lock();
            match s.queue.pop_front() {
                Some(c) => c,
                None => {
                    // Parked under the lock: a push after this starts a new job.
                    s.running = false;
                    s.work = guard.work.take();
                    return;
                }
            }
        };
        if let Some(work) = guard.work.as_mut() {
            if work.error.is_none() && !shared.cancelled.load(Ordering::Relaxed) {
                spool_chunk(work, &chunk.data, &handle, &shared);
            }
        }
        drop(chunk); // its budget goes back to the session
    }
}

fn spool_chunk(work: &mut Work, data: &Bytes, handle: &Handle, shared: &Shared) {
    let written = match work.writer.write_now(data) {
        Some(r) => r,
        None => handle.block_on(work.writer.write_bytes(data.clone())),
    };
    match written {
        Ok(()) => {
            if let Some(h) = work.hasher.as_mut() {
                h.update(data);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "blob spool write failed");
            work.error = Some(e);
            shared.failed.store(true, Ordering::Relaxed);
        }
    }
}
