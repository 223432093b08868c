//! A recipient's mailbox while its live session owns it: the write-behind fast path.
//!
//! When a user's session starts on a server that offers it (`Store::live_seqs`), the
//! session claims the user's mailbox: the store reserves a block of seqs and refuses to
//! hand out more itself (`StoreError::Owned`) until the session ends and hands the
//! unused ones back. From then on a message to the user gets its seq here, from memory,
//! and goes to the session's queue at once, under one lock (so the queue's order is the
//! seq order). It waits here, uncommitted, until either the user acknowledges it (it is
//! then never written at all) or the write-behind task (`write_behind.rs`) stores it;
//! only then does its sender hear `delivered`. When the session ends, everything still
//! uncommitted is stored before the mailbox is handed back.
//!
//! Also counted here while owned: the messages the mailbox holds (stored or not), for
//! `limits.mailbox_max`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::message::StoredMessage;
use crate::protocol::Fate;
use crate::store::StoreError;

/// Where a fast-path sender's answer goes: `delivered` once safe, or why it is not.
pub type Answer = oneshot::Sender<Result<Fate, StoreError>>;

/// Why the fast path did not take a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The session does not own its mailbox (not yet, or no longer): use the store.
    NotOwned,
    /// `limits.mailbox_max` messages are waiting already.
    MailboxFull,
    /// The reserved seqs are used up: reserve up to this seq, then try again.
    Exhausted(u64),
}

#[derive(Default)]
pub struct LiveMailbox {
    state: Mutex<State>,
}

impl std::fmt::Debug for LiveMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("LiveMailbox")
            .field("next", &s.next)
            .field("uncommitted", &s.uncommitted.len())
            .finish()
    }
}

#[derive(Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Unowned,
    Owned,
    Closed,
}

#[derive(Default)]
struct State {
    phase: Phase,
    /// The last seq handed out before this session's claim: names the claim to the
    /// store (`LiveSeqs::reserve`, `release`).
    base: u64,
    /// The next seq to hand out, and the highest one the store reserved.
    next: u64,
    reserved: u64,
    /// Messages the mailbox holds: stored or here, not acknowledged.
    held: u64,
    uncommitted: BTreeMap<u64, Entry>,
    /// Seqs `allocate`d to messages being written before they are routed: the session
    /// writes nothing after the first of them until it is routed (`routed`) or refused,
    /// so that its recipient gets the mailbox in seq order.
    in_flight: BTreeSet<u64>,
    /// Seqs acknowledged while their write was under way: acknowledged in the store
    /// once it committed.
    acked_while_committing: Vec<u64>,
    /// The write-behind task has this mailbox on its list.
    scheduled: bool,
}

struct Entry {
    msg: Arc<StoredMessage>,
    answer: Option<Answer>,
    /// What its sender hears once it is written: `Delivered` when it went into the
    /// session's queue, `Stored` when the queue was full (the session reads it later).
    fate: Fate,
    /// Taken by a write-behind batch that has not committed yet.
    committing: bool,
    /// When it was handed out: the write-behind takes it once it is old enough.
    at: Instant,
}

/// A message the fast path took (`LiveMailbox::deliver`).
pub struct Delivered {
    pub seq: u64,
    /// The sender's answer, once the message is safe.
    pub answer: oneshot::Receiver<Result<Fate, StoreError>>,
    /// Into the session's queue (`Delivered`) or left for its catch-up (`Stored`).
    pub fate: Fate,
    /// The caller puts the mailbox on the write-behind task's list.
    pub schedule: bool,
}

/// A message still uncommitted when its session ended, with its sender's answer (and
/// the fate it will hear) unless that was given already.
pub type Unwritten = (Arc<StoredMessage>, Option<(Answer, Fate)>);

/// Seqs handed out per reservation (a crash leaves at most this gap).
pub const BLOCK: u64 = 1 << 20;

