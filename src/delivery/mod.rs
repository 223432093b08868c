//! Delivery: a message's way from its sender's session to its recipient, and the way
//! back of the recipient's acknowledgements. Sessions hand their sends here; nothing else
//! decides where a message goes.
//!
//! Two ways, chosen per message:
//! - **Live** (`live.rs`, the write-behind fast path): the recipient has a session on
//!   this server that owns its mailbox. The message gets its seq from that session's
//!   memory and goes to its queue at once; it is written to the store only if the
//!   recipient has not acknowledged it within `[storage] write_behind_ms`
//!   (`write_behind.rs`). The sender hears `delivered` once it is acknowledged or
//!   written. Messages that must be remembered before they are routed (a client id,
//!   whose retries must be recognised after a crash; a blob) take a seq there too but
//!   are written first.
//! - **Store first**: everyone else (recipient offline or on another node, cluster mode,
//!   MongoDB, sender quotas on). The store accepts the message (its seq, retries, quotas,
//!   durability); then it goes to the recipient's live session on this node, to the node
//!   that holds the recipient's session, or nowhere: it waits for the next login.

pub mod live;
pub mod write_behind;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::app::App;
use crate::message::{Body, StoredMessage};
use crate::metrics::{add, inc};
use crate::protocol::{ErrorCode, Fate, ProtocolError};
use crate::session::handle::{Outgoing, SessionHandle};
use crate::store::{Enqueued, LiveMessage, NewMessage, StoreError};
use live::{LiveMailbox, Refusal};

/// A sender's answer for one message: (seq, fate, duplicate), or why it was refused.
pub type Accepted = Result<(u64, Fate, bool), ProtocolError>;

/// How long a send waits for a mailbox that is changing hands (a session ending or
/// starting) before it gives up with `store_unavailable`.
const OWNER_WAIT: Duration = Duration::from_secs(10);

/// A message's way, decided in order; answers are awaited after.
enum Way {
    /// On the live path: its seq, and the answer that comes once it is safe.
    Live(u64, oneshot::Receiver<Result<Fate, StoreError>>),
    /// On the live path but written first: index into the batch of those.
    WriteFirst(usize),
    /// Index into the batch that goes to the store.
    Store(usize),
    Done(Accepted),
}

/// A live-path message that is written before it is routed, under the seq its
/// recipient's session gave it.
struct WrittenFirst {
    seq: u64,
    msg: NewMessage,
    handle: SessionHandle,
    live: Arc<LiveMailbox>,
}

impl Drop for WrittenFirst {
    /// Normally routed or refused by now. When the sender's session ended during the
    /// write (its task aborted), the recipient's session must not go on holding later
    /// messages back for this one: it reads on from the mailbox.
    fn drop(&mut self) {
        if self.live.routed(self.seq) {
            read_on(&self.handle);
        }
    }
}

/// What `try_live` made of a message.
enum Taken {
    Way(Way),
    WriteFirst(WrittenFirst),
}

/// A sender's answer that may not be known yet: a live message's comes once the
/// recipient acknowledged it or it was written.
pub enum Pending {
    Ready(Accepted),
    Live(u64, oneshot::Receiver<Result<Fate, StoreError>>),
}

impl Pending {
    /// Waits for the answer (it is then `Ready`).
    pub async fn ready(&mut self) {
        if let Pending::Live(seq, rx) = self {
            let answer = live_answer(*seq, rx).await;
            *self = Pending::Ready(answer);
        }
    }

    /// The answer, when it is known (once: later calls say it was taken).
    pub fn take_ready(&mut self) -> Option<Accepted> {
        if let Pending::Live(seq, rx) = self {
            return match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => None,
                Ok(Ok(fate)) => Some(Ok((*seq, fate, false))),
                Ok(Err(e)) => Some(Err(ProtocolError::new(ErrorCode::from(&e), e.to_string()))),
                Err(oneshot::error::TryRecvError::Closed) => {
                    Some(Err(unavailable("the message could not be stored")))
                }
            };
        }
        match std::mem::replace(self, Pending::Ready(Err(unavailable("answered already")))) {
            Pending::Ready(a) => Some(a),
            Pending::Live(..) => None,
        }
    }
}

