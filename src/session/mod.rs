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

pub mod handle;

use std::collections::VecDeque;
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
use crate::delivery;
use crate::escape::{Escaped, EscapedOpt};
use crate::limits::{Rate, TokenBucket};
use crate::message::{BlobMeta, Body, StoredMessage};
use crate::metrics::{dec, inc};
use crate::names::canonical_username;
use crate::protocol::{
    self, canonical_or_error, close, hash, pigeon, seed_json, Dialect, ErrorCode, Event, Fate,
    KickReason, ProtocolError, Request,
};
use crate::ranges::SeqRanges;
use crate::store::{NewMessage, StoreError};
use crate::transfer::{new_blob_key, ChunkOutcome, Transfers};
use crate::wire::Wire;
use bytes::Bytes;
use handle::{BlobChunk, KickWait, Outgoing, SessionHandle, SessionShared, Start, StopReason};
use std::collections::HashMap;

/// The close reason of 1009: the settings that bound a WebSocket message.
const TOO_BIG_REASON: &str =
    "message too big: limits.max_message_bytes (legacy binary: limits.legacy_binary_max_bytes)";

/// The close reason of 1009 before login.
const PRELOGIN_TOO_BIG_REASON: &str = "too many bytes before login: limits.prelogin_bytes";

/// Queued frames the writer handles before it flushes the socket and looks around.
const WRITE_BATCH: usize = 256;
/// A legacy binary frame is written to blob storage in pieces of this size.
const LEGACY_SPOOL_PIECE: usize = 1024 * 1024;
/// Sends read off the socket before they are stored together.
const READ_BATCH: usize = 64;
/// Legacy sessions ask the kernel which written messages the client's TCP acknowledged
/// after this much quiet (doubling, up to `ACK_POLL_MAX`, while nothing new was)...
const ACK_DELAY: Duration = Duration::from_millis(5);
const ACK_POLL_MAX: Duration = Duration::from_millis(100);
/// ...or after each write batch while this many wait, whichever comes first (and when the
/// session ends). One `SIOCOUTQ` call per check, never one per message.
const ACK_BATCH: u64 = 64;
/// How long a legacy session's end waits for the client's TCP to acknowledge the last
/// messages written (see `settle`), before a session taking over may start.
const ACK_SETTLE: Duration = Duration::from_millis(250);
/// After the server's close frame, how long the socket is still read (and the bytes
/// dropped) while waiting for the client's close frame. Closing a socket with unread
/// bytes makes the kernel send a reset, and a reset discards what the client had not
/// read yet: the close frame with its reason, and the error frame before it.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// ...and at most this many frames: a client still sending more after the close frame is
/// flooding, and reading its flood would cost more than its reset.
const CLOSE_LINGER_FRAMES: usize = 256;

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// How the connection said who it is, before any frame arrived.
#[derive(Debug, Clone)]
pub enum Greeting {
    /// Nothing yet: a login frame or the first hash frame will tell.
    Anonymous,
    /// From the path or query; not yet canonicalized. In password mode only after a
    /// token proved it (`credential`: the stamp of the hash it was checked against).
    Named {
        user: String,
        dialect: Dialect,
        credential: Option<u64>,
    },
    /// A valid token (in the URL) proved the user; the first frame picks the dialect: a
    /// hash frame from this user, or a Pigeon `login` frame.
    Authenticated { user: String, credential: u64 },
    /// The upgrade's credentials were refused: send the error, then close with `close`.
    Refused {
        dialect: Dialect,
        error: ProtocolError,
        close: u16,
    },
}

