//! The WebSocket upgrade routes (`/ws`, `/web`, `/ws/<user>`, `/web/<user>`): who the
//! client is (`resolve`: the claimed name checked against a `?token=` or `Authorization:
//! Bearer` token), the RFC 6455 handshake (`handshake`, after the `Origin` check), and the
//! tungstenite settings of the upgraded socket (`websocket_config`,
//! `session_websocket_config`). The socket then belongs to `session::run`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::ctx::{origin_refusal, request_token, ConnGuard, Ctx};
use crate::config::Config;
use crate::names::canonical_username;
use crate::protocol::close;
use crate::protocol::{Dialect, ErrorCode, ProtocolError};
use crate::session::{self, Greeting};
use crate::wire::{ReadAhead, Wire};

/// The tungstenite settings every session uses, from `[websocket]` and `[limits]`.
pub fn websocket_config(config: &Config) -> WebSocketConfig {
    let ws = &config.websocket;
    WebSocketConfig::default()
        .read_buffer_size(ws.read_buffer_bytes)
        .write_buffer_size(ws.write_buffer_bytes)
        .max_write_buffer_size(ws.max_write_buffer_bytes.max(ws.write_buffer_bytes + 1))
        .max_message_size(Some(config.limits.max_message_bytes))
        .max_frame_size(Some(config.limits.max_message_bytes))
}

/// The settings of chat sessions: as `websocket_config`, but frames up to
/// `limits.legacy_binary_max_bytes` are read, so that a tutorial client's file (one raw
/// binary frame) reaches the session, which holds every other kind of frame to its own
/// limit (`max_text_bytes`, `max_message_bytes`).
pub fn session_websocket_config(config: &Config) -> WebSocketConfig {
    let most = config
        .limits
        .max_message_bytes
        .max(config.limits.legacy_binary_max_bytes);
    websocket_config(config)
        .max_message_size(Some(most))
        .max_frame_size(Some(most))
}

/// `/ws`, `/web`: Pigeon JSON (or the hash dialect), the user from `?user=`, a token, or
/// a login frame later.
pub async fn upgrade_anonymous(
    State(ctx): State<Arc<Ctx>>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let token = request_token(&query, req.headers());
    let claimed = query.get("user").cloned();
    let greeting = resolve(&ctx, claimed, Dialect::Pigeon, token, peer_ip(&req)).await;
    upgrade(ctx, greeting, req)
}

/// `/ws/<user>`, `/web/<user>`: the seed JSON dialect (or the hash dialect) as `user`.
pub async fn upgrade_named(
    State(ctx): State<Arc<Ctx>>,
    Path(user): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let token = request_token(&query, req.headers());
    let greeting = resolve(&ctx, Some(user), Dialect::SeedJson, token, peer_ip(&req)).await;
    upgrade(ctx, greeting, req)
}

