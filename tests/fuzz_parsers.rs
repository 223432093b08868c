//! Property tests (proptest) for the wire parsers, and a bounded end-to-end fuzz run.
//!
//! Parsers: arbitrary strings and bytes, and near-valid inputs (JSON objects with random
//! `type`s and fields of random JSON types, hash frames with random `#` placements) must
//! give `Ok` or a `ProtocolError` with a message, never a panic; format → parse round
//! trips hold where a dialect has both directions.
//!
//! Server: 200 random text and binary frames, over real sockets, on sessions of every
//! dialect; each frame must leave the session answering (checked with a message to
//! itself after every frame) or end it with a documented close code, and an unrelated
//! session on the same server must still work afterwards.

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use common::{test_config, Client, Frame, TestServer};
use pigeon::message::{Body, StoredMessage};
use pigeon::names::valid_username;
use pigeon::protocol::{
    self, check_send, chunk_frame, hash, pigeon as pj, seed_json, split_chunk, ErrorCode, Event,
    Fate, ProtocolError, Request,
};

// ---- strategies ------------------------------------------------------------------------

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
        "[a-z0-9_.-]{1,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The field names any client frame of any dialect may carry, and some it may not.
const FIELDS: &[&str] = &[
    "type", "user", "id", "to", "body", "upto", "name", "mime", "size", "sha256", "stream",
    "to_user", "msg", "from", "seq", "",
];

const TYPES: &[&str] = &[
    "login",
    "send",
    "ack",
    "ping",
    "blob",
    "blob_abort",
    "msg",
    "",
    "LOGIN",
    "send ",
];

/// A JSON object that is nearly a client frame: a likely `type` (or a random value) and
/// a random subset of the known fields, each with a random JSON value.
fn near_valid_object() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        3 => prop::sample::select(TYPES).prop_map(|t| Some(json!(t))),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ];
    let field = (prop::sample::select(FIELDS), json_value());
    let plausible = prop_oneof![
        (Just("to"), "[a-z]{1,6}".prop_map(|s| json!(s))),
        (Just("to_user"), "[a-z]{1,6}".prop_map(|s| json!(s))),
        (Just("user"), "[a-z]{1,6}".prop_map(|s| json!(s))),
        (Just("body"), ".{0,12}".prop_map(|s| json!(s))),
        (Just("msg"), ".{0,12}".prop_map(|s| json!(s))),
        (Just("id"), "[a-z0-9]{1,4}".prop_map(|s| json!(s))),
        (Just("upto"), any::<u32>().prop_map(|n| json!(n))),
        (Just("size"), any::<u32>().prop_map(|n| json!(n))),
        (Just("stream"), any::<u32>().prop_map(|n| json!(n))),
        (Just("sha256"), "[0-9a-fA-F]{63,65}".prop_map(|s| json!(s))),
    ];
    (
        kind,
        prop::collection::vec(field, 0..5),
        prop::collection::vec(plausible, 0..5),
    )
        .prop_map(|(kind, random, plausible)| {
            let mut m = Map::new();
            for (k, v) in random.into_iter().chain(plausible) {
                m.insert(k.to_string(), v);
            }
            match kind {
                Some(k) => {
                    m.insert("type".into(), k);
                }
                None => {
                    m.remove("type");
                }
            }
            Value::Object(m)
        })
}

/// Text with `#` at random places: segments (possibly empty) joined by `#`.
fn hashy_text() -> impl Strategy<Value = String> {
    prop::collection::vec("[^#]{0,8}", 0..6).prop_map(|segs| segs.join("#"))
}

fn username() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,32}"
}

// ---- checks ----------------------------------------------------------------------------

/// A parser's result is fine when it is `Ok` or an error that says something.
fn check_result(what: &str, input: &str, r: &Result<Request, ProtocolError>) {
    if let Err(e) = r {
        assert!(
            !e.message.trim().is_empty(),
            "{what}: empty error message for {input:?}: {e:?}"
        );
        assert!(!e.code.as_str().is_empty());
    }
}