/// Accepts a session's sends, in order, and routes each: the live ones at once, those
/// written first in one store round trip, the others in one more. The answers of live
/// ones may come later: a session goes on reading its client's frames meanwhile.
pub async fn accept_many_pending(app: &App, batch: Vec<NewMessage>) -> Vec<Pending> {
    let mut ways = Vec::with_capacity(batch.len());
    let mut to_store = Vec::new();
    let mut first = Vec::new();
    // Once a recipient's message went to the store, the rest of the batch for it does
    // too, so that a mailbox changing hands mid-batch cannot reorder them; once one is
    // written first, the rest for it is too (it reaches the recipient after that write).
    let mut via_store: HashSet<String> = HashSet::new();
    let mut via_first: HashSet<String> = HashSet::new();
    for msg in batch {
        let msg = match via_store.contains(&msg.recipient) {
            true => msg,
            false => {
                let force = via_first.contains(&msg.recipient);
                match try_live(app, msg, force).await {
                    Ok(Taken::Way(way)) => {
                        ways.push(way);
                        continue;
                    }
                    Ok(Taken::WriteFirst(w)) => {
                        via_first.insert(w.msg.recipient.clone());
                        ways.push(Way::WriteFirst(first.len()));
                        first.push(w);
                        continue;
                    }
                    Err(msg) => msg,
                }
            }
        };
        via_store.insert(msg.recipient.clone());
        ways.push(Way::Store(to_store.len()));
        to_store.push(msg);
    }
    // Written first before the store's batch: a recipient's messages that went to the
    // store come after its written-first ones in the batch.
    let mut written: Vec<Option<Accepted>> = Vec::with_capacity(first.len());
    for w in write_then_route(app, first).await {
        written.push(Some(match w {
            Written::Answer(a) => a,
            Written::Again(msg) => accept_owned(app, msg).await,
        }));
    }
    let mut stored: Vec<Option<Accepted>> = Vec::new();
    if !to_store.is_empty() {
        let results = app.store.enqueue_many(to_store.clone()).await;
        for (msg, result) in to_store.into_iter().zip(results) {
            stored.push(Some(match result {
                Err(StoreError::Owned { .. }) => accept_owned(app, msg).await,
                other => route(app, msg, other).await,
            }));
        }
    }
    let missing = || Err(unavailable("no answer from the store"));
    ways.into_iter()
        .map(|way| match way {
            Way::Live(seq, rx) => Pending::Live(seq, rx),
            Way::WriteFirst(i) => Pending::Ready(
                written
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or_else(missing),
            ),
            Way::Store(i) => Pending::Ready(
                stored
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or_else(missing),
            ),
            Way::Done(a) => Pending::Ready(a),
        })
        .collect()
}

/// Accepts one message and waits for its answer.
pub async fn accept(app: &App, msg: NewMessage) -> Accepted {
    let Some(mut pending) = accept_many_pending(app, vec![msg]).await.pop() else {
        return Err(unavailable("no answer"));
    };
    pending.ready().await;
    pending
        .take_ready()
        .unwrap_or_else(|| Err(unavailable("no answer")))
}

/// The store refused `msg` because its recipient's session owns the mailbox: it starts
/// or ends right now. Tries the live path and the store again until one takes it.
async fn accept_owned(app: &App, mut msg: NewMessage) -> Accepted {
    let deadline = Instant::now() + OWNER_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        msg = match try_live(app, msg, false).await {
            Ok(Taken::Way(Way::Live(seq, mut rx))) => return live_answer(seq, &mut rx).await,
            Ok(Taken::Way(Way::Done(a))) => return a,
            Ok(Taken::WriteFirst(w)) => match write_then_route(app, vec![w]).await.pop() {
                Some(Written::Answer(a)) => return a,
                Some(Written::Again(m)) if Instant::now() < deadline => m,
                _ => return Err(unavailable("the mailbox is changing hands; try again")),
            },
            Ok(Taken::Way(_)) => return Err(unavailable("unexpected way")),
            Err(msg) => msg,
        };
        match app.store.enqueue(msg.clone()).await {
            Err(StoreError::Owned { .. }) if Instant::now() < deadline => continue,
            other => return route(app, msg, other).await,
        }
    }
}

async fn live_answer(seq: u64, rx: &mut oneshot::Receiver<Result<Fate, StoreError>>) -> Accepted {
    match rx.await {
        Ok(Ok(fate)) => Ok((seq, fate, false)),
        Ok(Err(e)) => Err(ProtocolError::new(ErrorCode::from(&e), e.to_string())),
        Err(_) => Err(unavailable("the message could not be stored")),
    }
}

