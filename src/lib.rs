//! Pigeon: a point-to-point WebSocket messenger with store-and-forward delivery.
//!
//! `server::run` serves an already bound listener; everything else hangs off it:
//! `http` (routes, the WebSocket upgrade, the account API, downloads, and the test-only
//! echo of the `echo` feature), `session` (one connection's life), `router` (who is
//! online, take-over), `protocol` (the three wire dialects), `store` (the offline
//! mailbox), `config`, `metrics`, `client` (the terminal client), `transfer` (incoming
//! blobs), `links` (signed download links) and `cluster` (nodes through Redis).
//! Security: `auth` (passwords, tokens), `token`, `accounts` (`pigeon user ...`),
//! `revoke` (ending sessions whose account changed), `limits` (rate, throttles, caps, the
//! hashing pool), `escape` (client bytes in the log), `tls`, `origins` (which browser
//! pages may connect) and `web` (the embedded web client and the security headers of
//! every HTTP response). `wire` counts a connection's bytes and asks the kernel how many
//! the client's TCP acknowledged.

pub mod accounts;
pub mod app;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod escape;
pub mod http;
pub mod limits;
pub mod links;
pub mod message;
pub mod metrics;
pub mod names;
pub mod origins;
pub mod protocol;
pub mod ranges;
pub mod revoke;
pub mod router;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod token;
pub mod transfer;
pub mod web;
pub mod wire;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Shows an optional log field as its value, or `-` when absent (`ip=127.0.0.1`, not
/// `ip=Some(127.0.0.1)`): `tracing::info!(ip = %OrDash(&ip), ...)`.
pub struct OrDash<'a, T>(pub &'a Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}
