//! Pigeon's own JSON protocol: typed frames (`login`, `send`, `ack`, `ping` from the
//! client; `welcome`, `msg`, `synced`, `sent`, `error`, `kicked`, `pong` from the server).
//! The reference is docs/PROTOCOL.md.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{ErrorCode, Event, ProtocolError, Request};
use crate::message::Body;

/// Every field any client frame may carry; which are required depends on `type`.
#[derive(Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    id: Option<String>,
    to: Option<String>,
    body: Option<Value>,
    upto: Option<Value>,
    name: Option<String>,
    mime: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
    stream: Option<u32>,
}

/// True when a JSON text frame is a Pigeon frame (it has a `type`), not a seed one.
pub fn is_pigeon_frame(text: &str) -> bool {
    matches!(
        serde_json::from_str::<Value>(text),
        Ok(Value::Object(ref m)) if m.contains_key("type")
    )
}

/// The `id` of a frame that will not be parsed in full (one dropped by the rate limit),
/// so that its error still names the `send` it refuses.
pub fn frame_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    serde_json::from_str::<IdOnly>(text).ok()?.id
}

pub fn parse(text: &str) -> Result<Request, ProtocolError> {
    let f: ClientFrame = serde_json::from_str(text).map_err(|e| {
        ProtocolError::new(ErrorCode::BadFrame, format!("expected a JSON object: {e}"))
    })?;
    let kind = f
        .kind
        .ok_or_else(|| ProtocolError::new(ErrorCode::MissingField, "type is missing"))?;
    let missing = |field: &str| {
        ProtocolError::new(
            ErrorCode::MissingField,
            format!("{kind}: {field} is missing"),
        )
        .with_id(f.id.clone())
    };
    match kind.as_str() {
        "login" if f.token.is_some() => Ok(Request::Authenticate {
            user: f.user,
            password: None,
            token: f.token,
        }),
        "login" if f.password.is_some() => Ok(Request::Authenticate {
            user: Some(f.user.clone().ok_or_else(|| missing("user"))?),
            password: f.password,
            token: None,
        }),
        "login" => Ok(Request::Login {
            user: f.user.ok_or_else(|| missing("user"))?,
        }),
        "send" => {
            let to = f.to.clone().ok_or_else(|| missing("to"))?;
            let body = match f.body.clone() {
                None | Some(Value::Null) => return Err(missing("body")),
                Some(Value::String(s)) => Body::Text(s),
                Some(v) => Body::Json(v.to_string()),
            };
            Ok(Request::Send {
                from: None,
                id: f.id,
                to,
                body,
            })
        }
        "ack" => match f.upto {
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(Request::Ack {
                upto: n.as_u64().unwrap_or(0),
            }),
            None => Err(missing("upto")),
            Some(_) => Err(ProtocolError::new(
                ErrorCode::BadAck,
                "ack: upto must be a non-negative integer",
            )),
        },
        "ping" => Ok(Request::Ping),
        "blob" => {
            let id = f.id.clone().ok_or_else(|| missing("id"))?;
            let to = f.to.clone().ok_or_else(|| missing("to"))?;
            let size = f
                .size
                .ok_or_else(|| missing("size (a non-negative integer)"))?;
            let sha256 = match f.sha256 {
                Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Some(h.to_ascii_lowercase())
                }
                Some(_) => {
                    return Err(ProtocolError::new(
                        ErrorCode::BadFrame,
                        "blob: sha256 must be 64 hex digits",
                    )
                    .with_id(Some(id)))
                }
                None => None,
            };
            Ok(Request::BlobStart {
                id,
                to,
                name: f.name.unwrap_or_default(),
                mime: f
                    .mime
                    .unwrap_or_else(|| "application/octet-stream".to_string()),
                size,
                sha256,
            })
        }
        "blob_abort" => Ok(Request::BlobAbort {
            stream: f.stream.ok_or_else(|| missing("stream"))?,
        }),
        other => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!("unknown frame type {other:?}"),
        )
        .with_id(f.id)),
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerFrame<'a> {
    Welcome {
        user: &'a str,
        session: u64,
        pending: u64,
    },
    Msg {
        seq: u64,
        from: &'a str,
        to: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        body: BodyOut<'a>,
        ts: i64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        offline: bool,
    },
    Synced,
    Sent {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        to: &'a str,
        seq: u64,
        status: &'static str,
        duplicate: bool,
    },
    Error {
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        try_again_in: Option<u64>,
    },
    Kicked {
        reason: &'static str,
        message: &'static str,
    },
    Pong,
    Receipt {
        from: &'a str,
        upto: u64,
    },
    BlobAccepted {
        id: &'a str,
        stream: u32,
    },
    BlobStart {
        stream: u32,
        from: &'a str,
        to: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        name: &'a str,
        mime: &'a str,
        size: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        sha256: Option<&'a str>,
        /// The blob's key and an HTTP link to it (`GET /api/blobs/{key}`).
        key: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        url: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        offline: bool,
    },
    BlobEnd {
        stream: u32,
        seq: u64,
        ts: i64,
    },
    BlobAbort {
        stream: u32,
        reason: &'a str,
    },
}

