//! The JSON account API: `POST /api/login` (`{"user","password"}` → `{"token",
//! "expires_at"}`) and, when `[auth] allow_register` is on, `POST /api/register`.
//! Errors are `{"error":"<code>","message":"..."}` with a matching HTTP status. Bodies must
//! be `Content-Type: application/json` (415 otherwise), so no cross-site form or other
//! "simple" request can log in or spend a user's failed-login budget, and a browser
//! `Origin` must be one the server allows (403 otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{AuthError, Issued};
use crate::escape::Escaped;
use crate::names::{canonical_username, USERNAME_RULE};
use crate::store::StoreError;

use super::ctx::{error, origin_refusal, Ctx};

/// The account routes; their bodies are read up to `[limits] api_max_body_bytes` (413
/// beyond, and the address counts toward the flood ban: see `count_oversized`).
pub fn routes(ctx: Arc<Ctx>) -> Router<Arc<Ctx>> {
    let max_body = ctx.app.config.limits.api_max_body_bytes;
    Router::new()
        .route("/api/login", post(login))
        .route("/api/register", post(register))
        .layer(DefaultBodyLimit::max(max_body))
        .route_layer(middleware::from_fn_with_state(ctx, count_oversized))
}

/// No real client sends a login or registration larger than the limit: an address that
/// does counts toward `[limits] flood_ban_after`, as a flooding WebSocket does, so that a
/// flood of huge bodies is soon dropped on accept instead of read request by request.
async fn count_oversized(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let res = next.run(req).await;
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ctx.app.flood_ban.flooded(peer.ip(), Instant::now());
    }
    res
}

#[derive(Deserialize)]
struct Credentials {
    user: String,
    password: String,
}

fn auth_error(e: AuthError) -> Response {
    match e {
        AuthError::BadCredentials | AuthError::BadToken(_) => {
            error(StatusCode::UNAUTHORIZED, "bad_credentials", e)
        }
        AuthError::TokenExpired => error(StatusCode::UNAUTHORIZED, "token_expired", e),
        AuthError::Throttled { try_again_in } => {
            let body = json!({
                "error": "too_many_attempts",
                "message": e.to_string(),
                "try_again_in": try_again_in,
            });
            let mut res = (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response();
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(try_again_in));
            res
        }
        AuthError::ThrottleFull => error(StatusCode::TOO_MANY_REQUESTS, "too_busy", e),
        AuthError::HashBusy => {
            let mut res = error(StatusCode::SERVICE_UNAVAILABLE, "too_busy", e);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1));
            res
        }
        AuthError::InvalidPassword(m) => error(StatusCode::BAD_REQUEST, "weak_password", m),
        AuthError::InvalidUser => error(StatusCode::BAD_REQUEST, "invalid_user", e),
        AuthError::Store(StoreError::UserExists(u)) => error(
            StatusCode::CONFLICT,
            "user_exists",
            format!("user {} already exists", Escaped(&u)),
        ),
        other => {
            tracing::warn!(error = %other, "login failed on the server side");
            error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", other)
        }
    }
}

/// Refuses what no browser page of ours sends: a body that is not `application/json`
/// (a cross-site form can post text/plain without asking), or a page from an origin the
/// server does not allow (e.g. a DNS-rebinding page).
fn refuse_foreign(ctx: &Ctx, headers: &HeaderMap) -> Option<Response> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the credentials as JSON with Content-Type: application/json",
        ));
    }
    origin_refusal(ctx, headers, "account API request")
}

/// The credentials in a request body, or the 400 answer (boxed: a `Response` is large).
fn parse(body: &Bytes) -> Result<Credentials, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {{\"user\":\"...\",\"password\":\"...\"}}: {e}"),
        ))
    })
}

fn issued(status: StatusCode, user: &str, t: Issued) -> Response {
    let body = json!({"user": user, "token": t.token, "expires_at": t.expires_at});
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn login(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_foreign(&ctx, &headers) {
        return refused;
    }
    let c = match parse(&body) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let app = &ctx.app;
    match app
        .auth
        .login(&app.store, &c.user, &c.password, Some(peer.ip()))
        .await
    {
        Ok(t) => issued(StatusCode::OK, &t.user.clone(), t),
        Err(e) => auth_error(e),
    }
}

async fn register(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_foreign(&ctx, &headers) {
        return refused;
    }
    let app = &ctx.app;
    if !app.config.auth.allow_register {
        return error(
            StatusCode::FORBIDDEN,
            "registration_disabled",
            "self-registration is off ([auth] allow_register); ask the operator for an account",
        );
    }
    let c = match parse(&body) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let Some(user) = canonical_username(&c.user) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_user",
            format!(
                "\"{}\" is not a valid username: {USERNAME_RULE}",
                Escaped(&c.user)
            ),
        );
    };
    let min = app.config.auth.min_password_chars;
    if c.password.chars().count() < min {
        return error(
            StatusCode::BAD_REQUEST,
            "weak_password",
            format!("a password must have at least {min} characters"),
        );
    }
    // Reserved before the hash is computed (and kept: every attempt that gets this far
    // costs a hash), so parallel requests cannot all slip under the cap.
    if let Err(wait) = app.register_limit.reserve(peer.ip(), Instant::now()) {
        let secs = wait.as_secs().max(1);
        let mut res = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_registrations",
            format!(
                "at most {} registrations per address within {} s ([limits] register_per_ip); try again in {secs} s",
                app.config.limits.register_per_ip, app.config.limits.register_window_secs
            ),
        );
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return res;
    }
    let hash = match app.auth.hash_new_password(&c.password).await {
        Ok(h) => h,
        Err(e) => return auth_error(e),
    };
    if let Err(e) = app.store.create_user(&user, &hash).await {
        return auth_error(e.into());
    }
    tracing::info!(%user, ip = %peer.ip(), "account registered");
    issued(StatusCode::CREATED, &user, app.auth.issue(&user, &hash))
}