/// Runs every text parser on `text`; none may panic, every error must have a message.
fn all_text_parsers(text: &str) {
    check_result("hash", text, &hash::parse(text));
    check_result("seed_json", text, &seed_json::parse(text));
    check_result("pigeon", text, &pj::parse(text));
    let _ = hash::looks_like(text);
    let _ = pj::is_pigeon_frame(text);
    let _ = valid_username(text);
    if let Err(e) = check_send(text, Some(text)) {
        assert!(!e.message.is_empty());
    }
}

fn stored(sender: &str, recipient: &str, id: Option<&str>, body: Body) -> StoredMessage {
    StoredMessage {
        seq: 42,
        sender: sender.into(),
        recipient: recipient.into(),
        client_id: id.map(str::to_string),
        body,
        accepted_at: 1_700_000_000_000,
    }
}

fn pigeon_json(event: &Event<'_>) -> Value {
    let mut frames = Vec::new();
    protocol::format(protocol::Dialect::Pigeon, event, |f| frames.push(f));
    assert_eq!(frames.len(), 1, "{frames:?}");
    serde_json::from_str(&frames[0]).unwrap_or_else(|e| panic!("{:?}: {e}", frames[0]))
}

// ---- parser properties -------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn text_parsers_never_panic_on_any_string(s in any::<String>()) {
        all_text_parsers(&s);
    }

    #[test]
    fn text_parsers_never_panic_on_lossy_bytes(b in prop::collection::vec(any::<u8>(), 0..256)) {
        all_text_parsers(&String::from_utf8_lossy(&b));
    }

    #[test]
    fn split_chunk_never_panics(b in prop::collection::vec(any::<u8>(), 0..64)) {
        match split_chunk(&b) {
            Ok((stream, payload)) => {
                prop_assert!(b.len() > protocol::CHUNK_HEADER);
                prop_assert_eq!(stream.to_be_bytes(), [b[0], b[1], b[2], b[3]]);
                prop_assert_eq!(payload, &b[protocol::CHUNK_HEADER..]);
            }
            Err(e) => {
                prop_assert!(b.len() <= protocol::CHUNK_HEADER);
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn near_valid_json_frames(v in near_valid_object()) {
        let text = v.to_string();
        all_text_parsers(&text);
        // A JSON object with a `type` is a Pigeon frame; its parse agrees with the type.
        prop_assert_eq!(pj::is_pigeon_frame(&text), v.get("type").is_some());
        if let Ok(r) = pj::parse(&text) {
            let kind = v["type"].as_str().unwrap_or_default();
            let matches = match r {
                Request::Login { .. } | Request::Authenticate { .. } => kind == "login",
                Request::Send { .. } => kind == "send",
                Request::Ack { .. } => kind == "ack",
                Request::Ping => kind == "ping",
                Request::BlobStart { .. } => kind == "blob",
                Request::BlobAbort { .. } => kind == "blob_abort",
            };
            prop_assert!(matches, "{} parsed as {:?}", text, r);
        }
    }

    #[test]
    fn near_valid_json_with_noise(v in near_valid_object(), cut in any::<prop::sample::Index>(), junk in ".{0,3}") {
        // Truncated or spliced JSON must still be refused cleanly.
        let text = v.to_string();
        let mut at = cut.index(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        all_text_parsers(&format!("{}{}{}", &text[..at], junk, &text[at..]));
        all_text_parsers(&text[..at]);
    }

    #[test]
    fn hash_frames_split_at_first_and_last_hash(text in hashy_text()) {
        let r = hash::parse(&text);
        check_result("hash", &text, &r);
        let hashes = text.matches('#').count();
        match r {
            Ok(Request::Send { from: Some(from), id: None, to, body: Body::Text(body) }) => {
                prop_assert!(hashes >= 2);
                prop_assert_eq!(format!("{from}#{body}#{to}"), text.clone());
                prop_assert!(!from.is_empty() && !from.contains('#') && !to.contains('#'));
            }
            Ok(other) => prop_assert!(false, "unexpected {:?}", other),
            Err(e) if hashes < 2 => prop_assert_eq!(e.code, ErrorCode::BadFrame),
            Err(e) => {
                prop_assert_eq!(e.code, ErrorCode::EmptyField);
                prop_assert!(text.starts_with('#'));
            }
        }
    }

    #[test]
    fn hash_format_then_parse_round_trips(from in username(), to in username(), body in any::<String>()) {
        let msg = stored(&from, &to, None, Body::Text(body.clone()));
        let text = hash::format(&Event::Message { msg: &msg, offline: false })
            .expect("messages have a hash frame");
        let r = hash::parse(&text).map_err(|e| TestCaseError::fail(e.message))?;
        prop_assert_eq!(r, Request::Send { from: Some(from), id: None, to, body: Body::Text(body) });
    }

    #[test]
    fn seed_format_then_parse_round_trips(from in username(), to in username(), body in any::<String>(), offline in any::<bool>()) {
        let msg = stored(&from, &to, None, Body::Text(body.clone()));
        let text = seed_json::format(&Event::Message { msg: &msg, offline })
            .expect("messages have a seed frame");
        let r = seed_json::parse(&text).map_err(|e| TestCaseError::fail(e.message))?;
        prop_assert_eq!(r, Request::Send { from: None, id: None, to, body: Body::Text(body) });
    }

    #[test]
    fn chunk_frame_then_split_round_trips(stream in any::<u32>(), payload in prop::collection::vec(any::<u8>(), 1..128)) {
        let f = chunk_frame(stream, &payload);
        let (s, p) = split_chunk(&f).map_err(|e| TestCaseError::fail(e.message))?;
        prop_assert_eq!(s, stream);
        prop_assert_eq!(p, &payload[..]);
    }

    #[test]
    fn pigeon_msg_formats_as_json_with_its_fields(
        from in username(),
        to in username(),
        id in proptest::option::of(".{1,16}"),
        body in prop_oneof![
            any::<String>().prop_map(Body::Text),
            // Sends refuse a null body, so no stored message has one.
            json_value()
                .prop_filter("non-string, non-null", |v| !v.is_string() && !v.is_null())
                .prop_map(|v| Body::Json(v.to_string())),
        ],
        offline in any::<bool>(),
    ) {
        let msg = stored(&from, &to, id.as_deref(), body.clone());
        let v = pigeon_json(&Event::Message { msg: &msg, offline });
        prop_assert_eq!(&v["type"], "msg");
        prop_assert_eq!(&v["seq"], 42);
        prop_assert_eq!(&v["from"], from.as_str());
        prop_assert_eq!(&v["to"], to.as_str());
        prop_assert_eq!(&v["ts"], 1_700_000_000_000i64);
        prop_assert_eq!(v.get("id").and_then(Value::as_str), id.as_deref());
        prop_assert_eq!(v.get("offline").is_some(), offline);
        let want = match &body {
            Body::Text(t) => Value::String(t.clone()),
            Body::Json(j) | Body::Blob(j) => serde_json::from_str(j).map_err(|e| TestCaseError::fail(e.to_string()))?,
        };
        prop_assert_eq!(&v["body"], &want);
        // What a Pigeon client would send back for this message parses again.
        let send = json!({"type": "send", "to": from, "id": id, "body": v["body"]});
        let r = pj::parse(&send.to_string());
        let body_back = match r {
            Ok(Request::Send { body, .. }) => body,
            Err(e) => return Err(TestCaseError::fail(format!("{send}: {e:?}"))),
            Ok(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(body_back, body);
    }

    #[test]
    fn pigeon_sent_formats_as_json_with_its_fields(
        id in proptest::option::of(".{1,16}"),
        to in username(),
        seq in any::<u64>(),
        delivered in any::<bool>(),
        duplicate in any::<bool>(),
    ) {
        let fate = if delivered { Fate::Delivered } else { Fate::Stored };
        let v = pigeon_json(&Event::Sent { id: id.as_deref(), to: &to, seq, fate, duplicate });
        prop_assert_eq!(&v["type"], "sent");
        prop_assert_eq!(v.get("id").and_then(Value::as_str), id.as_deref());
        prop_assert_eq!(&v["to"], to.as_str());
        prop_assert_eq!(v["seq"].as_u64(), Some(seq));
        prop_assert_eq!(&v["status"], fate.as_str());
        prop_assert_eq!(&v["duplicate"], duplicate);
    }

    #[test]
    fn error_events_format_in_every_dialect(code_ix in 0usize..3, message in ".{1,40}", id in proptest::option::of("[a-z0-9]{1,8}")) {
        let code = [ErrorCode::BadFrame, ErrorCode::UnknownType, ErrorCode::TooLarge][code_ix];
        let e = ProtocolError::new(code, message.clone()).with_id(id.clone());
        let v = pigeon_json(&Event::Error(&e));
        prop_assert_eq!(&v["type"], "error");
        prop_assert_eq!(&v["code"], code.as_str());
        prop_assert_eq!(&v["message"], message.as_str());
        let seed: Value = serde_json::from_str(&seed_json::format(&Event::Error(&e)).unwrap_or_default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&seed["error"], code.as_str());
        let h = hash::format(&Event::Error(&e)).unwrap_or_default();
        prop_assert!(h.starts_with('!'), "{}", h);
    }
}

// ---- end to end --------------------------------------------------------------------------

/// Close codes docs/PROTOCOL.md documents.
const DOCUMENTED_CLOSE_CODES: &[u16] = &[1000, 1001, 1008, 1009, 4000, 4001, 4002];

/// `limits.max_message_bytes` of the end-to-end server.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Frames this run sends in all (random ones; barriers not counted).
const E2E_FRAMES: usize = 200;

#[derive(Clone)]
enum Fuzz {
    Text(String),
    Binary(Vec<u8>),
}

impl std::fmt::Debug for Fuzz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fuzz::Text(t) if t.len() > 200 => write!(f, "Text({} bytes)", t.len()),
            Fuzz::Text(t) => write!(f, "Text({t:?})"),
            Fuzz::Binary(b) if b.len() > 64 => write!(f, "Binary({} bytes)", b.len()),
            Fuzz::Binary(b) => write!(f, "Binary({b:?})"),
        }
    }
}

impl Fuzz {
    fn len(&self) -> usize {
        match self {
            Fuzz::Text(t) => t.len(),
            Fuzz::Binary(b) => b.len(),
        }
    }
}

fn fuzz_frame() -> impl Strategy<Value = Fuzz> {
    prop_oneof![
        3 => near_valid_object().prop_map(|v| Fuzz::Text(v.to_string())),
        2 => any::<String>().prop_map(Fuzz::Text),
        2 => hashy_text().prop_map(Fuzz::Text),
        1 => "[a-z]{1,4}#.{0,8}#[a-z]{1,4}".prop_map(Fuzz::Text),
        2 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Fuzz::Binary),
        1 => (0u32..4, prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(s, p)| Fuzz::Binary(chunk_frame(s, &p))),
        // Above max_text_bytes (too_large), and above max_message_bytes (close 1009).
        1 => (20_000usize..24_000).prop_map(|n| Fuzz::Text("x".repeat(n))),
        1 => (70_000usize..72_000).prop_map(|n| Fuzz::Binary(vec![7u8; n])),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Pigeon,
    Seed,
    Hash,
}

/// A session under fuzz: identified as `user` in dialect `kind`.
struct Victim {
    client: Client,
    user: String,
    kind: Kind,
    barrier: u64,
}

impl Victim {
    async fn open(base: &str, kind: Kind, user: String) -> Victim {
        let client = match kind {
            Kind::Pigeon => Client::pigeon(base, &user).await.0,
            Kind::Seed => Client::connect(&format!("{base}/ws/{user}")).await,
            Kind::Hash => Client::connect(&format!("{base}/ws")).await,
        };
        let mut v = Victim {
            client,
            user,
            kind,
            barrier: 0,
        };
        // The first hash frame names the user; a barrier also proves the session works.
        match v.barrier().await {
            Ok(_) => v,
            Err(code) => panic!("a fresh {kind:?} session closed with {code}"),
        }
    }

    /// Sends the user a message to itself and reads until it arrives: every frame sent
    /// before it has been handled. Returns the frames seen before it, or the close code.
    async fn barrier(&mut self) -> Result<usize, u16> {
        self.barrier += 1;
        let tag = format!("barrier-{}-{}", self.user, self.barrier);
        let u = &self.user;
        let frame = match self.kind {
            Kind::Pigeon => json!({"type":"send","id":tag,"to":u,"body":tag}).to_string(),
            Kind::Seed => json!({"to_user":u,"msg":tag}).to_string(),
            Kind::Hash => format!("{u}#{tag}#{u}"),
        };
        let mut seen = 0;
        if self.client.try_send(Message::text(frame)).await.is_err() {
            // The server closed after the previous frame: its close frame may still be there.
            return Err(self.client.next_or_close().await.err().unwrap_or(0));
        }
        loop {
            match self.client.next_or_close().await {
                Ok(Frame::Text(t)) if t.contains(&tag) && !t.contains("\"sent\"") => {
                    if let (Kind::Pigeon, Ok(v)) = (self.kind, serde_json::from_str::<Value>(&t)) {
                        if let Some(seq) = v["seq"].as_u64() {
                            self.client.ack(seq).await;
                        }
                    }
                    return Ok(seen);
                }
                Ok(_) => seen += 1,
                Err(code) => return Err(code),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_over_real_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.limits.max_text_bytes = 16 * 1024;
    config.limits.max_message_bytes = MAX_MESSAGE_BYTES;
    config.limits.blob_relay_bytes = MAX_MESSAGE_BYTES;
    config.limits.max_consecutive_errors = 5;
    let server = TestServer::start(config).await;
    let base = format!("ws://{}", server.addr);

    let mut runner = TestRunner::deterministic();
    let frames: Vec<Fuzz> = (0..E2E_FRAMES)
        .map(|_| fuzz_frame().new_tree(&mut runner).unwrap().current())
        .collect();

    let kinds = [Kind::Pigeon, Kind::Seed, Kind::Hash];
    let mut sessions = 0usize;
    let mut answered = 0usize;
    let mut silent = 0usize;
    let mut closes: BTreeMap<u16, usize> = BTreeMap::new();
    let mut resets_after_oversize = 0usize;
    let mut victim = Victim::open(&base, kinds[0], "fuzz-0".into()).await;
    for (i, f) in frames.iter().enumerate() {
        let m = match f {
            Fuzz::Text(t) => Message::text(t.clone()),
            Fuzz::Binary(b) => Message::binary(b.clone()),
        };
        let result = match victim.client.try_send(m).await {
            Ok(()) => victim.barrier().await,
            Err(_) => Err(victim.client.next_or_close().await.err().unwrap_or(0)),
        };
        match result {
            Ok(0) => silent += 1,
            Ok(_) => answered += 1,
            Err(0) if f.len() > MAX_MESSAGE_BYTES => {
                // Known issue (docs/RELIABILITY.md): the server closes with 1009 and drops
                // the socket with the rest of the oversized message unread, so the kernel
                // resets the connection and the client may lose the close frame.
                resets_after_oversize += 1;
                sessions += 1;
                let kind = kinds[sessions % kinds.len()];
                victim = Victim::open(&base, kind, format!("fuzz-{sessions}")).await;
            }
            Err(code) => {
                assert!(
                    DOCUMENTED_CLOSE_CODES.contains(&code),
                    "frame {i} ({f:?}) on a {:?} session: closed with undocumented code {code}",
                    victim.kind
                );
                *closes.entry(code).or_default() += 1;
                sessions += 1;
                let kind = kinds[sessions % kinds.len()];
                victim = Victim::open(&base, kind, format!("fuzz-{sessions}")).await;
            }
        }
    }
    println!(
        "e2e fuzz: {E2E_FRAMES} frames, {answered} answered, {silent} silently accepted, \
         closes by code {closes:?}, {resets_after_oversize} resets after an oversized \
         message, {} sessions",
        sessions + 1
    );

    // Too many bad frames in a row end a session with 4002, as documented.
    let mut c = Client::pigeon(&base, "fuzz-burst").await.0;
    for _ in 0..5 {
        c.text("{not json").await;
    }
    let (closed, texts) = c.closed().await;
    assert_eq!(closed.code, 4002, "{texts:?}");

    // The server still works for everyone else.
    let (mut alice, _) = Client::pigeon(&base, "alice").await;
    let (mut bob, _) = Client::pigeon(&base, "bob").await;
    let sent = alice
        .send_msg("after-fuzz", "bob", json!("still here"))
        .await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let got = bob.json().await;
    assert_eq!(got["type"], "msg", "{got}");
    assert_eq!(got["body"], "still here");
    server.stop().await;
}