/// A body on the way out: text as a JSON string, JSON spliced in as it was stored.
enum BodyOut<'a> {
    Text(&'a str),
    Raw(&'a RawValue),
}

impl Serialize for BodyOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BodyOut::Text(t) => s.serialize_str(t),
            BodyOut::Raw(r) => r.serialize(s),
        }
    }
}

fn body_out(body: &Body) -> BodyOut<'_> {
    match body {
        Body::Text(t) => BodyOut::Text(t),
        // Stored JSON was valid when accepted; if a store hands back anything else,
        // it still reaches the client, as text.
        Body::Json(j) | Body::Blob(j) => serde_json::from_str::<&RawValue>(j)
            .map(BodyOut::Raw)
            .unwrap_or(BodyOut::Text(j)),
    }
}

pub fn format(event: &Event<'_>) -> String {
    let frame = match event {
        Event::Welcome {
            user,
            session,
            pending,
        } => ServerFrame::Welcome {
            user,
            session: *session,
            pending: *pending,
        },
        // Pigeon sessions get blobs as blob_start and chunks; a notice never reaches one.
        Event::Message { msg, offline } | Event::FileNotice { msg, offline, .. } => {
            ServerFrame::Msg {
                seq: msg.seq,
                from: &msg.sender,
                to: &msg.recipient,
                id: msg.client_id.as_deref(),
                body: body_out(&msg.body),
                ts: msg.accepted_at,
                offline: *offline,
            }
        }
        Event::Synced => ServerFrame::Synced,
        Event::Sent {
            id,
            to,
            seq,
            fate,
            duplicate,
        } => ServerFrame::Sent {
            id: *id,
            to,
            seq: *seq,
            status: fate.as_str(),
            duplicate: *duplicate,
        },
        Event::Error(e) => ServerFrame::Error {
            code: e.code.as_str(),
            message: &e.message,
            id: e.id.as_deref(),
            to: e.to.as_deref(),
            try_again_in: e.try_again_in,
        },
        Event::Kicked(reason) => ServerFrame::Kicked {
            reason: reason.as_str(),
            message: reason.message(),
        },
        Event::Pong => ServerFrame::Pong,
        Event::Receipt { from, upto } => ServerFrame::Receipt { from, upto: *upto },
        Event::BlobAccepted { id, stream } => ServerFrame::BlobAccepted {
            id,
            stream: *stream,
        },
        Event::BlobStart {
            stream,
            from,
            to,
            meta,
            url,
            offline,
        } => ServerFrame::BlobStart {
            stream: *stream,
            from,
            to,
            id: meta.id.as_deref(),
            name: &meta.name,
            mime: &meta.mime,
            size: meta.size,
            sha256: meta.sha256.as_deref(),
            key: &meta.key,
            url: *url,
            offline: *offline,
        },
        Event::BlobEnd { stream, seq, ts } => ServerFrame::BlobEnd {
            stream: *stream,
            seq: *seq,
            ts: *ts,
        },
        Event::BlobAborted { stream, reason } => ServerFrame::BlobAbort {
            stream: *stream,
            reason,
        },
    };
    // Serializing these plain structs cannot fail; fall back to a fixed frame if it did.
    serde_json::to_string(&frame).unwrap_or_else(|_| {
        r#"{"type":"error","code":"bad_frame","message":"internal formatting error"}"#.into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Fate;

    #[test]
    fn frame_id_reads_only_the_id() {
        assert_eq!(
            frame_id(r#"{"type":"send","id":"c-7","to":"bob","body":{"x":[1,2]}}"#).as_deref(),
            Some("c-7")
        );
        assert_eq!(frame_id(r#"{"type":"ping"}"#), None);
        assert_eq!(frame_id(r#"{"id":7}"#), None, "not a string id");
        assert_eq!(frame_id("not json"), None);
    }
    use crate::message::StoredMessage;

    #[test]
    fn parses_each_type() {
        assert_eq!(
            parse(r#"{"type":"login","user":"alice"}"#).unwrap(),
            Request::Login {
                user: "alice".into()
            }
        );
        assert_eq!(
            parse(r#"{"type":"send","id":"1","to":"bob","body":"hi"}"#).unwrap(),
            Request::Send {
                from: None,
                id: Some("1".into()),
                to: "bob".into(),
                body: Body::Text("hi".into())
            }
        );
        assert!(matches!(
            parse(r#"{"type":"send","to":"bob","body":{"k":[1,2]}}"#).unwrap(),
            Request::Send { body: Body::Json(j), .. } if j == r#"{"k":[1,2]}"#
        ));
        assert_eq!(
            parse(r#"{"type":"ack","upto":9}"#).unwrap(),
            Request::Ack { upto: 9 }
        );
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), Request::Ping);
        assert_eq!(
            parse(
                r#"{"type":"blob","id":"t","to":"bob","name":"a.mp4","mime":"video/mp4","size":10}"#
            )
            .unwrap(),
            Request::BlobStart {
                id: "t".into(),
                to: "bob".into(),
                name: "a.mp4".into(),
                mime: "video/mp4".into(),
                size: 10,
                sha256: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"blob_abort","stream":3}"#).unwrap(),
            Request::BlobAbort { stream: 3 }
        );
        let code = |t: &str| parse(t).unwrap_err().code;
        assert_eq!(
            code(r#"{"type":"blob","id":"t","to":"b"}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"type":"blob","id":"t","to":"b","size":-1}"#),
            ErrorCode::BadFrame
        );
        assert_eq!(
            code(r#"{"type":"blob","id":"t","to":"b","size":1,"sha256":"zz"}"#),
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn login_with_credentials() {
        assert_eq!(
            parse(r#"{"type":"login","user":"a","password":"pw"}"#).unwrap(),
            Request::Authenticate {
                user: Some("a".into()),
                password: Some("pw".into()),
                token: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"login","token":"t"}"#).unwrap(),
            Request::Authenticate {
                user: None,
                password: None,
                token: Some("t".into())
            }
        );
        assert_eq!(
            parse(r#"{"type":"login","password":"pw"}"#)
                .unwrap_err()
                .code,
            ErrorCode::MissingField
        );
        let e = ProtocolError::new(ErrorCode::TooManyAttempts, "wait").with_try_again_in(Some(7));
        let v: Value = serde_json::from_str(&format(&Event::Error(&e))).unwrap();
        assert_eq!(v["code"], "too_many_attempts");
        assert_eq!(v["try_again_in"], 7);
    }

    #[test]
    fn errors_name_the_problem() {
        let code = |t: &str| parse(t).unwrap_err().code;
        assert_eq!(code("nope"), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"user":"a"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"fly"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"send","to":"bob"}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"type":"send","body":"x"}"#),
            ErrorCode::MissingField
        );
        assert_eq!(code(r#"{"type":"ack","upto":-1}"#), ErrorCode::BadAck);
        assert_eq!(code(r#"{"type":"ack","upto":"3"}"#), ErrorCode::BadAck);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::BadFrame);
        let e = parse(r#"{"type":"send","id":"c9","to":"bob"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c9"));
    }

    #[test]
    fn formats_frames() {
        let msg = StoredMessage {
            seq: 4,
            sender: "a".into(),
            recipient: "b".into(),
            client_id: Some("x".into()),
            body: Body::Json(r#"{"k":1}"#.into()),
            accepted_at: 9,
        };
        let v: Value = serde_json::from_str(&format(&Event::Message {
            msg: &msg,
            offline: true,
        }))
        .unwrap();
        assert_eq!(v["type"], "msg");
        assert_eq!(v["body"]["k"], 1);
        assert_eq!(v["offline"], true);
        assert_eq!(v["id"], "x");
        let v: Value = serde_json::from_str(&format(&Event::Sent {
            id: Some("c1"),
            to: "b",
            seq: 4,
            fate: Fate::Stored,
            duplicate: false,
        }))
        .unwrap();
        assert_eq!(v["status"], "stored");
        assert_eq!(v["seq"], 4);
    }
}