fn unavailable(why: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::StoreUnavailable, why.to_string())
}

fn stored_message(seq: u64, msg: &NewMessage) -> StoredMessage {
    StoredMessage {
        seq,
        sender: msg.sender.clone(),
        recipient: msg.recipient.clone(),
        client_id: msg.client_id.clone(),
        body: msg.body.clone(),
        accepted_at: msg.accepted_at,
    }
}

/// The live path, when the recipient's session here owns its mailbox; gives the
/// message back otherwise. `write_first`: an earlier message of the batch to the same
/// recipient is written first, so this one must be too.
async fn try_live(app: &App, msg: NewMessage, write_first: bool) -> Result<Taken, NewMessage> {
    let Some(wb) = &app.write_behind else {
        return Err(msg);
    };
    let Some(handle) = app.router.session(&msg.recipient) else {
        return Err(msg);
    };
    let live = handle.shared.live.clone();
    let mailbox_max = app.config.limits.mailbox_max;
    // Messages whose retries must be recognised even after a crash, and blobs, are
    // written before they are routed.
    // So are those of a sender who went over a quota, where it can still refuse them,
    // and everything while the store fails: nothing reaches a recipient that could not
    // be written (and the first write that works ends it).
    let write_first = write_first
        || msg.client_id.is_some()
        || matches!(msg.body, Body::Blob(_))
        || wb.over_quota().contains(&msg.sender)
        || wb.store_failing();
    loop {
        let taken = match write_first {
            true => live.allocate(mailbox_max).map(|seq| (seq, None)),
            false => live
                .deliver(
                    mailbox_max,
                    |seq| Arc::new(stored_message(seq, &msg)),
                    |m| push(&handle, m),
                )
                .map(|d| {
                    if d.schedule {
                        wb.schedule(live.clone());
                    }
                    match d.fate {
                        Fate::Delivered => inc(&app.metrics.messages_delivered),
                        Fate::Stored => inc(&app.metrics.messages_stored),
                    }
                    (d.seq, Some(d.answer))
                }),
        };
        match taken {
            Ok((seq, Some(rx))) => return Ok(Taken::Way(Way::Live(seq, rx))),
            Ok((seq, None)) => {
                return Ok(Taken::WriteFirst(WrittenFirst {
                    seq,
                    msg,
                    handle,
                    live,
                }))
            }
            Err(Refusal::NotOwned) => return Err(msg),
            Err(Refusal::MailboxFull) => {
                let e = StoreError::MailboxFull {
                    recipient: msg.recipient.clone(),
                    limit: mailbox_max,
                };
                return Ok(Taken::Way(Way::Done(Err(refusal(&msg, &e)))));
            }
            Err(Refusal::Exhausted(upto)) => {
                let reserved = match app.store.live_seqs() {
                    Some(s) => s.reserve(&msg.recipient, live.base(), upto).await,
                    None => Err(StoreError::Backend("no write-behind in this store".into())),
                };
                match reserved {
                    Ok(()) => live.extended(upto),
                    // A new session claimed the mailbox while this one is ending.
                    Err(StoreError::Owned { .. }) => return Err(msg),
                    Err(e) => return Ok(Taken::Way(Way::Done(Err(refusal(&msg, &e))))),
                }
            }
        }
    }
}

