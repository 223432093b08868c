//! `pigeon chat`: a terminal client on the Pigeon JSON protocol. Type `bob: hello` to
//! send; incoming messages (offline catch-up first) are printed and acknowledged. With a
//! password (`--password` or `PIGEON_PASSWORD`) it logs in with a `login` frame.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: tokio_tungstenite::tungstenite::Error,
    },
    #[error("connection lost: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("terminal: {0}")]
    Io(#[from] std::io::Error),
}

/// Percent-encodes a query value (usernames may be any Unicode letters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Parses a typed line `bob: hello` into (recipient, text).
pub fn parse_line(line: &str) -> Option<(&str, &str)> {
    let (to, text) = line.split_once(':')?;
    let to = to.trim();
    (!to.is_empty()).then_some((to, text.strip_prefix(' ').unwrap_or(text)))
}

/// Renders one server frame for the terminal; returns false when the session is over.
fn render(frame: &Value, out: &mut String) -> bool {
    let s = |k: &str| {
        frame
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    match frame.get("type").and_then(Value::as_str) {
        Some("msg") => {
            let body = match frame.get("body") {
                Some(Value::String(t)) => t.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            let tag = if frame.get("offline") == Some(&Value::Bool(true)) {
                "[offline] "
            } else {
                ""
            };
            *out = format!("{tag}{}: {body}", s("from"));
        }
        Some("welcome") => {
            *out = format!(
                "* logged in as {} ({} waiting)",
                s("user"),
                frame["pending"]
            )
        }
        Some("synced") => *out = "* up to date".into(),
        Some("sent") => *out = format!("* to {}: {}", s("to"), s("status")),
        Some("error") => *out = format!("! {}: {}", s("code"), s("message")),
        Some("kicked") => {
            *out = format!("! {}", s("message"));
            return false;
        }
        _ => out.clear(),
    }
    true
}

async fn print(out: &mut (impl AsyncWrite + Unpin), line: &str) -> Result<(), std::io::Error> {
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await
}

/// Chats as `user`; with a `password` it logs in with a `login` frame (password mode),
/// without one it names itself in the URL (open mode).
pub async fn chat(server: &str, user: &str, password: Option<&str>) -> Result<(), ClientError> {
    let base = server.trim_end_matches('/');
    let url = match password {
        Some(_) => format!("{base}/ws"),
        None => format!("{base}/ws?user={}", encode(user)),
    };
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .map_err(|source| ClientError::Connect {
            url: url.clone(),
            source,
        })?;
    let (mut sink, mut stream) = ws.split();
    if let Some(password) = password {
        let login = json!({"type":"login","user":user,"password":password});
        sink.send(Message::text(login.to_string())).await?;
    }
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut next_id: u64 = 0;
    let mut line_out = String::new();
    print(
        &mut stdout,
        "* type `name: message` to send, Ctrl-D to quit",
    )
    .await?;
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                let Some(line) = line? else { break };
                match parse_line(&line) {
                    Some((to, text)) => {
                        next_id += 1;
                        let frame = json!({"type":"send","id":format!("{}-{next_id}", crate::now_ms()),"to":to,"body":text});
                        sink.send(Message::text(frame.to_string())).await?;
                    }
                    None if line.trim().is_empty() => {}
                    None => print(&mut stdout, "! type `name: message`").await?,
                }
            }
            frame = stream.next() => {
                let Some(frame) = frame else { break };
                let Message::Text(text) = frame? else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                let go_on = render(&v, &mut line_out);
                if !line_out.is_empty() {
                    print(&mut stdout, &line_out).await?;
                }
                if let Some(seq) = v.get("seq").and_then(Value::as_u64).filter(|_| v["type"] == "msg") {
                    sink.send(Message::text(json!({"type":"ack","upto":seq}).to_string())).await?;
                }
                if !go_on {
                    break;
                }
            }
        }
    }
    let _ = sink.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_encoding() {
        assert_eq!(parse_line("bob: hi: there"), Some(("bob", "hi: there")));
        assert_eq!(parse_line("no colon"), None);
        assert_eq!(parse_line(": x"), None);
        assert_eq!(encode("zoë a"), "zo%C3%AB%20a");
    }

    #[test]
    fn renders_offline_messages() {
        let mut out = String::new();
        let v = json!({"type":"msg","from":"bob","body":"yo","offline":true,"seq":1});
        assert!(render(&v, &mut out));
        assert_eq!(out, "[offline] bob: yo");
        assert!(!render(&json!({"type":"kicked","message":"bye"}), &mut out));
    }
}
