//! File downloads over HTTP: `GET /api/blobs/{key}` streams a stored blob, from the
//! store and never whole in memory, to its sender or recipient only. They prove who they
//! are with a session token (`Authorization: Bearer` or `?token=`) or with a signed link
//! the server hands out with the file (`?user=&expires=&sig=`, HMAC under the server
//! secret, valid `[limits] blob_link_secs`). One byte range per request (206, 416), and
//! a `Content-Type` only for types a browser merely displays; anything else is an
//! `application/octet-stream` attachment. The links themselves are built and checked in
//! `links`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use super::ctx::{error, request_token, Ctx};
use crate::links::{self, LinkError};
use crate::store::{BlobInfo, BlobRead};

/// Bytes read from the store per piece of the response body.
const PIECE: usize = 64 * 1024;

/// Types a browser shows without running anything; served with their own type (as
/// written here, not as the sender wrote it).
const SAFE_TYPES: [&str; 12] = [
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "audio/mp4",
    "audio/webm",
    "audio/ogg",
    "audio/mpeg",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/mpeg",
];

pub fn routes() -> Router<Arc<Ctx>> {
    Router::new().route("/api/blobs/{key}", get(download))
}

/// RFC 8187 `attr-char`s stay (for `filename*=UTF-8''...`), every other byte is `%XX`.
fn filename_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Keys are the server's own (`transfer::new_blob_key`); anything else is not one.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Headers every blob response carries, errors included: nothing here may be run as a
/// page or sniffed into one.
fn harden(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    res
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let mut res = error(status, code, message);
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    harden(res)
}

fn not_found() -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such file, or not yours, or it has expired",
    )
}

/// Who the request proves to be: the user of a valid signed link or session token.
async fn principal(
    ctx: &Ctx,
    key: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<String, Response> {
    let app = &ctx.app;
    if let Some(checked) = links::verify(&app.auth, key, query) {
        return checked.map_err(|e| {
            let (code, message) = match e {
                LinkError::Incomplete => ("bad_link", "a signed link needs user, expires and sig"),
                LinkError::Expired => (
                    "link_expired",
                    "this download link has expired: open the file from the conversation again",
                ),
                LinkError::Invalid => ("bad_link", "this download link is not valid"),
            };
            refuse(StatusCode::FORBIDDEN, code, message)
        });
    }
    let token = request_token(query, headers);
    let Some(token) = token else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "auth_required",
            "send Authorization: Bearer <token> (from POST /api/login), ?token=, or use the file's link",
        ));
    };
    match app.auth.verify_token(&app.store, &token, None).await {
        Ok(proof) => Ok(proof.user),
        Err(e) => {
            let p = e.to_protocol();
            let status = match p.code {
                crate::protocol::ErrorCode::TooManyAttempts => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::UNAUTHORIZED,
            };
            Err(refuse(status, p.code.as_str(), &p.message))
        }
    }
}

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    /// No range, or one this server ignores (several ranges, not bytes): everything.
    All,
    /// Bytes `start..=end`.
    Part(u64, u64),
    /// Nothing of it exists: 416.
    Unsatisfiable,
}

fn parse_range(value: Option<&str>, size: u64) -> Wanted {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Wanted::All;
    };
    if spec.contains(',') {
        return Wanted::All; // several ranges: allowed to answer with the whole
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Wanted::All;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(b) {
            Some(0) => Wanted::Unsatisfiable,
            Some(n) => Wanted::Part(size.saturating_sub(n), size - 1),
            None => Wanted::All,
        },
        // bytes=A-
        (false, true) => match parse(a) {
            Some(s) if s < size => Wanted::Part(s, size - 1),
            Some(_) => Wanted::Unsatisfiable,
            None => Wanted::All,
        },
        (false, false) => match (parse(a), parse(b)) {
            (Some(s), Some(e)) if s > e => Wanted::All, // invalid: ignored
            (Some(s), Some(e)) if s < size => Wanted::Part(s, e.min(size - 1)),
            (Some(_), Some(_)) => Wanted::Unsatisfiable,
            _ => Wanted::All,
        },
        (true, true) => Wanted::All,
    }
}