fn peer_ip(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Who the upgrading client is: the name it claims (path or `?user=`) checked against
/// its token. In password mode a claimed name without a token is refused.
async fn resolve(
    ctx: &Ctx,
    claimed: Option<String>,
    dialect: Dialect,
    token: Option<String>,
    ip: Option<IpAddr>,
) -> Greeting {
    let app = &ctx.app;
    let refused = |error: ProtocolError| Greeting::Refused {
        dialect,
        error,
        close: close::AUTH,
    };
    let Some(token) = token else {
        return match claimed {
            Some(_) if app.auth.required() => refused(ProtocolError::new(
                ErrorCode::AuthRequired,
                "log in first: add ?token= (from POST /api/login) or an Authorization: \
                 Bearer header, or open /ws and send a login frame with user and password",
            )),
            Some(user) => Greeting::Named {
                user,
                dialect,
                credential: None,
            },
            None => Greeting::Anonymous,
        };
    };
    match app.auth.verify_token(&app.store, &token, ip).await {
        Ok(proof) => match claimed {
            Some(c) if canonical_username(&c).as_deref() != Some(proof.user.as_str()) => {
                refused(ProtocolError::new(
                    ErrorCode::BadCredentials,
                    format!("this token was issued to {}, not to {c:?}", proof.user),
                ))
            }
            Some(_) => Greeting::Named {
                user: proof.user,
                dialect,
                credential: Some(proof.credential),
            },
            None => Greeting::Authenticated {
                user: proof.user,
                credential: proof.credential,
            },
        },
        Err(e) => {
            tracing::debug!(error = %e, "token refused at upgrade");
            refused(e.to_protocol())
        }
    }
}

fn bad_request(msg: &'static str) -> Response {
    (StatusCode::BAD_REQUEST, msg).into_response()
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// Completes the RFC 6455 handshake and hands the socket to a session task.
fn upgrade(ctx: Arc<Ctx>, greeting: Greeting, req: Request) -> Response {
    // Only a socket that may speak a tutorial dialect gets the large frame limit of their
    // whole-file binary frames (`limits.legacy_binary_max_bytes`): a Pigeon JSON session
    // sends files in chunks, and in password mode a socket that has not proved its user
    // (no token in the URL) can only log in; so neither can make the server buffer more
    // than `limits.max_message_bytes`.
    let legacy_possible = match &greeting {
        Greeting::Named { dialect, .. } => *dialect != Dialect::Pigeon,
        Greeting::Authenticated { .. } => true,
        Greeting::Anonymous => !ctx.app.auth.required(),
        Greeting::Refused { .. } => false,
    };
    let ws_config = match legacy_possible {
        true => ctx.ws_config,
        false => websocket_config(&ctx.app.config),
    };
    // In password mode a socket without a token can only log in: it may send no more
    // than a login's worth of bytes until it has (`limits.prelogin_bytes`).
    let budget = match (&greeting, ctx.app.auth.required()) {
        (Greeting::Anonymous, true) => Some(ctx.app.config.limits.prelogin_bytes as u64),
        _ => None,
    };
    let links = crate::links::base(req.headers(), ctx.app.config.tls.enabled());
    // No `async` block around `session::run`: it would hold a second copy of the socket.
    handshake(ctx, req, ws_config, move |ws, ctx, peer, wire| {
        if let (Some(bytes), Some(wire)) = (budget, &wire) {
            wire.limit_reads(bytes);
        }
        session::run(
            ws,
            ctx.app.clone(),
            greeting,
            peer,
            wire,
            links,
            ctx.shutdown.clone(),
        )
    })
}

/// The upgraded socket every WebSocket route gets.
pub(super) type Ws = WebSocketStream<ReadAhead<TokioIo<Upgraded>>>;

/// Checks the upgrade request, answers 101 and runs `serve` on the upgraded socket (with
/// the server's tungstenite settings) in a tracked task that holds the connection permit.
/// `serve` also gets the client's address and the connection's byte count (`Wire`, put
/// into the request by `server::connection`).
pub(super) fn handshake<F, Fut>(
    ctx: Arc<Ctx>,
    mut req: Request,
    ws_config: WebSocketConfig,
    serve: F,
) -> Response
where
    F: FnOnce(Ws, Arc<Ctx>, Option<IpAddr>, Option<Arc<Wire>>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let headers = req.headers();
    if !header_has(headers, header::CONNECTION, "upgrade")
        || !header_has(headers, header::UPGRADE, "websocket")
    {
        return bad_request(
            "this is a WebSocket endpoint: send Connection: upgrade and Upgrade: websocket\n",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::SEC_WEBSOCKET_VERSION, "13")],
            "only WebSocket version 13 is supported\n",
        )
            .into_response();
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad_request("Sec-WebSocket-Key is missing\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    if let Some(refused) = origin_refusal(&ctx, headers, "WebSocket") {
        return refused;
    }
    if *ctx.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let guard = req.extensions().get::<ConnGuard>().cloned();
    let peer = peer_ip(&req);
    let wire = req.extensions().get::<Arc<Wire>>().cloned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_ctx = ctx.clone();
    ctx.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let chunk = task_ctx.app.config.websocket.read_ahead_bytes;
        let socket = ReadAhead::new(TokioIo::new(upgraded), chunk, wire.clone());
        let ws = WebSocketStream::from_raw_socket(socket, Role::Server, Some(ws_config)).await;
        serve(ws, task_ctx, peer, wire).await;
        drop(guard);
    });
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    res
}
