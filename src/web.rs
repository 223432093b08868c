//! The web client over HTTP: the files of `static/`, compiled into the binary by
//! `build.rs` (so `pigeon serve` works from any directory), each with its Content-Type;
//! and the security headers every response of the HTTP router carries (a strict
//! Content-Security-Policy, `nosniff`, no framing, no referrer). Routing and the
//! `[server] static_dir` override for development are in `http` (`http/mod.rs`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::origins::Origins;

include!(concat!(env!("OUT_DIR"), "/static_files.rs"));

/// The Content-Type of a web client file, by extension.
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext.to_ascii_lowercase().as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A file of the built-in web client: `/` is `/index.html`.
pub fn embedded_file(path: &str) -> Option<&'static [u8]> {
    let path = if path == "/" { "/index.html" } else { path };
    STATIC_FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, bytes)| *bytes)
}

/// Serves the built-in web client (the router's fallback when `static_dir` is not set).
pub async fn embedded(method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "method not allowed\n",
        )
            .into_response();
    }
    let path = uri.path();
    let Some(bytes) = embedded_file(path) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let file = if path == "/" { "/index.html" } else { path };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(file)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    // Small files, changed by an upgrade of the binary: ask the browser to revalidate.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// The headers added to every response, computed once at start-up.
pub struct SecurityHeaders {
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl SecurityHeaders {
    /// `connect-src` allows the page's own origin, the WebSocket forms (`ws://`,
    /// `wss://`) of the server's public origins (IPv6 literals cannot be written in a
    /// CSP; `'self'` covers them in current browsers) and `blob:` (reading back the
    /// page's own object URLs): the web client connects nowhere else.
    pub fn new(origins: &Origins) -> SecurityHeaders {
        let mut connect = vec!["'self'".to_string(), "blob:".to_string()];
        connect.extend(
            origins
                .own()
                .iter()
                .filter(|o| !o.is_ipv6())
                .map(|o| o.websocket()),
        );
        let csp = format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
             media-src 'self' blob:; font-src 'self'; manifest-src 'self'; connect-src {}; \
             form-action 'self'; base-uri 'none'; frame-ancestors 'none'; object-src 'none'",
            connect.join(" ")
        );
        let mut headers = vec![
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ];
        match HeaderValue::from_str(&csp) {
            Ok(v) => headers.push((header::CONTENT_SECURITY_POLICY, v)),
            // Origins are parsed to plain host names and ports, so this cannot happen;
            // if it did, the strictest policy is the safe answer.
            Err(_) => headers.push((
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'"),
            )),
        }
        SecurityHeaders { headers }
    }
}

/// Adds the security headers to a response (a `map_response` layer over the router).
pub async fn add_headers(State(h): State<Arc<SecurityHeaders>>, mut res: Response) -> Response {
    let map = res.headers_mut();
    for (name, value) in &h.headers {
        // A response that set its own (stricter) header keeps it: file downloads are
        // served with `Content-Security-Policy: sandbox; default-src 'none'`.
        if !map.contains_key(name) {
            map.insert(name.clone(), value.clone());
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_built_in() {
        let index = embedded_file("/").expect("index.html is embedded");
        assert!(String::from_utf8_lossy(index).contains("<title>Pigeon</title>"));
        assert!(embedded_file("/js/app.js").is_some());
        assert!(embedded_file("/../Cargo.toml").is_none());
        assert!(embedded_file("js/app.js").is_none());
        assert_eq!(content_type("/js/app.js"), "text/javascript; charset=utf-8");
    }
}
