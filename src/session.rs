//! One WebSocket connection's life: learn who the user is (login frame, path, query or
//! the first hash frame), take over any older session of that user, then read requests
//! while a separate writer task owns the socket's sink.
//!
//! The writer is fed by one bounded channel (`Outgoing`): replies to this client and live
//! deliveries from the router. Because every message is in the store before it is routed,
//! the writer can always fall back on the mailbox: at login it flushes it, when the
//! router found the queue full (`lagging`) it re-reads it, and when a live delivery
//! arrives out of order it reads the gap from it. It never sends a seq twice in a session.
//!
//! Authentication (`[auth] mode = "password"`): identities from the URL arrive already
//! checked (`http::resolve`); a login frame carries a password or token; a hash frame
//! identifies only a session whose token (in the URL) names its sender. Abuse limits
//! live here too: the frame rate bucket, the login timeout, and take-over damping.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::app::App;
use crate::limits::{Rate, TokenBucket};
use crate::metrics::{dec, inc};
use crate::protocol::{
    self, hash, pigeon, seed_json, valid_username, Dialect, ErrorCode, Event, Fate, ProtocolError,
    Request,
};
use crate::ranges::SeqRanges;
use crate::router::{BlobChunk, Outgoing, SessionHandle, SessionShared, Start, StopReason};
use crate::store::{BlobMeta, Body, Enqueued, NewMessage, StoreError, StoredMessage};
use crate::transfer::{new_blob_key, ChunkOutcome, Transfers};
use bytes::Bytes;
use std::collections::HashMap;

pub const CLOSE_REPLACED: u16 = 4000;
pub const CLOSE_INVALID_USER: u16 = 4001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 4002;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Authentication required or failed (`auth_required`, `bad_credentials`, ...).
pub const CLOSE_AUTH: u16 = 4003;
pub const CLOSE_RATE_LIMITED: u16 = 4008;
pub const CLOSE_TAKEOVER_LOOP: u16 = 4009;
pub const CLOSE_LOGIN_TIMEOUT: u16 = 4010;

/// The close reason of 1009: the settings that bound a WebSocket message.
const TOO_BIG_REASON: &str =
    "message too big: limits.max_message_bytes (legacy binary: limits.legacy_binary_max_bytes)";

/// Queued frames the writer handles before it flushes the socket and looks around.
const WRITE_BATCH: usize = 256;
/// A legacy binary frame is written to blob storage in pieces of this size.
const LEGACY_SPOOL_PIECE: usize = 1024 * 1024;
/// Sends read off the socket before they are stored together.
const READ_BATCH: usize = 64;
/// Legacy sessions record written messages as received after this much quiet...
const ACK_DELAY: Duration = Duration::from_millis(5);
/// ...or after this many, whichever comes first (and always when the session ends).
const ACK_BATCH: u64 = 64;
/// After the server's close frame, how long the socket is still read (and the bytes
/// dropped) while waiting for the client's close frame. Closing a socket with unread
/// bytes makes the kernel send a reset, and a reset discards what the client had not
/// read yet: the close frame with its reason, and the error frame before it.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// ...and at most this many frames: a client still sending more after the close frame is
/// flooding, and reading its flood would cost more than its reset.
const CLOSE_LINGER_FRAMES: usize = 256;

/// How the connection said who it is, before any frame arrived.
#[derive(Debug, Clone)]
pub enum Greeting {
    /// Nothing yet: a login frame or the first hash frame will tell.
    Anonymous,
    /// From the path or query; `valid_username` not yet checked. In password mode only
    /// after a token proved it.
    Named { user: String, dialect: Dialect },
    /// A valid token (in the URL) proved the user; the first frame picks the dialect: a
    /// hash frame from this user, or a Pigeon `login` frame.
    Authenticated { user: String },
    /// The upgrade's credentials were refused: send the error, then close with `close`.
    Refused {
        dialect: Dialect,
        error: ProtocolError,
        close: u16,
    },
}

