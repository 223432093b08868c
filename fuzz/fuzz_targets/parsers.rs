//! libFuzzer target: every wire parser on arbitrary input. None may panic; every error
//! must carry a message; what parses as a hash or chunk frame must split back into the
//! input it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pigeon::protocol::{check_send, chunk_frame, hash, pigeon as pj, seed_json, split_chunk, Request};
use pigeon::names::{valid_username};
use pigeon::message::Body;
use pigeon::token::{self, TokenKey};

fuzz_target!(|data: &[u8]| {
    // Binary frames: blob chunks.
    match split_chunk(data) {
        Ok((stream, payload)) => assert_eq!(chunk_frame(stream, payload), data),
        Err(e) => assert!(!e.message.is_empty()),
    }
    // Text frames: WebSocket text is UTF-8, so fuzz valid strings (and lossy ones).
    let lossy;
    let text = match std::str::from_utf8(data) {
        Ok(t) => t,
        Err(_) => {
            lossy = String::from_utf8_lossy(data);
            &lossy
        }
    };
    let _ = hash::looks_like(text);
    let _ = pj::is_pigeon_frame(text);
    let _ = valid_username(text);
    if let Err(e) = check_send(text, Some(text)) {
        assert!(!e.message.is_empty());
    }
    match hash::parse(text) {
        Ok(Request::Send {
            from: Some(from),
            to,
            body: Body::Text(body),
            ..
        }) => assert_eq!(format!("{from}#{body}#{to}"), text),
        Ok(other) => panic!("hash::parse gave {other:?}"),
        Err(e) => assert!(!e.message.is_empty()),
    }
    // Login tokens (URL query or `login` frame): parse, then verify against a key. A
    // token that verifies must be one `sign` would produce for its own claims.
    if let Ok(claims) = token::parse(text) {
        let key = TokenKey::new(b"fuzz-secret-fuzz-secret-fuzz-secret!");
        if key.verify(&claims, "hash", 0).is_ok() {
            assert_eq!(key.sign(&claims.user, claims.expires_at, "hash"), text);
        }
    }
    // The id read from a rate-limited frame matches what the full parser sees.
    if let (Some(id), Ok(Request::Send { id: Some(full), .. })) =
        (pj::frame_id(text), pj::parse(text))
    {
        assert_eq!(id, full);
    }
    for r in [seed_json::parse(text), pj::parse(text)] {
        match r {
            // A JSON body must be valid JSON: it is spliced into outgoing frames as is.
            Ok(Request::Send {
                body: Body::Json(j),
                ..
            }) => assert!(serde_json::from_str::<serde_json::Value>(&j).is_ok()),
            Ok(_) => {}
            Err(e) => assert!(!e.message.is_empty()),
        }
    }
});
