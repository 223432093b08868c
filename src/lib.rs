//! Pigeon: a point-to-point WebSocket messenger with store-and-forward delivery.
//!
//! `server::run` serves an already bound listener; everything else hangs off it:
//! `http` (routes and the WebSocket upgrade), `session` (one connection's life),
//! `router` (who is online, take-over), `protocol` (the three wire dialects),
//! `store` (the offline mailbox), `config`, `metrics`, `client` (the terminal client),
//! `transfer` (incoming blobs), `downloads` (`GET /api/blobs/{key}`), `cluster` (nodes through Redis), and `echo` (a test-only
//! WebSocket echo for conformance tests). Security: `auth` (passwords, tokens), `token`,
//! `api` (`/api/login`, `/api/register`), `accounts` (`pigeon user ...`), `limits` (rate,
//! throttles, caps) and `tls`.

pub mod accounts;
pub mod api;
pub mod app;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod downloads;
pub mod echo;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod ranges;
pub mod router;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod token;
pub mod transfer;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
