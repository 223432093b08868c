//! The write-behind task: stores the live messages (`live.rs`) that their recipients did
//! not acknowledge within `[storage] write_behind_ms`, many mailboxes in one store
//! transaction, then tells their senders `delivered`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::live::LiveMailbox;
use crate::metrics::{add, Metrics};
use crate::store::{LiveMessage, Store, StoreError};

/// Hands mailboxes with uncommitted messages to the write-behind task, and remembers
/// who went over a quota that way.
pub struct WriteBehind {
    tx: mpsc::UnboundedSender<Arc<LiveMailbox>>,
    over_quota: Arc<OverQuota>,
    /// The last write (a write-behind batch or a message written first) failed.
    failing: Arc<AtomicBool>,
}

/// Senders whose written-behind messages passed a quota (`""`: the store cap). Their
/// next messages are written first, where the quota refuses them; the first one that
/// passes takes them off. At most one entry per sender that sent a quota's worth.
#[derive(Default)]
pub struct OverQuota(Mutex<HashSet<String>>);

impl OverQuota {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn contains(&self, sender: &str) -> bool {
        let set = self.lock();
        !set.is_empty() && (set.contains(sender) || set.contains(""))
    }

    pub fn add(&self, senders: Vec<String>) {
        if !senders.is_empty() {
            self.lock().extend(senders);
        }
    }

    /// A write-first message of `sender` passed every quota.
    pub fn clear(&self, sender: &str) {
        let mut set = self.lock();
        if !set.is_empty() {
            set.remove(sender);
            set.remove("");
        }
    }
}

impl WriteBehind {
    /// Starts the task (on the current runtime). It ends when the last `WriteBehind` is
    /// dropped and its list is empty.
    pub fn start(store: Arc<dyn Store>, metrics: Arc<Metrics>, delay: Duration) -> WriteBehind {
        // Unbounded but bounded in practice: a mailbox is on the list at most once
        // (`LiveMailbox::deliver` says when to add it), so it never holds more entries
        // than there are sessions.
        let (tx, rx) = mpsc::unbounded_channel();
        let over_quota = Arc::new(OverQuota::default());
        let failing = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(
            store,
            metrics,
            over_quota.clone(),
            failing.clone(),
            delay,
            rx,
        ));
        WriteBehind {
            tx,
            over_quota,
            failing,
        }
    }

    pub fn over_quota(&self) -> &OverQuota {
        &self.over_quota
    }

    /// The store failed the last write: messages are written before they are routed
    /// until a write works again.
    pub fn store_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Notes the outcome of a write.
    pub fn saw<T>(&self, result: &Result<T, StoreError>) {
        self.failing.store(is_failure(result), Ordering::Release);
    }

    pub fn schedule(&self, live: Arc<LiveMailbox>) {
        let _ = self.tx.send(live);
    }
}

/// Whether a write failed for the store's sake (not a refusal such as a quota).
fn is_failure<T>(result: &Result<T, StoreError>) -> bool {
    matches!(
        result,
        Err(StoreError::Unavailable(_) | StoreError::Backend(_))
    )
}

/// After a failed write, the pause before the next try.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

async fn run(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    over_quota: Arc<OverQuota>,
    failing: Arc<AtomicBool>,
    delay: Duration,
    mut rx: mpsc::UnboundedReceiver<Arc<LiveMailbox>>,
) {
    let mut boxes: Vec<Arc<LiveMailbox>> = Vec::new();
    loop {
        if boxes.is_empty() {
            match rx.recv().await {
                Some(b) => boxes.push(b),
                None => return,
            }
        }
        // Give the recipients time to acknowledge: what they acknowledge meanwhile is
        // never written.
        tokio::time::sleep(delay).await;
        while let Ok(b) = rx.try_recv() {
            boxes.push(b);
        }
        // Only what had `delay` to be acknowledged; younger ones wait for the next round.
        let cutoff = Instant::now()
            .checked_sub(delay)
            .unwrap_or_else(Instant::now);
        let mut batch = Vec::new();
        let mut spans = Vec::with_capacity(boxes.len());
        let mut next_round = Vec::new();
        for b in &boxes {
            let (msgs, younger) = b.take_for_commit(cutoff);
            if younger {
                next_round.push(b.clone());
            }
            let user = msgs.first().map(|m| m.recipient.clone());
            spans.push((msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), user));
            batch.extend(msgs.into_iter().map(|msg| LiveMessage {
                msg,
                fingerprint: None,
                refusable: false,
            }));
        }
        let results = match (batch.is_empty(), store.live_seqs()) {
            (true, _) => Vec::new(),
            (false, Some(live)) => {
                add(&metrics.messages_written_behind, batch.len() as u64);
                let out = live.put(batch).await;
                over_quota.add(out.over_quota);
                let failed = out.answers.iter().any(is_failure);
                failing.store(failed, Ordering::Release);
                out.answers
            }
            (false, None) => batch
                .iter()
                .map(|_| Err(StoreError::Backend("no write-behind in this store".into())))
                .collect(),
        };
        let mut results = results.into_iter();
        let mut retry = Vec::new();
        for (b, (seqs, user)) in boxes.drain(..).zip(spans) {
            let mut outcome = Ok(());
            for r in results.by_ref().take(seqs.len()) {
                if let Err(e) = r {
                    outcome = Err(e);
                }
            }
            if let Err(e) = &outcome {
                tracing::warn!(error = %e, "write-behind failed; will retry");
            }
            let (acked, again) = b.committed(&seqs, &outcome);
            if let (false, Some(user)) = (acked.is_empty(), user) {
                match store.ack_ranges(&user, &acked).await {
                    Ok(n) => b.forget(n),
                    Err(e) => tracing::warn!(error = %e, "ack after write-behind failed"),
                }
            }
            if again && !next_round.iter().any(|x| Arc::ptr_eq(x, &b)) {
                retry.push(b);
            }
        }
        if !retry.is_empty() {
            tokio::time::sleep(RETRY_PAUSE).await;
            next_round.extend(retry);
        }
        boxes = next_round;
    }
}
