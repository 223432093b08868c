//! HTTP on the WebSocket port: the upgrade routes (`/ws`, `/web`, `/ws/<user>`,
//! `/web/<user>`), `/healthz`, `/metrics`, the web client from `static/` at `/`, and,
//! only with `[server] echo_route = true`, the test-only WebSocket echo at `/echo`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use tower_http::services::ServeDir;

use crate::app::App;
use crate::protocol::Dialect;
use crate::session::{self, Greeting};

/// What the HTTP handlers need besides the shared `App`.
pub struct Ctx {
    pub app: Arc<App>,
    pub tracker: TaskTracker,
    pub shutdown: watch::Receiver<bool>,
    pub ws_config: WebSocketConfig,
}

/// Kept alive by a connection, and by the WebSocket session it becomes: holds the
/// connection-limit permit.
#[derive(Clone)]
pub struct ConnGuard(pub Arc<dyn Send + Sync>);

pub fn routes(ctx: Arc<Ctx>) -> Router {
    let static_dir = ServeDir::new(&ctx.app.config.server.static_dir);
    let mut router = Router::new();
    if ctx.app.config.server.echo_route {
        tracing::warn!("test-only WebSocket echo route /echo is enabled");
        router = router.route("/echo", get(upgrade_echo));
    }
    router
        .route("/ws", get(upgrade_anonymous))
        .route("/web", get(upgrade_anonymous))
        .route("/ws/{user}", get(upgrade_named))
        .route("/web/{user}", get(upgrade_named))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback_service(static_dir)
        .with_state(ctx)
}

async fn upgrade_anonymous(
    State(ctx): State<Arc<Ctx>>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let greeting = match query.get("user") {
        Some(user) => Greeting::Named {
            user: user.clone(),
            dialect: Dialect::Pigeon,
        },
        None => Greeting::Anonymous,
    };
    upgrade(ctx, greeting, req)
}

async fn upgrade_named(
    State(ctx): State<Arc<Ctx>>,
    Path(user): Path<String>,
    req: Request,
) -> Response {
    upgrade(
        ctx,
        Greeting::Named {
            user,
            dialect: Dialect::SeedJson,
        },
        req,
    )
}

async fn upgrade_echo(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let limits = &ctx.app.config.limits;
    let queue = limits.session_queue;
    let write_timeout = Duration::from_secs(limits.write_timeout_secs);
    handshake(ctx, req, move |ws, ctx| {
        crate::echo::run(ws, queue, write_timeout, ctx.shutdown.clone())
    })
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
    handshake(ctx, req, move |ws, ctx| async move {
        session::run(ws, ctx.app.clone(), greeting, ctx.shutdown.clone()).await
    })
}

/// The upgraded socket every WebSocket route gets.
type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Checks the upgrade request, answers 101 and runs `serve` on the upgraded socket (with
/// the server's tungstenite settings) in a tracked task that holds the connection permit.
fn handshake<F, Fut>(ctx: Arc<Ctx>, mut req: Request, serve: F) -> Response
where
    F: FnOnce(Ws, Arc<Ctx>) -> Fut + Send + 'static,
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
    if *ctx.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let guard = req.extensions().get::<ConnGuard>().cloned();
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
        let ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(task_ctx.ws_config),
        )
        .await;
        serve(ws, task_ctx).await;
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

async fn healthz(State(ctx): State<Arc<Ctx>>) -> Response {
    let body = serde_json::json!({
        "status": "ok",
        "store": ctx.app.store.backend(),
        "online": ctx.app.router.online_count(),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.app.metrics.render(ctx.app.router.online_count()),
    )
        .into_response()
}