impl LiveMailbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every step is one
        // insert or remove): go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session owns the mailbox from now on: `base` was the last seq handed out,
    /// the store reserved up to `base + block`, and the mailbox holds `held` messages.
    /// False when the session ended (or opened) already: the caller hands the claim back.
    pub fn open(&self, base: u64, held: u64, block: u64) -> bool {
        let mut s = self.lock();
        if s.phase != Phase::Unowned {
            return false;
        }
        s.phase = Phase::Owned;
        s.base = base;
        s.next = base + 1;
        s.reserved = base.saturating_add(block);
        s.held = held;
        true
    }

    pub fn is_owned(&self) -> bool {
        self.lock().phase == Phase::Owned
    }

    /// The last seq handed out before this session claimed the mailbox (0 before).
    pub fn base(&self) -> u64 {
        self.lock().base
    }

    fn take_seq(s: &mut State, mailbox_max: u64) -> Result<u64, Refusal> {
        if s.phase != Phase::Owned {
            return Err(Refusal::NotOwned);
        }
        if mailbox_max > 0 && s.held >= mailbox_max {
            return Err(Refusal::MailboxFull);
        }
        if s.next > s.reserved {
            return Err(Refusal::Exhausted(s.next.saturating_add(BLOCK)));
        }
        let seq = s.next;
        s.next += 1;
        s.held += 1;
        Ok(seq)
    }

    /// A seq for a message that is written before it is routed (a blob, a client id to
    /// remember): the caller stores it (`LiveSeqs::put`), then routes it, or gives the
    /// slot back with `refused`.
    pub fn allocate(&self, mailbox_max: u64) -> Result<u64, Refusal> {
        let mut s = self.lock();
        let seq = Self::take_seq(&mut s, mailbox_max)?;
        s.in_flight.insert(seq);
        Ok(seq)
    }

    /// The message `allocate` gave `seq` was stored and goes to the session's queue now
    /// (or it was given up: its sender's session ended during the write). False when it
    /// was routed or refused already.
    pub fn routed(&self, seq: u64) -> bool {
        self.lock().in_flight.remove(&seq)
    }

    /// The first seq that is being written before it is routed: the session writes
    /// nothing from it on yet.
    pub fn first_in_flight(&self) -> Option<u64> {
        self.lock().in_flight.first().copied()
    }

    /// The message allocated `seq` with `allocate` was not stored after all (a retry,
    /// a refusal): the seq is handed out again when nothing came after it.
    pub fn refused(&self, seq: u64) {
        let mut s = self.lock();
        s.in_flight.remove(&seq);
        s.held = s.held.saturating_sub(1);
        if s.phase == Phase::Owned && s.next == seq + 1 {
            s.next = seq;
        }
    }

    /// The fast path: gives the message (`make` builds it around its seq) a seq, keeps
    /// it as uncommitted, and hands it to `push` (the session's queue: false when it is
    /// full), all under the lock. Returns the seq, the receiver of the sender's answer,
    /// whether it went into the queue, and whether the caller must put this mailbox on
    /// the write-behind task's list.
    pub fn deliver(
        &self,
        mailbox_max: u64,
        make: impl FnOnce(u64) -> Arc<StoredMessage>,
        push: impl FnOnce(Arc<StoredMessage>) -> bool,
    ) -> Result<Delivered, Refusal> {
        let mut s = self.lock();
        let seq = Self::take_seq(&mut s, mailbox_max)?;
        let msg = make(seq);
        let (answer, rx) = oneshot::channel();
        let pushed = push(msg.clone());
        let fate = match pushed {
            true => Fate::Delivered,
            false => Fate::Stored,
        };
        s.uncommitted.insert(
            seq,
            Entry {
                msg,
                answer: Some(answer),
                fate,
                committing: false,
                at: Instant::now(),
            },
        );
        let schedule = !s.scheduled;
        s.scheduled = true;
        Ok(Delivered {
            seq,
            answer: rx,
            fate,
            schedule,
        })
    }

    /// The store reserved seqs up to `upto`.
    pub fn extended(&self, upto: u64) {
        let mut s = self.lock();
        s.reserved = s.reserved.max(upto);
    }

    /// For a write-behind batch: the uncommitted messages not yet taken that were
    /// handed out at or before `cutoff`, and whether younger ones remain (the mailbox
    /// then stays on the task's list).
    pub fn take_for_commit(&self, cutoff: Instant) -> (Vec<Arc<StoredMessage>>, bool) {
        let mut s = self.lock();
        let mut younger = false;
        let mut taken = Vec::new();
        for e in s.uncommitted.values_mut().filter(|e| !e.committing) {
            if e.at > cutoff {
                younger = true;
                continue;
            }
            e.committing = true;
            taken.push(e.msg.clone());
        }
        s.scheduled = younger;
        (taken, younger)
    }

    /// A write-behind batch with `seqs` ended: stored (their senders hear `delivered`),
    /// or not (they hear why; the messages stay here for the next batch or the session's
    /// end). Returns the seqs acknowledged meanwhile, to acknowledge in the store, and
    /// whether the mailbox must go back on the write-behind task's list.
    pub fn committed(
        &self,
        seqs: &[u64],
        result: &Result<(), StoreError>,
    ) -> (Vec<(u64, u64)>, bool) {
        let mut s = self.lock();
        for seq in seqs {
            match result {
                Ok(()) => {
                    if let Some(e) = s.uncommitted.remove(seq) {
                        if let Some(a) = e.answer {
                            let _ = a.send(Ok(e.fate));
                        }
                    }
                }
                Err(err) => {
                    if let Some(e) = s.uncommitted.get_mut(seq) {
                        e.committing = false;
                        if let Some(a) = e.answer.take() {
                            let _ = a.send(Err(err.clone()));
                        }
                    }
                }
            }
        }
        let mut acked = std::mem::take(&mut s.acked_while_committing);
        if result.is_err() {
            // Not stored: those acknowledgements need no store write.
            acked.retain(|_| false);
        }
        let again = result.is_err() && !s.uncommitted.is_empty() && !s.scheduled;
        if again {
            s.scheduled = true;
        }
        (to_ranges(acked), again)
    }

    /// The user acknowledged `ranges`: the uncommitted messages among them are never
    /// written. Returns the ranges the store must still acknowledge (stored messages,
    /// and those being written right now), and the answers of those never written (the
    /// caller tells their senders `delivered`).
    pub fn acked(&self, ranges: &[(u64, u64)]) -> (Vec<(u64, u64)>, Vec<Answer>) {
        let mut s = self.lock();
        if s.uncommitted.is_empty() {
            return (ranges.to_vec(), Vec::new());
        }
        let mut unwritten = Vec::new();
        let mut rest = Vec::with_capacity(ranges.len());
        for &(lo, hi) in ranges {
            let mut start = lo;
            let seqs: Vec<u64> = s.uncommitted.range(lo..=hi).map(|(k, _)| *k).collect();
            for seq in seqs {
                let committing = s.uncommitted.get(&seq).is_some_and(|e| e.committing);
                if committing {
                    s.acked_while_committing.push(seq);
                    continue;
                }
                if let Some(e) = s.uncommitted.remove(&seq) {
                    s.held = s.held.saturating_sub(1);
                    unwritten.extend(e.answer);
                }
                if seq > start {
                    rest.push((start, seq - 1));
                }
                start = seq + 1;
            }
            if start <= hi {
                rest.push((start, hi));
            }
        }
        (rest, unwritten)
    }

    /// Live messages wait for an acknowledgement (legacy sessions then ask their TCP
    /// sooner).
    pub fn waiting(&self) -> bool {
        !self.lock().uncommitted.is_empty()
    }

    /// The store deleted `n` of the mailbox's messages (an acknowledgement).
    pub fn forget(&self, n: u64) {
        let mut s = self.lock();
        s.held = s.held.saturating_sub(n);
    }

    /// The uncommitted messages with `after < seq <= upto`, in seq order (a session
    /// reading its mailbox sees these beside the stored ones).
    pub fn between(&self, after: u64, upto: u64) -> Vec<Arc<StoredMessage>> {
        if upto <= after {
            return Vec::new();
        }
        let s = self.lock();
        s.uncommitted
            .range(after + 1..=upto)
            .map(|(_, e)| e.msg.clone())
            .collect()
    }

    /// The session ends: no more seqs are handed out here. Returns what must be stored
    /// before the mailbox is handed back (with the senders still waiting) and the last
    /// seq handed out, or `None` when it was never owned.
    pub fn close(&self) -> Option<(Vec<Unwritten>, u64)> {
        let mut s = self.lock();
        let owned = s.phase == Phase::Owned;
        s.phase = Phase::Closed;
        if !owned {
            return None;
        }
        let entries = std::mem::take(&mut s.uncommitted)
            .into_values()
            .map(|e| (e.msg, e.answer.map(|a| (a, e.fate))))
            .collect();
        Some((entries, s.next - 1))
    }
}

