//! The seed tutorial's JSON dialect: a session opened on `/ws/<user>` sends
//! `{"to_user":"bob","msg":"hi"}`; recipients get `{"from_user","to_user","msg"}`.
//! Successful sends get no reply (seed clients expect none); errors come as
//! `{"error":code,"message":...}` with `from_user` and `msg` too, so a seed page that
//! prints every frame as `from_user: msg` shows them readably. Every frame is JSON text:
//! files arrive as a notice with a download link.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{ErrorCode, Event, ProtocolError, Request};
use crate::message::Body;

#[derive(Deserialize)]
struct SeedFrame {
    to_user: Option<Value>,
    msg: Option<Value>,
}

/// Parses `{"to_user":..,"msg":..}`. A `msg` string is text; any other JSON is kept as JSON.
pub fn parse(text: &str) -> Result<Request, ProtocolError> {
    let frame: SeedFrame = serde_json::from_str(text).map_err(|e| {
        ProtocolError::new(ErrorCode::BadFrame, format!("expected a JSON object: {e}"))
    })?;
    let to = match frame.to_user {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(ProtocolError::new(
                ErrorCode::BadFrame,
                "to_user must be a string",
            ))
        }
        None => {
            return Err(ProtocolError::new(
                ErrorCode::MissingField,
                "to_user is missing",
            ))
        }
    };
    let body = match frame.msg {
        Some(Value::String(s)) => Body::Text(s),
        Some(Value::Null) | None => {
            return Err(
                ProtocolError::new(ErrorCode::MissingField, "msg is missing").with_to(Some(to)),
            )
        }
        Some(v) => Body::Json(v.to_string()),
    };
    Ok(Request::Send {
        from: None,
        id: None,
        to,
        body,
    })
}

/// The body as a JSON value: text as a string, JSON as itself.
pub fn body_value(body: &Body) -> Value {
    match body {
        Body::Text(s) => Value::String(s.clone()),
        Body::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        Body::Blob(_) => Value::String(
            body.blob_meta()
                .map(|m| super::blob_notice(&m))
                .unwrap_or_default(),
        ),
    }
}

pub fn format(event: &Event<'_>) -> Option<String> {
    let v = match event {
        Event::Message { msg, offline } => {
            let mut v = json!({
                "from_user": msg.sender,
                "to_user": msg.recipient,
                "msg": body_value(&msg.body),
                "seq": msg.seq,
                "ts": msg.accepted_at,
            });
            if *offline {
                v["offline"] = Value::Bool(true);
            }
            v
        }
        Event::FileNotice {
            msg,
            meta,
            url,
            offline,
        } => {
            let mut v = json!({
                "from_user": msg.sender,
                "to_user": msg.recipient,
                "msg": super::file_notice(meta, url),
                "seq": msg.seq,
                "ts": msg.accepted_at,
                "file": {"name": meta.name, "mime": meta.mime, "size": meta.size, "url": url},
            });
            if *offline {
                v["offline"] = Value::Bool(true);
            }
            v
        }
        Event::Error(e) => {
            let mut v = json!({
                "error": e.code.as_str(),
                "message": e.message,
                "from_user": super::SERVER_NAME,
                "msg": format!("error {}: {}", e.code.as_str(), e.message),
            });
            if let Some(to) = &e.to {
                v["to_user"] = Value::String(to.clone());
            }
            if let Some(secs) = e.try_again_in {
                v["try_again_in"] = Value::from(secs);
            }
            v
        }
        Event::Kicked(reason) => {
            json!({
                "error": "kicked",
                "reason": reason.as_str(),
                "message": reason.message(),
                "from_user": super::SERVER_NAME,
                "msg": format!("session closed: {}", reason.message()),
            })
        }
        Event::Welcome { .. }
        | Event::Synced
        | Event::Sent { .. }
        | Event::Pong
        | Event::Receipt { .. }
        | Event::BlobAccepted { .. }
        | Event::BlobStart { .. }
        | Event::BlobEnd { .. }
        | Event::BlobAborted { .. } => return None,
    };
    Some(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::StoredMessage;

    #[test]
    fn parses_text_and_json_bodies() {
        assert_eq!(
            parse(r#"{"to_user":"bob","msg":"hi"}"#).unwrap(),
            Request::Send {
                from: None,
                id: None,
                to: "bob".into(),
                body: Body::Text("hi".into())
            }
        );
        let r = parse(r#"{"to_user":"bob","msg":{"a":1},"extra":true}"#).unwrap();
        assert!(matches!(r, Request::Send { body: Body::Json(j), .. } if j == r#"{"a":1}"#));
    }

    #[test]
    fn rejects_missing_fields() {
        assert_eq!(
            parse(r#"{"msg":"hi"}"#).unwrap_err().code,
            ErrorCode::MissingField
        );
        assert_eq!(
            parse(r#"{"to_user":"bob"}"#).unwrap_err().code,
            ErrorCode::MissingField
        );
        assert_eq!(
            parse(r#"{"to_user":1,"msg":"x"}"#).unwrap_err().code,
            ErrorCode::BadFrame
        );
        assert_eq!(parse("{nope").unwrap_err().code, ErrorCode::BadFrame);
        assert_eq!(parse("[1]").unwrap_err().code, ErrorCode::BadFrame);
    }

    #[test]
    fn formats_message_with_from_user() {
        let msg = StoredMessage {
            seq: 3,
            sender: "alice".into(),
            recipient: "bob".into(),
            client_id: None,
            body: Body::Text("hi".into()),
            accepted_at: 5,
        };
        let v: Value = serde_json::from_str(
            &format(&Event::Message {
                msg: &msg,
                offline: false,
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(v["from_user"], "alice");
        assert_eq!(v["to_user"], "bob");
        assert_eq!(v["msg"], "hi");
        assert!(format(&Event::Synced).is_none());
    }
}
