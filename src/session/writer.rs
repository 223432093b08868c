//! The writing half of a session, the only code that touches the socket's sink: it
//! flushes the mailbox at login, writes what the queue brings (replies, deliveries, blob
//! chunks, receipts), fills gaps from the mailbox, records acknowledgements (legacy
//! dialects: once the client's TCP acknowledged the bytes), and says goodbye.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::handle::{BlobChunk, KickWait, Outgoing, SessionShared, Start, StopReason};
use super::{shutdown_linger, ACK_DELAY};
use crate::app::App;
use crate::escape::Escaped;
use crate::message::{BlobMeta, StoredMessage};
use crate::metrics::inc;
use crate::protocol::{self, close, Dialect, Event, KickReason};
use crate::ranges::SeqRanges;
use crate::store::StoreError;
use crate::wire::Wire;
use std::collections::HashMap;

/// Queued frames the writer handles before it flushes the socket and looks around.
const WRITE_BATCH: usize = 256;
const ACK_POLL_MAX: Duration = Duration::from_millis(100);
/// ...or after each write batch while this many wait, whichever comes first (and when the
/// session ends). One `SIOCOUTQ` call per check, never one per message.
const ACK_BATCH: u64 = 64;
/// How soon a legacy session asks its TCP again while live messages wait for it.
const LIVE_ACK_POLL: Duration = Duration::from_millis(1);

/// Sleeps for `d`; the timer is boxed, so that an idle writer's future holds none.
async fn pause(d: Duration) {
    Box::pin(tokio::time::sleep(d)).await
}

/// Completes once the session is replaced or the server shuts down.
pub(super) async fn cut_short(stop: &mut watch::Receiver<Option<StopReason>>) {
    let cut =
        |r: &Option<StopReason>| matches!(r, Some(StopReason::Replaced | StopReason::Shutdown));
    if stop.wait_for(cut).await.is_err() {
        // The session's state is gone: nothing will ever cut.
        std::future::pending::<()>().await;
    }
}

/// Waiting for the session(s) a login replaced to finish.
pub(super) type Handover = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>;

/// Why streaming a stored blob stopped.
pub(super) enum BlobOut {
    /// The client's socket failed: the session ends.
    Socket(Exit),
    /// The blob could not be read: the client is told, the session goes on.
    Store(StoreError),
}

/// The writer ends for one of these.
pub(super) enum Exit {
    /// The socket failed; nothing more can be written.
    Broken,
    /// A close frame was sent.
    Closed,
    /// A write waiting for the socket was given up: the session was replaced or the
    /// server is shutting down (what was queued stays in the mailbox; the goodbye follows).
    Cut,
}

/// Legacy dialects: messages written to the socket that the client's TCP has not
/// acknowledged yet. After each flush the connection's byte count (`Wire::written`) marks
/// the end of everything written before it; once the client's TCP acknowledged that many
/// bytes (`Wire::acked`) those messages count as received. Without a `Wire` none does.
pub(super) struct TcpAcks {
    pub(super) wire: Option<Arc<Wire>>,
    /// Written since the last flush.
    pub(super) unflushed: SeqRanges,
    /// Flushed, oldest first: the byte count after the flush, and what it carried.
    pub(super) in_flight: VecDeque<(u64, SeqRanges)>,
    /// Acknowledged by the client's TCP but not recorded yet (the store failed).
    pub(super) confirmed: SeqRanges,
}

impl TcpAcks {
    pub(super) fn new(wire: Option<Arc<Wire>>) -> TcpAcks {
        TcpAcks {
            wire,
            unflushed: SeqRanges::default(),
            in_flight: VecDeque::new(),
            confirmed: SeqRanges::default(),
        }
    }

