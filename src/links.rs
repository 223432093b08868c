//! Signed download links: `/api/blobs/{key}?user=&expires=&sig=`, an HMAC under the
//! server secret (`auth`) over key, user and expiry, valid `[limits] blob_link_secs`.
//! The session hands them out with a file (`link`, absolute with `base`), the download
//! route checks them (`verify`), and `sweep_acked_blobs` keeps an acknowledged blob until
//! the links handed out with it have expired.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use tokio::sync::watch;

use crate::app::App;
use crate::auth::Auth;
use crate::token::TokenError;

/// Longest `Host` header used to build absolute links.
const MAX_HOST_BYTES: usize = 255;

/// `http(s)://host` of an upgrade request, for absolute links in file notices (a
/// tutorial page on another origin must reach this server). `None` when the `Host`
/// header is missing or not a plain host name or address.
pub fn base(headers: &HeaderMap, tls: bool) -> Option<Arc<str>> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let plain = !host.is_empty()
        && host.len() <= MAX_HOST_BYTES
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
    if !plain {
        return None;
    }
    let scheme = if tls { "https" } else { "http" };
    Some(format!("{scheme}://{host}").into())
}

/// A signed download link for `user` to blob `key`, valid `blob_link_secs` from now;
/// absolute when `base` is known.
pub fn link(app: &App, base: Option<&str>, key: &str, user: &str) -> String {
    let expires = crate::token::now_secs().saturating_add(app.config.limits.blob_link_secs);
    let sig = app.auth.sign_link(key, user, expires);
    format!(
        "{}/api/blobs/{key}?user={}&expires={expires}&sig={sig}",
        base.unwrap_or(""),
        percent_encode(user)
    )
}

/// RFC 3986 unreserved characters stay, every other byte is `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a signed link was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("a signed link needs user, expires and sig")]
    Incomplete,
    #[error("the link has expired")]
    Expired,
    #[error("the link's signature is not valid")]
    Invalid,
}

/// The user a download request's signed link (`user`, `expires`, `sig` in `query`) was
/// issued to for blob `key`; `None` when the request carries no `sig` (it is not a link).
pub fn verify(
    auth: &Auth,
    key: &str,
    query: &HashMap<String, String>,
) -> Option<Result<String, LinkError>> {
    let sig = query.get("sig")?;
    let (Some(user), Some(expires)) = (
        query.get("user"),
        query.get("expires").and_then(|e| e.parse::<u64>().ok()),
    ) else {
        return Some(Err(LinkError::Incomplete));
    };
    Some(match auth.verify_link(key, user, expires, sig) {
        Ok(()) => Ok(user.clone()),
        Err(TokenError::Expired) => Err(LinkError::Expired),
        Err(_) => Err(LinkError::Invalid),
    })
}

/// Deletes acknowledged blobs once the links handed out with them have expired:
/// `blob_link_secs` after the ack, checked every minute (or more often for short lives).
pub async fn sweep_acked_blobs(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let secs = app.config.limits.blob_link_secs;
    let every = Duration::from_secs(secs.clamp(1, 60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::shutdown::shutdown_requested(&mut shutdown) => return,
        }
        let millis = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let cutoff = crate::now_ms().saturating_sub(millis);
        match app.store.blob_sweep_acked(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(blobs = n, "deleted acknowledged blobs past their links"),
            Err(e) => tracing::warn!(error = %e, "sweeping acknowledged blobs failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_encoded() {
        assert_eq!(percent_encode("zoë.b"), "zo%C3%AB.b");
    }

    #[test]
    fn only_plain_hosts_make_a_base() {
        let headers = |host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, host.parse().unwrap());
            h
        };
        assert_eq!(
            base(&headers("example.org:8080"), false).as_deref(),
            Some("http://example.org:8080")
        );
        assert_eq!(
            base(&headers("[::1]:443"), true).as_deref(),
            Some("https://[::1]:443")
        );
        assert_eq!(base(&headers("a/b"), false), None);
        assert_eq!(base(&HeaderMap::new(), false), None);
    }
}
