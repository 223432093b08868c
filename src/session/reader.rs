//! The reading half of a session: reads the client's frames, checks them (size, rate),
//! and acts on them: sends go through `delivery` in batches, blob chunks to the transfer
//! relay, acks to the store; everything for the client goes to the writer's queue.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::handle::{Outgoing, SessionShared, StopReason};
use super::Flow;
use crate::app::App;
use crate::delivery;
use crate::escape::{Escaped, EscapedOpt};
use crate::limits::{Rate, TokenBucket};
use crate::message::{BlobMeta, Body};
use crate::metrics::inc;
use crate::names::canonical_username;
use crate::protocol::{
    self, canonical_or_error, close, hash, pigeon, seed_json, Dialect, ErrorCode, Event, Fate,
    ProtocolError, Request,
};
use crate::store::NewMessage;
use crate::transfer::{new_blob_key, ChunkOutcome, Transfers};
use crate::wire::Wire;
use bytes::Bytes;

/// The close reason of 1009: the settings that bound a WebSocket message.
const TOO_BIG_REASON: &str =
    "message too big: limits.max_message_bytes (legacy binary: limits.legacy_binary_max_bytes)";
/// The close reason of 1009 before login.
const PRELOGIN_TOO_BIG_REASON: &str = "too many bytes before login: limits.prelogin_bytes";
/// A legacy binary frame is written to blob storage in pieces of this size.
const LEGACY_SPOOL_PIECE: usize = 1024 * 1024;
/// Sends read off the socket before they are stored together.
const READ_BATCH: usize = 64;
/// Sends whose answers may wait (live messages not acknowledged or written yet) before
/// the session stops reading new frames until the oldest is answered.
const MAX_AWAITED: usize = 256;

/// A send whose answer is not written yet (answers go out in the order of the sends).
pub(super) struct Awaited {
    dialect: Dialect,
    id: Option<String>,
    to: String,
    answer: delivery::Pending,
}

/// Completes once the oldest awaited answer is known (never without one).
async fn oldest_answered(answers: &mut VecDeque<Awaited>) {
    match answers.front_mut() {
        Some(a) => a.answer.ready().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever without one. The timer is boxed: an idle
/// session's future holds no timer (only blob transfers have a deadline).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => Box::pin(tokio::time::sleep_until(d.into())).await,
        None => std::future::pending().await,
    }
}