/// `Content-Type` and `Content-Disposition` for a blob.
fn labels(info: &BlobInfo) -> (&'static str, String) {
    let mime = info
        .mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let name = if info.name.is_empty() {
        "file".to_string()
    } else {
        filename_encode(&info.name)
    };
    match SAFE_TYPES.iter().find(|t| **t == mime) {
        Some(t) => (t, format!("inline; filename*=UTF-8''{name}")),
        None => (
            "application/octet-stream",
            format!("attachment; filename*=UTF-8''{name}"),
        ),
    }
}

async fn download(
    State(ctx): State<Arc<Ctx>>,
    Path(key): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    if !valid_key(&key) {
        return not_found();
    }
    let user = match principal(&ctx, &key, &query, req.headers()).await {
        Ok(u) => u,
        Err(res) => return res,
    };
    let store = &ctx.app.store;
    let info = match store.blob_info(&key).await {
        Ok(Some(i)) if i.sender == user || i.recipient == user => i,
        Ok(_) => return not_found(),
        Err(e) => {
            tracing::warn!(error = %e, "blob info unavailable");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the store failed; try again",
            );
        }
    };
    let size = info.size;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (status, start, end) = match parse_range(range, size) {
        Wanted::All => (StatusCode::OK, 0, size - 1),
        Wanted::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e),
        Wanted::Unsatisfiable => {
            let mut res = refuse(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "bad_range",
                "the range is beyond the end of the file",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                res.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return res;
        }
    };
    let reader = match store.blob_reader_at(&key, start).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%key, error = %e, "blob gone before its download");
            return not_found();
        }
    };
    let length = end - start + 1;
    let (mime, disposition) = labels(&info);
    let mut res = Response::new(Body::from_stream(pieces(reader, length)));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    harden(res)
}

/// The next `length` bytes of `reader`, a piece at a time.
fn pieces(
    reader: Box<dyn BlobRead>,
    length: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, crate::store::StoreError>> + Send {
    futures_util::stream::unfold((reader, length), |(mut reader, left)| async move {
        if left == 0 {
            return None;
        }
        let want = usize::try_from(left).unwrap_or(PIECE).min(PIECE);
        let mut buf = vec![0u8; want];
        match reader.read(&mut buf).await {
            Ok(0) => Some((
                Err(crate::store::StoreError::Backend(
                    "the blob is shorter than recorded".into(),
                )),
                (reader, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (reader, left - n as u64)))
            }
            Err(e) => Some((Err(e), (reader, 0))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |v: &str| parse_range(Some(v), 100);
        assert_eq!(parse_range(None, 100), Wanted::All);
        assert_eq!(r("bytes=0-9"), Wanted::Part(0, 9));
        assert_eq!(r("bytes=90-200"), Wanted::Part(90, 99));
        assert_eq!(r("bytes=95-"), Wanted::Part(95, 99));
        assert_eq!(r("bytes=-10"), Wanted::Part(90, 99));
        assert_eq!(r("bytes=-1000"), Wanted::Part(0, 99));
        assert_eq!(r("bytes=100-"), Wanted::Unsatisfiable);
        assert_eq!(r("bytes=100-120"), Wanted::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Wanted::Unsatisfiable);
        assert_eq!(r("bytes=5-1"), Wanted::All);
        assert_eq!(r("bytes=0-1,5-6"), Wanted::All);
        assert_eq!(r("items=0-1"), Wanted::All);
        assert_eq!(r("bytes=x-y"), Wanted::All);
    }

    #[test]
    fn only_display_types_keep_their_type() {
        let info = |mime: &str, name: &str| BlobInfo {
            sender: "a".into(),
            recipient: "b".into(),
            name: name.into(),
            mime: mime.into(),
            size: 1,
            acked_at: None,
        };
        assert_eq!(labels(&info("Video/MP4; codecs=x", "a.mp4")).0, "video/mp4");
        let (t, d) = labels(&info("text/html", "a b\"é\r\n.html"));
        assert_eq!(t, "application/octet-stream");
        assert_eq!(d, "attachment; filename*=UTF-8''a%20b%22%C3%A9%0D%0A.html");
        for bad in ["image/svg+xml", "text/plain", "application/pdf", ""] {
            assert_eq!(labels(&info(bad, "x")).0, "application/octet-stream");
        }
    }

    #[test]
    fn keys_are_checked() {
        assert!(valid_key("0a1b-2c") && !valid_key("../x") && !valid_key(""));
    }
}
