//! HTTP on the WebSocket port: the upgrade routes (`/ws`, `/web`, `/ws/<user>`,
//! `/web/<user>`), `/healthz`, `/metrics`, the account API (`api`), file downloads
//! (`downloads`), the web client at `/` (built in, see `web`, or from
//! `[server] static_dir`), and, only with `[server] echo_route = true`, the test-only
//! WebSocket echo at `/echo`. Every response gets the security headers of
//! `web::SecurityHeaders`. Before an upgrade it checks the `Origin` (see `origins`) and
//! resolves a token (`?token=` or `Authorization: Bearer`)
//! into the session's identity.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::map_response_with_state;
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
use crate::escape::Escaped;
use crate::names::canonical_username;
use crate::origins::Origins;
use crate::protocol::close;
use crate::protocol::{Dialect, ErrorCode, ProtocolError};
use crate::session::{self, Greeting};
use crate::web::SecurityHeaders;
use crate::wire::Wire;

/// What the HTTP handlers need besides the shared `App`.
pub struct Ctx {
    pub app: Arc<App>,
    pub tracker: TaskTracker,
    pub shutdown: watch::Receiver<bool>,
    pub ws_config: WebSocketConfig,
    /// Which browser pages may open WebSockets and use the account API.
    pub origins: Origins,
}

/// Kept alive by a connection, and by the WebSocket session it becomes: holds the
/// connection-limit permit.
#[derive(Clone)]
pub struct ConnGuard(pub Arc<dyn Send + Sync>);

pub fn routes(ctx: Arc<Ctx>) -> Router {
    let security = Arc::new(SecurityHeaders::new(&ctx.origins));
    let mut router = Router::new();
    if ctx.app.config.server.echo_route {
        tracing::warn!("test-only WebSocket echo route /echo is enabled");
        router = router.route("/echo", get(upgrade_echo));
    }
    router = router
        .route("/ws", get(upgrade_anonymous))
        .route("/web", get(upgrade_anonymous))
        .route("/ws/{user}", get(upgrade_named))
        .route("/web/{user}", get(upgrade_named))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(crate::api::routes(ctx.clone()))
        .merge(crate::downloads::routes());
    let static_dir = &ctx.app.config.server.static_dir;
    router = match static_dir.as_os_str().is_empty() {
        true => router.fallback(crate::web::embedded),
        false => router.fallback_service(ServeDir::new(static_dir)),
    };
    router
        .layer(map_response_with_state(security, crate::web::add_headers))
        .with_state(ctx)
}

async fn upgrade_anonymous(
    State(ctx): State<Arc<Ctx>>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let token = request_token(&query, &req);
    let claimed = query.get("user").cloned();
    let greeting = resolve(&ctx, claimed, Dialect::Pigeon, token, peer_ip(&req)).await;
    upgrade(ctx, greeting, req)
}

async fn upgrade_named(
    State(ctx): State<Arc<Ctx>>,
    Path(user): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let token = request_token(&query, &req);
    let greeting = resolve(&ctx, Some(user), Dialect::SeedJson, token, peer_ip(&req)).await;
    upgrade(ctx, greeting, req)
}

/// A session token from `?token=` or an `Authorization: Bearer` header.
fn request_token(query: &HashMap<String, String>, req: &Request) -> Option<String> {
    if let Some(t) = query.get("token") {
        return Some(t.clone());
    }
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
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

/// The refusal (403, saying which setting allows it) of a browser request whose `Origin`
/// is not one of `ctx.origins`; `None` lets it through, as it does requests without an
/// `Origin` (non-browser clients).
pub fn origin_refusal(ctx: &Ctx, headers: &HeaderMap, what: &str) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?;
    // Not visible ASCII: no browser sends that, and it must not reach the log raw.
    let origin = origin.to_str().unwrap_or("<not ASCII>");
    if ctx.origins.allows(origin) {
        return None;
    }
    let shown: String = origin.chars().take(200).collect();
    tracing::warn!(
        origin = %Escaped(origin),
        "{what} from a page at origin {shown:?} refused: to allow that page, add the origin to \
         [auth] allowed_origins in the config file or to PIGEON_AUTH_ALLOWED_ORIGINS \
         (comma-separated), or set [server] public_url if it is this server's own address; \
         allowed now: {}",
        ctx.origins.describe()
    );
    Some(
        (
            StatusCode::FORBIDDEN,
            format!(
                "a page at origin {shown:?} may not use this server; the operator can allow it in \
             [auth] allowed_origins (environment: PIGEON_AUTH_ALLOWED_ORIGINS, comma-separated)\n"
            ),
        )
            .into_response(),
    )
}

async fn upgrade_echo(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let limits = &ctx.app.config.limits;
    let queue = limits.session_queue;
    let write_timeout = Duration::from_secs(limits.write_timeout_secs);
    let ws_config = crate::server::websocket_config(&ctx.app.config);
    handshake(ctx, req, ws_config, move |ws, ctx, _peer, _wire| {
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
        false => crate::server::websocket_config(&ctx.app.config),
    };
    // In password mode a socket without a token can only log in: it may send no more
    // than a login's worth of bytes until it has (`limits.prelogin_bytes`).
    let budget = match (&greeting, ctx.app.auth.required()) {
        (Greeting::Anonymous, true) => Some(ctx.app.config.limits.prelogin_bytes as u64),
        _ => None,
    };
    let links = crate::downloads::link_base(&req, ctx.app.config.tls.enabled());
    handshake(ctx, req, ws_config, move |ws, ctx, peer, wire| async move {
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
        .await
    })
}

/// The upgraded socket every WebSocket route gets.
type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Checks the upgrade request, answers 101 and runs `serve` on the upgraded socket (with
/// the server's tungstenite settings) in a tracked task that holds the connection permit.
/// `serve` also gets the client's address and the connection's byte count (`Wire`, put
/// into the request by `server::connection`).
fn handshake<F, Fut>(
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
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config))
                .await;
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

async fn healthz(State(ctx): State<Arc<Ctx>>) -> Response {
    let mut body = serde_json::json!({
        "status": "ok",
        "store": ctx.app.store.backend(),
        "online": ctx.app.router.online_count(),
        "auth": ctx.app.config.auth.mode,
    });
    if let Some(c) = &ctx.app.cluster {
        body["node"] = c.node().into();
        if c.is_degraded() {
            body["status"] = "degraded".into();
            body["cluster"] = "redis unreachable: serving local users only".into();
        }
    }
    // A store that refuses writes (disk full, read-only) means every send fails: that is
    // not healthy, and a load balancer should hear it (503).
    let mut status = StatusCode::OK;
    if let Err(e) = ctx.app.store.check_writable().await {
        status = StatusCode::SERVICE_UNAVAILABLE;
        body["status"] = "degraded".into();
        body["store_error"] = e.to_string().into();
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.app.metrics.render(
            ctx.app.router.online_count(),
            ctx.app
                .cluster
                .as_deref()
                .map(crate::cluster::Cluster::figures),
        ),
    )
        .into_response()
}
