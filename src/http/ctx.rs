//! What every HTTP handler shares: `Ctx` (the `App`, the task tracker, the shutdown
//! signal, the WebSocket settings, the allowed origins), the connection's `ConnGuard`,
//! and the helpers of more than one route: the `Origin` check (`origin_refusal`), the
//! JSON error body (`error`) and the session token of a request (`request_token`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::escape::Escaped;
use crate::origins::Origins;

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

/// A JSON error response: `{"error":"<code>","message":"..."}` with `status`.
pub fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response {
    let body = json!({"error": code, "message": message.to_string()});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A session token from `?token=` or an `Authorization: Bearer` header.
pub fn request_token(query: &HashMap<String, String>, headers: &HeaderMap) -> Option<String> {
    if let Some(t) = query.get("token") {
        return Some(t.clone());
    }
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
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