/// Runs the session to its end. `wire` counts the connection's bytes (legacy dialects:
/// a message counts as received once the client's TCP acknowledged its bytes; without a
/// `wire` none ever does, and they stay in the mailbox).
pub async fn run<S>(
    ws: WebSocketStream<S>,
    app: Arc<App>,
    greeting: Greeting,
    peer: Option<IpAddr>,
    wire: Option<Arc<Wire>>,
    links: Option<Arc<str>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    inc(&app.metrics.sessions_open);
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::channel(app.config.limits.session_queue);
    let shared = SessionShared::new(app.config.limits.blob_relay_bytes);
    let read_budget = wire.clone();
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
        tcp_acks: TcpAcks::new(wire),
        ack_wait: ACK_DELAY,
        cut: shared.stop_signal(),
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
        read_budget,
        user: None,
        dialect: None,
        generation: 0,
        errors_in_row: 0,
        transfers: Transfers::default(),
        last_to: None,
        pending: Vec::new(),
        peer,
        authenticated: None,
        credential: None,
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
        Greeting::Named {
            user,
            dialect,
            credential,
        } => {
            reader.credential = credential;
            reader.identify(user, dialect, true).await
        }
        Greeting::Authenticated { user, credential } => {
            reader.authenticated = Some(user);
            reader.credential = Some(credential);
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
    let shutdown_end = match *shutdown.borrow() {
        true => Some(Instant::now() + shutdown_linger(&app)),
        false => None,
    };

    // The writer says goodbye (kick notice, close frame) and records its acks; meanwhile
    // what the client still sends is read and dropped, so that nothing unread is left in
    // the socket (closing it then would make the kernel reset the connection). Room for
    // its goodbye plus a hand-over it may still be waiting for.
    let mut drain = Drain::default();
    let mut grace = Duration::from_millis(app.config.server.takeover_wait_ms.saturating_mul(3));
    if let Some(end) = shutdown_end {
        grace = grace.min(end.saturating_duration_since(Instant::now()));
    }
    let abort = writer.abort_handle();
    let waited = tokio::time::timeout(grace, writer);
    tokio::pin!(waited);
    let mut tcp_acks = loop {
        tokio::select! {
            done = &mut waited => match done {
                Ok(Ok(acks)) => break Some(acks),
                Ok(Err(_)) => break None,
                Err(_) => {
                    tracing::debug!(user = %EscapedOpt(reader.user.as_deref()), "writer did not finish in time; aborting it");
                    abort.abort();
                    break None;
                }
            },
            frame = stream.next(), if !drain.done => drain.saw(frame),
        }
    };
    // Before the session counts as done (a session taking over starts then, with what is
    // still in the mailbox), give the client's TCP a moment to acknowledge what was
    // written last, or the next session would send it again.
    if let (Some(acks), Some(user)) = (tcp_acks.as_mut(), &reader.user) {
        let mut until = Instant::now() + ACK_SETTLE;
        if let Some(end) = shutdown_end {
            until = until.min(end);
        }
        settle(acks, &app, &shared, user, &mut stream, &mut drain, until).await;
    }
    if let Some(user) = &reader.user {
        app.router.unregister(user, reader.generation);
        if let Some(c) = &app.cluster {
            c.release(user, reader.generation).await;
        }
    }
    shared.mark_done();
    dec(&app.metrics.sessions_open);
    let mut linger_end = Instant::now() + CLOSE_LINGER;
    if let Some(end) = shutdown_end {
        linger_end = linger_end.min(end);
    }
    linger(&mut stream, &mut drain, linger_end).await;
    // What the client's TCP acknowledged while the goodbye and the linger went on counts
    // too (the socket is still open: `stream` holds it).
    if let (Some(mut acks), Some(user)) = (tcp_acks, &reader.user) {
        let ranges = acks.take_confirmed();
        record_tcp_acks(&app, &shared, user, &ranges).await;
    }
}

/// How long a session may still take, after the server was asked to shut down, for its
/// goodbye and linger: within `server.shutdown_grace_secs`, leaving room to exit.
fn shutdown_linger(app: &App) -> Duration {
    Duration::from_secs(app.config.server.shutdown_grace_secs).mul_f64(0.8)
}

/// Records what the client's TCP acknowledged of the legacy messages written last,
/// asking the kernel again (1 ms, doubling to 20 ms) until nothing waits or `until`;
/// reads and drops the client's frames meanwhile.
async fn settle<S>(
    acks: &mut TcpAcks,
    app: &App,
    shared: &SessionShared,
    user: &str,
    stream: &mut SplitStream<WebSocketStream<S>>,
    drain: &mut Drain,
    until: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut pause = Duration::from_millis(1);
    loop {
        let ranges = acks.take_confirmed();
        if !ranges.is_empty() && !record_tcp_acks(app, shared, user, &ranges).await {
            acks.restore(&ranges);
            return;
        }
        if acks.in_flight.is_empty() || Instant::now() >= until {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => pause = (pause * 2).min(Duration::from_millis(20)),
            frame = stream.next(), if !drain.done => drain.saw(frame),
        }
    }
}

/// The client's frames read after the session stopped listening to them.
#[derive(Default)]
struct Drain {
    frames: usize,
    /// The client closed (or the socket ended, or it kept flooding): stop reading.
    done: bool,
}

impl Drain {
    fn saw(&mut self, frame: Option<Result<Message, tungstenite::Error>>) {
        self.frames += 1;
        // After the client's close frame the next read completes the handshake and ends.
        if !matches!(frame, Some(Ok(_))) || self.frames >= CLOSE_LINGER_FRAMES {
            self.done = true;
        }
    }
}

/// Reads and drops whatever the client still sends until its close frame (or the end of
/// the socket, `CLOSE_LINGER_FRAMES` frames in all, or `until`), so that the socket
/// closes without a reset.
async fn linger<S>(stream: &mut SplitStream<WebSocketStream<S>>, drain: &mut Drain, until: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::sleep_until(until.into());
    tokio::pin!(deadline);
    while !drain.done {
        tokio::select! {
            _ = &mut deadline => return,
            frame = stream.next() => drain.saw(frame),
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
    /// The connection's byte counts: before login its reads are held to
    /// `limits.prelogin_bytes` (password mode), lifted once the user is known.
    read_budget: Option<Arc<Wire>>,
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
    /// `auth::credential_stamp` of the password hash this session's login was checked
    /// against (password mode): a later change of the account ends the session.
    credential: Option<u64>,
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
        let blob_idle = Duration::from_secs(self.app.config.limits.blob_idle_secs);
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
                    self.refuse_and_close(dialect, e, close::LOGIN_TIMEOUT).await;
                    return;
                }
                _ = crate::shutdown::shutdown_requested(shutdown) => {
                    self.shared.stop(StopReason::Shutdown);
                    return;
                }
                _ = sleep_until(self.transfers.next_deadline(blob_idle)) => {
                    if self.expire_transfers(blob_idle).await == Flow::Close {
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
    async fn expire_transfers(&mut self, idle: Duration) -> Flow {
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
        let user = match canonical_or_error(&user, "user") {
            Ok(user) => user,
            Err(e) if from_url => {
                self.refuse(dialect, e).await;
                return self.close(close::INVALID_USER, "invalid_user").await;
            }
            Err(e) => return self.refuse(dialect, e).await,
        };
        if self.app.router.is_online(&user) && !self.app.auth.allow_takeover(&user) {
            tracing::warn!(
                user = %Escaped(&user),
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
            return self
                .refuse_and_close(dialect, e, close::TAKEOVER_LOOP)
                .await;
        }
        let _ = self.shared.dialect.set(dialect);
        self.generation = self.app.router.next_generation();
        let handle = SessionHandle {
            generation: self.generation,
            credential: self.credential,
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        };
        let replaced = self.app.router.register(&user, handle).map(|old| {
            inc(&self.app.metrics.takeovers);
            tracing::info!(user = %Escaped(&user), old = old.generation, new = self.generation, "session taken over");
            old.shared.stop(StopReason::Replaced);
            old.shared
        });
        tracing::debug!(user = %Escaped(&user), generation = self.generation, ?dialect, "session identified");
        if let Some(wire) = &self.read_budget {
            wire.unlimit_reads();
        }
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
    async fn flush_sends(&mut self) -> Flow {
        if self.pending.is_empty() {
            return Flow::Continue;
        }
        let dialect = self.dialect.unwrap_or(Dialect::Pigeon);
        let batch = std::mem::take(&mut self.pending);
        let keys: Vec<(Option<String>, String)> = batch
            .iter()
            .map(|m| (m.client_id.clone(), m.recipient.clone()))
            .collect();
        let results = delivery::accept_many(&self.app, batch).await;
        for ((id, to), result) in keys.into_iter().zip(results) {
            let flow = match result {
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

    /// Accepts one message (`delivery::accept`). Returns (seq, fate, duplicate).
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
        delivery::accept(&self.app, msg).await
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

    /// A `login` frame without credentials: only in open mode, or naming the user a
    /// token in the URL already proved.
    async fn login(&mut self, user: String) -> Flow {
        match &self.authenticated {
            Some(me) if canonical_username(&user).as_ref() == Some(me) => {
                self.identify(user, Dialect::Pigeon, false).await
            }
            Some(me) => {
                let e = ProtocolError::new(
                    ErrorCode::BadCredentials,
                    format!("this connection's token was issued to {me}, not to {user:?}"),
                );
                self.refuse_and_close(Dialect::Pigeon, e, close::AUTH).await
            }
            None if self.app.auth.required() => {
                let e = ProtocolError::new(
                    ErrorCode::AuthRequired,
                    "this server needs a password or token: {\"type\":\"login\",\"user\":...,\"password\":...}",
                );
                self.refuse_and_close(Dialect::Pigeon, e, close::AUTH).await
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
        // In open mode anyone may claim any name: a client that brings a password anyway
        // (`pigeon chat --password`) is not refused for it.
        if let (Some(u), None, false) = (&user, &token, app.auth.required()) {
            return self.identify(u.clone(), Dialect::Pigeon, false).await;
        }
        let proved = match (&user, password, token) {
            (_, _, Some(t)) => app.auth.verify_token(&app.store, &t, ip).await,
            (Some(u), Some(p), None) => app.auth.check_password(&app.store, u, &p, ip).await,
            _ => Err(crate::auth::AuthError::BadCredentials),
        };
        match proved {
            Ok(proof)
                if user
                    .as_ref()
                    .is_none_or(|u| canonical_username(u).as_ref() == Some(&proof.user)) =>
            {
                self.credential = Some(proof.credential);
                self.identify(proof.user, Dialect::Pigeon, false).await
            }
            Ok(proof) => {
                let e = ProtocolError::new(
                    ErrorCode::BadCredentials,
                    format!(
                        "the token was issued to {}, not to the user named",
                        proof.user
                    ),
                );
                self.refuse_and_close(Dialect::Pigeon, e, close::AUTH).await
            }
            Err(e) => {
                self.refuse_and_close(Dialect::Pigeon, e.to_protocol(), close::AUTH)
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
                Some(self.refuse_and_close(Dialect::Hash, e, close::AUTH).await)
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
            tracing::info!(user = %EscapedOpt(self.user.as_deref()), peer = %crate::OrDash(&self.peer), "closing a flooding connection");
            if let Some(ip) = self.peer {
                self.app.flood_ban.flooded(ip, Instant::now());
            }
            return Some(self.refuse_and_close(dialect, e, close::RATE_LIMITED).await);
        }
        Some(self.reply(dialect, &Event::Error(&e)).await)
    }

    /// Sends an error frame, then closes with `code` (the error code is the reason).
    async fn refuse_and_close(&mut self, dialect: Dialect, e: ProtocolError, code: u16) -> Flow {
        tracing::debug!(user = %EscapedOpt(self.user.as_deref()), peer = %crate::OrDash(&self.peer), code = e.code.as_str(), message = %Escaped(&e.message), "closing session");
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

/// Completes once the session is replaced or the server shuts down.
async fn cut_short(stop: &mut watch::Receiver<Option<StopReason>>) {
    let cut =
        |r: &Option<StopReason>| matches!(r, Some(StopReason::Replaced | StopReason::Shutdown));
    if stop.wait_for(cut).await.is_err() {
        // The session's state is gone: nothing will ever cut.
        std::future::pending::<()>().await;
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
    /// A write waiting for the socket was given up: the session was replaced or the
    /// server is shutting down (what was queued stays in the mailbox; the goodbye follows).
    Cut,
}

/// Legacy dialects: messages written to the socket that the client's TCP has not
/// acknowledged yet. After each flush the connection's byte count (`Wire::written`) marks
/// the end of everything written before it; once the client's TCP acknowledged that many
/// bytes (`Wire::acked`) those messages count as received. Without a `Wire` none does.
struct TcpAcks {
    wire: Option<Arc<Wire>>,
    /// Written since the last flush.
    unflushed: SeqRanges,
    /// Flushed, oldest first: the byte count after the flush, and what it carried.
    in_flight: VecDeque<(u64, SeqRanges)>,
    /// Acknowledged by the client's TCP but not recorded yet (the store failed).
    confirmed: SeqRanges,
}

impl TcpAcks {
    fn new(wire: Option<Arc<Wire>>) -> TcpAcks {
        TcpAcks {
            wire,
            unflushed: SeqRanges::default(),
            in_flight: VecDeque::new(),
            confirmed: SeqRanges::default(),
        }
    }

    /// Everything written so far is in the kernel now.
    fn flushed(&mut self) {
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
    fn pending(&self) -> bool {
        !self.in_flight.is_empty() || !self.confirmed.is_empty()
    }

    /// The seqs whose bytes the client's TCP has acknowledged (one `SIOCOUTQ` call).
    fn take_confirmed(&mut self) -> Vec<(u64, u64)> {
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
    fn restore(&mut self, ranges: &[(u64, u64)]) {
        for &(lo, hi) in ranges {
            for seq in lo..=hi {
                self.confirmed.insert(seq);
            }
        }
    }
}

fn add_all(into: &mut SeqRanges, from: SeqRanges) {
    let mut from = from;
    for (lo, hi) in from.take_upto(u64::MAX) {
        for seq in lo..=hi {
            into.insert(seq);
        }
    }
}

/// Records legacy messages as received (`ranges`, confirmed by the client's TCP) and
/// sends the receipts; `false` when the store failed.
async fn record_tcp_acks(
    app: &App,
    shared: &SessionShared,
    user: &str,
    ranges: &[(u64, u64)],
) -> bool {
    let Some(&(_, highest)) = ranges.last() else {
        return true;
    };
    match app.store.ack_ranges(user, ranges).await {
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
    /// Messages written and not recorded as received yet (legacy dialects).
    unacked_writes: u64,
    /// Legacy dialects: written messages waiting for the client's TCP to acknowledge them.
    tcp_acks: TcpAcks,
    /// Current pause before asking the kernel again (`ACK_DELAY` .. `ACK_POLL_MAX`).
    ack_wait: Duration,
    /// Fires when the session is replaced or the server shuts down: writes waiting for a
    /// slow client give up, so the goodbye can go out.
    cut: watch::Receiver<Option<StopReason>>,
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
    /// Serves until the session stops; returns the legacy messages still waiting for the
    /// client's TCP, for one last look after the linger.
    async fn run(
        mut self,
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
                    self.goodbye(
                        Some(KickReason::Replaced),
                        close::REPLACED,
                        "session_replaced",
                        wait,
                    )
                    .await
                }
                Some(StopReason::Revoked(reason)) => {
                    let wait = Duration::from_millis(self.app.config.server.takeover_wait_ms);
                    self.goodbye(Some(reason), close::AUTH, reason.as_str(), wait)
                        .await
                }
                Some(StopReason::Shutdown) => {
                    let wait = shutdown_linger(&self.app) / 2;
                    self.goodbye(None, close::GOING_AWAY, "server shutting down", wait)
                        .await
                }
                Some(StopReason::Closed) | None => self.flush().await,
            };
        }
        self.ack_written().await;
        if let Some(handover) = self.unfinished_handover.take() {
            handover.await;
        }
        self.tcp_acks
    }

    /// The last frames of a replaced or shut down session: the kick notice (`kicked`) and
    /// the close frame, written even when the client is slow (after what tungstenite
    /// still buffers), for at most `wait`.
    async fn goodbye(
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
                // Legacy dialects: record what the client's TCP acknowledged once things
                // are quiet, rather than one syscall and store round trip per flush.
                _ = tokio::time::sleep(self.ack_wait), if self.ack_due() => {
                    self.ack_wait = match self.ack_written().await {
                        true => ACK_DELAY,
                        false => (self.ack_wait * 2).min(ACK_POLL_MAX),
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
        self.user.is_some() && self.dialect.acks_on_write() && self.tcp_acks.pending()
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
        if self.dialect.acks_on_write() {
            self.tcp_acks.unflushed.insert(msg.seq);
        } else if let Ok(mut unacked) = self.shared.unacked.lock() {
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

    /// Queues a frame (tungstenite writes it out as its buffer fills). Gives up after the
    /// write timeout, or when the session is replaced or the server shuts down while the
    /// socket has no room (`Exit::Cut`: the frame was not queued).
    async fn write(&mut self, msg: Message) -> Result<(), Exit> {
        tokio::select! {
            biased;
            done = tokio::time::timeout(self.write_timeout, self.sink.feed(msg)) => match done {
                Ok(Ok(())) => Ok(()),
                _ => Err(Exit::Broken),
            },
            _ = cut_short(&mut self.cut) => Err(Exit::Cut),
        }
    }

    async fn flush(&mut self) -> Result<(), Exit> {
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
        self.tcp_acks.flushed();
        Ok(())
    }

    /// Legacy dialects cannot ack: a written message counts as received once the client's
    /// TCP acknowledged its bytes. Records those; `true` when it recorded any.
    async fn ack_written(&mut self) -> bool {
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