    /// Everything written so far is in the kernel now.
    pub(super) fn flushed(&mut self) {
        if self.unflushed.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.unflushed);
        let mark = self.wire.as_ref().map_or(u64::MAX, |w| w.written());
        match self.in_flight.back_mut() {
            // Nothing acknowledged it yet; one mark for both (keeps the queue short).
            Some((last, prev)) if *last == mark => add_all(prev, seqs),
            _ => self.in_flight.push_back((mark, seqs)),
        }
    }

    /// Something is waiting for the client's TCP or for the store.
    pub(super) fn pending(&self) -> bool {
        !self.in_flight.is_empty() || !self.confirmed.is_empty()
    }

    /// The seqs whose bytes the client's TCP has acknowledged (one `SIOCOUTQ` call).
    pub(super) fn take_confirmed(&mut self) -> Vec<(u64, u64)> {
        if let Some(acked) = self
            .wire
            .as_ref()
            .filter(|_| !self.in_flight.is_empty())
            .and_then(|w| w.acked())
        {
            while self
                .in_flight
                .front()
                .is_some_and(|(mark, _)| *mark <= acked)
            {
                if let Some((_, seqs)) = self.in_flight.pop_front() {
                    add_all(&mut self.confirmed, seqs);
                }
            }
        }
        self.confirmed.take_upto(u64::MAX)
    }

    /// Puts back confirmed seqs the store could not record.
    pub(super) fn restore(&mut self, ranges: &[(u64, u64)]) {
        for &(lo, hi) in ranges {
            for seq in lo..=hi {
                self.confirmed.insert(seq);
            }
        }
    }
}

pub(super) fn add_all(into: &mut SeqRanges, from: SeqRanges) {
    let mut from = from;
    for (lo, hi) in from.take_upto(u64::MAX) {
        for seq in lo..=hi {
            into.insert(seq);
        }
    }
}

/// Records legacy messages as received (`ranges`, confirmed by the client's TCP) and
/// sends the receipts; `false` when the store failed.
pub(super) async fn record_tcp_acks(
    app: &App,
    shared: &SessionShared,
    user: &str,
    ranges: &[(u64, u64)],
) -> bool {
    let Some(&(_, highest)) = ranges.last() else {
        return true;
    };
    match crate::delivery::acked(app, user, &shared.live, ranges).await {
        Ok(_) => {
            app.router.receipts(user, shared, highest);
            true
        }
        Err(e) => {
            inc(&app.metrics.store_errors);
            tracing::warn!(%user, error = %e, "ack on write failed; will retry");
            false
        }
    }
}

pub(super) struct Writer<S> {
    pub(super) sink: SplitSink<WebSocketStream<S>, Message>,
    pub(super) app: Arc<App>,
    pub(super) shared: Arc<SessionShared>,
    /// Set by `Start`; deliveries before it are left to the mailbox flush.
    pub(super) user: Option<String>,
    pub(super) dialect: Dialect,
    /// Highest seq written in this session.
    pub(super) last_sent: u64,
    /// Every seq written in this session (never written twice).
    pub(super) written: SeqRanges,
    /// Something was written since the last flush.
    pub(super) unflushed: bool,
    /// Messages written and not recorded as received yet (legacy dialects).
    pub(super) unacked_writes: u64,
    /// Legacy dialects: written messages waiting for the client's TCP to acknowledge them.
    pub(super) tcp_acks: TcpAcks,
    /// Current pause before asking the kernel again (`ACK_DELAY` .. `ACK_POLL_MAX`).
    pub(super) ack_wait: Duration,
    /// Fires when the session is replaced or the server shuts down: writes waiting for a
    /// slow client give up, so the goodbye can go out.
    pub(super) cut: watch::Receiver<Option<StopReason>>,
    /// The wait for a replaced session, cut short because this one was replaced too.
    pub(super) unfinished_handover: Option<Handover>,
    /// Blobs arriving live, by key, with the stream number this client sees them on.
    pub(super) live_blobs: HashMap<Arc<str>, u32>,
    pub(super) next_stream: u32,
    pub(super) write_timeout: Duration,
    /// `http(s)://host` the client reached this server at, for download links.
    pub(super) links: Option<Arc<str>>,
}