/// Runs the session to its end.
pub async fn run<S>(
    ws: WebSocketStream<S>,
    app: Arc<App>,
    greeting: Greeting,
    peer: Option<IpAddr>,
    links: Option<Arc<str>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    inc(&app.metrics.sessions_open);
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::channel(app.config.limits.session_queue);
    let shared = SessionShared::new(app.config.limits.blob_relay_bytes);
    let writer = Writer {
        sink,
        app: app.clone(),
        shared: shared.clone(),
        user: None,
        dialect: Dialect::Pigeon,
        last_sent: 0,
        written: SeqRanges::default(),
        unflushed: false,
        unacked_writes: 0,
        unfinished_handover: None,
        live_blobs: HashMap::new(),
        next_stream: 0,
        write_timeout: Duration::from_secs(app.config.limits.write_timeout_secs),
        links,
    };
    let writer = tokio::spawn(writer.run(rx, shared.stop_signal()));

    let mut reader = Reader {
        app: app.clone(),
        tx,
        shared: shared.clone(),
        user: None,
        dialect: None,
        generation: 0,
        errors_in_row: 0,
        transfers: Transfers::default(),
        last_to: None,
        pending: Vec::new(),
        peer,
        authenticated: None,
        bucket: TokenBucket::new(
            app.config.limits.rate_per_sec,
            app.config.limits.rate_burst,
            app.config.limits.rate_strikes,
            Instant::now(),
        ),
        ping_bucket: TokenBucket::new(
            app.config.limits.ping_per_sec,
            app.config.limits.ping_burst,
            app.config.limits.rate_strikes,
            Instant::now(),
        ),
    };
    let mut stop = shared.stop_signal();
    let flow = match greeting {
        Greeting::Anonymous => Flow::Continue,
        Greeting::Named { user, dialect } => reader.identify(user, dialect, true).await,
        Greeting::Authenticated { user } => {
            reader.authenticated = Some(user);
            Flow::Continue
        }
        Greeting::Refused {
            dialect,
            error,
            close,
        } => reader.refuse_and_close(dialect, error, close).await,
    };
    if flow == Flow::Continue {
        reader
            .read_loop(&mut stream, &mut stop, &mut shutdown)
            .await;
        // Sends read before the socket ended are stored all the same.
        reader.flush_sends().await;
    }
    reader.transfers.abort_all("sender_gone").await;
    shared.stop(StopReason::Closed);

    // The writer says goodbye (kick notice, close frame) and records its acks.
    // Room for its goodbye plus a hand-over it may still be waiting for.
    let grace = Duration::from_millis(app.config.server.takeover_wait_ms.saturating_mul(3));
    let abort = writer.abort_handle();
    if tokio::time::timeout(grace, writer).await.is_err() {
        tracing::debug!(user = ?reader.user, "writer did not finish in time; aborting it");
        abort.abort();
    }
    if let Some(user) = &reader.user {
        app.router.unregister(user, reader.generation);
        if let Some(c) = &app.cluster {
            c.release(user, reader.generation).await;
        }
    }
    shared.mark_done();
    dec(&app.metrics.sessions_open);
    linger(&mut stream, &mut shutdown).await;
}

