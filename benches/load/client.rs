//! The WebSocket client side shared by the scenarios: connecting (from a chosen source
//! address), logging in in either dialect, and small helpers for what comes back.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;
fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
}

pub async fn connect(addr: SocketAddr, path: &str, source: Option<IpAddr>) -> Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}{path}");
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(client_ws_config())).await?;
    Ok(ws)
}

/// Logs `user` in and fails with `what` unless its `welcome` says nothing is pending.
pub async fn expect_empty_mailbox(addr: SocketAddr, user: &str, what: &str) -> Result<()> {
    let mut ws = connect(addr, &format!("/ws?user={user}"), None).await?;
    while let Some(frame) = ws.next().await {
        if let Message::Text(t) = frame? {
            let t = t.as_str();
            if t.contains(r#""type":"welcome""#) {
                if !t.contains(r#""pending":0"#) {
                    bail!("{what}: {t}");
                }
                return Ok(());
            }
        }
    }
    bail!("{user}: socket ended before the welcome")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Hash,
    Json,
    /// Pigeon JSON whose sends carry no `id` (their retries are not recognised, so a
    /// message to an online user takes the live path; with an id it is written first).
    JsonNoId,
}

/// Opens a session for `user`: hash sessions identify with a message to themselves and
/// wait for it to come back; Pigeon JSON sessions log in by query and wait for `synced`.
pub async fn open_session(
    addr: SocketAddr,
    user: &str,
    dialect: Dialect,
    source: Option<IpAddr>,
) -> Result<Ws> {
    let (path, hello) = match dialect {
        Dialect::Hash => ("/ws".to_string(), Some(format!("{user}#hello#{user}"))),
        Dialect::Json | Dialect::JsonNoId => (format!("/ws?user={user}"), None),
    };
    let mut ws = connect(addr, &path, source).await?;
    if let Some(h) = &hello {
        ws.send(Message::text(h.clone())).await?;
    }
    let deadline = Duration::from_secs(30);
    loop {
        let frame = tokio::time::timeout(deadline, ws.next())
            .await
            .with_context(|| format!("{user}: no answer to the login"))?;
        let Some(frame) = frame else {
            bail!("{user}: closed during login")
        };
        if let Message::Text(t) = frame? {
            let t = t.as_str();
            let done = match &hello {
                Some(h) => t == h,
                None => t.contains("\"synced\""),
            };
            if done {
                return Ok(ws);
            }
            if t.starts_with('!') || t.contains("\"error\"") {
                bail!("{user}: login refused: {t}");
            }
        }
    }
}

pub fn new_hist() -> Histogram<u64> {
    // 1 µs to 100 s, 3 significant digits; record() saturates beyond.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("static bounds")
}

pub fn seq_of(t: &str) -> Option<u64> {
    let rest = &t[t.find(r#""seq":"#)? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}
