//! Test-only WebSocket echo (`GET /echo`): compiled only with the cargo feature `echo`
//! (which the integration tests turn on, see `Cargo.toml`), served only with
//! `[server] echo_route = true`. Every text and binary message comes back unchanged. It
//! exists so that a WebSocket conformance suite (Autobahn|Testsuite, see
//! `.ci/autobahn.sh`) exercises the same upgrade, the same tungstenite settings and the
//! same shape as real sessions: a reader, and a writer task that owns the sink and is fed
//! through a bounded channel.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::ctx::Ctx;
use super::upgrade::{handshake, websocket_config};
use crate::protocol::close;

/// `router` with `/echo` when `[server] echo_route` is on.
pub fn route(router: Router<Arc<Ctx>>, ctx: &Ctx) -> Router<Arc<Ctx>> {
    if !ctx.app.config.server.echo_route {
        return router;
    }
    tracing::warn!("test-only WebSocket echo route /echo is enabled");
    router.route("/echo", get(upgrade))
}

/// `/echo`: the handshake and settings of every WebSocket route, then `run`.
async fn upgrade(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let limits = &ctx.app.config.limits;
    let queue = limits.session_queue;
    let write_timeout = Duration::from_secs(limits.write_timeout_secs);
    let ws_config = websocket_config(&ctx.app.config);
    handshake(ctx, req, ws_config, move |ws, ctx, _peer, _wire| {
        run(ws, queue, write_timeout, ctx.shutdown.clone())
    })
}

/// What the reader hands the writer.
enum Out {
    Echo(Message),
    Close(u16, &'static str),
}

/// Echoes until the peer closes, the socket fails, or the server shuts down.
async fn run<S>(
    ws: WebSocketStream<S>,
    queue: usize,
    write_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Out>(queue.max(1));

    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(out) = next.take() {
                let fed = match out {
                    Out::Echo(msg) => tokio::time::timeout(write_timeout, sink.feed(msg)).await,
                    Out::Close(code, reason) => {
                        let frame = CloseFrame {
                            code: CloseCode::from(code),
                            reason: reason.into(),
                        };
                        let _ = tokio::time::timeout(
                            write_timeout,
                            sink.send(Message::Close(Some(frame))),
                        )
                        .await;
                        return;
                    }
                };
                if !matches!(fed, Ok(Ok(()))) {
                    return;
                }
                next = rx.try_recv().ok();
            }
            match tokio::time::timeout(write_timeout, sink.flush()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        // The reader is done: write what tungstenite still holds (the close reply).
        let _ = tokio::time::timeout(write_timeout, sink.flush()).await;
    });

    loop {
        let frame = tokio::select! {
            biased;
            _ = crate::shutdown::shutdown_requested(&mut shutdown) => {
                let _ = tx.send(Out::Close(close::GOING_AWAY, "server shutting down")).await;
                break;
            }
            // The writer gave up (socket broken, write timeout): nothing can be echoed.
            _ = tx.closed() => break,
            frame = stream.next() => frame,
        };
        let out = match frame {
            None => break,
            Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => Out::Echo(msg),
            // Pings are answered by tungstenite itself; a close frame ends the stream.
            Some(Ok(_)) => continue,
            Some(Err(tungstenite::Error::Capacity(e))) => {
                tracing::debug!(error = %e, "echo: message too big");
                let _ = tx.send(Out::Close(close::TOO_BIG, "message too big")).await;
                break;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "echo: read error");
                break;
            }
        };
        if tx.send(out).await.is_err() {
            break; // the writer is gone: the socket is dead
        }
    }
    drop(tx);
    if writer.await.is_err() {
        tracing::debug!("echo writer panicked");
    }
}
