//! HTTP on the WebSocket port. `routes` assembles the axum `Router` from the parts below;
//! every response gets the security headers of `web::SecurityHeaders`, and anything no
//! route takes is the web client at `/` (built in, see `web`, or `[server] static_dir`).
//!
//! - `ctx`: what every handler shares (`Ctx`, `ConnGuard`, the `Origin` check, the JSON
//!   error body, a request's token); the other children import it, never this module.
//! - `upgrade`: the WebSocket routes (`/ws`, `/web`, `/ws/<user>`, `/web/<user>`), the
//!   handshake and the tungstenite settings.
//! - `api`: the account API (`/api/login`, `/api/register`).
//! - `downloads`: `GET /api/blobs/{key}` (the links themselves are `crate::links`).
//! - `status`: `/healthz` and `/metrics`.
//! - `echo`: the test-only WebSocket echo at `/echo`, compiled only with the cargo
//!   feature `echo` and served only with `[server] echo_route = true`.

pub mod api;
pub mod ctx;
pub mod downloads;
#[cfg(feature = "echo")]
mod echo;
pub mod status;
pub mod upgrade;

use std::sync::Arc;

use axum::middleware::map_response_with_state;
use axum::routing::get;
use axum::Router;
use tower_http::services::ServeDir;

pub use ctx::{ConnGuard, Ctx};

use crate::web::SecurityHeaders;

/// Every route of the server, with the security headers and the web client as fallback.
pub fn routes(ctx: Arc<Ctx>) -> Router {
    let security = Arc::new(SecurityHeaders::new(&ctx.origins));
    let router = Router::new()
        .route("/ws", get(upgrade::upgrade_anonymous))
        .route("/web", get(upgrade::upgrade_anonymous))
        .route("/ws/{user}", get(upgrade::upgrade_named))
        .route("/web/{user}", get(upgrade::upgrade_named))
        .route("/healthz", get(status::healthz))
        .route("/metrics", get(status::metrics))
        .merge(api::routes(ctx.clone()))
        .merge(downloads::routes());
    #[cfg(feature = "echo")]
    let router = echo::route(router, &ctx);
    let static_dir = &ctx.app.config.server.static_dir;
    let router = match static_dir.as_os_str().is_empty() {
        true => router.fallback(crate::web::embedded),
        false => router.fallback_service(ServeDir::new(static_dir)),
    };
    router
        .layer(map_response_with_state(security, crate::web::add_headers))
        .with_state(ctx)
}
