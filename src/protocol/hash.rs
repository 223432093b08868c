//! The hash dialect of the seed tutorial: text frames `from#body#to`. The body is
//! everything between the first and last `#`. Replies are bare strings (`send success`,
//! `Out Line`); errors and notices start with `!`, which no username can.

use super::{ErrorCode, Event, ProtocolError, Request};
use crate::message::Body;

pub const SEND_SUCCESS: &str = "send success";
pub const OUT_LINE: &str = "Out Line";

/// True when `text` looks like a hash frame rather than JSON.
pub fn looks_like(text: &str) -> bool {
    !text.trim_start().starts_with('{')
}

/// Parses `from#body#to`.
pub fn parse(text: &str) -> Result<Request, ProtocolError> {
    let (Some(first), Some(last)) = (text.find('#'), text.rfind('#')) else {
        return Err(bad());
    };
    if first == last {
        return Err(bad());
    }
    let from = &text[..first];
    let body = &text[first + 1..last];
    let to = &text[last + 1..];
    if from.is_empty() {
        return Err(ProtocolError::new(
            ErrorCode::EmptyField,
            "sender (before the first #) is empty",
        ));
    }
    Ok(Request::Send {
        from: Some(from.to_string()),
        id: None,
        to: to.to_string(),
        body: Body::Text(body.to_string()),
    })
}

fn bad() -> ProtocolError {
    ProtocolError::new(ErrorCode::BadFrame, "expected from#message#to")
}

pub fn format(event: &Event<'_>) -> Option<String> {
    match event {
        Event::FileNotice { msg, meta, url, .. } => Some(format!(
            "{}#{}#{}",
            msg.sender,
            super::file_notice(meta, url),
            msg.recipient
        )),
        Event::Message { msg, .. } => {
            let notice;
            let body = match msg.body.blob_meta() {
                Some(meta) => {
                    notice = super::blob_notice(&meta);
                    &notice
                }
                None => msg.body.as_str(),
            };
            Some(format!("{}#{}#{}", msg.sender, body, msg.recipient))
        }
        // A stored message is answered `Out Line` first: `protocol::format` adds it.
        Event::Sent { .. } => Some(SEND_SUCCESS.to_string()),
        Event::Error(e) => Some(format!("!error#{}#{}", e.code.as_str(), e.message)),
        Event::Kicked(reason) => Some(format!("!kicked#{}#{}", reason.as_str(), reason.message())),
        Event::Welcome { .. }
        | Event::Synced
        | Event::Pong
        | Event::Receipt { .. }
        | Event::BlobAccepted { .. }
        | Event::BlobStart { .. }
        | Event::BlobEnd { .. }
        | Event::BlobAborted { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::StoredMessage;

    #[test]
    fn parses_first_and_last_hash() {
        let r = parse("alice#a#b#c#bob").unwrap();
        assert_eq!(
            r,
            Request::Send {
                from: Some("alice".into()),
                id: None,
                to: "bob".into(),
                body: Body::Text("a#b#c".into())
            }
        );
        let r = parse("alice##bob").unwrap();
        assert!(matches!(r, Request::Send { body: Body::Text(b), .. } if b.is_empty()));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse("hello").unwrap_err().code, ErrorCode::BadFrame);
        assert_eq!(parse("alice#bob").unwrap_err().code, ErrorCode::BadFrame);
        assert_eq!(parse("#hi#bob").unwrap_err().code, ErrorCode::EmptyField);
    }

    #[test]
    fn formats_messages_and_replies() {
        let msg = StoredMessage {
            seq: 1,
            sender: "alice".into(),
            recipient: "bob".into(),
            client_id: None,
            body: Body::Text("x#y".into()),
            accepted_at: 0,
        };
        let ev = Event::Message {
            msg: &msg,
            offline: false,
        };
        assert_eq!(format(&ev).unwrap(), "alice#x#y#bob");
        let e = ProtocolError::new(ErrorCode::MailboxFull, "full");
        assert_eq!(
            format(&Event::Error(&e)).unwrap(),
            "!error#mailbox_full#full"
        );
        assert_eq!(format(&Event::Synced), None);
    }
}
