//! `pigeon chat`: a terminal client on the Pigeon JSON protocol. Type `bob: hello` to
//! send, `/send bob ./clip.mp4` to send a file; incoming messages (offline catch-up
//! first) are printed and acknowledged, incoming files saved to the download directory.
//! With a password (`--password` or `PIGEON_PASSWORD`) it logs in with a `login` frame.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
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

/// Parses `/send bob ./clip.mp4` into (recipient, path).
pub fn parse_send_file(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("/send ")?.trim_start();
    let (to, path) = rest.split_once(char::is_whitespace)?;
    let path = path.trim();
    (!to.is_empty() && !path.is_empty()).then_some((to, path))
}

/// Where a received file is saved: its base name only (never a path the sender chose),
/// made unique in `dir`.
pub fn save_path(dir: &Path, name: &str, stream: u64) -> PathBuf {
    let base = Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| format!("blob-{stream}"));
    let mut path = dir.join(&base);
    let mut n = 1;
    while path.exists() {
        path = dir.join(format!("{n}-{base}"));
        n += 1;
    }
    path
}

async fn file_sha256(path: &Path) -> Result<(u64, String), std::io::Error> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((
        size,
        h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    ))
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
        Some("blob_start") => {
            let tag = if frame.get("offline") == Some(&Value::Bool(true)) {
                "[offline] "
            } else {
                ""
            };
            *out = format!(
                "{tag}{} is sending {} ({} bytes)",
                s("from"),
                s("name"),
                frame["size"]
            );
        }
        Some("blob_abort") => *out = format!("! transfer stopped: {}", s("reason")),
        Some("blob_accepted") | Some("blob_end") => out.clear(),
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
/// without one it names itself in the URL (open mode). Received files go to `download_dir`.
pub async fn chat(
    server: &str,
    user: &str,
    password: Option<&str>,
    download_dir: &Path,
) -> Result<(), ClientError> {
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
    // Files we announced, by transfer id, waiting for `blob_accepted`.
    let mut uploads: HashMap<String, PathBuf> = HashMap::new();
    // Files arriving, by stream.
    let mut downloads: HashMap<u64, (PathBuf, tokio::fs::File)> = HashMap::new();
    print(
        &mut stdout,
        "* type `name: message` to send, Ctrl-D to quit",
    )
    .await?;
    // Sends and uploads not yet answered; after Ctrl-D the client waits (a little) for
    // them, so the last line typed gets its `sent` before the client quits.
    let mut unanswered: usize = 0;
    let mut quit_by: Option<tokio::time::Instant> = None;
    loop {
        if quit_by.is_some() && unanswered == 0 {
            break;
        }
        let until_quit = async {
            match quit_by {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = until_quit => break,
            line = stdin.next_line(), if quit_by.is_none() => {
                let Some(line) = line? else {
                    quit_by = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(5));
                    continue;
                };
                if let Some((to, path)) = parse_send_file(&line) {
                    match file_sha256(Path::new(path)).await {
                        Ok((size, sha)) => {
                            next_id += 1;
                            let id = format!("{}-f{next_id}", crate::now_ms());
                            let name = Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                            let frame = json!({"type":"blob","id":id,"to":to,"name":name,"mime":"application/octet-stream","size":size,"sha256":sha});
                            uploads.insert(id, PathBuf::from(path));
                            unanswered += 1;
                            sink.send(Message::text(frame.to_string())).await?;
                        }
                        Err(e) => print(&mut stdout, &format!("! cannot read {path}: {e}")).await?,
                    }
                    continue;
                }
                match parse_line(&line) {
                    Some((to, text)) => {
                        next_id += 1;
                        let frame = json!({"type":"send","id":format!("{}-{next_id}", crate::now_ms()),"to":to,"body":text});
                        unanswered += 1;
                        sink.send(Message::text(frame.to_string())).await?;
                    }
                    None if line.trim().is_empty() => {}
                    None => print(&mut stdout, "! type `name: message`").await?,
                }
            }
            frame = stream.next() => {
                let Some(frame) = frame else { break };
                let text = match frame? {
                    Message::Text(t) => t,
                    Message::Binary(b) if b.len() > 4 => {
                        let stream = u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                        if let Some((_, f)) = downloads.get_mut(&stream) {
                            f.write_all(&b[4..]).await?;
                        }
                        continue;
                    }
                    _ => continue,
                };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                let stream = v.get("stream").and_then(Value::as_u64).unwrap_or(0);
                // A send (or upload) is answered by `sent` or by an error carrying its id.
                if v["type"] == "sent" || (v["type"] == "error" && v.get("id").is_some()) {
                    unanswered = unanswered.saturating_sub(1);
                }
                match v["type"].as_str() {
                    Some("blob_accepted") => {
                        if let Some(path) = uploads.remove(v["id"].as_str().unwrap_or("")) {
                            let mut f = tokio::fs::File::open(&path).await?;
                            let mut buf = vec![0u8; 4 + 256 * 1024];
                            buf[..4].copy_from_slice(&(stream as u32).to_be_bytes());
                            loop {
                                let n = f.read(&mut buf[4..]).await?;
                                if n == 0 {
                                    break;
                                }
                                sink.send(Message::binary(buf[..4 + n].to_vec())).await?;
                            }
                        }
                    }
                    Some("blob_start") => {
                        let path = save_path(download_dir, v["name"].as_str().unwrap_or(""), stream);
                        let file = tokio::fs::File::create(&path).await?;
                        downloads.insert(stream, (path, file));
                    }
                    Some("blob_end") => {
                        if let Some((path, mut f)) = downloads.remove(&stream) {
                            f.flush().await?;
                            print(&mut stdout, &format!("* saved {}", path.display())).await?;
                        }
                    }
                    Some("blob_abort") => {
                        if let Some((path, f)) = downloads.remove(&stream) {
                            drop(f);
                            let _ = tokio::fs::remove_file(&path).await;
                        }
                    }
                    _ => {}
                }
                let go_on = render(&v, &mut line_out);
                if !line_out.is_empty() {
                    print(&mut stdout, &line_out).await?;
                }
                if let Some(seq) = v.get("seq").and_then(Value::as_u64).filter(|_| v["type"] == "msg" || v["type"] == "blob_end") {
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
        assert_eq!(
            parse_send_file("/send bob ./a b.mp4"),
            Some(("bob", "./a b.mp4"))
        );
        assert_eq!(parse_send_file("/send bob"), None);
    }

    #[test]
    fn received_files_never_escape_the_download_dir() {
        let dir = std::env::temp_dir();
        assert_eq!(
            save_path(&dir, "../../etc/passwd", 1).parent(),
            Some(dir.as_path())
        );
        assert_eq!(save_path(&dir, "", 7).file_name().unwrap(), "blob-7");
        assert_eq!(save_path(&dir, "..", 8).file_name().unwrap(), "blob-8");
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
