//! One WebSocket connection's life: learn who the user is (login frame, path, query or
//! the first hash frame), take over any older session of that user, then read requests
//! while a separate writer task owns the socket's sink.
//!
//! The writer is fed by one bounded channel (`Outgoing`): replies to this client and live
//! deliveries. Every message is in the store or in the session's own live mailbox
//! (`delivery::live`: taken at login, handed back at the end after writing what was not
//! acknowledged), so the writer can always fall back on the mailbox: at login it flushes
//! it, when a delivery found the queue full (`lagging`) it re-reads it, and when a live
//! delivery arrives out of order it reads the gap from it. It never sends a seq twice in
//! a session.
//!
//! Authentication (`[auth] mode = "password"`): identities from the URL arrive already
//! checked (`http::upgrade::resolve`); a login frame carries a password or token; a hash frame
//! identifies only a session whose token (in the URL) names its sender. Abuse limits
//! live here too: the frame rate bucket, the login timeout, and take-over damping.
//!
//! This file runs the session (`run`: start both halves, then the goodbye, the linger and
//! the last TCP acknowledgements); `reader.rs` reads and dispatches the client's frames,
//! `login.rs` learns the user, `writer.rs` owns the sink, and `handle.rs` holds what the
//! session shares with the router and with the session that replaces it.

pub mod handle;
mod login;
mod reader;
mod writer;

use reader::Reader;
use writer::{record_tcp_acks, TcpAcks, Writer};

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::app::App;
use crate::escape::EscapedOpt;
use crate::limits::TokenBucket;
use crate::metrics::{dec, inc};
use crate::protocol::{Dialect, ProtocolError};
use crate::ranges::SeqRanges;
use crate::transfer::Transfers;
use crate::wire::Wire;
use handle::{SessionShared, StopReason};
use std::collections::HashMap;

/// Legacy sessions ask the kernel which written messages the client's TCP acknowledged
/// after this much quiet (doubling, up to `ACK_POLL_MAX`, while nothing new was)...
const ACK_DELAY: Duration = Duration::from_millis(5);
/// How long a session's end waits for the answers to its last sends (live messages
/// are answered once acknowledged or written).
const ANSWERS_AT_END: Duration = Duration::from_secs(2);
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
///
/// Not an `async fn`: the socket is split, the writer started and the reader made before
/// the future is, so that the future does not carry them for its life (an `async fn`
/// keeps its arguments, and values it moved away, in its state).
pub fn run<S>(
    ws: WebSocketStream<S>,
    app: Arc<App>,
    greeting: Greeting,
    peer: Option<IpAddr>,
    wire: Option<Arc<Wire>>,
    links: Option<Arc<str>>,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    inc(&app.metrics.sessions_open);
    let (sink, stream) = ws.split();
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
    // Boxed: the writer's future would otherwise hold it twice (as argument and local).
    let writer = tokio::spawn(Box::new(writer).run(rx, shared.stop_signal()));

    // Boxed, as the writer.
    let reader = Box::new(Reader {
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
        answers: Default::default(),
        answering: false,
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
    });
    serve(
        stream,
        app,
        Box::new(greeting),
        reader,
        writer,
        shared,
        shutdown,
    )
}

/// `run` once the socket is split, the writer started and the reader made. Everything
/// but the wait for the client's next frame is boxed (`Box::pin`), so that an idle
/// session's future is only as large as that wait.
async fn serve<S>(
    mut stream: SplitStream<WebSocketStream<S>>,
    app: Arc<App>,
    greeting: Box<Greeting>,
    mut reader: Box<Reader>,
    writer: tokio::task::JoinHandle<TcpAcks>,
    shared: Arc<SessionShared>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stop = shared.stop_signal();
    let flow = match *greeting {
        Greeting::Anonymous => Flow::Continue,
        Greeting::Named {
            user,
            dialect,
            credential,
        } => {
            reader.credential = credential;
            Box::pin(reader.identify(user, dialect, true)).await
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
        } => Box::pin(reader.refuse_and_close(dialect, error, close)).await,
    };
    if flow == Flow::Continue {
        reader
            .read_loop(&mut stream, &mut stop, &mut shutdown)
            .await;
        // Sends read before the socket ended are stored all the same (and answered,
        // should the socket still take it).
        Box::pin(reader.flush_sends()).await;
        let _ = tokio::time::timeout(ANSWERS_AT_END, Box::pin(reader.write_answers(true))).await;
    }
    Box::pin(reader.transfers.abort_all("sender_gone")).await;
    shared.stop(StopReason::Closed);
    let shutdown_end = match *shutdown.borrow() {
        true => Some(Instant::now() + shutdown_linger(&app)),
        false => None,
    };
    Box::pin(end(app, shared, reader, writer, stream, shutdown_end)).await;
}

/// The session's end, after its reader stopped: the writer's goodbye, the last TCP
/// acknowledgements, the linger.
async fn end<S>(
    app: Arc<App>,
    shared: Arc<SessionShared>,
    reader: Box<Reader>,
    writer: tokio::task::JoinHandle<TcpAcks>,
    mut stream: SplitStream<WebSocketStream<S>>,
    shutdown_end: Option<Instant>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
        // What the user did not acknowledge is stored before the session counts as done
        // (a session taking over flushes it from the mailbox).
        let deleted = matches!(
            *shared.stop_signal().borrow(),
            Some(StopReason::Revoked(
                crate::protocol::KickReason::AccountDeleted
            ))
        );
        crate::delivery::release(&app, user, &shared.live, deleted).await;
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
pub(super) enum Flow {
    Continue,
    Close,
}