/// Sorted seqs as inclusive ranges.
fn to_ranges(mut seqs: Vec<u64>) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for seq in seqs {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == seq => *hi = seq,
            _ => out.push((seq, seq)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Body;

    fn msg(seq: u64) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            seq,
            sender: "a".into(),
            recipient: "b".into(),
            client_id: None,
            body: Body::Text("x".into()),
            accepted_at: 0,
        })
    }

    #[test]
    fn seqs_follow_the_base_and_refuse_when_not_owned_or_full() {
        let live = LiveMailbox::default();
        assert_eq!(live.allocate(0), Err(Refusal::NotOwned));
        assert!(live.open(7, 1, 2));
        let d = live.deliver(3, msg, |_| true).unwrap();
        assert_eq!((d.seq, d.schedule, d.fate), (8, true, Fate::Delivered));
        assert_eq!(live.allocate(3), Ok(9));
        // held: 1 stored + 2 handed out = 3 = mailbox_max
        assert_eq!(live.allocate(3), Err(Refusal::MailboxFull));
        // 9 was refused (a retry): handed out again
        live.refused(9);
        assert_eq!(live.allocate(3), Ok(9));
        live.refused(9);
        assert_eq!(live.allocate(0), Ok(9));
        assert_eq!(live.allocate(0), Err(Refusal::Exhausted(10 + BLOCK)));
        live.extended(20);
        assert_eq!(live.allocate(0), Ok(10));
        let (entries, last) = live.close().unwrap();
        assert_eq!((entries.len(), last), (1, 10));
        assert_eq!(live.allocate(0), Err(Refusal::NotOwned));
    }

    #[test]
    fn seqs_being_written_first_hold_the_session_back_until_routed_or_refused() {
        let live = LiveMailbox::default();
        live.open(0, 0, 100);
        assert_eq!(live.first_in_flight(), None);
        let (a, b) = (live.allocate(0).unwrap(), live.allocate(0).unwrap());
        assert_eq!((a, b), (1, 2));
        assert_eq!(live.first_in_flight(), Some(1));
        assert!(live.routed(a));
        assert!(!live.routed(a), "once");
        assert_eq!(live.first_in_flight(), Some(2));
        // The last seq refused goes back and holds nothing any more.
        live.refused(b);
        assert_eq!(live.first_in_flight(), None);
        assert_eq!(live.allocate(0).unwrap(), 2);
    }

    #[test]
    fn a_claim_that_completes_after_the_session_ended_is_not_opened() {
        let live = LiveMailbox::default();
        assert!(live.close().is_none(), "never owned: nothing to hand back");
        assert!(!live.open(5, 0, 100), "the claimer hands it back itself");
        assert!(!live.is_owned());
        let live = LiveMailbox::default();
        assert!(live.open(5, 0, 100));
        assert!(!live.open(9, 0, 100), "opened once");
        assert_eq!(live.base(), 5);
    }

    #[test]
    fn an_ack_before_the_write_answers_and_leaves_only_the_rest_for_the_store() {
        let live = LiveMailbox::default();
        live.open(0, 0, 100);
        let mut rxs = Vec::new();
        for i in 0..4 {
            // the last one found the queue full
            rxs.push(live.deliver(0, msg, |_| i < 3).unwrap().answer);
        }
        // 1..=4 uncommitted; 3 and 4 go into a write-behind batch
        let (rest, answers) = live.acked(&[(1, 1)]);
        assert_eq!((rest, answers.len()), (vec![], 1));
        for a in answers {
            a.send(Ok(Fate::Delivered)).unwrap();
        }
        assert_eq!(rxs[0].try_recv().unwrap().unwrap(), Fate::Delivered);
        let (taken, younger) = live.take_for_commit(Instant::now());
        assert_eq!((taken.len(), younger), (3, false));
        // an ack of 0..=3 while 2 and 3 are being written: all of it goes to the store
        let (rest, answers) = live.acked(&[(0, 3)]);
        assert_eq!((rest, answers.len()), (vec![(0, 3)], 0));
        let (acked, again) = live.committed(&[2, 3, 4], &Ok(()));
        assert_eq!((acked, again), (vec![(2, 3)], false));
        assert_eq!(rxs[3].try_recv().unwrap().unwrap(), Fate::Stored);
        assert!(live.between(0, 10).is_empty());
    }

    #[test]
    fn a_failed_write_answers_the_error_and_keeps_the_message() {
        let live = LiveMailbox::default();
        live.open(0, 0, 100);
        let mut rx = live.deliver(0, msg, |_| true).unwrap().answer;
        let past = Instant::now() - std::time::Duration::from_secs(1);
        assert_eq!(live.take_for_commit(past), (vec![], true));
        let seqs: Vec<u64> = live
            .take_for_commit(Instant::now())
            .0
            .iter()
            .map(|m| m.seq)
            .collect();
        let (_, again) = live.committed(&seqs, &Err(StoreError::Unavailable("disk".into())));
        assert!(again);
        assert!(rx.try_recv().unwrap().is_err());
        assert_eq!(live.between(0, 5).len(), 1);
        let (entries, _) = live.close().unwrap();
        assert_eq!(entries.len(), 1);
    }
}