/// Hands a live message to the recipient's queue; false when it is full (the message
/// is left to the session's catch-up: `lagging`) or closed (to the session's end).
fn push(handle: &SessionHandle, msg: Arc<StoredMessage>) -> bool {
    match handle.tx.try_send(Outgoing::Deliver(msg)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            handle.shared.lagging.store(true, Ordering::Release);
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// What became of a message written first.
enum Written {
    Answer(Accepted),
    /// Its recipient's session ended before the write: to be routed again.
    Again(NewMessage),
}

/// Live-path messages that are written first (client id, blob, ...): one store round
/// trip for them all, then each goes to its recipient's queue, in order. The answers
/// are in the order of `batch`.
async fn write_then_route(app: &App, batch: Vec<WrittenFirst>) -> Vec<Written> {
    if batch.is_empty() {
        return Vec::new();
    }
    let entries: Vec<LiveMessage> = batch
        .iter()
        .map(|w| LiveMessage {
            msg: Arc::new(stored_message(w.seq, &w.msg)),
            fingerprint: w.msg.fingerprint(),
            refusable: true,
        })
        .collect();
    let stored: Vec<Arc<StoredMessage>> = entries.iter().map(|e| e.msg.clone()).collect();
    let mut results = match app.store.live_seqs() {
        Some(s) => s.put(entries).await.answers,
        None => Vec::new(),
    }
    .into_iter();
    let mut accepted = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for (w, stored) in batch.iter().zip(stored) {
        let result = results
            .next()
            .unwrap_or_else(|| Err(StoreError::Backend("no write-behind in this store".into())));
        if let Some(wb) = &app.write_behind {
            wb.saw(&result);
        }
        let answer: Accepted = match result {
            Ok(Enqueued::New { .. }) => {
                if let Some(wb) = &app.write_behind {
                    wb.over_quota().clear(&w.msg.sender);
                }
                let _ = w.live.routed(w.seq);
                let fate = match push(&w.handle, stored) {
                    true => Fate::Delivered,
                    false => Fate::Stored,
                };
                match fate {
                    Fate::Delivered => inc(&app.metrics.messages_delivered),
                    Fate::Stored => inc(&app.metrics.messages_stored),
                }
                Ok((w.seq, fate, false))
            }
            Ok(Enqueued::Duplicate { seq: first }) => {
                refused.push(w);
                inc(&app.metrics.messages_duplicate);
                Ok((first, Fate::Stored, true))
            }
            Err(StoreError::Owned { recipient }) => {
                refused.push(w);
                match w.live.is_owned() {
                    // The recipient's session ended before the write: routed again.
                    false => {
                        accepted.push(Written::Again(w.msg.clone()));
                        continue;
                    }
                    // The store and the session disagree on who owns the mailbox.
                    true => {
                        tracing::error!(user = %crate::escape::Escaped(&recipient), "the store refused a live session's seq");
                        Err(unavailable("the mailbox is changing hands; try again"))
                    }
                }
            }
            Err(e) => {
                refused.push(w);
                Err(refusal(&w.msg, &e))
            }
        };
        accepted.push(Written::Answer(answer));
    }
    // Latest first: a mailbox's seqs go back only from its end.
    let mut wake: Vec<&SessionHandle> = Vec::new();
    for w in refused.into_iter().rev() {
        w.live.refused(w.seq);
        if !wake
            .iter()
            .any(|h| Arc::ptr_eq(&h.shared, &w.handle.shared))
        {
            wake.push(&w.handle);
        }
    }
    // Their sessions may hold later messages back for them.
    for handle in wake {
        read_on(handle);
    }
    accepted
}

/// A message the session held back for will not come through its queue: it reads on
/// from the mailbox (at once, or after its current batch when the queue is full).
fn read_on(handle: &SessionHandle) {
    if handle.tx.try_send(Outgoing::CatchUp).is_err() {
        handle.shared.lagging.store(true, Ordering::Release);
    }
}

/// After the store answered for `msg`: hands a new message to its recipient.
async fn route(app: &App, msg: NewMessage, stored: Result<Enqueued, StoreError>) -> Accepted {
    if let Some(wb) = &app.write_behind {
        wb.saw(&stored);
    }
    match stored {
        Ok(Enqueued::New { seq }) => {
            let stored = Arc::new(StoredMessage {
                seq,
                sender: msg.sender,
                recipient: msg.recipient,
                client_id: msg.client_id,
                body: msg.body,
                accepted_at: msg.accepted_at,
            });
            let fate = match &app.cluster {
                Some(c) if !app.router.is_online(&stored.recipient) => {
                    match c.forward(&stored).await {
                        true => Fate::Delivered,
                        false => Fate::Stored,
                    }
                }
                _ => app.router.deliver(stored),
            };
            match fate {
                Fate::Delivered => inc(&app.metrics.messages_delivered),
                Fate::Stored => inc(&app.metrics.messages_stored),
            }
            Ok((seq, fate, false))
        }
        Ok(Enqueued::Duplicate { seq }) => {
            inc(&app.metrics.messages_duplicate);
            Ok((seq, Fate::Stored, true))
        }
        Err(e) => Err(refusal(&msg, &e)),
    }
}

/// The error frame for a refused message.
fn refusal(msg: &NewMessage, e: &StoreError) -> ProtocolError {
    let code = ErrorCode::from(e);
    if code == ErrorCode::StoreUnavailable {
        tracing::warn!(user = %msg.sender, error = %e, "enqueue failed");
    }
    ProtocolError::new(code, e.to_string())
        .with_id(msg.client_id.clone())
        .with_to(Some(msg.recipient.clone()))
}

/// `user` acknowledged the seqs `ranges`: live messages among them are never written
/// (their senders hear `delivered`), the rest is deleted from the store. Returns how
/// many messages that covered.
pub async fn acked(
    app: &App,
    user: &str,
    live: &LiveMailbox,
    ranges: &[(u64, u64)],
) -> Result<u64, StoreError> {
    let (rest, answers) = live.acked(ranges);
    let unwritten = answers.len() as u64;
    add(&app.metrics.messages_acked_unwritten, unwritten);
    for a in answers {
        let _ = a.send(Ok(Fate::Delivered));
    }
    if rest.is_empty() {
        return Ok(unwritten);
    }
    let n = app.store.ack_ranges(user, &rest).await?;
    live.forget(n);
    Ok(n + unwritten)
}

/// `user`'s session starts delivering: it takes over the mailbox's seqs when this
/// server has the live path. Returns the last seq the store handed out before (the
/// session's mailbox flush covers everything up to it).
pub async fn claim(app: &Arc<App>, user: &str, live: &Arc<LiveMailbox>) -> Option<u64> {
    app.write_behind.as_ref()?;
    app.store.live_seqs()?;
    // In a task of its own: when the session's writer is aborted while the store claims
    // (a session end that gave up waiting for it), the claim still completes and is
    // handed back, rather than leaving the mailbox owned by nobody (every send to it
    // would wait for an owner, then fail, until the user's next login).
    let (app, user, live) = (app.clone(), user.to_string(), live.clone());
    let task = tokio::spawn(async move {
        let seqs = app.store.live_seqs()?;
        match seqs.claim(&user, live::BLOCK).await {
            Ok((base, held)) => match live.open(base, held, live::BLOCK) {
                true => Some(base),
                false => {
                    seqs.release(&user, base, base).await;
                    None
                }
            },
            Err(e) => {
                // The session still works, on the store-first way.
                inc(&app.metrics.store_errors);
                tracing::warn!(user = %crate::escape::Escaped(&user), error = %e, "claiming the mailbox failed");
                None
            }
        }
    });
    task.await.ok().flatten()
}

/// Tries before a session's end gives up writing its uncommitted messages.
const RELEASE_TRIES: u32 = 5;

/// `user`'s session ends: what it still holds uncommitted is written, then the mailbox
/// goes back to the store. Senders still waiting hear `delivered`, or the error when
/// the store refused every try (their messages are then lost, and they know it).
/// `deleted`: the account was deleted; its messages are dropped (senders hear
/// `no_such_user`), so that a later account of that name starts empty.
pub async fn release(app: &App, user: &str, live: &LiveMailbox, deleted: bool) {
    let Some((entries, last)) = live.close() else {
        return;
    };
    let Some(seqs) = app.store.live_seqs() else {
        return;
    };
    if deleted {
        for (_, answer) in entries {
            if let Some((a, _)) = answer {
                let _ = a.send(Err(StoreError::NoSuchUser {
                    user: user.to_string(),
                }));
            }
        }
    } else if !entries.is_empty() {
        let batch: Vec<LiveMessage> = entries
            .iter()
            .map(|(msg, _)| LiveMessage {
                msg: msg.clone(),
                fingerprint: None,
                refusable: false,
            })
            .collect();
        add(&app.metrics.messages_written_behind, batch.len() as u64);
        let mut outcome = Err(StoreError::Unavailable("not tried".into()));
        for attempt in 0..RELEASE_TRIES {
            let out = seqs.put(batch.clone()).await;
            if let Some(wb) = &app.write_behind {
                wb.over_quota().add(out.over_quota);
            }
            outcome = out
                .answers
                .into_iter()
                .find(|r| r.is_err())
                .map_or(Ok(()), |r| r.map(|_| ()));
            if outcome.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        if let Err(e) = &outcome {
            inc(&app.metrics.store_errors);
            tracing::error!(user = %crate::escape::Escaped(user), error = %e, messages = entries.len(), "messages of an ending session could not be stored; their senders are told");
        }
        for (_, answer) in entries {
            if let Some((a, fate)) = answer {
                let _ = a.send(outcome.clone().map(|()| fate));
            }
        }
    }
    seqs.release(user, live.base(), last).await;
}