/// Waits for `timer`, or forever without one.
async fn wait_for(timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

pub(super) struct Reader {
    pub(super) app: Arc<App>,
    pub(super) tx: mpsc::Sender<Outgoing>,
    pub(super) shared: Arc<SessionShared>,
    /// The connection's byte counts: before login its reads are held to
    /// `limits.prelogin_bytes` (password mode), lifted once the user is known.
    pub(super) read_budget: Option<Arc<Wire>>,
    pub(super) user: Option<String>,
    pub(super) dialect: Option<Dialect>,
    pub(super) generation: u64,
    pub(super) errors_in_row: u32,
    /// Blob transfers this session is sending.
    pub(super) transfers: Transfers,
    /// The last recipient this session sent to (legacy binary frames go there).
    pub(super) last_to: Option<String>,
    /// Sends read but not yet stored (at most `READ_BATCH`).
    pub(super) pending: Vec<NewMessage>,
    /// Sends accepted whose answers are not written yet, oldest first (at most
    /// `MAX_AWAITED`).
    pub(super) answers: VecDeque<Awaited>,
    /// Writing those answers (they must not wait for themselves, see `push`).
    pub(super) answering: bool,
    pub(super) peer: Option<IpAddr>,
    /// The user a token in the URL proved, before the first frame picked the dialect.
    pub(super) authenticated: Option<String>,
    /// `auth::credential_stamp` of the password hash this session's login was checked
    /// against (password mode): a later change of the account ends the session.
    pub(super) credential: Option<u64>,
    pub(super) bucket: TokenBucket,
    /// WebSocket pings on top of `bucket`: a ping costs a pong, and floods are cheap to send.
    pub(super) ping_bucket: TokenBucket,
}

impl Reader {
    pub(super) async fn read_loop<S>(
        &mut self,
        stream: &mut SplitStream<WebSocketStream<S>>,
        stop: &mut watch::Receiver<Option<StopReason>>,
        shutdown: &mut watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let login_timeout = Duration::from_secs(self.app.config.limits.login_timeout_secs);
        let blob_idle = Duration::from_secs(self.app.config.limits.blob_idle_secs);
        // Boxed and dropped at login: a logged-in session holds no login timer.
        let mut login_deadline = Some(Box::pin(tokio::time::sleep(login_timeout)));
        loop {
            if self.user.is_some() {
                login_deadline = None;
            }
            // While sends are pending, take only frames that are already here; when none
            // is, store the pending ones before waiting.
            if !self.pending.is_empty() {
                match futures_util::FutureExt::now_or_never(stream.next()) {
                    Some(frame) => {
                        // Boxed: the frame handlers are large futures, and inline they would make
                        // every idle session's task that large too.
                        if Box::pin(self.on_frame(frame)).await == Flow::Close {
                            return;
                        }
                        continue;
                    }
                    None => {
                        if Box::pin(self.flush_sends()).await == Flow::Close {
                            return;
                        }
                    }
                }
            }
            let frame = tokio::select! {
                biased;
                _ = stop.changed() => return,
                _ = wait_for(&mut login_deadline), if self.user.is_none() => {
                    let e = ProtocolError::new(
                        ErrorCode::LoginTimeout,
                        format!("no login within {} s", login_timeout.as_secs()),
                    );
                    let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
                    Box::pin(self.refuse_and_close(dialect, e, close::LOGIN_TIMEOUT)).await;
                    return;
                }
                _ = crate::shutdown::shutdown_requested(shutdown) => {
                    self.shared.stop(StopReason::Shutdown);
                    return;
                }
                _ = sleep_until(self.transfers.next_deadline(blob_idle)) => {
                    if Box::pin(self.expire_transfers(blob_idle)).await == Flow::Close {
                        return;
                    }
                    continue;
                }
                _ = oldest_answered(&mut self.answers), if !self.answers.is_empty() => {
                    if self.write_answers(false).await == Flow::Close {
                        return;
                    }
                    continue;
                }
                frame = stream.next() => frame,
            };
            // Boxed: the frame handlers are large futures, and inline they would make
            // every idle session's task that large too.
            if Box::pin(self.on_frame(frame)).await == Flow::Close {
                return;
            }
        }
    }

    /// Aborts the blob transfers that received no chunk for `idle`: the sender is told
    /// (`blob_timeout`), the live recipient gets `blob_abort`, the spool file goes.
    pub(super) async fn expire_transfers(&mut self, idle: Duration) -> Flow {
        for id in self.transfers.abort_idle(idle).await {
            let e = ProtocolError::new(
                ErrorCode::BlobTimeout,
                format!(
                    "no chunk for {} s ([limits] blob_idle_secs): transfer aborted",
                    idle.as_secs()
                ),
            )
            .with_id(id);
            if self.reply(Dialect::Pigeon, &Event::Error(&e)).await == Flow::Close {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Handles one frame off the socket (`None`: the socket ended).
    pub(super) async fn on_frame(
        &mut self,
        frame: Option<Result<Message, tungstenite::Error>>,
    ) -> Flow {
        // Chunks of an accepted blob are paced by the relay's backpressure, not by the
        // frame rate (a 256 MiB file is a thousand frames).
        let rated = match &frame {
            // Pings too: each costs a pong, and a ping flood is an attack like any other.
            Some(Ok(Message::Text(_) | Message::Ping(_))) => true,
            Some(Ok(Message::Binary(_))) => {
                self.dialect != Some(Dialect::Pigeon) || self.transfers.is_empty()
            }
            _ => false,
        };
        if matches!(frame, Some(Ok(Message::Ping(_)))) {
            if let Some(flow) = self.rate_check(true, None).await {
                return flow;
            }
        }
        if rated {
            let text = match &frame {
                Some(Ok(Message::Text(t))) => Some(t.as_str()),
                _ => None,
            };
            if let Some(flow) = self.rate_check(false, text).await {
                return flow;
            }
        }
        // The socket reads frames up to the legacy binary limit; everything but a legacy
        // session's binary frame is held to `max_message_bytes`, as before.
        let len = match &frame {
            Some(Ok(Message::Text(t))) => t.len(),
            Some(Ok(Message::Binary(b))) if !self.legacy_identified() => b.len(),
            _ => 0,
        };
        if len > self.app.config.limits.max_message_bytes {
            tracing::debug!(user = ?self.user, len, "message too big");
            return self.close(close::TOO_BIG, TOO_BIG_REASON).await;
        }
        match frame {
            None => Flow::Close,
            Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await,
            Some(Ok(Message::Binary(data))) => self.on_binary(data).await,
            // Pings are answered by tungstenite itself; close frames end the stream.
            Some(Ok(_)) => Flow::Continue,
            Some(Err(tungstenite::Error::Capacity(e))) => {
                tracing::debug!(user = %crate::OrDash(&self.user), error = %e, "message too big");
                self.close(close::TOO_BIG, TOO_BIG_REASON).await
            }
            Some(Err(e))
                if self
                    .read_budget
                    .as_ref()
                    .is_some_and(|w| w.read_budget_spent()) =>
            {
                tracing::info!(peer = %crate::OrDash(&self.peer), error = %e, "closing a socket that sent too much before login");
                // Never a real client: the address counts toward the flood ban.
                if let Some(ip) = self.peer {
                    self.app.flood_ban.flooded(ip, Instant::now());
                }
                self.close(close::TOO_BIG, PRELOGIN_TOO_BIG_REASON).await
            }
            Some(Err(e)) => {
                tracing::debug!(user = %crate::OrDash(&self.user), error = %e, "read error");
                Flow::Close
            }
        }
    }

    /// A hash or seed-JSON session that knows its user: its binary frames are files.
    pub(super) fn legacy_identified(&self) -> bool {
        self.user.is_some() && matches!(self.dialect, Some(Dialect::Hash | Dialect::SeedJson))
    }

    pub(super) async fn on_text(&mut self, text: &str) -> Flow {
        let limit = self.app.config.limits.max_text_bytes;
        let dialect = self.dialect.unwrap_or_else(|| guess_dialect(text));
        if text.len() > limit {
            let e = ProtocolError::new(
                ErrorCode::TooLarge,
                format!(
                    "text frame of {} bytes is above the limit of {limit} (limits.max_text_bytes)",
                    text.len()
                ),
            );
            return self.refuse(dialect, e).await;
        }
        let parsed = match dialect {
            Dialect::Hash => hash::parse(text),
            Dialect::SeedJson => seed_json::parse(text),
            Dialect::Pigeon => pigeon::parse(text),
        };
        let request = match parsed {
            Ok(r) => r,
            Err(e) => return self.refuse(dialect, e).await,
        };
        match (self.user.clone(), request) {
            // An anonymous session's first hash frame names its user.
            (
                None,
                Request::Send {
                    from: Some(from),
                    id,
                    to,
                    body,
                },
            ) => {
                let from = match canonical_or_error(&from, "sender") {
                    Ok(f) => f,
                    Err(e) => return self.refuse(Dialect::Hash, e).await,
                };
                if let Some(flow) = self.check_hash_sender(&from).await {
                    return flow;
                }
                if self.identify(from.clone(), Dialect::Hash, false).await == Flow::Close {
                    return Flow::Close;
                }
                self.send(&from, id, to, body).await
            }
            (None, Request::Login { user }) => self.login(user).await,
            (
                None,
                Request::Authenticate {
                    user,
                    password,
                    token,
                },
            ) => self.authenticate(user, password, token).await,
            (None, Request::Ping) => self.reply(dialect, &Event::Pong).await,
            (None, _) => {
                let e = ProtocolError::new(
                    ErrorCode::NotIdentified,
                    "log in first: {\"type\":\"login\",\"user\":...}, /ws/<user>, or from#msg#to",
                );
                self.refuse(dialect, e).await
            }
            (Some(_), Request::Login { .. } | Request::Authenticate { .. }) => {
                let e = ProtocolError::new(
                    ErrorCode::AlreadyIdentified,
                    "this session is already logged in",
                );
                self.refuse(dialect, e).await
            }
            (Some(user), Request::Send { from, id, to, body }) => {
                if from
                    .as_ref()
                    .is_some_and(|f| canonical_username(f).as_ref() != Some(&user))
                {
                    let e = ProtocolError::new(
                        ErrorCode::WrongSender,
                        format!("this session belongs to {user}"),
                    );
                    return self.refuse(dialect, e).await;
                }
                self.send(&user, id, to, body).await
            }
            (Some(user), Request::Ack { upto }) => {
                // Exactly the seqs this session wrote up to there: a seq it skipped (its
                // insert still in flight when a later one went out) stays in the mailbox.
                let ranges = self.shared.take_acked(upto);
                let Some(&(_, highest)) = ranges.last() else {
                    self.errors_in_row = 0;
                    return Flow::Continue;
                };
                if let Err(e) = delivery::acked(&self.app, &user, &self.shared.live, &ranges).await
                {
                    self.shared.restore_unacked(&ranges);
                    inc(&self.app.metrics.store_errors);
                    tracing::warn!(%user, error = %e, "ack failed");
                    let e = ProtocolError::new(ErrorCode::StoreUnavailable, e.to_string());
                    return self.refuse(dialect, e).await;
                }
                self.app.router.receipts(&user, &self.shared, highest);
                self.errors_in_row = 0;
                Flow::Continue
            }
            (Some(_), Request::Ping) => self.reply(dialect, &Event::Pong).await,
            (
                Some(user),
                Request::BlobStart {
                    id,
                    to,
                    name,
                    mime,
                    size,
                    sha256,
                },
            ) => {
                let to = match protocol::check_send(&to, Some(&id)) {
                    Ok(to) => to,
                    Err(e) => {
                        return self
                            .refuse(dialect, e.with_id(Some(id)).with_to(Some(to)))
                            .await
                    }
                };
                let meta = BlobMeta {
                    key: String::new(),
                    id: Some(id.clone()),
                    name,
                    mime,
                    size,
                    sha256,
                };
                match self.transfers.start(&self.app, &user, to, meta).await {
                    Ok(stream) => {
                        self.errors_in_row = 0;
                        self.reply(dialect, &Event::BlobAccepted { id: &id, stream })
                            .await
                    }
                    Err(e) => self.refuse(dialect, e).await,
                }
            }
            (Some(_), Request::BlobAbort { stream }) => {
                if self.transfers.abort(stream, "cancelled").await {
                    Flow::Continue
                } else {
                    let e = ProtocolError::new(
                        ErrorCode::UnknownStream,
                        format!("no transfer on stream {stream}"),
                    );
                    self.refuse(dialect, e).await
                }
            }
        }
    }

    /// Binary frames: blob chunks (Pigeon JSON), or the seed tutorials' raw binary
    /// relay to the last recipient (legacy dialects).
    pub(super) async fn on_binary(&mut self, data: Bytes) -> Flow {
        let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
        let Some(user) = self.user.clone() else {
            let e = ProtocolError::new(
                ErrorCode::NotIdentified,
                "log in before sending binary frames",
            );
            return self.refuse(dialect, e).await;
        };
        if dialect != Dialect::Pigeon {
            return self.legacy_binary(&user, dialect, data).await;
        }
        let stream = match protocol::split_chunk(&data) {
            Ok((stream, _)) => stream,
            Err(e) => return self.refuse(dialect, e).await,
        };
        let payload = data.slice(protocol::CHUNK_HEADER..);
        match self.transfers.chunk(&self.app, stream, payload).await {
            Ok(ChunkOutcome::Partial) => {
                self.errors_in_row = 0;
                Flow::Continue
            }
            Ok(ChunkOutcome::Complete) => self.complete_blob(&user, stream).await,
            Err(e) => self.refuse(dialect, e).await,
        }
    }

    /// All bytes of a blob arrived: it becomes a mailbox message like any other.
    pub(super) async fn complete_blob(&mut self, user: &str, stream: u32) -> Flow {
        let done = match self.transfers.finish(&self.app, stream).await {
            Ok(done) => done,
            Err(e) => return self.refuse(Dialect::Pigeon, e).await,
        };
        let id = done.meta.id.clone();
        let to = done.to.clone();
        record_blob(&self.app, user, &to, &done.meta).await;
        match self
            .accept(user, id.clone(), to.clone(), done.meta.to_body())
            .await
        {
            Ok((seq, fate, duplicate)) => {
                if duplicate {
                    done.discard(&self.app, "duplicate").await;
                }
                self.answer_sent(Dialect::Pigeon, id.as_deref(), &to, (seq, fate, duplicate))
                    .await
            }
            Err(e) => {
                done.discard(&self.app, "refused").await;
                self.refuse(Dialect::Pigeon, e).await
            }
        }
    }

    /// A raw binary frame from a legacy session (a tutorial's file or video, sent whole)
    /// goes to its last recipient. tungstenite holds the frame once; it is spooled to
    /// blob storage from there and becomes a blob message like any other.
    pub(super) async fn legacy_binary(
        &mut self,
        user: &str,
        dialect: Dialect,
        data: Bytes,
    ) -> Flow {
        let limit = self.app.config.limits.legacy_binary_max_bytes;
        let Some(to) = self.last_to.clone() else {
            let e = ProtocolError::new(
                ErrorCode::Unsupported,
                "send a text message first: binary frames go to your last recipient",
            );
            return self.refuse(dialect, e).await;
        };
        if data.len() > limit || data.is_empty() {
            let e = ProtocolError::new(
                ErrorCode::TooLarge,
                format!(
                    "binary frames on this session must be 1..={limit} bytes (limits.legacy_binary_max_bytes)"
                ),
            )
            .with_to(Some(to));
            return self.refuse(dialect, e).await;
        }
        let key = new_blob_key();
        let stored = async {
            let mut w = self.app.store.blob_writer(&key).await?;
            let mut at = 0;
            while at < data.len() {
                let end = (at + LEGACY_SPOOL_PIECE).min(data.len());
                if let Err(e) = w.write_bytes(data.slice(at..end)).await {
                    w.discard().await;
                    return Err(e);
                }
                at = end;
            }
            w.finish().await
        };
        if let Err(e) = stored.await {
            let e = ProtocolError::new(ErrorCode::StoreUnavailable, e.to_string());
            return self.refuse(dialect, e).await;
        }
        let (mime, name) = crate::transfer::sniff(&data);
        let meta = BlobMeta {
            key: key.clone(),
            id: None,
            name: name.into(),
            mime: mime.into(),
            size: data.len() as u64,
            sha256: None,
        };
        drop(data);
        record_blob(&self.app, user, &to, &meta).await;
        match self.accept(user, None, to.clone(), meta.to_body()).await {
            Ok(accepted) => self.answer_sent(dialect, None, &to, accepted).await,
            Err(e) => {
                self.app.store.blob_remove(&key).await;
                self.refuse(dialect, e).await
            }
        }
    }

    /// A text or JSON message from this session's user.
    pub(super) async fn send(
        &mut self,
        user: &str,
        id: Option<String>,
        to: String,
        body: Body,
    ) -> Flow {
        let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
        let to = match protocol::check_send(&to, id.as_deref()) {
            Ok(to) => to,
            Err(e) => return self.refuse(dialect, e.with_id(id).with_to(Some(to))).await,
        };
        self.last_to = Some(to.clone());
        // Held until the frames already waiting on the socket are read too, then stored
        // together (see `flush_sends`).
        self.pending.push(NewMessage {
            sender: user.to_string(),
            recipient: to,
            client_id: id,
            body,
            accepted_at: crate::now_ms(),
        });
        if self.pending.len() >= READ_BATCH {
            return self.flush_sends().await;
        }
        Flow::Continue
    }

    /// Stores the pending sends in one go (in order), routes them, and answers each.
    /// Anything else this session writes first flushes them (`push`), so answers keep
    /// the order of the frames.
    pub(super) async fn flush_sends(&mut self) -> Flow {
        if self.pending.is_empty() {
            return Flow::Continue;
        }
        let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
        let batch = std::mem::take(&mut self.pending);
        let keys: Vec<(Option<String>, String)> = batch
            .iter()
            .map(|m| (m.client_id.clone(), m.recipient.clone()))
            .collect();
        let answers = delivery::accept_many_pending(&self.app, batch).await;
        for ((id, to), answer) in keys.into_iter().zip(answers) {
            self.answers.push_back(Awaited {
                dialect,
                id,
                to,
                answer,
            });
        }
        if self.write_answers(false).await == Flow::Close {
            return Flow::Close;
        }
        while self.answers.len() > MAX_AWAITED {
            oldest_answered(&mut self.answers).await;
            if self.write_answers(false).await == Flow::Close {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Writes the answers that are known, oldest first, up to the first that is not
    /// (`wait`: waits for every one).
    pub(super) async fn write_answers(&mut self, wait: bool) -> Flow {
        loop {
            let Some(oldest) = self.answers.front_mut() else {
                return Flow::Continue;
            };
            if wait {
                oldest.answer.ready().await;
            }
            let Some(result) = oldest.answer.take_ready() else {
                return Flow::Continue;
            };
            let Some(a) = self.answers.pop_front() else {
                return Flow::Continue;
            };
            self.answering = true;
            let flow = match result {
                Ok(accepted) => {
                    self.answer_sent(a.dialect, a.id.as_deref(), &a.to, accepted)
                        .await
                }
                Err(e) => self.refuse(a.dialect, e).await,
            };
            self.answering = false;
            if flow == Flow::Close {
                return Flow::Close;
            }
        }
    }

    /// Tells the sender an accepted message's fate: `accepted` is (seq, fate, duplicate).
    pub(super) async fn answer_sent(
        &mut self,
        dialect: Dialect,
        id: Option<&str>,
        to: &str,
        (seq, fate, duplicate): (u64, Fate, bool),
    ) -> Flow {
        self.errors_in_row = 0;
        let sent = Event::Sent {
            id,
            to,
            seq,
            fate,
            duplicate,
        };
        self.reply(dialect, &sent).await
    }

    /// Accepts one message (`delivery::accept`). Returns (seq, fate, duplicate).
    pub(super) async fn accept(
        &mut self,
        user: &str,
        id: Option<String>,
        to: String,
        body: Body,
    ) -> Result<(u64, Fate, bool), ProtocolError> {
        if self.flush_sends().await == Flow::Close {
            return Err(ProtocolError::new(
                ErrorCode::StoreUnavailable,
                "session closing",
            ));
        }
        let msg = NewMessage {
            sender: user.to_string(),
            recipient: to,
            client_id: id,
            body,
            accepted_at: crate::now_ms(),
        };
        delivery::accept(&self.app, msg).await
    }

    pub(super) async fn reply(&mut self, dialect: Dialect, event: &Event<'_>) -> Flow {
        let mut frames = Vec::with_capacity(2);
        protocol::format(dialect, event, |f| frames.push(f));
        for f in frames {
            if self.push(Outgoing::Reply(f)).await == Flow::Close {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Answers a bad request with an error frame; too many in a row close the session.
    pub(super) async fn refuse(&mut self, dialect: Dialect, e: ProtocolError) -> Flow {
        tracing::debug!(user = %EscapedOpt(self.user.as_deref()), code = e.code.as_str(), message = %Escaped(&e.message), "refused frame");
        inc(&self.app.metrics.errors);
        if self.reply(dialect, &Event::Error(&e)).await == Flow::Close {
            return Flow::Close;
        }
        // A store outage (or a full store) is not the client's fault: a client retrying
        // through one must not be closed as a protocol offender.
        if matches!(e.code, ErrorCode::StoreUnavailable | ErrorCode::StoreFull) {
            return Flow::Continue;
        }
        self.errors_in_row += 1;
        if self.errors_in_row >= self.app.config.limits.max_consecutive_errors {
            return self.close(close::PROTOCOL_ERROR, "protocol_error").await;
        }
        Flow::Continue
    }

    /// Spends a token of the frame-rate bucket (`ping`: of the ping bucket): `None` lets
    /// the frame through; otherwise it was dropped with a `rate_limited` error (and maybe
    /// the session closed). A dropped Pigeon frame's error carries its `id` (`text`: the
    /// frame, if text). A ping's pong may already be on its way: tungstenite answers
    /// pings as it reads them.
    pub(super) async fn rate_check(&mut self, ping: bool, text: Option<&str>) -> Option<Flow> {
        let bucket = match ping {
            true => &mut self.ping_bucket,
            false => &mut self.bucket,
        };
        let verdict = bucket.check(Instant::now());
        if verdict == Rate::Allow {
            return None;
        }
        let limits = &self.app.config.limits;
        let what = match ping {
            true => format!("more than {} pings per second", limits.ping_per_sec),
            false => format!(
                "more than {} frames per second: frame dropped",
                limits.rate_per_sec
            ),
        };
        let id = match (self.dialect, text) {
            (Some(Dialect::Pigeon), Some(t)) => protocol::pigeon::frame_id(t),
            _ => None,
        };
        self.over_rate(verdict, what, id).await
    }

    /// Acts on a refusing verdict: a `rate_limited` error (naming the dropped frame's
    /// `id`, if any), and a close on `Rate::Close`.
    pub(super) async fn over_rate(
        &mut self,
        verdict: Rate,
        what: String,
        id: Option<String>,
    ) -> Option<Flow> {
        inc(&self.app.metrics.errors);
        let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
        let e = ProtocolError::new(ErrorCode::RateLimited, what).with_id(id);
        if verdict == Rate::Close {
            tracing::info!(user = %EscapedOpt(self.user.as_deref()), peer = %crate::OrDash(&self.peer), "closing a flooding connection");
            if let Some(ip) = self.peer {
                self.app.flood_ban.flooded(ip, Instant::now());
            }
            return Some(self.refuse_and_close(dialect, e, close::RATE_LIMITED).await);
        }
        Some(self.reply(dialect, &Event::Error(&e)).await)
    }

    /// Sends an error frame, then closes with `code` (the error code is the reason).
    pub(super) async fn refuse_and_close(
        &mut self,
        dialect: Dialect,
        e: ProtocolError,
        code: u16,
    ) -> Flow {
        tracing::debug!(user = %EscapedOpt(self.user.as_deref()), peer = %crate::OrDash(&self.peer), code = e.code.as_str(), message = %Escaped(&e.message), "closing session");
        inc(&self.app.metrics.errors);
        self.reply(dialect, &Event::Error(&e)).await;
        self.close(code, e.code.as_str()).await
    }

    pub(super) async fn close(&mut self, code: u16, reason: &'static str) -> Flow {
        self.push(Outgoing::Close(code, reason)).await;
        Flow::Close
    }

    pub(super) async fn push(&mut self, out: Outgoing) -> Flow {
        // Earlier sends are answered first, so answers keep the order of the frames.
        // Boxed: flushing answers through `push` again (with nothing pending by then).
        if !self.answering {
            if !self.pending.is_empty() && Box::pin(self.flush_sends()).await == Flow::Close {
                return Flow::Close;
            }
            if !self.answers.is_empty() && Box::pin(self.write_answers(true)).await == Flow::Close {
                return Flow::Close;
            }
        }
        match self.tx.send(out).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close, // the writer is gone: the socket is dead
        }
    }
}

/// Records who may download a finished blob (`GET /api/blobs/{key}`). Without it the
/// blob is still delivered, but its links do not work: logged, not refused.
pub(super) async fn record_blob(app: &App, user: &str, to: &str, meta: &BlobMeta) {
    if app.config.limits.blob_link_secs == 0 {
        return; // no links: the blob goes with its message's ack
    }
    let info = crate::store::BlobInfo {
        sender: user.to_string(),
        recipient: to.to_string(),
        name: meta.name.clone(),
        mime: meta.mime.clone(),
        size: meta.size,
        acked_at: None,
    };
    if let Err(e) = app.store.blob_set_info(&meta.key, &info).await {
        inc(&app.metrics.store_errors);
        tracing::warn!(key = %meta.key, error = %e, "cannot record who may download a blob");
    }
}

/// Before a session knows its dialect, a frame's shape tells which one it speaks.
pub(super) fn guess_dialect(text: &str) -> Dialect {
    if hash::looks_like(text) {
        Dialect::Hash
    } else if pigeon::is_pigeon_frame(text) {
        Dialect::Pigeon
    } else {
        Dialect::SeedJson
    }
}