/// Reads and drops whatever the client still sends until its close frame (or the end of
/// the socket, `CLOSE_LINGER` or `CLOSE_LINGER_FRAMES`, or the server shutting down), so
/// that the socket closes without a reset.
async fn linger<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    shutdown: &mut watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::sleep(CLOSE_LINGER);
    tokio::pin!(deadline);
    for _ in 0..CLOSE_LINGER_FRAMES {
        tokio::select! {
            _ = &mut deadline => return,
            _ = crate::server::shutdown_requested(shutdown) => return,
            frame = stream.next() => if !matches!(frame, Some(Ok(_))) { return },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

struct Reader {
    app: Arc<App>,
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<SessionShared>,
    user: Option<String>,
    dialect: Option<Dialect>,
    generation: u64,
    errors_in_row: u32,
    /// Blob transfers this session is sending.
    transfers: Transfers,
    /// The last recipient this session sent to (legacy binary frames go there).
    last_to: Option<String>,
    /// Sends read but not yet stored (at most `READ_BATCH`).
    pending: Vec<NewMessage>,
    peer: Option<IpAddr>,
    /// The user a token in the URL proved, before the first frame picked the dialect.
    authenticated: Option<String>,
    bucket: TokenBucket,
    /// WebSocket pings on top of `bucket`: a ping costs a pong, and floods are cheap to send.
    ping_bucket: TokenBucket,
}

impl Reader {
    async fn read_loop<S>(
        &mut self,
        stream: &mut SplitStream<WebSocketStream<S>>,
        stop: &mut watch::Receiver<Option<StopReason>>,
        shutdown: &mut watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let login_timeout = Duration::from_secs(self.app.config.limits.login_timeout_secs);
        let login_deadline = tokio::time::sleep(login_timeout);
        tokio::pin!(login_deadline);
        loop {
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
                        if self.flush_sends().await == Flow::Close {
                            return;
                        }
                    }
                }
            }
            let frame = tokio::select! {
                biased;
                _ = stop.changed() => return,
                _ = &mut login_deadline, if self.user.is_none() => {
                    let e = ProtocolError::new(
                        ErrorCode::LoginTimeout,
                        format!("no login within {} s", login_timeout.as_secs()),
                    );
                    let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
                    self.refuse_and_close(dialect, e, CLOSE_LOGIN_TIMEOUT).await;
                    return;
                }
                _ = crate::server::shutdown_requested(shutdown) => {
                    self.shared.stop(StopReason::Shutdown);
                    return;
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

    /// Handles one frame off the socket (`None`: the socket ended).
    async fn on_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) -> Flow {
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
            return self.close(CLOSE_TOO_BIG, TOO_BIG_REASON).await;
        }
        match frame {
            None => Flow::Close,
            Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await,
            Some(Ok(Message::Binary(data))) => self.on_binary(data).await,
            // Pings are answered by tungstenite itself; close frames end the stream.
            Some(Ok(_)) => Flow::Continue,
            Some(Err(tungstenite::Error::Capacity(e))) => {
                tracing::debug!(user = ?self.user, error = %e, "message too big");
                self.close(CLOSE_TOO_BIG, TOO_BIG_REASON).await
            }
            Some(Err(e)) => {
                tracing::debug!(user = ?self.user, error = %e, "read error");
                Flow::Close
            }
        }
    }

    /// A hash or seed-JSON session that knows its user: its binary frames are files.
    fn legacy_identified(&self) -> bool {
        self.user.is_some() && matches!(self.dialect, Some(Dialect::Hash | Dialect::SeedJson))
    }

    async fn on_text(&mut self, text: &str) -> Flow {
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
                if !valid_username(&from) {
                    let e = ProtocolError::new(
                        ErrorCode::InvalidUser,
                        format!("sender {from:?} is not a valid username"),
                    );
                    return self.refuse(Dialect::Hash, e).await;
                }
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
                if from.as_ref().is_some_and(|f| *f != user) {
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
                if let Err(e) = self.app.store.ack_ranges(&user, &ranges).await {
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
                if let Err(e) = protocol::check_send(&to, Some(&id)) {
                    return self
                        .refuse(dialect, e.with_id(Some(id)).with_to(Some(to)))
                        .await;
                }
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
    async fn on_binary(&mut self, data: Bytes) -> Flow {
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
    async fn complete_blob(&mut self, user: &str, stream: u32) -> Flow {
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
    async fn legacy_binary(&mut self, user: &str, dialect: Dialect, data: Bytes) -> Flow {
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
            for piece in data.chunks(LEGACY_SPOOL_PIECE) {
                if let Err(e) = w.write(piece).await {
                    w.discard().await;
                    return Err(e);
                }
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

    /// Claims `user` for this session: registers it (taking over any older session) and
    /// tells the writer to start delivering.
    async fn identify(&mut self, user: String, dialect: Dialect, from_url: bool) -> Flow {
        if !valid_username(&user) {
            let e = ProtocolError::new(
                ErrorCode::InvalidUser,
                format!("{user:?} is not a valid username (1-32 letters, digits, _ . -)"),
            );
            if from_url {
                self.refuse(dialect, e).await;
                return self.close(CLOSE_INVALID_USER, "invalid_user").await;
            }
            return self.refuse(dialect, e).await;
        }
        if self.app.router.is_online(&user) && !self.app.auth.allow_takeover(&user) {
            tracing::warn!(
                %user,
                max = self.app.config.limits.takeover_max,
                window_secs = self.app.config.limits.takeover_window_secs,
                "login refused: this user is being taken over in a loop"
            );
            let e = ProtocolError::new(
                ErrorCode::TakeoverLoop,
                format!(
                    "{user} was taken over too often lately; is another client fighting over this account?"
                ),
            );
            return self.refuse_and_close(dialect, e, CLOSE_TAKEOVER_LOOP).await;
        }
        let _ = self.shared.dialect.set(dialect);
        self.generation = self.app.router.next_generation();
        let handle = SessionHandle {
            generation: self.generation,
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        };
        let replaced = self.app.router.register(&user, handle).map(|old| {
            inc(&self.app.metrics.takeovers);
            tracing::info!(%user, old = old.generation, new = self.generation, "session taken over");
            old.shared.stop(StopReason::Replaced);
            old.shared
        });
        tracing::debug!(%user, generation = self.generation, ?dialect, "session identified");
        self.user = Some(user.clone());
        self.dialect = Some(dialect);
        self.errors_in_row = 0;
        // The kick goes out now, not when the writer starts: this session may itself be
        // replaced before then, and the session it replaced must still be stopped.
        let replaced_remote = match &self.app.cluster {
            Some(c) => match c.claim(&user, self.generation).await {
                Some(owner) => Some(c.kick(&owner, &user).await),
                None => None,
            },
            None => None,
        };
        let start = Outgoing::Start(Box::new(Start {
            user,
            dialect,
            generation: self.generation,
            replaced,
            replaced_remote,
        }));
        self.push(start).await
    }

    /// A text or JSON message from this session's user.
    async fn send(&mut self, user: &str, id: Option<String>, to: String, body: Body) -> Flow {
        let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
        if let Err(e) = protocol::check_send(&to, id.as_deref()) {
            return self.refuse(dialect, e.with_id(id).with_to(Some(to))).await;
        }
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
    async fn flush_sends(&mut self) -> Flow {
        if self.pending.is_empty() {
            return Flow::Continue;
        }
        let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
        let batch = std::mem::take(&mut self.pending);
        let results = self.app.store.enqueue_many(batch.clone()).await;
        for (msg, result) in batch.into_iter().zip(results) {
            let (id, to) = (msg.client_id.clone(), msg.recipient.clone());
            let flow = match self.route(msg, result).await {
                Ok(accepted) => {
                    self.answer_sent(dialect, id.as_deref(), &to, accepted)
                        .await
                }
                Err(e) => self.refuse(dialect, e).await,
            };
            if flow == Flow::Close {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Tells the sender an accepted message's fate: `accepted` is (seq, fate, duplicate).
    async fn answer_sent(
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

    /// Accepts one message: store first, then route. Returns (seq, fate, duplicate).
    async fn accept(
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
        let result = self.app.store.enqueue(msg.clone()).await;
        self.route(msg, result).await
    }

    /// After the store answered for `msg`: hands a new message to its recipient.
    async fn route(
        &mut self,
        msg: NewMessage,
        stored: Result<Enqueued, StoreError>,
    ) -> Result<(u64, Fate, bool), ProtocolError> {
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
                let fate = match &self.app.cluster {
                    Some(c) if !self.app.router.is_online(&stored.recipient) => {
                        match c.forward(&stored).await {
                            true => Fate::Delivered,
                            false => Fate::Stored,
                        }
                    }
                    _ => self.app.router.deliver(stored),
                };
                match fate {
                    Fate::Delivered => inc(&self.app.metrics.messages_delivered),
                    Fate::Stored => inc(&self.app.metrics.messages_stored),
                }
                Ok((seq, fate, false))
            }
            Ok(Enqueued::Duplicate { seq }) => {
                inc(&self.app.metrics.messages_duplicate);
                Ok((seq, Fate::Stored, true))
            }
            Err(e) => {
                let code = match e {
                    StoreError::MailboxFull { .. } => ErrorCode::MailboxFull,
                    StoreError::IdConflict { .. } => ErrorCode::IdConflict,
                    _ => {
                        inc(&self.app.metrics.store_errors);
                        tracing::warn!(user = %msg.sender, error = %e, "enqueue failed");
                        ErrorCode::StoreUnavailable
                    }
                };
                Err(ProtocolError::new(code, e.to_string())
                    .with_id(msg.client_id)
                    .with_to(Some(msg.recipient)))
            }
        }
    }

    async fn reply(&mut self, dialect: Dialect, event: &Event<'_>) -> Flow {
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
    async fn refuse(&mut self, dialect: Dialect, e: ProtocolError) -> Flow {
        tracing::debug!(user = ?self.user, code = e.code.as_str(), message = %e.message, "refused frame");
        inc(&self.app.metrics.errors);
        if self.reply(dialect, &Event::Error(&e)).await == Flow::Close {
            return Flow::Close;
        }
        // A store outage is not the client's fault: a client retrying through one must
        // not be closed as a protocol offender.
        if e.code == ErrorCode::StoreUnavailable {
            return Flow::Continue;
        }
        self.errors_in_row += 1;
        if self.errors_in_row >= self.app.config.limits.max_consecutive_errors {
            return self.close(CLOSE_PROTOCOL_ERROR, "protocol_error").await;
        }
        Flow::Continue
    }

    /// A `login` frame without credentials: only in open mode, or naming the user a
    /// token in the URL already proved.
    async fn login(&mut self, user: String) -> Flow {
        match &self.authenticated {
            Some(me) if *me == user => self.identify(user, Dialect::Pigeon, false).await,
            Some(me) => {
                let e = ProtocolError::new(
                    ErrorCode::BadCredentials,
                    format!("this connection's token was issued to {me}, not to {user}"),
                );
                self.refuse_and_close(Dialect::Pigeon, e, CLOSE_AUTH).await
            }
            None if self.app.auth.required() => {
                let e = ProtocolError::new(
                    ErrorCode::AuthRequired,
                    "this server needs a password or token: {\"type\":\"login\",\"user\":...,\"password\":...}",
                );
                self.refuse_and_close(Dialect::Pigeon, e, CLOSE_AUTH).await
            }
            None => self.identify(user, Dialect::Pigeon, false).await,
        }
    }

    /// A `login` frame with a password (and user) or a token.
    async fn authenticate(
        &mut self,
        user: Option<String>,
        password: Option<String>,
        token: Option<String>,
    ) -> Flow {
        let (app, ip) = (self.app.clone(), self.peer);
        let proved = match (&user, password, token) {
            (_, _, Some(t)) => app.auth.verify_token(&app.store, &t, ip).await,
            (Some(u), Some(p), None) => app
                .auth
                .check_password(&app.store, u, &p, ip)
                .await
                .map(|_| u.clone()),
            _ => Err(crate::auth::AuthError::BadCredentials),
        };
        match proved {
            Ok(proved) if user.as_ref().is_none_or(|u| *u == proved) => {
                self.identify(proved, Dialect::Pigeon, false).await
            }
            Ok(proved) => {
                let e = ProtocolError::new(
                    ErrorCode::BadCredentials,
                    format!("the token was issued to {proved}, not to the user named"),
                );
                self.refuse_and_close(Dialect::Pigeon, e, CLOSE_AUTH).await
            }
            Err(e) => {
                self.refuse_and_close(Dialect::Pigeon, e.to_protocol(), CLOSE_AUTH)
                    .await
            }
        }
    }

    /// Whether the first hash frame's sender may identify this session: `None` when it
    /// may, else how the refusal went.
    async fn check_hash_sender(&mut self, from: &str) -> Option<Flow> {
        match &self.authenticated {
            Some(me) if me == from => None,
            Some(me) => {
                let e = ProtocolError::new(
                    ErrorCode::WrongSender,
                    format!("this session belongs to {me}"),
                );
                Some(self.refuse(Dialect::Hash, e).await)
            }
            None if self.app.auth.required() => {
                let e = ProtocolError::new(
                    ErrorCode::AuthRequired,
                    "open /ws?token=... (from POST /api/login) to use the hash dialect",
                );
                Some(self.refuse_and_close(Dialect::Hash, e, CLOSE_AUTH).await)
            }
            None => None,
        }
    }

    /// Spends a token of the frame-rate bucket (`ping`: of the ping bucket): `None` lets
    /// the frame through; otherwise it was dropped with a `rate_limited` error (and maybe
    /// the session closed). A dropped Pigeon frame's error carries its `id` (`text`: the
    /// frame, if text). A ping's pong may already be on its way: tungstenite answers
    /// pings as it reads them.
    async fn rate_check(&mut self, ping: bool, text: Option<&str>) -> Option<Flow> {
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
    async fn over_rate(&mut self, verdict: Rate, what: String, id: Option<String>) -> Option<Flow> {
        inc(&self.app.metrics.errors);
        let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
        let e = ProtocolError::new(ErrorCode::RateLimited, what).with_id(id);
        if verdict == Rate::Close {
            tracing::info!(user = ?self.user, peer = ?self.peer, "closing a flooding connection");
            if let Some(ip) = self.peer {
                self.app.flood_ban.flooded(ip, Instant::now());
            }
            return Some(self.refuse_and_close(dialect, e, CLOSE_RATE_LIMITED).await);
        }
        Some(self.reply(dialect, &Event::Error(&e)).await)
    }

    /// Sends an error frame, then closes with `code` (the error code is the reason).
    async fn refuse_and_close(&mut self, dialect: Dialect, e: ProtocolError, code: u16) -> Flow {
        tracing::debug!(user = ?self.user, peer = ?self.peer, code = e.code.as_str(), message = %e.message, "closing session");
        inc(&self.app.metrics.errors);
        self.reply(dialect, &Event::Error(&e)).await;
        self.close(code, e.code.as_str()).await
    }

    async fn close(&mut self, code: u16, reason: &'static str) -> Flow {
        self.push(Outgoing::Close(code, reason)).await;
        Flow::Close
    }

    async fn push(&mut self, out: Outgoing) -> Flow {
        // Boxed: flushing answers through `push` again (with nothing pending by then).
        if !self.pending.is_empty() && Box::pin(self.flush_sends()).await == Flow::Close {
            return Flow::Close;
        }
        match self.tx.send(out).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close, // the writer is gone: the socket is dead
        }
    }
}

/// Records who may download a finished blob (`GET /api/blobs/{key}`). Without it the
/// blob is still delivered, but its links do not work: logged, not refused.
async fn record_blob(app: &App, user: &str, to: &str, meta: &BlobMeta) {
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
fn guess_dialect(text: &str) -> Dialect {
    if hash::looks_like(text) {
        Dialect::Hash
    } else if pigeon::is_pigeon_frame(text) {
        Dialect::Pigeon
    } else {
        Dialect::SeedJson
    }
}

/// Waiting for the session(s) a login replaced to finish.
type Handover = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>;

/// Why streaming a stored blob stopped.
enum BlobOut {
    /// The client's socket failed: the session ends.
    Socket(Exit),
    /// The blob could not be read: the client is told, the session goes on.
    Store(StoreError),
}

/// The writer ends for one of these.
enum Exit {
    /// The socket failed; nothing more can be written.
    Broken,
    /// A close frame was sent.
    Closed,
}

struct Writer<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    app: Arc<App>,
    shared: Arc<SessionShared>,
    /// Set by `Start`; deliveries before it are left to the mailbox flush.
    user: Option<String>,
    dialect: Dialect,
    /// Highest seq written in this session.
    last_sent: u64,
    /// Every seq written in this session (never written twice).
    written: SeqRanges,
    /// Something was written since the last flush.
    unflushed: bool,
    /// Messages written since the last acknowledgement on write (legacy dialects).
    unacked_writes: u64,
    /// The wait for a replaced session, cut short because this one was replaced too.
    unfinished_handover: Option<Handover>,
    /// Blobs arriving live, by key, with the stream number this client sees them on.
    live_blobs: HashMap<Arc<str>, u32>,
    next_stream: u32,
    write_timeout: Duration,
    /// `http(s)://host` the client reached this server at, for download links.
    links: Option<Arc<str>>,
}

impl<S> Writer<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Outgoing>,
        mut stop: watch::Receiver<Option<StopReason>>,
    ) {
        let end = self.serve(&mut rx, &mut stop).await;
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
                Some(StopReason::Replaced) => match self.write_event(&Event::Kicked).await {
                    Ok(()) => self.close(CLOSE_REPLACED, "session_replaced").await,
                    Err(e) => Err(e),
                },
                Some(StopReason::Shutdown) => {
                    self.close(CLOSE_GOING_AWAY, "server shutting down").await
                }
                Some(StopReason::Closed) | None => self.flush().await,
            };
        }
        self.ack_written().await;
        if let Some(handover) = self.unfinished_handover.take() {
            handover.await;
        }
    }

    /// Writes until asked to stop (`Ok`) or the socket ends (`Err`).
    async fn serve(
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
                            self.handle(out).await?;
                        }
                    }
                    return Ok(());
                }
                out = rx.recv() => out,
                // Legacy dialects: record what was written once things are quiet, rather
                // than one store round trip per flush.
                _ = tokio::time::sleep(ACK_DELAY), if self.ack_due() => {
                    self.ack_written().await;
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
                self.catch_up(false).await?;
            }
            self.flush().await?;
            if self.unacked_writes >= ACK_BATCH {
                self.ack_written().await;
            }
        }
    }

    /// Written messages a legacy session has not recorded as received yet.
    fn ack_due(&self) -> bool {
        self.user.is_some() && self.dialect.acks_on_write() && self.unacked_writes > 0
    }

    async fn handle(&mut self, out: Outgoing) -> Result<(), Exit> {
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

    fn new_stream(&mut self) -> u32 {
        self.next_stream = self.next_stream.wrapping_add(1);
        self.next_stream
    }

    /// A blob message: ends a live relay, or streams the stored bytes.
    async fn write_blob(
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
    async fn stream_stored_blob(&mut self, stream: u32, key: &str) -> Result<(), BlobOut> {
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
    fn link(&self, key: &str, user: &str) -> String {
        crate::downloads::link(&self.app, self.links.as_deref(), key, user)
    }

    async fn start(
        &mut self,
        user: String,
        dialect: Dialect,
        generation: u64,
        replaced: Option<Arc<SessionShared>>,
        replaced_remote: Option<crate::cluster::KickWait>,
    ) -> Result<(), Exit> {
        let wait = Duration::from_millis(self.app.config.server.takeover_wait_ms);
        let user_for_log = user.clone();
        let mut handover: Handover = Box::pin(async move {
            if let Some(old) = replaced {
                if tokio::time::timeout(wait, old.wait_done()).await.is_err() {
                    tracing::warn!(user = %user_for_log, "replaced session did not finish in time");
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
        if dialect == Dialect::Pigeon {
            self.write_event(&Event::Synced).await?;
        }
        Ok(())
    }

    /// Writes every mailbox message after `last_sent`, in order, batch by batch.
    async fn catch_up(&mut self, offline: bool) -> Result<(), Exit> {
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
            for m in &msgs {
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

    async fn write_message(&mut self, msg: &StoredMessage, offline: bool) -> Result<(), Exit> {
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
        if let Ok(mut unacked) = self.shared.unacked.lock() {
            unacked.insert(msg.seq);
        }
        self.unacked_writes += 1;
        self.unflushed = true;
        Ok(())
    }

    async fn write_event(&mut self, event: &Event<'_>) -> Result<(), Exit> {
        let mut frames = Vec::with_capacity(2);
        protocol::format(self.dialect, event, |f| frames.push(f));
        for f in frames {
            self.write(Message::text(f)).await?;
        }
        Ok(())
    }

    async fn write(&mut self, msg: Message) -> Result<(), Exit> {
        match tokio::time::timeout(self.write_timeout, self.sink.feed(msg)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Exit::Broken),
        }
    }

    async fn flush(&mut self) -> Result<(), Exit> {
        match tokio::time::timeout(self.write_timeout, self.sink.flush()).await {
            Ok(Ok(())) => {}
            _ => return Err(Exit::Broken),
        }
        self.unflushed = false;
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &'static str) -> Result<(), Exit> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        self.sink
            .send(Message::Close(Some(frame)))
            .await
            .map_err(|_| Exit::Broken)?;
        self.unflushed = false;
        Ok(())
    }

    /// Legacy dialects cannot ack: what was flushed to the socket counts as received.
    async fn ack_written(&mut self) {
        let Some(user) = &self.user else { return };
        if !self.dialect.acks_on_write() || self.unflushed || self.unacked_writes == 0 {
            return;
        }
        let ranges = self.shared.take_acked(u64::MAX);
        let Some(&(_, highest)) = ranges.last() else {
            return;
        };
        match self.app.store.ack_ranges(user, &ranges).await {
            Ok(_) => {
                self.unacked_writes = 0;
                self.app.router.receipts(user, &self.shared, highest);
            }
            Err(e) => {
                self.shared.restore_unacked(&ranges);
                inc(&self.app.metrics.store_errors);
                tracing::warn!(%user, error = %e, "ack on write failed; will retry");
            }
        }
    }
}