impl<S> Writer<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Serves until the session stops; returns the legacy messages still waiting for the
    /// client's TCP, for one last look after the linger.
    pub(super) async fn run(
        mut self: Box<Self>,
        mut rx: mpsc::Receiver<Outgoing>,
        mut stop: watch::Receiver<Option<StopReason>>,
    ) -> TcpAcks {
        let end = match self.serve(&mut rx, &mut stop).await {
            // Queued deliveries are dropped (they are in the mailbox): the goodbye goes now.
            Err(Exit::Cut) => Ok(()),
            end => end,
        };
        drop(rx);
        if end.is_err() {
            // The socket is gone or stopped taking bytes (write timeout): end the reader
            // too, or a client that never reads or sends would keep its session, socket
            // and connection permit forever.
            self.shared.stop(StopReason::Closed);
        }
        if let Ok(()) = end {
            let reason = *stop.borrow();
            if let Some(d) = self.shared.dialect.get() {
                self.dialect = *d; // stopped before `Start` was handled
            }
            let _ = match reason {
                Some(StopReason::Replaced) => {
                    let wait = Duration::from_millis(self.app.config.server.takeover_wait_ms);
                    Box::pin(self.goodbye(
                        Some(KickReason::Replaced),
                        close::REPLACED,
                        "session_replaced",
                        wait,
                    ))
                    .await
                }
                Some(StopReason::Revoked(reason)) => {
                    let wait = Duration::from_millis(self.app.config.server.takeover_wait_ms);
                    Box::pin(self.goodbye(Some(reason), close::AUTH, reason.as_str(), wait)).await
                }
                Some(StopReason::Shutdown) => {
                    let wait = shutdown_linger(&self.app) / 2;
                    Box::pin(self.goodbye(None, close::GOING_AWAY, "server shutting down", wait))
                        .await
                }
                Some(StopReason::Closed) | None => Box::pin(self.flush()).await,
            };
        }
        Box::pin(self.ack_written()).await;
        if let Some(handover) = self.unfinished_handover.take() {
            handover.await;
        }
        self.tcp_acks
    }

    /// The last frames of a replaced or shut down session: the kick notice (`kicked`) and
    /// the close frame, written even when the client is slow (after what tungstenite
    /// still buffers), for at most `wait`.
    pub(super) async fn goodbye(
        &mut self,
        kicked: Option<KickReason>,
        code: u16,
        reason: &'static str,
        wait: Duration,
    ) -> Result<(), Exit> {
        let mut frames = Vec::with_capacity(3);
        if let Some(why) = kicked {
            protocol::format(self.dialect, &Event::Kicked(why), |f| {
                frames.push(Message::text(f))
            });
        }
        frames.push(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        })));
        let sink = &mut self.sink;
        let sent = tokio::time::timeout(wait.min(self.write_timeout), async move {
            for f in frames {
                sink.feed(f).await?;
            }
            sink.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => {
                self.unflushed = false;
                self.tcp_acks.flushed();
                Ok(())
            }
            _ => Err(Exit::Broken),
        }
    }

    /// Writes until asked to stop (`Ok`) or the socket ends (`Err`).
    pub(super) async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<Outgoing>,
        stop: &mut watch::Receiver<Option<StopReason>>,
    ) -> Result<(), Exit> {
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.changed() => {
                    // The reader ended on its own: what it queued (a last error, a close
                    // frame) still goes out. Take-over and shutdown cut straight through.
                    if *stop.borrow() == Some(StopReason::Closed) {
                        while let Ok(out) = rx.try_recv() {
                            Box::pin(self.handle(out)).await?;
                        }
                    }
                    return Ok(());
                }
                out = rx.recv() => out,
                // Legacy dialects: record what the client's TCP acknowledged once things
                // are quiet, rather than one syscall and store round trip per flush.
                _ = pause(self.ack_wait), if self.ack_due() => {
                    let recorded = Box::pin(self.ack_written()).await;
                    self.ack_wait = match (self.live_waiting(), recorded) {
                        (true, _) => LIVE_ACK_POLL,
                        (false, true) => ACK_DELAY,
                        (false, false) => (self.ack_wait * 2).min(ACK_POLL_MAX),
                    };
                    continue;
                }
            };
            let Some(first) = first else { return Ok(()) };
            // Boxed for the same reason as the reader's frame handling: idle sessions stay small.
            Box::pin(self.handle(first)).await?;
            for _ in 1..WRITE_BATCH {
                match rx.try_recv() {
                    Ok(out) => Box::pin(self.handle(out)).await?,
                    Err(_) => break,
                }
            }
            if self.user.is_some() && self.shared.lagging.swap(false, Ordering::AcqRel) {
                Box::pin(self.catch_up(false)).await?;
            }
            Box::pin(self.flush()).await?;
            // Live messages wait for their acknowledgement to be spared the store write
            // (and their senders for their answer): ask the kernel at once.
            if self.unacked_writes >= ACK_BATCH || self.live_waiting() {
                Box::pin(self.ack_written()).await;
                if self.live_waiting() {
                    self.ack_wait = LIVE_ACK_POLL;
                }
            }
        }
    }

    /// A legacy session wrote live messages its TCP has not confirmed yet.
    fn live_waiting(&self) -> bool {
        self.dialect.acks_on_write() && self.tcp_acks.pending() && self.shared.live.waiting()
    }

    /// Written messages a legacy session has not recorded as received yet.
    pub(super) fn ack_due(&self) -> bool {
        self.user.is_some() && self.dialect.acks_on_write() && self.tcp_acks.pending()
    }

    pub(super) async fn handle(&mut self, out: Outgoing) -> Result<(), Exit> {
        match out {
            Outgoing::Reply(text) => self.write(Message::text(text)).await,
            Outgoing::Deliver(msg) => {
                if self.user.is_none() || self.written.contains(msg.seq) {
                    return Ok(()); // the mailbox flush covers it, or it was sent already
                }
                if msg.seq > self.last_sent + 1 {
                    // Something before it is still on its way or was diverted: read the gap
                    // (and this message) from the mailbox, in order.
                    return self.catch_up(false).await;
                }
                // The next one, or a late one whose store write finished after a later
                // seq had gone out (concurrent senders on a shared store).
                self.write_message(&msg, false).await
            }
            Outgoing::Start(start) => {
                let Start {
                    user,
                    dialect,
                    generation,
                    replaced,
                    replaced_remote,
                } = *start;
                self.start(user, dialect, generation, replaced, replaced_remote)
                    .await
            }
            Outgoing::Close(code, reason) => {
                self.close(code, reason).await?;
                Err(Exit::Closed)
            }
            Outgoing::BlobStart { from, meta } => {
                // Only a started Pigeon JSON session can take a live blob; others get it
                // from the mailbox once it is complete.
                let Some(user) = self.user.clone() else {
                    return Ok(());
                };
                if self.dialect != Dialect::Pigeon {
                    return Ok(());
                }
                let stream = self.new_stream();
                self.live_blobs.insert(meta.key.as_str().into(), stream);
                let url = self.link(&meta.key, &user);
                let start = Event::BlobStart {
                    stream,
                    from: &from,
                    to: &user,
                    meta: &meta,
                    url: Some(&url),
                    offline: false,
                };
                self.write_event(&start).await
            }
            Outgoing::BlobChunk(chunk) => {
                let BlobChunk { key, data, permit } = *chunk;
                let Some(&stream) = self.live_blobs.get(&key) else {
                    return Ok(());
                };
                self.write(Message::binary(protocol::chunk_frame(stream, &data)))
                    .await?;
                drop(permit); // the bytes are in the socket's hands: the sender may go on
                Ok(())
            }
            Outgoing::CatchUp => self.catch_up(false).await,
            Outgoing::Receipt { from, upto } => {
                if self.dialect != Dialect::Pigeon || self.user.is_none() {
                    return Ok(()); // the legacy dialects have no receipts
                }
                self.write_event(&Event::Receipt { from: &from, upto })
                    .await
            }
            Outgoing::BlobAbort { key, reason } => match self.live_blobs.remove(&key) {
                Some(stream) => {
                    self.write_event(&Event::BlobAborted { stream, reason })
                        .await
                }
                None => Ok(()),
            },
        }
    }

    pub(super) fn new_stream(&mut self) -> u32 {
        self.next_stream = self.next_stream.wrapping_add(1);
        self.next_stream
    }

    /// A blob message: ends a live relay, or streams the stored bytes.
    pub(super) async fn write_blob(
        &mut self,
        msg: &StoredMessage,
        meta: &BlobMeta,
        offline: bool,
    ) -> Result<(), Exit> {
        let url = self.link(&meta.key, &msg.recipient);
        if self.dialect != Dialect::Pigeon {
            // The legacy dialects get files as a text notice with a download link: a
            // seed page parses every frame as JSON, and a hash client needs the sender.
            let notice = Event::FileNotice {
                msg,
                meta,
                url: &url,
                offline,
            };
            return self.write_event(&notice).await;
        }
        if let Some(stream) = self.live_blobs.remove(meta.key.as_str()) {
            return self
                .write_event(&Event::BlobEnd {
                    stream,
                    seq: msg.seq,
                    ts: msg.accepted_at,
                })
                .await;
        }
        let stream = self.new_stream();
        let start = Event::BlobStart {
            stream,
            from: &msg.sender,
            to: &msg.recipient,
            meta,
            url: Some(&url),
            offline,
        };
        self.write_event(&start).await?;
        if let Err(e) = self.stream_stored_blob(stream, &meta.key).await {
            return match e {
                BlobOut::Socket(e) => Err(e),
                BlobOut::Store(e) => {
                    tracing::error!(key = %meta.key, error = %e, "stored blob cannot be read");
                    let aborted = Event::BlobAborted {
                        stream,
                        reason: "unavailable",
                    };
                    self.write_event(&aborted).await
                }
            };
        }
        self.write_event(&Event::BlobEnd {
            stream,
            seq: msg.seq,
            ts: msg.accepted_at,
        })
        .await
    }

    /// Writes a stored blob's bytes as chunk frames on `stream`.
    pub(super) async fn stream_stored_blob(
        &mut self,
        stream: u32,
        key: &str,
    ) -> Result<(), BlobOut> {
        let mut reader = self
            .app
            .store
            .blob_reader(key)
            .await
            .map_err(BlobOut::Store)?;
        let mut buf = vec![0u8; self.app.config.limits.blob_chunk_bytes];
        loop {
            let n = reader.read(&mut buf).await.map_err(BlobOut::Store)?;
            if n == 0 {
                return Ok(());
            }
            self.write(Message::binary(protocol::chunk_frame(stream, &buf[..n])))
                .await
                .map_err(BlobOut::Socket)?;
        }
    }

    /// A signed download link to blob `key` for `user`.
    pub(super) fn link(&self, key: &str, user: &str) -> String {
        crate::links::link(&self.app, self.links.as_deref(), key, user)
    }

    pub(super) async fn start(
        &mut self,
        user: String,
        dialect: Dialect,
        generation: u64,
        replaced: Option<Arc<SessionShared>>,
        replaced_remote: Option<KickWait>,
    ) -> Result<(), Exit> {
        let wait = Duration::from_millis(self.app.config.server.takeover_wait_ms);
        let user_for_log = user.clone();
        let mut handover: Handover = Box::pin(async move {
            if let Some(old) = replaced {
                if tokio::time::timeout(wait, old.wait_done()).await.is_err() {
                    tracing::warn!(user = %Escaped(&user_for_log), "replaced session did not finish in time");
                }
            }
            if let Some(kick) = replaced_remote {
                kick.wait(wait).await;
            }
        });
        // Replaced in turn while waiting (many logins at once): say so at once rather
        // than after the wait, but finish the wait before this session counts as done,
        // so whoever replaced it still starts after the session this one replaced.
        let mut stop = self.shared.stop_signal();
        tokio::select! {
            _ = &mut handover => {}
            _ = stop.wait_for(|r| r.is_some()) => {
                self.unfinished_handover = Some(handover);
                return Ok(());
            }
        }
        self.dialect = dialect;
        // The live path: from here on this session hands out the user's seqs; the
        // flush below covers every one the store handed out before.
        let claimed = crate::delivery::claim(&self.app, &user, &self.shared.live).await;
        if dialect == Dialect::Pigeon {
            let pending = self.app.store.pending(&user).await.unwrap_or(0);
            let welcome = Event::Welcome {
                user: &user,
                session: generation,
                pending,
            };
            self.write_event(&welcome).await?;
        }
        self.user = Some(user);
        self.catch_up(true).await?;
        if let Some(base) = claimed {
            // Seqs up to `base` that are not in the mailbox were acknowledged already.
            self.last_sent = self.last_sent.max(base);
        }
        if dialect == Dialect::Pigeon {
            self.write_event(&Event::Synced).await?;
        }
        Ok(())
    }

    /// Writes every mailbox message after `last_sent`, in order, batch by batch.
    pub(super) async fn catch_up(&mut self, offline: bool) -> Result<(), Exit> {
        let Some(user) = self.user.clone() else {
            return Ok(());
        };
        let batch = self.app.config.limits.flush_batch;
        loop {
            let msgs = match self.app.store.fetch(&user, self.last_sent, batch).await {
                Ok(m) => m,
                Err(e) => {
                    // Try again after the next event; the messages stay in the mailbox.
                    inc(&self.app.metrics.store_errors);
                    tracing::warn!(%user, error = %e, "mailbox read failed");
                    self.shared.lagging.store(true, Ordering::Release);
                    return Ok(());
                }
            };
            let n = msgs.len();
            // Live messages not written to the store yet belong in the same order.
            let upto = match n < batch {
                true => u64::MAX,
                false => msgs.last().map_or(u64::MAX, |m| m.seq),
            };
            let live = self.shared.live.between(self.last_sent, upto);
            let mut msgs: Vec<Arc<StoredMessage>> = msgs.into_iter().map(Arc::new).collect();
            if !live.is_empty() {
                msgs.extend(live);
                msgs.sort_by_key(|m| m.seq);
                msgs.dedup_by_key(|m| m.seq);
            }
            // A seq handed out to a message that is being written before it is routed:
            // nothing from it on goes out before it (it comes through the queue, then
            // the rest: `lagging`).
            let hold = self.shared.live.first_in_flight();
            for m in &msgs {
                if hold.is_some_and(|h| m.seq >= h) {
                    self.shared.lagging.store(true, Ordering::Release);
                    return Ok(());
                }
                if self.written.contains(m.seq) {
                    continue;
                }
                self.write_message(m, offline).await?;
                inc(&self.app.metrics.messages_flushed);
            }
            if n < batch {
                return Ok(());
            }
            self.flush().await?;
            self.ack_written().await;
        }
    }

    pub(super) async fn write_message(
        &mut self,
        msg: &StoredMessage,
        offline: bool,
    ) -> Result<(), Exit> {
        match msg.body.blob_meta() {
            Some(meta) => self.write_blob(msg, &meta, offline).await?,
            None => self.write_event(&Event::Message { msg, offline }).await?,
        }
        if let Ok(mut senders) = self.shared.unacked_senders.lock() {
            let e = senders
                .entry(msg.sender.clone())
                .or_insert((msg.seq, msg.seq));
            e.1 = e.1.max(msg.seq);
        }
        self.last_sent = self.last_sent.max(msg.seq);
        self.written.insert(msg.seq);
        if self.dialect.acks_on_write() {
            self.tcp_acks.unflushed.insert(msg.seq);
        } else if let Ok(mut unacked) = self.shared.unacked.lock() {
            unacked.insert(msg.seq);
        }
        self.unacked_writes += 1;
        self.unflushed = true;
        Ok(())
    }

    pub(super) async fn write_event(&mut self, event: &Event<'_>) -> Result<(), Exit> {
        let mut frames = Vec::with_capacity(2);
        protocol::format(self.dialect, event, |f| frames.push(f));
        for f in frames {
            self.write(Message::text(f)).await?;
        }
        Ok(())
    }

    /// Queues a frame (tungstenite writes it out as its buffer fills). Gives up after the
    /// write timeout, or when the session is replaced or the server shuts down while the
    /// socket has no room (`Exit::Cut`: the frame was not queued).
    pub(super) async fn write(&mut self, msg: Message) -> Result<(), Exit> {
        tokio::select! {
            biased;
            done = tokio::time::timeout(self.write_timeout, self.sink.feed(msg)) => match done {
                Ok(Ok(())) => Ok(()),
                _ => Err(Exit::Broken),
            },
            _ = cut_short(&mut self.cut) => Err(Exit::Cut),
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), Exit> {
        tokio::select! {
            biased;
            done = tokio::time::timeout(self.write_timeout, self.sink.flush()) => match done {
                Ok(Ok(())) => {}
                _ => return Err(Exit::Broken),
            },
            _ = cut_short(&mut self.cut) => return Err(Exit::Cut),
        }
        self.unflushed = false;
        self.tcp_acks.flushed();
        Ok(())
    }

    pub(super) async fn close(&mut self, code: u16, reason: &'static str) -> Result<(), Exit> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        self.sink
            .send(Message::Close(Some(frame)))
            .await
            .map_err(|_| Exit::Broken)?;
        self.unflushed = false;
        self.tcp_acks.flushed();
        Ok(())
    }

    /// Legacy dialects cannot ack: a written message counts as received once the client's
    /// TCP acknowledged its bytes. Records those; `true` when it recorded any.
    pub(super) async fn ack_written(&mut self) -> bool {
        let Some(user) = &self.user else { return false };
        if !self.dialect.acks_on_write() || !self.tcp_acks.pending() {
            return false;
        }
        let ranges = self.tcp_acks.take_confirmed();
        if ranges.is_empty() {
            return false;
        }
        if !record_tcp_acks(&self.app, &self.shared, user, &ranges).await {
            self.tcp_acks.restore(&ranges);
            return false;
        }
        let n: u64 = ranges.iter().map(|(lo, hi)| hi - lo + 1).sum();
        self.unacked_writes = self.unacked_writes.saturating_sub(n);
        true
    }
}
